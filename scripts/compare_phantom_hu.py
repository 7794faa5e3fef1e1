"""Compare HU statistics and appearance of the synthetic phantom with real chest CT.

Reads the COVID-CT-MD sample series (../shared/data/covid-ct-md/sample_data) with
SimpleITK, builds an approximate lung mask on them (air-like voxels inside the
body, not touching the border), and prints HU percentiles of lung and soft tissue
beside those of phantoms of each kind measured with their exact masks, lesions
included. Writes ``docs/phantom_vs_real.png`` with lung-window slices and the
histograms.

Usage::

    python scripts/compare_phantom_hu.py [--data DIR] [--out docs/phantom_vs_real.png] [--size 512]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_wscovid.phantom import LESION_LABELS, make_phantom

log = logging.getLogger("compare_phantom_hu")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "covid-ct-md" / "sample_data"
SERIES = {
    "P001": "COVID-19 subjects/P001",
    "cap001": "Cap subjects/cap001",
    "normal001": "Normal subjects/normal001",
}
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
LUNG_WINDOW = (-1350, 150)


def read_series(folder: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """HU array (z, y, x), z increasing superior, and (z, y, x) spacing of one DICOM series."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(names)
    image = reader.Execute()
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if direction[2, 2] < 0:  # keep index z increasing towards the head
        hu = hu[::-1]
    sx, sy, sz = image.GetSpacing()
    return hu, (sz, sy, sx)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: the largest dense component, with its holes (lungs) filled per slice."""
    dense = ndimage.binary_opening(hu > -500, iterations=2)
    lab, n = ndimage.label(dense)
    if n == 0:
        return dense
    sizes = ndimage.sum_labels(dense, lab, index=np.arange(1, n + 1))
    body = lab == (1 + int(np.argmax(sizes)))
    return np.stack([ndimage.binary_fill_holes(s) for s in body])


def approximate_lungs(hu: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Air-like voxels inside the body: the two largest components not touching the border."""
    air = (hu < -400) & body
    lab, n = ndimage.label(air)
    if n == 0:
        return air
    border = np.unique(
        np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()])
    )
    sizes = ndimage.sum_labels(air, lab, index=np.arange(1, n + 1))
    sizes[border[border > 0] - 1] = 0
    keep = np.argsort(sizes)[::-1][:2] + 1
    keep = keep[sizes[keep - 1] > 0.05 * sizes.max()]
    return np.isin(lab, keep)


def percentiles(values: np.ndarray) -> list[float]:
    if values.size == 0:
        return [float("nan")] * len(PERCENTILES)
    return [float(v) for v in np.percentile(values, PERCENTILES)]


def measure(name: str, hu: np.ndarray, lung: np.ndarray, body: np.ndarray, rows: list, hists: dict) -> None:
    soft = body & (hu >= -100) & (hu <= 200)
    rows.append((name, "lung", int(lung.sum()), percentiles(hu[lung])))
    rows.append((name, "soft tissue", int(soft.sum()), percentiles(hu[soft])))
    hists[name] = (hu[lung], hu[soft])


def lung_slice(lung: np.ndarray, frac: float) -> int:
    """Axial index at ``frac`` of the lung's cranio-caudal extent (0 = base)."""
    zs = np.nonzero(lung.any(axis=(1, 2)))[0]
    return int(zs.min() + frac * (zs.max() - zs.min()))


def coronal(hu: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Coronal slice through the centre of the lungs, head up."""
    ys = np.nonzero(lung.any(axis=(0, 2)))[0]
    return hu[::-1, int(0.5 * (ys.min() + ys.max())), :]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "phantom_vs_real.png")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows: list = []
    hists: dict = {}
    views: dict = {}
    for name, rel in SERIES.items():
        folder = args.data / rel
        if not folder.is_dir():
            log.warning("missing %s, skipped", folder)
            continue
        hu, sp = read_series(folder)
        body = body_mask(hu)
        lung = approximate_lungs(hu, body)
        measure(name, hu, lung, body, rows, hists)
        views[name] = (hu, lung, sp)

    for kind in ("COVID-19", "CAP", "NP"):
        ph = make_phantom(kind, seed=args.seed, size=args.size, nodules=kind == "NP")
        hu = ph.volume.hu.astype(np.float32)
        body = body_mask(hu)
        healthy = (ph.lung_mask > 0) & (ph.lesion_mask == 0)
        name = f"phantom {kind}"
        measure(name, hu, healthy, body, rows, hists)
        approx = approximate_lungs(hu, body)
        rows.append((name, "lung (approx. mask)", int(approx.sum()), percentiles(hu[approx])))
        for code, lname in LESION_LABELS.items():
            sel = ph.lesion_mask == code
            if sel.any():
                rows.append((name, f"lesion {lname}", int(sel.sum()), percentiles(hu[sel])))
        views[name] = (hu, ph.lung_mask > 0, ph.volume.spacing)

    header = f"{'series':<18} {'region':<22} {'voxels':>9} " + " ".join(f"p{p:<5}" for p in PERCENTILES)
    lines = [header, "-" * len(header)]
    for name, region, count, pct in rows:
        lines.append(f"{name:<18} {region:<22} {count:>9} " + " ".join(f"{v:6.0f}" for v in pct))
    print("\n".join(lines))
    figure(views, hists, args.out)
    print(f"wrote {args.out}")


def figure(views: dict, hists: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [("phantom COVID-19", "P001"), ("phantom CAP", "cap001"), ("phantom NP", "normal001")]
    fig, axes = plt.subplots(4, 4, figsize=(20, 20))
    for row, pair in enumerate(pairs):
        for col, name in enumerate(pair):
            ax_axial, ax_cor = axes[row, 2 * col], axes[row, 2 * col + 1]
            if name not in views:
                ax_axial.set_axis_off()
                ax_cor.set_axis_off()
                continue
            hu, lung, sp = views[name]
            k = lung_slice(lung, 0.3)
            ax_axial.imshow(hu[k], cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1])
            ax_axial.set_title(f"{name}: axial {k} (lower zone)")
            ax_cor.imshow(
                coronal(hu, lung), cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], aspect=sp[0] / sp[2]
            )
            ax_cor.set_title(f"{name}: coronal")
            ax_axial.set_axis_off()
            ax_cor.set_axis_off()
    bins = np.arange(-1024, 301, 8)
    for col, (idx, title) in enumerate(((0, "lung HU"), (1, "soft tissue HU (-100..200, in body)"))):
        ax = axes[3, 2 * col]
        for name, (lung_hu, soft_hu) in hists.items():
            vals = (lung_hu, soft_hu)[idx]
            if vals.size:
                ax.hist(
                    vals,
                    bins=bins,
                    density=True,
                    histtype="step",
                    label=name,
                    linestyle="-" if name.startswith("phantom") else "--",
                )
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.set_xlim((-1024, 0) if idx == 0 else (-120, 220))
    for name, col in (("phantom COVID-19", 1), ("P001", 3)):
        ax = axes[3, col]
        if name in views:
            hu, lung, _ = views[name]
            k = lung_slice(lung, 0.3)
            ys, xs = np.nonzero(lung[k])
            crop = hu[k, ys.min() : ys.max(), xs.min() : (xs.min() + xs.max()) // 2]
            ax.imshow(crop, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1])
            ax.set_title(f"{name}: right lung, full resolution")
        ax.set_axis_off()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=70)
    plt.close(fig)


if __name__ == "__main__":
    main()
