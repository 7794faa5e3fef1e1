"""Do FeCNN's lesion clusters separate ground-glass from consolidation? (Wu et al. 2021, Table 7.)

For every lesion the lesion branch finds (``napari_wscovid.methods.fecnn``), the true type is
read from a mask at the lesion's peak: on synthetic phantoms (``lesion_mask``: GGO and crazy
paving count as GGO, consolidation as consolidation, nodules are left out) and on the MedSeg
slices of Inf-Net (``infection_multiclass``: 1 = GGO, 2 = consolidation). A peak outside every
lesion takes the type most of its box's lesion pixels have; a box without lesion pixels is a
false detection and is counted, not typed. All lesions of a data set are clustered together by
k-means on their C5 feature vectors (as the paper clusters a data set's lesions), each cluster
is matched to the type it mostly holds, and per cluster the script prints

- sensitivity: the lesions of the matched type that are in the cluster / all of that type;
- specificity: the lesions of other types outside the cluster / all of other types;
- purity: the lesions of the matched type in the cluster / the cluster's size (what the paper's
  Table 7 calls sensitivity: 51/54 is its GGO column).

Run: ``python scripts/lesion_type_clusters.py --model runs/fecnn/fecnn-covid.safetensors``
(a weights file or a registry name). The MedSeg part is skipped, with a message, when its
folder is absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MEDSEG = REPO_ROOT.parent / "shared" / "data" / "medseg-infnet" / "train_doctor_label"
TYPES = ("GGO", "consolidation")
# mask value -> type index: phantom 1 GGO, 3 crazy paving (GGO with septa), 2 consolidation
PHANTOM_TYPES = {1: 0, 3: 0, 2: 1}
MEDSEG_TYPES = {1: 0, 2: 1}

log = logging.getLogger("lesion_type_clusters")


def lesion_truth(lesions, boxes, lesion_mask: np.ndarray, type_of: dict[int, int]) -> list[int]:
    """Type index of each lesion (-1: not on any lesion of a known type)."""
    out = []
    for les, box in zip(lesions, boxes, strict=True):
        value = int(lesion_mask[les.slice, les.y, les.x])
        if value in type_of:
            out.append(type_of[value])
            continue
        region = lesion_mask[box.slice, box.y0 : box.y1, box.x0 : box.x1]
        counts = np.bincount(
            [type_of[v] for v in region.ravel().tolist() if v in type_of], minlength=len(TYPES)
        )
        out.append(int(np.argmax(counts)) if counts.sum() else -1)
    return out


def _detect(volume, lung_mask, net, info, k: int, saliency: str):
    import torch

    from napari_wscovid.methods.fecnn import detect_iter
    from napari_wscovid.pipeline import run_to_end

    device = next(net.parameters()).device
    return run_to_end(
        detect_iter(
            volume,
            net,
            info,
            lung_mask=lung_mask,
            torch_device=torch.device(device),
            n_lesion_types=k,
            saliency=saliency,
        )
    )


def phantom_lesions(net, info, *, n: int, size: int, n_slices: int, seed: int, k: int, saliency: str) -> dict:
    """Features, density and true type of the lesions found on ``n`` COVID-19 phantoms."""
    from napari_wscovid.phantom import make_phantom

    rows = _empty()
    for i in range(n):
        ph = make_phantom("COVID-19", n_slices=n_slices, size=size, seed=seed + i)
        result = _detect(ph.volume, ph.lung_mask, net, info, k, saliency)
        _collect(rows, result, lesion_truth(result.lesions, result.boxes, ph.lesion_mask, PHANTOM_TYPES))
        log.info(
            "phantom %d/%d: %d positive slices, %d lesions",
            i + 1,
            n,
            len(result.saliency_slices),
            len(result.lesions),
        )
    return rows


def medseg_lesions(net, info, root: Path, *, k: int, saliency: str) -> dict:
    """The same for the MedSeg slices (8-bit images; the plugin's 2-D path finds the lungs)."""
    from PIL import Image

    from napari_wscovid.io import load_ct
    from napari_wscovid.lung import segment_lungs
    from napari_wscovid.pipeline import lung_slices

    rows = _empty()
    images = sorted(
        (root / "images").glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem
    )
    for path in images:
        mask_path = root / "infection_multiclass" / f"{path.stem}.png"
        if not mask_path.is_file():
            log.warning("%s has no infection_multiclass mask; skipped", path.name)
            continue
        volume = load_ct(path)
        lung = segment_lungs(volume)
        if not len(lung_slices(lung, volume.spacing)):
            # The crops are of the chest; as in training (plugin_image_input), a picture in which
            # no lung is found is used whole.
            lung = np.ones(volume.shape, dtype=np.uint8)
            rows["whole_image"] += 1
        with Image.open(mask_path) as im:
            mask = np.asarray(im)[None]
        if mask.shape != volume.shape:
            log.warning("%s: mask %s differs from the image %s; skipped", path.name, mask.shape, volume.shape)
            continue
        result = _detect(volume, lung, net, info, k, saliency)
        if not len(result.saliency_slices):
            rows["not_explained"] += 1
        _collect(rows, result, lesion_truth(result.lesions, result.boxes, mask, MEDSEG_TYPES))
    rows["images"] = len(images)
    return rows


def _empty() -> dict:
    return {"features": [], "density": [], "truth": [], "not_explained": 0, "whole_image": 0}


def _collect(rows: dict, result, truth: list[int]) -> None:
    rows["features"] += [np.asarray(les.features, np.float32) for les in result.lesions]
    rows["density"] += list(result.lesion_types.get("lesion_density", []))
    rows["truth"] += truth


def evaluate_clusters(features, density, truth, k: int) -> dict:
    """Cluster all typed lesions together and score each cluster against its majority type."""
    from napari_wscovid.methods.fecnn import cluster_lesions, order_by_density, type_names

    truth = np.asarray(truth, dtype=int)
    typed = truth >= 0
    out = {"n_lesions": int(len(truth)), "n_untyped": int((~typed).sum())}
    if typed.sum() < 2:
        return {**out, "k": 0, "clusters": [], "confusion": []}
    x = np.stack([f for f, t in zip(features, typed, strict=True) if t])
    clusters = order_by_density(cluster_lesions(x, k), np.asarray(density, float)[typed])
    labels, y = clusters["labels"], truth[typed]
    confusion = np.zeros((len(TYPES), clusters["k"]), dtype=int)
    np.add.at(confusion, (y, labels), 1)
    rows = []
    for c, name in enumerate(type_names(clusters["k"])):
        in_c = labels == c
        t = int(np.argmax(confusion[:, c]))
        tp = int((in_c & (y == t)).sum())
        tn = int((~in_c & (y != t)).sum())
        rows.append(
            {
                "cluster": c,
                "name": name,
                "n": int(in_c.sum()),
                "matched_type": TYPES[t],
                "sensitivity": tp / max(int((y == t).sum()), 1),
                "specificity": tn / int((y != t).sum()) if (y != t).any() else float("nan"),
                "purity": tp / max(int(in_c.sum()), 1),
                "mean_density": float(clusters["mean_density"][c]),
            }
        )
    return {**out, "k": clusters["k"], "clusters": rows, "confusion": confusion.tolist()}


def format_report(title: str, res: dict, note: str = "") -> str:
    lines = [f"## {title}", ""]
    if note:
        lines += [note, ""]
    lines.append(
        f"{res['n_lesions']} lesions, {res['n_untyped']} not on a GGO/consolidation lesion (left out)"
    )
    if not res["clusters"]:
        return "\n".join([*lines, "", "too few typed lesions to cluster", ""])
    k = res["k"]
    lines += [
        "",
        "| true type \\ cluster | "
        + " | ".join(f"{r['cluster']} {r['name']}" for r in res["clusters"])
        + " |",
        "|---" * (k + 1) + "|",
    ]
    for t, counts in zip(TYPES, res["confusion"], strict=True):
        lines.append(f"| {t} | " + " | ".join(str(v) for v in counts) + " |")
    lines += [
        "",
        "| cluster | n | mean density | matched type | sensitivity | specificity | purity |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["clusters"]:
        lines.append(
            f"| {r['cluster']} {r['name']} | {r['n']} | {r['mean_density']:.1f} | {r['matched_type']} | "
            f"{r['sensitivity']:.3f} | {r['specificity']:.3f} | {r['purity']:.3f} |"
        )
    return "\n".join([*lines, ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="FeCNN weights file or registry name")
    parser.add_argument("--k", type=int, default=2, help="number of lesion types (the paper: 2 on CNCB)")
    parser.add_argument("--phantoms", type=int, default=6, help="COVID-19 phantoms to generate (0: none)")
    parser.add_argument("--phantom-size", type=int, default=256)
    parser.add_argument("--phantom-slices", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1000, help="first phantom seed (away from training's)")
    parser.add_argument(
        "--medseg", type=Path, default=DEFAULT_MEDSEG, help="Inf-Net train_doctor_label folder"
    )
    parser.add_argument(
        "--saliency",
        choices=("positive", "all"),
        default="positive",
        help="lesions on slices predicted COVID-19 only (the paper) or on every lung slice",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from napari_wscovid.models.registry import load_model

    torch.set_num_threads(args.threads)
    net, info = load_model(args.model, device=args.device)
    if info["architecture"] != "fecnn-wu2021":
        parser.error(f"{args.model} is a {info['architecture']} network, not FeCNN (fecnn-wu2021)")
    report = {"model": {k: info.get(k) for k in ("name", "version", "sha256")}, "k": args.k}
    sections = []
    if args.phantoms:
        start = time.perf_counter()
        rows = phantom_lesions(
            net,
            info,
            n=args.phantoms,
            size=args.phantom_size,
            n_slices=args.phantom_slices,
            seed=args.seed,
            k=args.k,
            saliency=args.saliency,
        )
        res = evaluate_clusters(rows["features"], rows["density"], rows["truth"], args.k)
        report["phantoms"] = {**res, "seconds": time.perf_counter() - start}
        sections.append(
            format_report(
                f"Phantoms ({args.phantoms} COVID-19, {args.phantom_size} px, {args.phantom_slices} slices)",
                res,
                "Density: mean HU of each lesion region.",
            )
        )
    if args.medseg.is_dir():
        start = time.perf_counter()
        rows = medseg_lesions(net, info, args.medseg, k=args.k, saliency=args.saliency)
        res = evaluate_clusters(rows["features"], rows["density"], rows["truth"], args.k)
        report["medseg"] = {
            **res,
            "images": rows["images"],
            "whole_image": rows["whole_image"],
            "not_explained": rows["not_explained"],
            "seconds": time.perf_counter() - start,
        }
        sections.append(
            format_report(
                f"MedSeg / Inf-Net ({args.medseg.name}, {rows['images']} slices)",
                res,
                f"8-bit images (density: mean display intensity). No lung found on {rows['whole_image']} "
                f"images (used whole); {rows['not_explained']} images had no slice predicted COVID-19.",
            )
        )
    else:
        log.warning("MedSeg folder %s is absent: real-data part skipped", args.medseg)
        sections.append(f"## MedSeg\n\nskipped: {args.medseg} is absent\n")
    print(f"# Lesion types of {report['model']['name']} (k = {args.k})\n")
    print("\n".join(sections))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
