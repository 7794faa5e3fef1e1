"""Pneumonia painted into real lesion-free lungs, with the exact 3-D lesion mask and the class.

Procedural, no GAN, after Hu et al. (CVPR 2023, label-free liver tumour synthesis: location,
shape, texture, intensity, blending) and Liu et al. 2020 (3-D tomographic pattern synthesis for
COVID-19: location priors from real cases). The background is a real CT (see
:mod:`training.real_backgrounds`), so anatomy, vessels, airways, scanner noise and texture are
real; only the lesions are made.

Patterns (``lesion_mask`` codes as in :mod:`napari_wscovid.phantom`):

* **ground glass (1)**: the parenchyma is raised towards a GGO level drawn per lesion, while
  voxels already denser (vessels, fissures) keep their value, so vessels stay visible; the raise
  is added to the real voxel, so the scanner's own noise stays on top.
* **crazy paving (3)**: ground glass plus a polygonal network of thickened septa.
* **consolidation (2)**: blended towards a soft-tissue level over the local mean, which hides
  vessels but keeps the real noise; the background's own air-filled bronchi are left dark inside
  it (air bronchograms).
* **nodules (4)**: bronchocentric clusters of small nodules (tree-in-bud-like) with CAP; as
  distractors in any class, one to three solid nodules or one lobulated tumour-like mass.
* **IV contrast** (an option, off by default): a share of the cases, of every class alike, get
  their lung vessels enhanced as an arterial or venous phase would (:func:`enhance_vessels`): the
  backgrounds of COVID-CT-MD are unenhanced, those of LIDC-IDRI enhanced, and the held-out
  contrast scans were the 2.3.0 folds' wrong answers (docs/reliability.md). Trained with it, the
  folds were no better on them (docs/heldout/gpu_folds_2.4.md).
* **bronchopneumonia**: half of the CAP cases are many small patchy foci (ground glass, some
  consolidating) clustered in one or two pseudo-lobes, often of one lung, with tree-in-bud
  nodules; the other half lobar or segmental.

Where (canonical axes of a :class:`~training.real_backgrounds.Background`: +z superior,
+y posterior): COVID-19 is bilateral and multifocal, subpleural, posterior and lower-zone
predominant, rounded; CAP is lobar or segmental pneumonia reaching the pleura, or a
bronchopneumonia, usually in one lung, confined to pseudo-lobes (k-means of the lung's voxel
positions; no lobe masks are needed).
Severity runs from a single trace focus to most of a lung. Soft borders come from smoothsteps of
noisy shape fields in millimetres, so partial volume across thick slices follows from the geometry.

Intensities: see ``docs/lesion_intensities.md`` (``python scripts/lesion_intensities.py``), measured
on the labelled slices of COVID-CT-MD; the ranges below are set from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from napari_wscovid.io.volume import CTVolume
from napari_wscovid.phantom import (
    _LABEL_PRIORITY,
    LESION_CODES,
    Phantom,
    _box,
    _rotation,
    _septal_network,
    _smooth_field,
    _ss,
    covid_location_weight,
)
from napari_wscovid.phantom import _box_coords as _coords
from training.real_backgrounds import Background, vessel_p99  # noqa: F401 (re-exported)

# HU levels a lesion blends towards, drawn per lesion (docs/lesion_intensities.md).
HU_GGO = (-700.0, -330.0)
HU_CONSOLIDATION = (-120.0, 40.0)
HU_SEPTA = -250.0
HU_NODULE = (-60.0, 40.0)
# Parenchyma levels are taken from the background clipped to this range, so that vessels and
# airways do not shift the local "lung level" the ground glass is measured from.
PARENCHYMA_HU = (-1000.0, -600.0)
# A bronchus left dark inside consolidation: the background's locally averaged HU below this.
AIRWAY_HU = -930.0
AIRWAY_CONTRAST_HU = 70.0
W_MIN = 0.1  # blend weight below which a voxel is left untouched and unmarked

KINDS = ("NP", "CAP", "COVID-19")
#: Of the cases with distractors, the share that gets one tumour-like mass instead of nodules.
MASS_FRACTION = 0.4
#: Of the masses, the share centred on the lung's border (:func:`solitary_mass`): off by default
#: until a run has judged it (``--synth-pleural-masses``, ``pleural=`` in a GPU fold).
PLEURAL_MASS_FRACTION = 0.0
#: Share of the cases (any class) whose vessels get IV contrast, when the background has none.
#: Off by default: two GPU runs with 0.4 judged no better on the held-out real patients, the
#: contrast scans included (docs/heldout/gpu_folds_2.4.md); ``--synth-contrast`` turns it on.
ENHANCE_FRACTION = 0.0
#: Enhancement of blood over its unenhanced ~40 HU, drawn per case: venous to arterial phase.
ENHANCE_HU = (80.0, 320.0)
UNENHANCED_BLOOD_HU = 40.0
NOISE_DEAD_ZONE_HU = 60.0
#: A background is already enhanced when its lung vessels' 99th percentile is above this: the
#: COVID-CT-MD scans measure 63-74 HU, the LIDC-IDRI and Lung-PET-CT-Dx ones 339-455 HU
#: (in-lung voxels above -300 HU, lungs eroded by two voxels).
ENHANCED_VESSEL_P99_HU = 200.0


@dataclass
class _Paint:
    """One lesion on a box of the volume: blend weight, HU level, label and how it blends."""

    kind: str
    side: int
    sl: tuple
    weight: np.ndarray
    target: np.ndarray
    labels: np.ndarray
    mode: str  # "raise" (ground glass: vessels kept) or "replace" (consolidation, nodules)
    extra: dict = field(default_factory=dict)


def _grid(shape, spacing):
    return tuple(np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing, strict=True))


def _pick(rng, weights) -> tuple[int, int, int] | None:
    flat = np.asarray(weights, float).ravel()
    total = flat.sum()
    if not np.isfinite(total) or total <= 0:
        return None
    i = rng.choice(flat.size, p=flat / total)
    return tuple(int(v) for v in np.unravel_index(i, np.shape(weights)))


class _Context:
    """Per-background quantities the lesion makers share (coarse lung grid, pleural distance)."""

    def __init__(self, bg: Background):
        # slices with a real lesion get no lung: never painted, never drawn
        self.lung = np.where(bg.usable[:, None, None], bg.lung, 0).astype(np.uint8)
        self.spacing = tuple(float(s) for s in bg.spacing)
        self.grid = _grid(bg.lung.shape, self.spacing)
        self.cstep = max(1, int(round(3.0 / min(self.spacing[1:]))))
        self.cmask = self.lung[:, :: self.cstep, :: self.cstep]
        sampling = (self.spacing[0], self.cstep * self.spacing[1], self.cstep * self.spacing[2])
        self.cdist = ndimage.distance_transform_edt(self.cmask > 0, sampling=sampling).astype(np.float32)

    def to_full(self, c) -> np.ndarray:
        return np.array(c, float) * [1, self.cstep, self.cstep]


def _blob(rng, ctx: _Context, centre, radius, side, pattern) -> _Paint | None:
    """A rounded patch with an irregular soft margin, clipped to one lung."""
    sp = ctx.spacing
    half = [1.45 * radius / s + 2 for s in sp]
    sl = _box(centre, half, ctx.lung.shape)
    zz, yy, xx = _coords(sl, ctx.grid)
    c = np.array([ctx.grid[i][int(np.clip(centre[i], 0, len(ctx.grid[i]) - 1))] for i in range(3)])
    rot = _rotation(rng)
    axes = radius * np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.45, 0.85)])
    d = (zz - c[0], yy - c[1], xx - c[2])
    q = sum(((rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2]) / axes[i]) ** 2 for i in range(3))
    shape = tuple(s.stop - s.start for s in sl)
    noise = np.clip(_smooth_field(rng, shape, sp, radius * 0.35), -2.5, 2.5)
    s = 1.0 - q + 0.35 * noise
    w = (_ss(0.0, 0.3, s) * (ctx.lung[sl] == side)).astype(np.float32)
    w[w < W_MIN] = 0.0
    if not np.any(w > 0):
        return None
    tex = _smooth_field(rng, shape, sp, 4.0)
    target = rng.uniform(*HU_GGO) + 60.0 * tex
    labels = np.where(w > 0, LESION_CODES["GGO"], 0).astype(np.uint8)
    if pattern == "crazy paving":
        septa = _septal_network(rng, zz, yy, xx, w > 0, sp)
        target = target + septa * (HU_SEPTA - target)
        labels[w > 0] = LESION_CODES["crazy paving"]
    paint = _Paint(pattern, side, sl, w, target.astype(np.float32), labels, "raise")
    if pattern == "consolidating":
        core = (_ss(0.35, 0.55, s + 0.15 * tex) * (w > 0)).astype(np.float32)
        core[core < W_MIN] = 0.0
        if core.any():
            paint.extra["core"] = core
            paint.extra["core_target"] = (rng.uniform(*HU_CONSOLIDATION) + 10.0 * tex).astype(np.float32)
            labels[core > 0.5] = LESION_CODES["consolidation"]
    return paint


def covid_lesions(rng, ctx: _Context, severity: float) -> list[_Paint]:
    """Bilateral, multifocal, subpleural, posterior and lower-zone predominant rounded opacities."""
    n = int(np.clip(round(1 + 8 * severity + rng.uniform(-1.0, 1.0)), 1, 10))
    sides = [1, 2] if n >= 2 else [int(rng.integers(1, 3))]
    sides += list(rng.integers(1, 3, size=max(n - len(sides), 0)))
    out = []
    for side in sides:
        sel = ctx.cmask == side
        if not sel.any():
            continue
        c = _pick(rng, covid_location_weight(sel, ctx.cdist, lower_floor=0.08))
        if c is None:
            continue
        radius = (8.0 + 32.0 * severity) * rng.uniform(0.6, 1.25)
        roll = rng.uniform()
        if roll < 0.2 + 0.4 * severity:
            pattern = "consolidating"
        elif roll < 0.45 + 0.3 * severity:
            pattern = "crazy paving"
        else:
            pattern = "GGO"
        paint = _blob(rng, ctx, ctx.to_full(c), radius, side, pattern)
        if paint is not None:
            out.append(paint)
    return out


def _kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means centres. SciPy's, not scikit-learn's: the GPU machine the prepared training run
    goes to has numpy, scipy and torch but no scikit-learn."""
    from scipy.cluster.vq import kmeans2

    gen = np.random.default_rng(seed)
    try:
        centres, _ = kmeans2(points, k, minit="++", rng=gen)
    except TypeError:  # SciPy before 1.15 calls it seed
        centres, _ = kmeans2(points, k, minit="++", seed=gen)
    return centres


def pseudo_lobes(ctx: _Context, side: int, seed: int) -> np.ndarray | None:
    """Coarse-grid labels 1..k of one lung cut into k compact parts (3 right, 2 left) by k-means.

    Real lobes are split by fissures; a k-means partition of the voxel positions, weighted
    towards the cranio-caudal and antero-posterior axes the oblique fissures cut, gives parts of
    about lobar size whose borders a consolidation must stop at, which is what the classifier
    has to learn. Exact lobes need a lobe segmentation this project does not have.
    """
    pts = np.argwhere(ctx.cmask == side)
    if len(pts) < 50:
        return None
    mm = pts * [ctx.spacing[0], ctx.cstep * ctx.spacing[1], ctx.cstep * ctx.spacing[2]]
    feats = mm * [1.0, 0.8, 0.25]
    k = 3 if side == 1 else 2
    sub = feats[:: max(1, len(feats) // 4000)]
    centres = _kmeans(sub, k, seed)
    # Positions displaced by a smooth random field before assignment: a k-means partition alone
    # has flat borders, which show as straight cuts across a slice; fissures are curved sheets.
    rng = np.random.default_rng(seed)
    sampling = (ctx.spacing[0], ctx.cstep * ctx.spacing[1], ctx.cstep * ctx.spacing[2])
    warp = np.stack([_smooth_field(rng, ctx.cmask.shape, sampling, 40.0)[tuple(pts.T)] for _ in range(3)], 1)
    labels = np.zeros(ctx.cmask.shape, np.uint8)
    moved = feats + 12.0 * warp
    labels[tuple(pts.T)] = np.argmin(((moved[:, None, :] - centres[None]) ** 2).sum(-1), axis=1) + 1
    return labels


def _upsample_labels(coarse: np.ndarray, ctx: _Context, sl) -> np.ndarray:
    zz = np.arange(sl[0].start, sl[0].stop)
    yy = np.minimum(np.arange(sl[1].start, sl[1].stop) // ctx.cstep, coarse.shape[1] - 1)
    xx = np.minimum(np.arange(sl[2].start, sl[2].stop) // ctx.cstep, coarse.shape[2] - 1)
    return coarse[np.ix_(zz, yy, xx)]


def _lungs_with_lobes(rng, ctx: _Context, *, p_right: float, p_both: float):
    """Yield ``(i, side, pseudo_lobes)`` for the affected lung and, with ``p_both``, the other."""
    side = 1 if rng.uniform() < p_right else 2
    sides = [side] + ([3 - side] if rng.uniform() < p_both else [])
    for i, sd in enumerate(sides):
        lobes = pseudo_lobes(ctx, sd, int(rng.integers(2**31)))
        if lobes is not None:
            yield i, sd, lobes


def cap_lesions(rng, ctx: _Context, severity: float) -> list[_Paint]:
    """Community-acquired pneumonia: lobar/segmental, or a bronchopneumonia (half each)."""
    if rng.uniform() < 0.5:
        return bronchopneumonia(rng, ctx, severity)
    return lobar_pneumonia(rng, ctx, severity)


def bronchopneumonia(rng, ctx: _Context, severity: float) -> list[_Paint]:
    """Many small patchy, bronchocentric foci clustered in one or two pseudo-lobes, often of one
    lung, with tree-in-bud nodules: the pattern of the real CAP patient at hand (cap001)."""
    out = []
    for i, sd, lobes in _lungs_with_lobes(rng, ctx, p_right=0.55, p_both=0.5):
        chosen = rng.choice(
            np.arange(1, lobes.max() + 1), size=min(int(lobes.max()), 1 + (rng.uniform() < 0.5))
        )
        region = np.isin(lobes, chosen) & (ctx.cmask == sd)
        n = int((30 + 120 * severity) * (1.0 if i == 0 else 0.5) * rng.uniform(0.7, 1.3))
        for _ in range(n):
            c = _pick(rng, region.astype(float))
            if c is None:
                break
            pattern = "consolidating" if rng.uniform() < 0.35 else "GGO"
            paint = _blob(rng, ctx, ctx.to_full(c), rng.uniform(4.0, 10.0), sd, pattern)
            if paint is not None:
                out.append(paint)
        if rng.uniform() < 0.6:
            out += nodule_cluster(rng, ctx, sd, bronchocentric=True)
    return out


def lobar_pneumonia(rng, ctx: _Context, severity: float) -> list[_Paint]:
    """Lobar or segmental pneumonia reaching the pleura, mostly one lung, with nodules."""
    out = []
    side = None
    for i, sd, lobes in _lungs_with_lobes(rng, ctx, p_right=0.6, p_both=0.15):
        side = sd if side is None else side
        lobe = int(rng.integers(1, lobes.max() + 1))
        # the lobe's box on the full grid
        where = np.argwhere(lobes == lobe)
        lo = ctx.to_full(where.min(0)).astype(int)
        hi = ctx.to_full(where.max(0) + 1).astype(int) + ctx.cstep
        sl = tuple(slice(int(a), int(min(b, n))) for a, b, n in zip(lo, hi, ctx.lung.shape, strict=True))
        in_lobe = (_upsample_labels(lobes, ctx, sl) == lobe) & (ctx.lung[sl] == sd)
        if in_lobe.sum() < 50:
            continue
        in_lobe = in_lobe.astype(np.float32)
        zz, yy, xx = _coords(sl, ctx.grid)
        shape = in_lobe.shape
        noise = _smooth_field(rng, shape, ctx.spacing, 12.0)
        lobar = i == 0 and rng.uniform() < 0.2 + 0.5 * severity
        if lobar:
            s = 0.55 + 0.45 * noise
        else:
            # a segment: a wedge reaching the pleura around a subpleural centre of the lobe
            near = (lobes == lobe) & (ctx.cdist < 12.0) & (ctx.cmask == sd)
            c = _pick(rng, near.astype(float))
            if c is None:
                continue
            cf = ctx.to_full(c)
            cm = [ctx.grid[a][int(min(cf[a], len(ctx.grid[a]) - 1))] for a in range(3)]
            small = i > 0 or severity < 0.3
            radius = rng.uniform(12.0, 25.0) if small else rng.uniform(25.0, 50.0)
            q = (
                ((zz - cm[0]) / (1.2 * radius)) ** 2
                + ((yy - cm[1]) / radius) ** 2
                + ((xx - cm[2]) / radius) ** 2
            )
            s = 1.0 - q + 0.3 * noise
        # the coarse pseudo-lobe is blocky at 3 mm; a soft edge hides the staircase
        sigma = [0.0] + [1.5 / sp for sp in ctx.spacing[1:]]
        lobe_soft = _ss(0.3, 0.7, ndimage.gaussian_filter(in_lobe.astype(np.float32), sigma))
        in_lobe = lobe_soft * (ctx.lung[sl] == sd)
        # Real CAP is more ground glass than consolidation by volume (cap001: 65% of its opacity
        # voxels are in the ground-glass range, docs/lesion_intensities.md): the region is ground
        # glass, consolidated where the noisy shape field is highest.
        core = rng.uniform(0.4, 0.85)
        w_c = (_ss(core, core + 0.12, s) * in_lobe).astype(np.float32)
        w_c[w_c < W_MIN] = 0.0
        extent = _ss(-rng.uniform(0.2, 0.5), 0.05, s) * in_lobe
        w_g = np.where((w_c == 0) & (extent > W_MIN), 0.85 * extent, 0.0).astype(np.float32)
        if not (w_c.any() or w_g.any()):
            continue
        tex = _smooth_field(rng, shape, ctx.spacing, 5.0)
        for kind, w, levels, grain, code, mode in (
            ("ground glass", w_g, HU_GGO, 30.0, "GGO", "raise"),
            ("consolidation", w_c, HU_CONSOLIDATION, 10.0, "consolidation", "replace"),
        ):
            if w.any():
                target = (rng.uniform(*levels) + grain * tex).astype(np.float32)
                labels = np.where(w > 0, LESION_CODES[code], 0).astype(np.uint8)
                out.append(_Paint(kind, sd, sl, w, target, labels, mode))
    if side is not None and rng.uniform() < 0.4:
        out += nodule_cluster(rng, ctx, side, bronchocentric=True)
    return out


def nodule_cluster(rng, ctx: _Context, side: int, *, bronchocentric: bool) -> list[_Paint]:
    """A cluster of 2-6 mm nodules (tree-in-bud-like) or one to three solid nodules."""
    sel = (ctx.cmask == side) & (ctx.cdist > 8.0)
    c0 = _pick(rng, sel.astype(float))
    if c0 is None:
        return []
    c0 = ctx.to_full(c0)
    n = int(rng.integers(4, 10)) if bronchocentric else int(rng.integers(1, 4))
    spread = 12.0 if bronchocentric else 60.0
    out = []
    for _ in range(n):
        offset = rng.normal(0.0, spread, 3) / np.asarray(ctx.spacing)
        ci = np.clip(c0 + offset, 0, np.asarray(ctx.lung.shape) - 1)
        r = rng.uniform(1.5, 3.0) if bronchocentric else rng.uniform(2.5, 5.0)
        half = [r / s + 2 for s in ctx.spacing]
        sl = _box(ci, half, ctx.lung.shape)
        zz, yy, xx = _coords(sl, ctx.grid)
        cm = [ctx.grid[a][int(ci[a])] for a in range(3)]
        dist = np.sqrt((zz - cm[0]) ** 2 + (yy - cm[1]) ** 2 + (xx - cm[2]) ** 2)
        soft = np.clip((r - dist) / min(ctx.spacing[1:]) + 0.5, 0.0, 1.0) * (ctx.lung[sl] == side)
        soft = soft.astype(np.float32)
        soft[soft < W_MIN] = 0.0
        if not soft.any():
            continue
        target = np.full(soft.shape, rng.uniform(*HU_NODULE), np.float32)
        out.append(
            _Paint("nodule", side, sl, soft, target, np.where(soft > 0, 4, 0).astype(np.uint8), "replace")
        )
    return out


def solitary_mass(rng, ctx: _Context, side: int, *, juxtapleural: bool = False) -> list[_Paint]:
    """One solid, lobulated mass (a tumour): not pneumonia, a hard negative.

    Real non-pneumonia patients carry nodules and tumours (LIDC-IDRI, Lung-PET-CT-Dx); a stream
    whose only dense round things are pneumonia teaches that every mass is CAP. Inside the lung
    it is 15-45 mm across; ``juxtapleural`` centres a 24-64 mm one on the lung's border, so that
    only its dome shows in the lung, as Lung_Dx-A0001's 5-6 cm tumour bulges from the mediastinum
    and the posterior pleura, where the CAP stream's consolidation also meets the pleura.
    """
    if juxtapleural:
        sel = (ctx.cmask == side) & (ctx.cdist <= 4.0)
        radius = rng.uniform(12.0, 32.0)
    else:
        sel = (ctx.cmask == side) & (ctx.cdist > 10.0)
        radius = None
    c0 = _pick(rng, sel.astype(float))
    if c0 is None:
        return []
    centre = ctx.to_full(c0)
    radius = rng.uniform(7.5, 22.5) if radius is None else radius
    sp = ctx.spacing
    sl = _box(centre, [1.6 * radius / v + 2 for v in sp], ctx.lung.shape)
    zz, yy, xx = _coords(sl, ctx.grid)
    c = [ctx.grid[a][int(np.clip(centre[a], 0, len(ctx.grid[a]) - 1))] for a in range(3)]
    dist = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    shape = tuple(v.stop - v.start for v in sl)
    lobulation = np.clip(_smooth_field(rng, shape, sp, radius * 0.4), -2.5, 2.5)
    edge = radius * (1.0 + 0.15 * lobulation) - dist
    w = (np.clip(edge / min(sp[1:]) + 0.5, 0.0, 1.0) * (ctx.lung[sl] == side)).astype(np.float32)
    w[w < W_MIN] = 0.0
    if not w.any():
        return []
    target = (rng.uniform(*HU_NODULE) + 15.0 * _smooth_field(rng, shape, sp, 3.0)).astype(np.float32)
    return [_Paint("mass", side, sl, w, target, np.where(w > 0, 4, 0).astype(np.uint8), "replace")]


def enhance_vessels(hu: np.ndarray, lung: np.ndarray, spacing, boost_hu: float) -> np.ndarray:
    """Raise the lung's vessels as IV contrast would; ``hu`` float32, changed in place and returned.

    A voxel's blood fraction is its excess over the local parenchyma level as a share of the
    excess of unenhanced blood, so that a vessel fully inside a voxel gains ``boost_hu`` and one
    the voxel only grazes gains in proportion (partial volume, thick slices included). Air and
    parenchyma are left as they are; the hila's vessels within 3 mm of the lung go with them.
    """
    px = min(spacing[1:])
    near = ndimage.binary_dilation(lung > 0, iterations=max(1, int(round(3.0 / px))))
    parenchyma = ndimage.gaussian_filter(np.clip(hu, *PARENCHYMA_HU), (0, 3.0 / px, 3.0 / px))
    # the dead zone keeps the parenchyma's noise from being amplified into the enhancement
    excess = hu - parenchyma - NOISE_DEAD_ZONE_HU
    fraction = np.clip(excess / (UNENHANCED_BLOOD_HU - parenchyma - NOISE_DEAD_ZONE_HU), 0.0, 1.0)
    hu += (near * fraction * boost_hu).astype(np.float32)
    return hu


def _apply(hu: np.ndarray, paints: list[_Paint], spacing) -> np.ndarray:
    """Blend every lesion into ``hu`` (float32, in place) and return the lesion label volume."""
    lesion_mask = np.zeros(hu.shape, np.uint8)
    if not paints:
        return lesion_mask
    px = min(spacing[1:])
    # Local parenchyma level (vessels and airways clipped away) and local mean; the voxel's
    # difference from them is the real scanner noise and fine texture, which stays on top.
    parenchyma = ndimage.gaussian_filter(np.clip(hu, *PARENCHYMA_HU), (0, 3.0 / px, 3.0 / px))
    local_mean = ndimage.gaussian_filter(hu, (0, 1.2 / px, 1.2 / px))
    # Bronchi: air clearly darker than the parenchyma around them (noise dips of a dark lung are not)
    smooth_air = ndimage.gaussian_filter(hu, (0, 1.0 / px, 1.0 / px))
    airway = (smooth_air < AIRWAY_HU) & (smooth_air < parenchyma - AIRWAY_CONTRAST_HU)
    prio = np.array([_LABEL_PRIORITY[i] for i in range(5)])
    for p in paints:
        view = hu[p.sl]
        if p.mode == "raise":
            raised = view + p.weight * np.maximum(p.target - parenchyma[p.sl], 0.0)
            # vessels and septa already denser than the ground glass stay as they are
            new = np.where(view >= p.target, view, np.minimum(raised, np.maximum(view, p.target + 60.0)))
            if "core" in p.extra:
                # the consolidated core replaces the local mean of the original, noise kept
                core = p.extra["core"] * ~airway[p.sl]
                dense = view + (p.extra["core_target"] - local_mean[p.sl])
                new = new + core * np.maximum(dense - new, 0.0)
        else:
            w = p.weight * ~airway[p.sl] if p.kind == "consolidation" else p.weight
            new = view + w * (p.target - local_mean[p.sl])
            new = np.maximum(new, view)  # a lesion only adds density
        view[...] = new
        mview = lesion_mask[p.sl]
        take = prio[p.labels] > prio[mview]
        mview[take] = p.labels[take]
    return lesion_mask


def synthesize(
    bg: Background,
    kind: str,
    seed: int,
    *,
    severity: float | None = None,
    nodules: bool | None = None,
    enhance: bool | None = None,
    distractor_fraction: float = 0.25,
    mass_fraction: float | None = None,
    enhance_fraction: float | None = None,
    pleural_mass_fraction: float | None = None,
) -> Phantom:
    """Paint a ``kind`` ("NP", "CAP", "COVID-19") case into ``bg``.

    Returns a :class:`~napari_wscovid.phantom.Phantom` (the training streams take either): int16
    HU on the background's canonical grid, the lung labels with the slices that hold a real
    lesion emptied (so that no slice of unknown class is labelled), the exact lesion mask
    (codes 1-4) and one record per painted lesion. An NP case is the background as it is,
    with distractor nodules when ``nodules`` (default: ``distractor_fraction`` of the cases, of
    which ``mass_fraction``, else :data:`MASS_FRACTION`, get one tumour-like mass, centred on the
    lung's border in ``pleural_mass_fraction``, else :data:`PLEURAL_MASS_FRACTION`, of them). ``enhance``
    gives the vessels IV contrast first (default: ``enhance_fraction``, else
    :data:`ENHANCE_FRACTION`, of the cases whose background has none, drawn from a stream of its
    own so that a seed's lesions are the same either way).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    if severity is None:
        # from a trace to most of the lung; milder cases are the more common and the harder
        severity = float(rng.beta(1.3, 1.8))
    if nodules is None:
        nodules = bool(rng.uniform() < distractor_fraction)
    ctx = _Context(bg)
    if kind == "COVID-19":
        paints = covid_lesions(rng, ctx, severity)
    elif kind == "CAP":
        paints = cap_lesions(rng, ctx, severity)
    else:
        paints = []
    if nodules:
        side = int(rng.integers(1, 3))
        if rng.uniform() < (MASS_FRACTION if mass_fraction is None else mass_fraction):
            # its own stream: turning the option on leaves every other case as it was
            pleural_share = PLEURAL_MASS_FRACTION if pleural_mass_fraction is None else pleural_mass_fraction
            juxtapleural = bool(np.random.default_rng([seed, 2]).uniform() < pleural_share)
            paints += solitary_mass(rng, ctx, side, juxtapleural=juxtapleural)
        else:
            paints += nodule_cluster(rng, ctx, side, bronchocentric=False)
    hu = bg.hu.astype(np.float32)
    contrast_rng = np.random.default_rng([seed, 1])
    if enhance is None:
        share = ENHANCE_FRACTION if enhance_fraction is None else enhance_fraction
        enhance = bool(contrast_rng.uniform() < share) and _unenhanced(bg)
    if enhance:
        enhance_vessels(hu, ctx.lung, ctx.spacing, float(contrast_rng.uniform(*ENHANCE_HU)))
    lesion_mask = _apply(hu, paints, ctx.spacing)
    lesion_mask[ctx.lung == 0] = 0
    volume = CTVolume(
        hu=np.clip(np.rint(hu), -1024, 3071).astype(np.int16),
        spacing=ctx.spacing,
        origin=(0.0, 0.0, 0.0),
        is_hu=True,
        source="synthetic-in-real",
    )
    records = [
        {"type": p.kind, "lung": "right" if p.side == 1 else "left", "n_voxels": int((p.labels > 0).sum())}
        for p in paints
    ]
    return Phantom(volume=volume, lung_mask=ctx.lung, lesion_mask=lesion_mask, label=kind, lesions=records)


def _unenhanced(bg: Background) -> bool:
    return not bg.vessel_p99 > ENHANCED_VESSEL_P99_HU
