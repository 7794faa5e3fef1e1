"""The feature reference of a WSNet: what its features look like on the data it trained on.

:mod:`napari_wscovid.reliability` scores every scan by the Mahalanobis distance of its lung
slices' pooled features from this reference. The reference is made from the network's own
training stream (synthetic lesions painted into the real lungs it trained on, every class), run
through the plugin's ``detect`` so the features are exactly those a user's scan gets; the
covariance is shrunk (Ledoit-Wolf, scikit-learn) because a few hundred slices do not fix 256
dimensions.

The threshold is set on **held-out real chest CTs** (never trained on): a margin above the
largest of their scores, so that the real chest scans the model was checked on pass, and what
lies well beyond them (another modality, a display image, an unfamiliar protocol) is flagged::

    python -m training.feature_reference --weights napari_wscovid/models/weights/wsnet-3class.safetensors \\
        --backgrounds runs/backgrounds --trained-on P001,normal001,LIDC-IDRI-0001 \\
        --held-out cap001,LIDC-IDRI-0003,Lung_Dx-A0001 --data ../shared/data

writes ``<weights stem>.reference.safetensors`` beside the weights and prints every score.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("training.feature_reference")

#: Threshold = this factor times the largest held-out real chest CT's score.
MARGIN = 1.25


def slice_features(volume, weights, lung_mask=None) -> np.ndarray:
    """Pooled deepest features of the lung slices of ``volume``, as ``detect`` computes them."""
    from napari_wscovid import detect

    result = detect(volume, model=str(weights), lung_mask=lung_mask, saliency="none", device="cpu")
    if result.slice_features is None:
        raise ValueError(f"{Path(weights).name}: this network gives no pooled features (WSNet only)")
    return result.slice_features


def build_reference(
    weights: str | Path,
    backgrounds,
    held_out_volumes: dict,
    *,
    cases_per_class: int = 2,
    seed: int = 0,
    margin: float = MARGIN,
):
    """Fit the reference on synthetic cases in ``backgrounds`` and set its threshold on
    ``held_out_volumes`` (name -> CTVolume). Returns the reference and every scan's score."""
    from sklearn.covariance import LedoitWolf

    from napari_wscovid.models.registry import file_sha256
    from napari_wscovid.reliability import FeatureReference
    from training.synthesis import synthesize

    per_case: dict[str, np.ndarray] = {}
    for i, bg in enumerate(backgrounds):
        for k, kind in enumerate(("NP", "CAP", "COVID-19")):
            for j in range(cases_per_class):
                case = synthesize(bg, kind, seed=seed + 1000 * i + 10 * j + k)
                name = f"{bg.patient_id}-{kind}-{j}"
                per_case[name] = slice_features(case.volume, weights, case.lung_mask)
                log.info("features of %s: %d slices", name, len(per_case[name]))
    stacked = np.concatenate(list(per_case.values()))
    shrunk = LedoitWolf().fit(stacked)
    provisional = FeatureReference(shrunk.location_, shrunk.precision_, np.inf, file_sha256(weights), "")
    scores = {"training": {k: provisional.scan_score(v) for k, v in per_case.items()}, "held_out": {}}
    for name, volume in held_out_volumes.items():
        scores["held_out"][name] = provisional.scan_score(slice_features(volume, weights))
        log.info("held-out %s: score %.2f", name, scores["held_out"][name])
    if not scores["held_out"]:
        raise ValueError("the threshold is set on held-out real chest CTs: give at least one")
    threshold = margin * max(scores["held_out"].values())
    description = (
        f"{len(stacked)} lung slices of {len(per_case)} synthetic cases in the real lungs of "
        f"{', '.join(sorted({b.patient_id for b in backgrounds}))}; threshold {margin:g} x the largest score "
        f"of the held-out real chest CTs {', '.join(sorted(held_out_volumes))}"
    )
    reference = FeatureReference(
        provisional.mean, provisional.precision, threshold, provisional.weights_sha256, description
    )
    return reference, scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument(
        "--backgrounds", required=True, help="real-background cache (training.real_backgrounds)"
    )
    parser.add_argument("--trained-on", required=True, help="comma-separated patients the weights trained on")
    parser.add_argument("--held-out", required=True, help="comma-separated real patients never trained on")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--cases-per-class", type=int, default=2)
    parser.add_argument("--out", default=None, help="default: beside the weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from napari_wscovid import load_ct
    from napari_wscovid.reliability import reference_path
    from training.real_backgrounds import PATIENTS_BY_ID, load_backgrounds

    trained = [p.strip() for p in args.trained_on.split(",") if p.strip()]
    held = [p.strip() for p in args.held_out.split(",") if p.strip()]
    if set(trained) & set(held):
        raise SystemExit(f"patients both trained on and held out: {sorted(set(trained) & set(held))}")
    backgrounds = load_backgrounds(args.backgrounds, patient_ids=trained)
    volumes = {p: load_ct(str(Path(args.data) / PATIENTS_BY_ID[p].path)) for p in held}
    reference, scores = build_reference(
        args.weights, backgrounds, volumes, cases_per_class=args.cases_per_class
    )
    out = Path(args.out) if args.out else reference_path(args.weights)
    reference.save(out)
    print(json.dumps({"reference": str(out), "threshold": reference.threshold, "scores": scores}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
