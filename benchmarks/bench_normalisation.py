"""Which intensity normalisation standardises the model input best? (sets DEFAULT_NORMALISATION)

For each method, the spread (standard deviation across images) of

* ``lung``: the normalised median of the lung parenchyma, and
* ``contrast``: normalised soft-tissue median (-100..100 HU outside the lungs) minus ``lung``
  (for phantoms: lesion median minus the median of the rest of the lungs),

over four groups of images; lower spread = better standardisation:

* ``series``: the three real COVID-CT-MD series (COVID-19, CAP, normal). Their lungs really
  differ (disease raises density), so part of this spread is signal, not nuisance;
* ``offsets``: the normal series shifted by -40, 0 and +40 HU (a miscalibrated scanner);
* ``nuisance``: the normal series as is, with contrast-enhanced lung vessels (+250 HU), and
  with a lung mask grown by 4 voxels into the chest wall (the lung median is always measured
  on the original mask);
* ``syntaxes``: one CT slice in 16 DICOM transfer syntaxes (the lossy ones shift intensities);
* ``phantoms``: ``napari_wscovid.phantom.make_phantom`` at three seeds, when it exists.

Lungs come from a crude threshold (< -400 HU inside the body, two largest components).
Run from the repository root (reads ../shared/data)::

    python benchmarks/bench_normalisation.py
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_wscovid.preprocess import PADDING_HU, intensity_range

logger = logging.getLogger("bench_normalisation")
DATA = Path(os.environ.get("WSCOVID_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
METHODS = {
    "window(-1350,150)": {"method": "window"},
    "sliding W(1500,10) lung": {"method": "sliding", "q": 1500, "s": 10, "stats": "lung"},
    "sliding W(1000,10) lung": {"method": "sliding", "q": 1000, "s": 10, "stats": "lung"},
    "sliding W(1500,10) body": {"method": "sliding", "q": 1500, "s": 10, "stats": "body"},
}


def read_series(folder: Path) -> np.ndarray:
    """HU volume (z, y, x) with SimpleITK/GDCM (decodes the JPEG-lossless files)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute()).astype(np.float32)


def read_slice(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)


def crude_masks(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lung, body) masks: body = largest > -500 HU component filled; lung = dark inside it."""
    body = hu > -500
    labels, n = ndimage.label(body)
    if n:
        sizes = ndimage.sum(body, labels, range(1, n + 1))
        body = labels == (1 + int(np.argmax(sizes)))
    body = np.stack([ndimage.binary_fill_holes(s) for s in body])
    lung = body & (hu < -400) & (hu > PADDING_HU)
    # In-plane only, so a single slice (the transfer-syntax file) is not eroded away in z.
    lung = ndimage.binary_opening(lung, structure=ndimage.generate_binary_structure(2, 1)[None], iterations=2)
    labels, n = ndimage.label(lung)
    if n > 2:
        sizes = ndimage.sum(lung, labels, range(1, n + 1))
        keep = 1 + np.argsort(sizes)[-2:]
        lung = np.isin(labels, keep)
    return lung, body


def measure(hu, lung, body, target=None, stats_lung=None) -> dict[str, tuple[float, float]]:
    """method -> (normalised lung median, target minus lung contrast).

    ``target`` is soft tissue (-100..100 HU outside the lungs) unless given (phantom lesions);
    with a target inside the lungs the lung median is taken over the rest of the lungs.
    ``stats_lung`` replaces ``lung`` for the sliding window's statistics only.
    """
    if target is None:
        target = body & ~ndimage.binary_dilation(lung, iterations=3) & (hu > -100) & (hu < 100)
        lung_med = float(np.median(hu[lung]))
    else:
        lung_med = float(np.median(hu[lung & ~target]))
    soft_med = float(np.median(hu[target]))
    out = {}
    for name, spec in METHODS.items():
        stats = {"lung": lung if stats_lung is None else stats_lung, "body": body}.get(spec.get("stats"))
        r = intensity_range(hu, spec["method"], q=spec.get("q", 1500), s=spec.get("s", 10), stats_mask=stats)

        def norm(v, r=r):
            return float(np.clip((v - r.lo) / (r.hi - r.lo), 0, 1))

        out[name] = (norm(lung_med), norm(soft_med) - norm(lung_med))
    return out


def groups(data: Path):
    """Yield (group, label, hu, lung, body, target, stats_lung) for every image set that is present."""
    root = data / "covid-ct-md" / "sample_data"
    series = sorted(p.parent for p in root.glob("*/*/*.dcm"))
    series = sorted(set(series))
    normal = None
    for folder in series:
        hu = read_series(folder)
        lung, body = crude_masks(hu)
        logger.info("%s: %s, lung %.1f%% of voxels", folder.name, hu.shape, 100 * lung.mean())
        yield "series", folder.name, hu, lung, body, None, None
        if "normal" in folder.name.lower():
            normal = (hu, lung, body)
    if normal is not None:
        hu, lung, body = normal
        # Soft tissue chosen once on the unshifted image, so only the offset changes.
        soft = body & ~ndimage.binary_dilation(lung, iterations=3) & (hu > -100) & (hu < 100)
        for shift in (-40, 0, 40):
            yield "offsets", f"normal{shift:+d}HU", hu + shift, lung, body, soft, None
        # Contrast agent: lung vessels (> 0 HU) enhanced by +250 HU; the parenchyma is unchanged.
        enhanced = hu + 250 * (lung & (hu > 0))
        yield "nuisance", "vessels+250HU", enhanced, lung, body, soft, None
        # A sloppy lung mask that takes in the chest wall (grown by 4 voxels in-plane).
        grown = ndimage.binary_dilation(
            lung, structure=ndimage.generate_binary_structure(2, 1)[None], iterations=4
        )
        yield "nuisance", "mask+4vox", hu, lung, body, soft, grown
        yield "nuisance", "reference", hu, lung, body, soft, None
    syntaxes = data / "dicom-robustness" / "cornerstone_ctimage_transfer_syntaxes"
    files = sorted(syntaxes.glob("*.dcm"))
    if files:
        reference = read_slice(syntaxes / "CTImage.dcm")
        lung, body = crude_masks(reference)  # same geometry for every variant
        for path in files:
            try:
                yield "syntaxes", path.name.split("_")[-1][:-4], read_slice(path), lung, body, None, None
            except RuntimeError as exc:
                logger.warning("%s: not decoded (%s)", path.name, exc)
    try:
        from napari_wscovid.phantom import make_phantom
    except ImportError:
        logger.info("napari_wscovid.phantom not available: no phantom group")
        return
    for seed in range(3):
        phantom = make_phantom("COVID-19", n_slices=24, size=256, seed=seed)
        hu = phantom.volume.hu.astype(np.float32)
        lung = phantom.lung_mask > 0
        _, body = crude_masks(hu)
        yield "phantoms", f"seed{seed}", hu, lung, body, lung & (phantom.lesion_mask > 0), None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows: dict[str, dict[str, list]] = {}
    for group, label, hu, lung, body, target, stats_lung in groups(args.data):
        for method, value in measure(hu, lung, body, target, stats_lung).items():
            rows.setdefault(group, {}).setdefault(method, []).append(value)
        logger.debug("%s %s done", group, label)
    header = (
        f"{'group':9s} {'method':26s} {'n':>2s} {'lung mean':>9s} {'lung std':>9s} "
        f"{'contr mean':>10s} {'contr std':>9s}"
    )
    lines = [header, "-" * len(header)]
    for group, by_method in rows.items():
        for method, values in by_method.items():
            v = np.asarray(values)
            lines.append(
                f"{group:9s} {method:26s} {len(v):2d} {v[:, 0].mean():9.4f} {v[:, 0].std():9.4f} "
                f"{v[:, 1].mean():10.4f} {v[:, 1].std():9.4f}"
            )
    lines += ["", "sum of the spreads (lung std + contrast std over all groups):"]
    for method in METHODS:
        total = sum(np.asarray(by[method]).std(axis=0).sum() for by in rows.values() if method in by)
        lines.append(f"  {method:26s} {total:.4f}")
    logger.info("\n%s", "\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
