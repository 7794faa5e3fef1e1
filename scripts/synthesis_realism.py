"""How real do the synthetic lesions look? A figure, HU-histogram distances and a patch classifier.

Real lesions: COVID-CT-MD labels slices, not voxels, so real patches are centred on the broad
opacities (see ``scripts/lesion_intensities.py``) of the infected slices of P001 and cap001.
Synthetic lesions: components of the exact lesion mask of cases painted into the lesion-free
slices of the same two patients, so that patient, scanner and noise are shared.

* **HU histograms**: the 1-D Wasserstein distance between real and synthetic opacity HU (and,
  for scale, between the two real patients).
* **Real vs synthetic patch classifier**: 48 mm patches described by an HU histogram, GLCM
  texture (scikit-image) and gradient statistics; a random forest, cross-validated with patients
  as groups (a patch is never judged by a forest that saw its patient). AUC 0.5 means the two
  cannot be told apart.
* **Figure** ``docs/synthesis_real_vs_synthetic.png``: real lesions (top) beside synthetic ones.

    python -m scripts.synthesis_realism --backgrounds runs/backgrounds --out docs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.stats import wasserstein_distance
from skimage.feature import graycomatrix, graycoprops

from scripts.lesion_intensities import broad_opacity
from training.real_backgrounds import load_backgrounds
from training.synthesis import synthesize

PATCH_MM = 48.0
HIST_EDGES = np.linspace(-1000, 200, 25)


def _patch(img, centre, half):
    y, x = centre
    pad = np.pad(img, half, mode="constant", constant_values=-1000)
    return pad[y : y + 2 * half, x : x + 2 * half]


def _components(mask2d, min_px):
    lab, n = ndimage.label(mask2d)
    if n == 0:
        return []
    sizes = ndimage.sum(mask2d, lab, range(1, n + 1))
    centres = ndimage.center_of_mass(mask2d, lab, range(1, n + 1))
    return [
        (int(round(c[0])), int(round(c[1])), s) for c, s in zip(centres, sizes, strict=True) if s >= min_px
    ]


def features(patch):
    hist = np.histogram(patch, HIST_EDGES)[0] / patch.size
    q = np.clip((patch + 1000) / 1200 * 31, 0, 31).astype(np.uint8)
    glcm = graycomatrix(q, [1, 2], [0, np.pi / 2], levels=32, symmetric=True, normed=True)
    tex = [graycoprops(glcm, p).mean() for p in ("contrast", "homogeneity", "energy", "correlation")]
    gy, gx = np.gradient(patch.astype(float))
    grad = np.hypot(gy, gx)
    return np.concatenate([hist, tex, [grad.mean(), grad.std(), patch.mean(), patch.std()]])


def real_patches(bg, per_patient, rng):
    half = int(round(PATCH_MM / 2 / bg.spacing[1]))
    min_px = int(100 / bg.spacing[1] ** 2)  # >= 1 cm^2
    out, hus = [], []
    for z in np.flatnonzero(bg.real_positive):
        lung = bg.lung[z] > 0
        if lung.sum() < 500:
            continue
        op = broad_opacity(bg.hu[z], lung, bg.spacing[1])
        hus.append(bg.hu[z][op])
        for y, x, _ in _components(op, min_px):
            out.append(_patch(bg.hu[z], (y, x), half))
    idx = rng.permutation(len(out))[:per_patient]
    return [out[i] for i in idx], np.concatenate(hus)


def synthetic_patches(bg, cases, per_patient, rng, seed0):
    """Patches of cases painted into ``bg``, centred by two rules: on the broad opacities of the
    painted slices, the rule the real patches follow (they have no voxel masks, so some real
    centres are vessels or dependent density, and so are some of these), and on the components
    of the exact lesion mask (every centre a lesion)."""
    half = int(round(PATCH_MM / 2 / bg.spacing[1]))
    min_px = int(100 / bg.spacing[1] ** 2)
    by_opacity, by_lesion, hus, shown = [], [], [], []
    for i in range(cases):
        kind = ("COVID-19", "CAP")[i % 2]
        case = synthesize(bg, kind, seed=seed0 + i, nodules=False)
        les = np.isin(case.lesion_mask, (1, 2, 3))
        for z in np.flatnonzero(les.reshape(len(les), -1).any(1)):
            lung = case.lung_mask[z] > 0
            opacity = broad_opacity(case.volume.hu[z], lung, bg.spacing[1])
            hus.append((kind, case.volume.hu[z][opacity & les[z]]))
            for y, x, _ in _components(opacity, min_px):
                by_opacity.append((_patch(case.volume.hu[z], (y, x), half), bool(les[z][y, x])))
            for y, x, s in _components(les[z], min_px):
                by_lesion.append(_patch(case.volume.hu[z], (y, x), half))
                shown.append((s, case.volume.hu[z], les[z], kind, int(lung.sum())))
    pick_o = rng.permutation(len(by_opacity))[:per_patient]
    pick_l = rng.permutation(len(by_lesion))[:per_patient]
    on_lesion = float(np.mean([by_opacity[i][1] for i in pick_o])) if len(pick_o) else float("nan")
    return [by_opacity[i][0] for i in pick_o], [by_lesion[i] for i in pick_l], hus, shown, on_lesion


def figure(real_bgs, synth_shown, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 8.4))
    for ax, bg in zip(axes[0], [real_bgs[0], real_bgs[0], real_bgs[1], real_bgs[1]], strict=True):
        pos = np.flatnonzero(bg.real_positive)
        share = [
            broad_opacity(bg.hu[z], bg.lung[z] > 0, bg.spacing[1]).sum() / max((bg.lung[z] > 0).sum(), 1)
            for z in pos
        ]
        order = np.argsort(share)[::-1]
        z = pos[order[0 if ax in axes[0][::2] else len(order) // 3]]
        ax.imshow(bg.hu[z], cmap="gray", vmin=-1350, vmax=150)
        ax.set_title(f"real {bg.label} ({bg.patient_id}), slice {z}")
    # slices through the middle of the lungs, as the real ones above (not a lung base over the abdomen)
    most_lung = max(t[4] for t in synth_shown)
    big = sorted((t for t in synth_shown if t[4] >= 0.5 * most_lung), key=lambda t: -t[0])
    picks = [big[0], next(t for t in big if t[3] != big[0][3]), big[len(big) // 4], big[len(big) // 2]]
    for ax, (_, hu, _les, kind, _lung) in zip(axes[1], picks, strict=True):
        ax.imshow(hu, cmap="gray", vmin=-1350, vmax=150)
        ax.set_title(f"synthetic {kind} in a real lung")
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(
        "Top: real lesions (COVID-CT-MD). Bottom: synthetic lesions painted into real lesion-free lungs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=70)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backgrounds", default="runs/backgrounds")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--cases", type=int, default=6, help="synthetic cases per background")
    parser.add_argument("--per-patient", type=int, default=120, help="patches per patient")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict

    rng = np.random.default_rng(args.seed)
    real_bgs = load_backgrounds(args.backgrounds, ["P001", "cap001"])
    # Synthetic lesions go into the lesion-free slices of the same two patients, so that the
    # classifier cannot tell real from synthetic by the patient (scanner, anatomy, noise).
    clean_bgs = real_bgs
    real_X, real_groups, real_hu, synth_hu, shown, on_lesion = [], [], {}, [], [], {}
    synth = {"opacity": ([], []), "lesion": ([], [])}  # centring rule: (features, patients)
    for bg in real_bgs:
        patches, hus = real_patches(bg, args.per_patient, rng)
        real_hu[bg.patient_id] = hus
        real_X += [features(p) for p in patches]
        real_groups += [bg.patient_id] * len(patches)
    for i, bg in enumerate(clean_bgs):
        by_opacity, by_lesion, hus, s, on_lesion[bg.patient_id] = synthetic_patches(
            bg, args.cases, args.per_patient, rng, 1000 * i + args.seed
        )
        synth_hu += hus
        shown += s
        for rule, patches in (("opacity", by_opacity), ("lesion", by_lesion)):
            synth[rule][0].extend(features(p) for p in patches)
            synth[rule][1].extend([bg.patient_id] * len(patches))

    fold_of = {g: i for i, g in enumerate(sorted(set(real_groups)))}

    def patch_auc(rule):
        # Two folds, one patient each (its real and its synthetic patches): trained on one
        # patient, judged on the other.
        X = np.asarray(real_X + synth[rule][0])
        y = np.r_[np.zeros(len(real_X)), np.ones(len(synth[rule][0]))]
        groups = real_groups + synth[rule][1]
        folds = np.array([fold_of[g] for g in groups])
        forest = RandomForestClassifier(n_estimators=300, min_samples_leaf=3, random_state=args.seed)
        cv = GroupKFold(2)
        scores = cross_val_predict(forest, X, y, groups=folds, cv=cv, method="predict_proba")[:, 1]
        return round(float(roc_auc_score(y, scores)), 3), int((y == 1).sum())

    auc, n_synth = patch_auc("opacity")
    auc_lesion, n_lesion = patch_auc("lesion")
    synth_by = {k: np.concatenate([h for kind, h in synth_hu if kind == k]) for k in ("COVID-19", "CAP")}
    pair = {"P001": "COVID-19", "cap001": "CAP"}
    reals = list(real_hu.values())
    result = {
        # both centred on broad opacities of lesion slices (real: labelled; synthetic: painted)
        "patch_auc_real_vs_synthetic": auc,
        # synthetic centred on the lesion mask's components (the rule before 2026-11-29): every
        # synthetic centre a lesion, about half the real ones not (see docs/synthesis.md)
        "patch_auc_synthetic_centred_on_lesions": auc_lesion,
        # share of the opacity-centred synthetic patches whose centre lies in a painted lesion
        "synthetic_opacity_centres_in_a_lesion": {k: round(v, 3) for k, v in on_lesion.items()},
        "patches": {"real": len(real_X), "synthetic": n_synth, "synthetic_centred_on_lesions": n_lesion},
        "wasserstein_hu_synthetic_vs_real_same_class": {
            f"{k} vs synthetic {pair[k]}": round(float(wasserstein_distance(v, synth_by[pair[k]])), 1)
            for k, v in real_hu.items()
        },
        "wasserstein_hu_real_vs_real": round(float(wasserstein_distance(reals[0], reals[1])), 1),
        "share_in_ggo_range": {
            **{k: round(float(np.mean(v <= -300)), 3) for k, v in real_hu.items()},
            **{f"synthetic {k}": round(float(np.mean(v <= -300)), 3) for k, v in synth_by.items()},
        },
        "median_hu": {
            **{k: float(np.median(v)) for k, v in real_hu.items()},
            **{f"synthetic {k}": float(np.median(v)) for k, v in synth_by.items()},
        },
        "folds": {str(k): v for k, v in fold_of.items()},
    }
    out = Path(args.out)
    figure(real_bgs, shown, out / "synthesis_real_vs_synthetic.png")
    (out / "synthesis_realism.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
