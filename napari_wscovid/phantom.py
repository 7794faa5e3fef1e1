"""Synthetic chest CT with exact lung and lesion masks.

The phantom is the test fixture of every downstream module and half of the
training data, so it aims at what a radiologist looks for on a lung window:
tapering apices and diaphragm domes (liver under the right, stomach and spleen
under the left; the stomach holds fluid under a gas cap, or food mottled with gas
bubbles), a mediastinum with heart, aorta, trachea and main bronchi,
branching pulmonary arteries, veins and airways that thin towards the pleura,
ribs, spine, sternum and scapulae, posterior (dependent) density, a slight PSF
blur and correlated scanner noise.

Anatomy is defined in millimetres, so ``size`` only changes the sampling; the
cranio-caudal anatomy is scaled to the covered extent ``n_slices * spacing[0]``.

Lesions follow Hu et al. (IEEE Access 2020) and the usual radiology teaching:

* COVID-19: bilateral, peripheral (subpleural), lower-zone and posterior
  predominant, multifocal ground-glass opacities (GGO) with soft irregular
  edges and vessels visible through them, some with crazy paving (GGO plus
  thickened interlobular septa), some with a consolidated core.
* CAP: mostly unilateral lobar or segmental consolidation that stops at the
  fissure, with air bronchograms and sometimes a thin GGO rim.
* NP: no lesion, or with ``nodules=True`` one to three small solid nodules.

Mask conventions: ``lesion_mask`` marks exactly the voxels whose HU a lesion
changed (before the PSF blur and the noise, which smear every edge by about a
voxel). Air bronchograms lie inside the consolidated region and are marked as
consolidation, as a reader would outline the whole consolidated segment. The
lung mask includes every lesion and the intrapulmonary vessels and airways, but
not the trachea, the mediastinum or the pleura.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from napari_wscovid.io.volume import CTVolume

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- HU table
# Typical attenuation at 100-120 kVp, unenhanced; lesion values are drawn per
# lesion from the ranges below.
HU_AIR = -1000.0
HU_MIN = -1024.0  # scanner floor: no value is ever below it
HU_LUNG = -888.0  # non-dependent (anterior) parenchyma
HU_LUNG_DEPENDENT = 60.0  # added towards the posterior (dependent) lung when supine
HU_FAT = -100.0
HU_MUSCLE = 45.0
HU_SKIN = 30.0
HU_BLOOD = 40.0  # unenhanced blood: heart, aorta, pulmonary vessels
HU_AIRWAY_WALL = 20.0
HU_LIVER = 60.0
HU_SPLEEN = 48.0
HU_STOMACH = 15.0  # fluid content
HU_FOOD = (20.0, 70.0)  # solid gastric content, mottled with gas bubbles
#: Share of phantoms whose stomach holds food with gas bubbles rather than fluid. Mottled
#: content under the diaphragm looks like consolidation with air bronchograms: a lung
#: segmenter must learn that it is not lung (it did not, on a real CT, before these were added).
FOOD_PROBABILITY = 0.6
HU_CORD = 25.0  # spinal canal (cord and CSF)
HU_CORTICAL = 850.0
HU_MARROW = 280.0  # rib and sternum marrow
HU_VERTEBRA = 220.0  # cancellous vertebral body
HU_DISC = 85.0
HU_CARTILAGE = 120.0
HU_FISSURE = -150.0  # a pleural fissure is a ~1 mm sheet, faint on thick slices
HU_GGO = (-680.0, -480.0)
HU_CONSOLIDATION = (-60.0, 40.0)
HU_SEPTA = -220.0  # thickened interlobular septa of crazy paving
HU_NODULE = (20.0, 60.0)

NOISE_SIGMA_HU = 20.0
# One Gaussian both blurs the image (PSF) and correlates the noise (grain of a
# medium, D40-like kernel), so the scanner model costs a single filter pass.
PSF_SIGMA_MM = 0.5
FOV_MM = 350.0

LESION_LABELS = {1: "GGO", 2: "consolidation", 3: "crazy paving", 4: "nodule"}
LESION_CODES = {name: code for code, name in LESION_LABELS.items()}
_LABEL_PRIORITY = {0: 0, 1: 1, 3: 2, 2: 3, 4: 4}  # which label wins where lesions overlap
_KIND_ALIASES = {
    "np": "NP",
    "normal": "NP",
    "non-pneumonia": "NP",
    "cap": "CAP",
    "pneumonia": "CAP",
    "covid-19": "COVID-19",
    "covid19": "COVID-19",
    "covid": "COVID-19",
}
_W_MIN = 0.1  # lesion weight below which the HU is left untouched (and unmarked)


@dataclass
class Phantom:
    """A synthetic chest CT with its exact masks."""

    volume: CTVolume  # int16 HU, is_hu=True, identity direction, LPS origin
    lung_mask: np.ndarray  # uint8 (z, y, x): 0 background, 1 right lung, 2 left lung
    lesion_mask: np.ndarray  # uint8 (z, y, x): 0 none, 1 GGO, 2 consolidation, 3 crazy paving, 4 nodule
    label: str  # "NP" | "CAP" | "COVID-19"
    lesions: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------ helpers


def _ss(a, b, x):
    """Smoothstep from 0 at ``a`` to 1 at ``b``."""
    s = np.clip((np.asarray(x, dtype=np.float32) - a) / (b - a), 0.0, 1.0)
    return s * s * (3.0 - 2.0 * s)


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation weights mapping ``n_in`` coarse nodes onto ``n_out`` samples."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    i0 = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
    f = pos - i0
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), i0] = 1.0 - f
    if n_in > 1:
        m[np.arange(n_out), i0 + 1] += f
    return m


def _smooth_field(rng, shape, spacing, cell_mm) -> np.ndarray:
    """Zero-mean, unit-variance random field with structures of about ``cell_mm``.

    Drawn on a coarse grid and interpolated with separable matrix products, which
    is far cheaper than filtering the full grid.
    """
    coarse = [max(2, int(np.ceil(n * s / cell_mm)) + 2) for n, s in zip(shape, spacing, strict=True)]
    g = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 0.7, mode="wrap")
    mz, my, mx = (_interp_matrix(n, c) for n, c in zip(shape, coarse, strict=True))
    f = np.matmul(np.matmul(my, g), mx.T)  # (a, y, x)
    f = np.tensordot(mz, f, axes=(1, 0))
    sub = f[:: max(1, f.shape[0] // 16), :: max(1, f.shape[1] // 32), :: max(1, f.shape[2] // 32)]
    mean, sd = float(sub.mean()), float(sub.std())
    f -= mean
    f /= sd if sd > 0 else 1.0
    return f


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


# ----------------------------------------------------------------- anatomy


def _gastric_content(rng, hu: np.ndarray, spacing) -> None:
    """Turn the stomach's fluid, in place, into food mottled with gas bubbles (some phantoms)."""
    stomach = hu == np.float32(HU_STOMACH)
    if rng.uniform() >= FOOD_PROBABILITY or not stomach.any():
        return
    box = ndimage.find_objects(stomach.astype(np.uint8))[0]
    inside = stomach[box]
    field = _smooth_field(rng, inside.shape, spacing, float(rng.uniform(3.0, 5.0)))
    gas_fraction = float(rng.uniform(0.15, 0.4))
    gas = field > np.quantile(field[inside], 1.0 - gas_fraction)
    view = hu[box]
    view[inside] = np.float32(rng.uniform(*HU_FOOD))
    view[inside & gas] = np.float32(HU_AIR)


@dataclass(frozen=True)
class _Anatomy:
    """Per-seed anatomical parameters, all in mm (z, y, x are LPS; t = 0 bottom, 1 top)."""

    z0: float
    height: float
    body_ax: float
    body_ay: float
    fat: float
    cav_ax: float
    cav_ay: float
    cav_cy: float
    wall: float
    dome_t: tuple[float, float]  # right, left dome peak height
    apex_t: float
    heart: tuple[float, float, float, float, float, float, float]  # t, y, x, ay, ax, half-height t, angle
    spine_y: float
    vb_r: float
    rib_z0: float
    rib_pitch: float
    rib_drop: float
    carina_t: float

    def t(self, z):
        return (z - self.z0) / self.height

    def z(self, t):
        return self.z0 + t * self.height

    def cavity_axes(self, t):
        narrow = 0.5 * _ss(0.25, 1.05, t) + 0.5 * _ss(0.6, 1.05, t)
        return self.cav_ax * (1.0 - 0.36 * narrow), self.cav_ay * (1.0 - 0.15 * narrow)

    def cavity_uv(self, t, y, x):
        """Normalised cavity coordinates; the cavity is the unit disc."""
        ax, ay = self.cavity_axes(t)
        ayy = np.where(y > self.cav_cy, 1.08 * ay, 0.95 * ay)
        return x / ax, (y - self.cav_cy) / ayy

    def diaphragm(self, y, x):
        """Height (mm) of the diaphragm surface: the higher of two paraboloid domes."""
        out = None
        for side, sign in ((0, -1.0), (1, 1.0)):
            dy = y - (self.cav_cy - 5.0)
            k = np.where(dy > 0, 0.0095, 0.0045) * (self.height / 320.0)
            dome = self.z(self.dome_t[side]) - k * ((x - sign * 58.0) ** 2 * 0.75 + dy**2)
            out = dome if out is None else np.maximum(out, dome)
        return out

    def apex(self, y, x, sign):
        k = 0.16 * self.height / 50.0**2
        return self.z(self.apex_t) - k * ((x - sign * 48.0) ** 2 + (y - self.cav_cy - 15.0) ** 2)

    def mediastinum(self, z, y, x):
        """Everything inside the thoracic cavity that is not lung (above the diaphragm)."""
        t = self.t(z)
        ax, ay = self.cavity_axes(t)
        yant = self.cav_cy - ay
        rel = (y - yant) / (2.0 * ay)  # 0 anterior .. 1 posterior
        hw = 18.0 + 16.0 * _ss(0.45, 0.62, t) * (1.0 - 0.55 * _ss(0.8, 0.95, t))
        hw = hw * (0.4 + 0.6 * _ss(0.08, 0.3, rel))
        xm = 4.0 * _ss(0.45, 0.62, t)
        med = np.abs(x - xm) < hw
        # vertebral body and the paravertebral strip
        med |= (x**2 + (y - self.spine_y) ** 2) < (self.vb_r + 4.0) ** 2
        med |= (np.abs(x) < self.vb_r * 0.8) & (y > self.spine_y)
        med |= (np.abs(x) < 31.0) & (y > self.spine_y + self.vb_r - 6.0)
        # descending aorta, left anterolateral to the spine
        ya = self.spine_y - self.vb_r - 9.0
        med |= ((x - 22.0) ** 2 + (y - ya) ** 2 < 15.0**2) & (t < 0.74)
        # aortic arch, a band from the ascending to the descending aorta
        arch = _ss(0.0, 1.0, 1.0 - np.abs(t - 0.715) / 0.05) > 0
        if np.any(arch):
            d = _dist_to_polyline_2d(y, x, [(-25.0, -8.0), (0.0, 6.0), (ya, 22.0)])
            med |= arch & (d < 16.0)
        # heart: a rotated ellipsoid resting on the diaphragm
        ht, hy, hx, hay, hax, hhz, ang = self.heart
        prof = 1.0 - ((t - ht) / hhz) ** 2
        if np.any(prof > 0):
            s = np.sqrt(np.clip(prof, 0.0, 1.0))
            c, si = np.cos(ang), np.sin(ang)
            u = (x - hx) * c + (y - hy) * si
            v = -(x - hx) * si + (y - hy) * c
            med |= (prof > 0) & ((u / (hax * s + 1e-3)) ** 2 + (v / (hay * s + 1e-3)) ** 2 < 1.0)
        return med

    def lungs(self, z, y, x, surfaces=None):
        """Lung label (0, 1 right, 2 left) at points or on a broadcast grid.

        ``surfaces`` may hold the z-independent (diaphragm, right apex, left apex)
        heights already evaluated on the same (y, x) grid.
        """
        t = self.t(z)
        u, v = self.cavity_uv(t, y, x)
        if surfaces is None:
            surfaces = (self.diaphragm(y, x), self.apex(y, x, -1.0), self.apex(y, x, 1.0))
        zd, ap_r, ap_l = surfaces
        lung = (u * u + v * v < 1.0) & (z > zd) & ~self.mediastinum(z, y, x)
        right = lung & (x < 0) & (z < ap_r)
        left = lung & (x >= 0) & (z < ap_l)
        return right.astype(np.uint8) + 2 * left.astype(np.uint8)

    def lobe(self, z, y, x, side):
        """Lobe code: right 1 upper, 2 middle, 3 lower; left 4 upper (with lingula), 5 lower."""
        lower = z < self._oblique(y, x, side)
        if side == "left":
            return np.where(lower, 5, 4).astype(np.uint8)
        middle = ~lower & (z < self.z(0.44))
        return np.where(lower, 3, np.where(middle, 2, 1)).astype(np.uint8)

    def _oblique(self, y, x, side):
        """Height of the oblique fissure: it climbs from the anterior diaphragm to T4-T5
        posteriorly and, on an axial slice, runs from the hilum antero-laterally."""
        ax, ay = self.cavity_axes(0.4)
        yant = self.cav_cy - ay
        t_ant, t_post = (0.14, 0.62) if side == "right" else (0.13, 0.66)
        y_eff = y + 0.45 * np.abs(x)
        span = 2.0 * ay + 0.45 * 0.8 * ax
        return self.z(t_ant) + (y_eff - yant) / span * (t_post - t_ant) * self.height

    def fissure_distance(self, z, y, x, side):
        """Approximate distance (mm) to the oblique fissure, used to draw it faintly."""
        ax, ay = self.cavity_axes(0.4)
        t_ant, t_post = (0.14, 0.62) if side == "right" else (0.13, 0.66)
        slope = (t_post - t_ant) * self.height / (2.0 * ay + 0.36 * ax)
        return np.abs(z - self._oblique(y, x, side)) / np.sqrt(1.0 + 1.2 * slope**2)


def _dist_to_polyline_2d(y, x, pts):
    """Distance in the (y, x) plane from points to a polyline given as (y, x) vertices."""
    best = None
    for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:], strict=False):
        dy, dx = y1 - y0, x1 - x0
        s = np.clip(((y - y0) * dy + (x - x0) * dx) / (dy * dy + dx * dx), 0.0, 1.0)
        d = np.hypot(y - y0 - s * dy, x - x0 - s * dx)
        best = d if best is None else np.minimum(best, d)
    return best


def _random_anatomy(rng, z0: float, height: float) -> _Anatomy:
    body_ax = rng.uniform(150.0, 168.0)
    body_ay = rng.uniform(108.0, 124.0)
    fat = rng.uniform(6.0, 18.0)
    wall = 10.0
    cav_ax = body_ax - fat - wall - 5.0
    cav_ay = body_ay - fat - wall - 14.0
    cav_cy = -8.0
    spine_y = cav_cy + cav_ay - 18.0
    vb_r = rng.uniform(15.0, 18.0)
    heart = (
        rng.uniform(0.28, 0.33),
        cav_cy - rng.uniform(18.0, 28.0),
        rng.uniform(38.0, 46.0),
        rng.uniform(40.0, 47.0),
        rng.uniform(52.0, 60.0),
        rng.uniform(0.17, 0.2),
        np.deg2rad(rng.uniform(-40.0, -25.0)),
    )
    dome_r = rng.uniform(0.25, 0.30)
    return _Anatomy(
        z0=z0,
        height=height,
        body_ax=body_ax,
        body_ay=body_ay,
        fat=fat,
        cav_ax=cav_ax,
        cav_ay=cav_ay,
        cav_cy=cav_cy,
        wall=wall,
        dome_t=(dome_r, dome_r - rng.uniform(0.02, 0.05)),
        apex_t=rng.uniform(0.93, 0.97),
        heart=heart,
        spine_y=spine_y,
        vb_r=vb_r,
        rib_z0=z0 + 1.02 * height,
        rib_pitch=0.083 * height,
        rib_drop=0.3 * height,
        carina_t=rng.uniform(0.6, 0.64),
    )


def _anatomy_slice(a: _Anatomy, z: float, y, x, dz: float, surfaces):
    """HU of one axial slice without lung structures, its lung labels and thoracic cavity."""
    t = float(a.t(z))
    shape = (y.shape[0], x.shape[1])
    px = float(abs(x[0, 1] - x[0, 0]))
    hu = np.full(shape, HU_AIR, dtype=np.float32)
    p = 2.4  # a superellipse gives the flattened back and sides of a supine trunk
    body = (np.abs(x) / a.body_ax) ** p + (np.abs(y) / a.body_ay) ** p
    hu[body < 1.0] = HU_SKIN
    inner = (np.abs(x) / (a.body_ax - 2.0)) ** p + (np.abs(y) / (a.body_ay - 2.0)) ** p
    hu[inner < 1.0] = HU_FAT
    ax, ay = a.cavity_axes(t)
    cy = a.cav_cy
    u, v = a.cavity_uv(t, y, x)
    rho = np.sqrt(u * u + v * v) + 1e-6
    dist = np.sqrt(x * x + (y - cy) ** 2)
    depth = dist * (1.0 - 1.0 / rho)  # mm outside the cavity boundary along the ray
    theta = np.arctan2(np.abs(x), y - cy)  # 0 posterior midline .. pi anterior midline

    # chest-wall muscles: paraspinal behind, pectoral in front, thin at the sides,
    # shoulder girdle at the top; subcutaneous fat everywhere else
    fat_in = (np.abs(x) / (a.body_ax - a.fat)) ** p + (np.abs(y) / (a.body_ay - a.fat)) ** p
    muscle = a.wall + 5.0 + 34.0 * np.exp(-((theta / 0.42) ** 2))
    muscle = muscle + 16.0 * np.exp(-(((theta - 2.45) / 0.45) ** 2)) * _ss(0.3, 0.5, t)
    muscle = muscle + 28.0 * _ss(0.7, 1.0, t)
    hu[(inner < 1.0) & ((depth < muscle) | (fat_in < 1.0) & (depth < a.wall + 5.0))] = HU_MUSCLE

    # scapulae: curved plates posterolateral to the ribs in the upper chest
    if t > 0.55:
        scap = (depth > a.wall + 9.0) & (depth < a.wall + 15.0) & (theta > 0.5) & (theta < 1.25)
        scap &= t < 0.55 + 0.4 * (1.0 - (theta - 0.45) / 0.75)
        hu[scap] = 0.5 * (HU_CORTICAL + HU_MARROW)

    ring = (depth > 0) & (depth < a.wall) & (fat_in < 1.0)
    _ribs(a, z, dz, hu, ring, depth, theta)

    cavity = rho < 1.0
    hu[cavity] = HU_FAT
    lab = a.lungs(z, y, x, surfaces)
    lung = lab > 0
    yant = cy - ay
    dep = _ss(0.0, 1.0, (y - yant) / (2.0 * ay))
    hu_lung = HU_LUNG + HU_LUNG_DEPENDENT * dep**1.5
    for side, name in ((1, "right"), (2, "left")):
        dist = a.fissure_distance(z, y, x, name)
        f = np.clip(1.0 - dist / max(px, 1.0), 0.0, 1.0) * min(1.0, 1.5 / dz) * 0.6
        hu_lung = np.where(lab == side, hu_lung + f * (HU_FISSURE - hu_lung), hu_lung)
    hu = np.where(lung, hu_lung, hu).astype(np.float32)

    zd = surfaces[0]
    above = z > zd
    med = cavity & above & ~lung
    # heart and great vessels (no contrast: blood and myocardium look alike)
    ht, hy, hx, hay, hax, hhz, ang = a.heart
    prof = 1.0 - ((t - ht) / (hhz * 0.93)) ** 2
    if prof > 0:
        s = np.sqrt(prof)
        c, si = np.cos(ang), np.sin(ang)
        uu = (x - hx) * c + (y - hy) * si
        vv = -(x - hx) * si + (y - hy) * c
        heart = (uu / (hax * s - 3.0 + 1e-3)) ** 2 + (vv / (hay * s - 3.0 + 1e-3)) ** 2 < 1.0
        hu[med & heart] = HU_BLOOD
    ya = a.spine_y - a.vb_r - 9.0
    if t < 0.72:
        hu[(cavity & ((x - 22.0) ** 2 + (y - ya) ** 2 < 12.5**2))] = HU_BLOOD
    if 0.42 < t < 0.72:
        hu[med & ((x + 8.0) ** 2 + (y + 25.0) ** 2 < 15.0**2)] = HU_BLOOD
    if abs(t - 0.715) < 0.04:
        d = _dist_to_polyline_2d(y, x, [(-25.0, -8.0), (0.0, 6.0), (ya, 22.0)])
        hu[med & (d < 13.0)] = HU_BLOOD
    if t > 0.72:  # brachiocephalic, carotid and subclavian trunks
        for vy, vx in ((-20.0, -12.0), (-10.0, 8.0), (0.0, 20.0), (-22.0, -28.0)):
            hu[med & ((x - vx) ** 2 + (y - vy) ** 2 < 7.0**2)] = HU_BLOOD
    # oesophagus, collapsed with a sliver of air
    ye = a.spine_y - a.vb_r - 6.0
    eso = (x - 6.0) ** 2 + (y - ye) ** 2
    hu[med & (eso < 7.5**2)] = HU_MUSCLE
    hu[med & (eso < 1.8**2)] = HU_AIR

    below = cavity & ~above
    if np.any(below):
        sub = np.full(shape, HU_FAT, dtype=np.float32)
        liver = x < 25.0 - 0.6 * (y - cy)
        sub[liver] = HU_LIVER
        st_y, st_x = cy - 20.0, 62.0
        stomach = ((x - st_x) / 48.0) ** 2 + ((y - st_y) / 42.0) ** 2 < 1.0
        stomach &= z < a.z(a.dome_t[1]) - 6.0
        sub[stomach] = HU_STOMACH
        sub[stomach & (y < st_y - 26.0)] = HU_AIR  # supine: gas rises anteriorly
        spleen = ((x - 88.0) / 30.0) ** 2 + ((y - cy - 45.0) / 42.0) ** 2 < 1.0
        sub[spleen & ~stomach] = HU_SPLEEN
        hu = np.where(below, sub, hu)
        hu[below & ((x - 22.0) ** 2 + (y - ya) ** 2 < 12.5**2)] = HU_BLOOD

    _spine(a, z, hu, x, y, theta)
    # sternum: manubrium and body, anterior midline within the rib layer
    if 0.33 < t < 0.9:
        half_w = 16.0 + 10.0 * _ss(0.75, 0.85, t)
        sy = cy - ay - a.wall / 2.0
        e = (x / half_w) ** 2 + ((y - sy) / (a.wall / 2.0 + 1.0)) ** 2
        hu[e < 1.0] = HU_CORTICAL
        hu[e < 0.6] = HU_MARROW
    return hu, lab, cavity


def _ribs(a: _Anatomy, z, dz, hu, ring, depth, theta) -> None:
    """Draw ribs and costal cartilage in the chest-wall ring, averaged over the slice thickness."""
    idx = np.nonzero(ring)
    if idx[0].size == 0:
        return
    d = depth[idx]
    th = theta[idx]
    ns = int(np.clip(np.ceil(dz / 1.5), 1, 4))
    acc = np.zeros(d.shape, dtype=np.float32)
    weight = np.zeros(d.shape, dtype=np.float32)
    for k in range(ns):
        zz = z + ((k + 0.5) / ns - 0.5) * dz
        zr = zz - a.rib_z0 + a.rib_drop * (1.0 - np.cos(th)) / 2.0
        n = np.round(zr / a.rib_pitch)
        dzr = zr - n * a.rib_pitch
        rib_no = -n  # 0 for the first rib
        height = 5.0 + 2.5 * _ss(0.0, 2.2, th)  # ribs widen anteriorly
        e = ((d - a.wall / 2.0) / 3.2) ** 2 + (dzr / height) ** 2
        bony_end = 2.2 + 0.25 * (rib_no < 7)
        valid = (rib_no >= 0) & (rib_no < 12) & (th > 0.12)
        bone = valid & (e < 1.0) & (th < bony_end)
        cart = valid & (e < 1.0) & (th >= bony_end) & (th < 2.95) & (rib_no < 10)
        val = np.where(e < 0.5, HU_MARROW, HU_CORTICAL)
        acc += np.where(bone, val, np.where(cart, HU_CARTILAGE, 0.0))
        weight += bone | cart
    frac = weight / ns
    mean = np.where(weight > 0, acc / np.maximum(weight, 1), 0.0)
    hu[idx] = hu[idx] * (1.0 - frac) + mean * frac


def _spine(a: _Anatomy, z, hu, x, y, theta) -> None:
    """Vertebral body with discs, spinal canal, arch, spinous and transverse processes."""
    zr = z - a.rib_z0
    disc = abs(zr - np.round(zr / a.rib_pitch) * a.rib_pitch) < 2.5
    r2 = x**2 + (y - a.spine_y) ** 2
    body = r2 < a.vb_r**2
    hu[body] = HU_DISC if disc else HU_CORTICAL * 0.8
    if not disc:
        hu[r2 < (a.vb_r - 1.8) ** 2] = HU_VERTEBRA
    cy = a.spine_y + a.vb_r + 9.0
    rc2 = x**2 + (y - cy) ** 2
    arch = (rc2 < 14.0**2) & (y > a.spine_y + a.vb_r - 3.0)
    arch |= (np.abs(x) < 4.0) & (y > cy) & (y < cy + 34.0)
    arch |= (np.abs(y - cy + 2.0) < 3.5) & (np.abs(x) < 27.0)
    hu[arch & ~body] = 0.5 * (HU_CORTICAL + HU_VERTEBRA)
    hu[rc2 < 8.0**2] = HU_CORD


# ------------------------------------------------------------ tubular trees


def _grow_tree(rng, root, pts, r_leaf, exponent, r_cap):
    """Space-filling branching tree from ``root`` towards sample points of one lung.

    Each node owns a set of target points, steps part of the way to their
    centroid, and splits them along their principal axis; radii follow the pipe
    model ``r ~ n ** exponent`` (Murray-like), so vessels thin towards the pleura.
    Returns a list of (p0, p1, r0, r1) segments in mm.
    """
    segs = []
    stack = [(np.asarray(root, float), pts)]
    while stack:
        p, pp = stack.pop()
        n = len(pp)
        r = min(r_leaf * n**exponent, r_cap)
        if n == 1:
            segs.append((p, pp[0], r, r * 0.8))
            continue
        c = pp.mean(axis=0)
        q = p + rng.uniform(0.35, 0.6) * (c - p)
        segs.append((p, q, r, r))
        xc = pp - c
        if n > 6:
            _, vecs = np.linalg.eigh(xc.T @ xc)
            order = np.argsort(xc @ vecs[:, -1])
        else:  # small sets: the widest coordinate is as good and much cheaper
            order = np.argsort(xc[:, int(np.argmax(np.ptp(xc, axis=0)))])
        k = int(np.clip(round(n * rng.uniform(0.3, 0.7)), 1, n - 1))
        stack.append((q, pp[order[:k]]))
        stack.append((q, pp[order[k:]]))
    return segs


def _sample_lung_points(rng, a: _Anatomy, side: int, n: int, bounds) -> np.ndarray:
    """``n`` uniform random points (z, y, x mm) inside one lung, by rejection."""
    lo, hi = bounds
    out = []
    count = 0
    while count < n:
        cand = rng.uniform(lo, hi, size=(4 * n, 3))
        ok = a.lungs(cand[:, 0], cand[:, 1], cand[:, 2]) == side
        out.append(cand[ok])
        count += int(ok.sum())
    return np.concatenate(out)[:n]


def _rasterise(segs, vol, grid, pixel, dz, grow=None) -> None:
    """Max-combine the partial-volume occupancy of tapered cylinders into ``vol``.

    Occupancy is anti-aliased over a pixel in-plane and averaged over sub-slices in
    z; vessels thinner than a pixel keep their cross-section area as a lower
    intensity, as partial volume does in a real scanner. Segments are cut into
    short pieces whose boxes are evaluated in batches, so thousands of small
    branches cost a few vectorised passes instead of a Python loop each.
    """
    if not segs:
        return
    p0 = np.array([s[0] for s in segs], float)
    p1 = np.array([s[1] for s in segs], float)
    r0 = np.array([s[2] for s in segs], float)
    r1 = np.array([s[3] for s in segs], float)
    if grow is not None:
        r0, r1 = grow(r0), grow(r1)
    # pieces no longer than a few radii keep the boxes tight around oblique branches
    length = np.linalg.norm(p1 - p0, axis=1)
    npieces = np.maximum(1, np.ceil(length / np.maximum(4.0, 3.0 * np.maximum(r0, r1)))).astype(int)
    seg = np.repeat(np.arange(len(segs)), npieces)
    k = np.arange(seg.size) - np.repeat(np.cumsum(npieces) - npieces, npieces)
    f0 = (k / npieces[seg])[:, None]
    f1 = ((k + 1) / npieces[seg])[:, None]
    a0 = p0[seg] + (p1 - p0)[seg] * f0
    a1 = p0[seg] + (p1 - p0)[seg] * f1
    ra = r0[seg] + (r1 - r0)[seg] * f0[:, 0]
    rb = r0[seg] + (r1 - r0)[seg] * f1[:, 0]
    re_max = np.maximum(np.maximum(ra, rb), pixel / 2.0)
    keep = (np.maximum(ra, rb) / re_max) ** 2 >= 0.04  # fainter than ~2 HU: skip
    a0, a1, ra, rb, re_max = a0[keep], a1[keep], ra[keep], rb[keep], re_max[keep]

    zc, yc, xc = grid
    shape = vol.shape
    org = np.array([zc[0], yc[0], xc[0]], float)
    sp = np.array([dz, yc[1] - yc[0], xc[1] - xc[0]], float)
    m = (re_max + pixel)[:, None] + np.array([0.0, 0.0, 0.0])
    m[:, 0] += dz / 2.0
    i0 = np.ceil((np.minimum(a0, a1) - m - org) / sp).astype(int)
    i1 = np.floor((np.maximum(a0, a1) + m - org) / sp).astype(int)
    ext = i1 - i0 + 1
    ext[:, 1:] = (ext[:, 1:] + 3) // 4 * 4  # few distinct box shapes, so few batches
    ns = int(np.clip(np.ceil(dz / 1.5), 1, 4))
    offs = ((np.arange(ns) + 0.5) / ns - 0.5) * dz
    flat_vol = vol.reshape(-1)
    keys, inverse = np.unique(ext, axis=0, return_inverse=True)
    for gi, (kz, ky, kx) in enumerate(keys):
        if kz <= 0 or ky <= 0 or kx <= 0:
            continue
        members = np.nonzero(inverse.ravel() == gi)[0]
        per = max(1, int(3e6 // (kz * ky * kx * ns)))
        for c in range(0, members.size, per):
            b = members[c : c + per]
            iz = i0[b, 0, None] + np.arange(kz)
            iy = i0[b, 1, None] + np.arange(ky)
            ix = i0[b, 2, None] + np.arange(kx)
            vz = (iz >= 0) & (iz < shape[0])
            vy = (iy >= 0) & (iy < shape[1])
            vx = (ix >= 0) & (ix < shape[2])
            zz = (org[0] + iz * sp[0] - a0[b, 0, None])[:, :, None, None]
            yy = (org[1] + iy * sp[1] - a0[b, 1, None])[:, None, :, None]
            xx = (org[2] + ix * sp[2] - a0[b, 2, None])[:, None, None, :]
            d = (a1[b] - a0[b]).reshape(-1, 3, 1, 1, 1)
            dd = (d * d).sum(axis=1) + 1e-9
            rab = ra[b].reshape(-1, 1, 1, 1)
            rdb = (rb[b] - ra[b]).reshape(-1, 1, 1, 1)
            occ = np.zeros((b.size, kz, ky, kx), dtype=np.float32)
            for off in offs:
                z_ = zz + off
                s = np.clip((z_ * d[:, 0] + yy * d[:, 1] + xx * d[:, 2]) / dd, 0.0, 1.0)
                dist = np.sqrt((z_ - s * d[:, 0]) ** 2 + (yy - s * d[:, 1]) ** 2 + (xx - s * d[:, 2]) ** 2)
                r = rab + rdb * s
                re = np.maximum(r, pixel / 2.0)
                occ += np.clip((re - dist) / pixel + 0.5, 0.0, 1.0) * (r / re) ** 2
            occ /= ns
            valid = vz[:, :, None, None] & vy[:, None, :, None] & vx[:, None, None, :] & (occ > 0.004)
            flat = (iz[:, :, None, None] * shape[1] + iy[:, None, :, None]) * shape[2] + ix[:, None, None, :]
            np.maximum.at(flat_vol, flat[valid], occ[valid])


# ------------------------------------------------------------------ lesions


@dataclass
class _Lesion:
    kind: str
    side: int
    sl: tuple  # slices of the bounding box in the volume
    weight: np.ndarray  # 0..1 blend weight, exactly 0 where untouched
    target: np.ndarray  # HU the weight blends towards
    labels: np.ndarray  # uint8 label per voxel of the box
    lobe: str = ""


def _box(centre_idx, half_idx, shape):
    return tuple(
        slice(max(int(c - h), 0), min(int(c + h) + 1, n))
        for c, h, n in zip(centre_idx, half_idx, shape, strict=True)
    )


def _box_coords(sl, grid):
    return tuple(
        g[s].reshape([-1 if i == ax else 1 for i in range(3)])
        for ax, (g, s) in enumerate(zip(grid, sl, strict=True))
    )


def _pick_centres(rng, weights, n):
    flat = weights.ravel().astype(float)
    flat /= flat.sum()
    return np.unravel_index(rng.choice(flat.size, size=n, p=flat), weights.shape)


def covid_location_weight(sel: np.ndarray, cdist: np.ndarray, lower_floor: float = 0.05) -> np.ndarray:
    """Where a COVID-19 focus sits in one lung: subpleural, lower-zone and posterior predominant.

    ``sel`` is the lung's (coarse) mask with axes running superior-wards and posterior-wards,
    ``cdist`` the distance to the pleura in mm; ``lower_floor`` keeps some weight on the upper zones.
    """
    zs = np.nonzero(sel.any(axis=(1, 2)))[0]
    tz = (np.arange(sel.shape[0]) - zs.min()) / max(zs.max() - zs.min(), 1)
    ys = np.nonzero(sel.any(axis=(0, 2)))[0]
    ty = (np.arange(sel.shape[1]) - ys.min()) / max(ys.max() - ys.min(), 1)
    w = sel * np.exp(-cdist / 8.0)  # subpleural
    w = w * (np.clip(1.0 - tz, 0, 1) ** 2 + lower_floor)[:, None, None]  # lower zones
    return w * (0.3 + np.clip(ty, 0, 1) ** 1.5)[None, :, None]  # posterior (dependent)


def _covid_lesions(rng, a, lung, grid, spacing, severity, coarse) -> list[_Lesion]:
    """Bilateral, peripheral, lower and posterior predominant GGO patches."""
    cmask, cstep, cdist = coarse
    n = int(np.clip(round(3 + 7 * severity + rng.uniform(-1.0, 1.0)), 3, 10))
    sides = [1, 2] + list(rng.integers(1, 3, size=n - 2))
    rng.shuffle(sides)
    lesions = []
    zc = grid[0]
    for side in sides:
        sel = cmask == side
        if not sel.any():
            continue
        w = covid_location_weight(sel, cdist)
        ci = np.array([c[0] for c in _pick_centres(rng, w, 1)], float) * [1, cstep, cstep]
        radius = (14.0 + 30.0 * severity) * rng.uniform(0.6, 1.25)
        roll = rng.uniform()
        if roll < 0.15 + 0.35 * severity:
            kind = "consolidating"
        elif roll < 0.45 + 0.3 * severity:
            kind = "crazy paving"
        else:
            kind = "GGO"
        les = _blob_lesion(rng, a, lung, grid, spacing, ci, radius, side, kind)
        if les is not None:
            lesions.append(les)
        log.debug("COVID lesion %s side %d at %s r=%.0f", kind, side, ci, radius)
    del zc
    return lesions


def _blob_lesion(rng, a, lung, grid, spacing, ci, radius, side, kind) -> _Lesion | None:
    """A patch with an irregular soft margin, clipped to one lung."""
    half = [1.45 * radius / s + 2 for s in spacing]
    sl = _box(ci, half, lung.shape)
    zz, yy, xx = _box_coords(sl, grid)
    c = np.array([grid[i][int(np.clip(ci[i], 0, len(grid[i]) - 1))] for i in range(3)])
    rot = _rotation(rng)
    axes = radius * np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.45, 0.8)])
    dz_, dy_, dx_ = zz - c[0], yy - c[1], xx - c[2]
    q = sum(((rot[0, i] * dz_ + rot[1, i] * dy_ + rot[2, i] * dx_) / axes[i]) ** 2 for i in range(3))
    shape = tuple(s.stop - s.start for s in sl)
    noise = np.clip(_smooth_field(rng, shape, spacing, radius * 0.35), -2.5, 2.5)
    s = 1.0 - q + 0.35 * noise  # stays <= 0 beyond 1.37 radii, inside the box
    inside = lung[sl] == side
    w = (_ss(0.0, 0.3, s) * inside).astype(np.float32)
    w[w < _W_MIN] = 0.0
    if not np.any(w > 0):
        return None
    hu_g = rng.uniform(*HU_GGO)
    tex = _smooth_field(rng, shape, spacing, 4.0)
    target = hu_g + 35.0 * tex
    labels = np.where(w > 0, LESION_CODES["GGO"], 0).astype(np.uint8)
    out_kind = "GGO"
    if kind == "consolidating":
        core = _ss(0.35, 0.55, s + 0.15 * tex) * (w > 0)
        hu_c = rng.uniform(*HU_CONSOLIDATION)
        target = target + core * (hu_c - target)
        w = np.maximum(w, core)
        labels[core > 0.5] = LESION_CODES["consolidation"]
    elif kind == "crazy paving":
        septa = _septal_network(rng, zz, yy, xx, w > 0, spacing)
        target = target + septa * (HU_SEPTA - target)
        labels[w > 0] = LESION_CODES["crazy paving"]
        out_kind = "crazy paving"
    return _Lesion(out_kind, side, sl, w, target.astype(np.float32), labels)


def _septal_network(rng, zz, yy, xx, where, spacing) -> np.ndarray:
    """Polygonal reticulation: Voronoi cell walls of ~1-2 cm secondary lobules."""
    out = np.zeros(where.shape, dtype=np.float32)
    idx = np.nonzero(where)
    if idx[0].size == 0:
        return out
    pts = np.stack(
        [
            zz.ravel()[idx[0] if zz.shape[0] > 1 else 0] * np.ones(idx[0].size),
            yy.ravel()[idx[1] if yy.shape[1] > 1 else 0] * np.ones(idx[0].size),
            xx.ravel()[idx[2] if xx.shape[2] > 1 else 0] * np.ones(idx[0].size),
        ],
        axis=1,
    )
    lo, hi = pts.min(0) - 10.0, pts.max(0) + 10.0
    cell = 9.0
    n_seeds = int(np.prod((hi - lo) / cell)) + 4
    seeds = rng.uniform(lo, hi, size=(n_seeds, 3))
    d, _ = cKDTree(seeds).query(pts, k=2)
    gap = (d[:, 1] - d[:, 0]) / 2.0  # distance to the bisecting wall
    width = max(0.6, 0.5 * min(spacing[1], spacing[2]))
    out[idx] = np.clip(1.0 - gap / width, 0.0, 1.0) * 0.8
    return out


def _cap_lesions(rng, a, lung, grid, spacing, severity, coarse) -> list[_Lesion]:
    """Lobar or segmental consolidation, mostly in one lung, stopping at the fissure."""
    cmask, cstep, cdist = coarse
    side = 1 if rng.uniform() < 0.6 else 2
    lesions = []
    sides = [side]
    if rng.uniform() < 0.15:
        sides.append(3 - side)  # a smaller focus in the other lung
    for i, sd in enumerate(sides):
        name = "right" if sd == 1 else "left"
        lobes = (3, 1, 2) if sd == 1 else (5, 4)
        probs = (0.6, 0.25, 0.15) if sd == 1 else (0.7, 0.3)
        lobe = int(rng.choice(lobes, p=probs))
        lobar = i == 0 and rng.uniform() < 0.3 + 0.4 * severity
        les = _consolidation(rng, a, lung, grid, spacing, sd, name, lobe, lobar, small=i > 0)
        if les is not None:
            lesions.append(les)
    return lesions


def _consolidation(rng, a, lung, grid, spacing, side, name, lobe, lobar, small) -> _Lesion | None:
    sel = lung == side
    idx = np.nonzero(sel.any(axis=(1, 2)))[0]
    if idx.size == 0:
        return None
    zsl = slice(idx.min(), idx.max() + 1)
    ys = np.nonzero(sel[zsl].any(axis=(0, 2)))[0]
    xs = np.nonzero(sel[zsl].any(axis=(0, 1)))[0]
    sl = (zsl, slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    zz, yy, xx = _box_coords(sl, grid)
    in_lobe = (lung[sl] == side) & (a.lobe(zz, yy, xx, name) == lobe)
    if in_lobe.sum() < 10:
        in_lobe = lung[sl] == side
    shape = in_lobe.shape
    noise = _smooth_field(rng, shape, spacing, 12.0)
    if lobar:
        s = 0.55 + 0.45 * noise
    else:
        # a segment: a wedge of the lobe reaching the pleura around a peripheral centre
        pts = np.argwhere(in_lobe)
        pick = pts[rng.integers(len(pts))]
        c = np.array([zz.ravel()[pick[0]], yy.ravel()[pick[1]], xx.ravel()[pick[2]]])
        radius = rng.uniform(18.0, 28.0) if small else rng.uniform(30.0, 50.0)
        q = ((zz - c[0]) / (1.2 * radius)) ** 2 + ((yy - c[1]) / radius) ** 2 + ((xx - c[2]) / radius) ** 2
        s = 1.0 - q + 0.3 * noise
    w_c = _ss(0.0, 0.12, s) * in_lobe
    rim = (_ss(-0.2, 0.0, s) * in_lobe) * (rng.uniform() < 0.6)
    w_c[w_c < _W_MIN] = 0.0
    w_g = np.where((w_c == 0) & (rim > _W_MIN), rim, 0.0)
    if not np.any(w_c > 0):
        return None
    hu_c = rng.uniform(*HU_CONSOLIDATION)
    hu_g = rng.uniform(*HU_GGO)
    tex = _smooth_field(rng, shape, spacing, 5.0)
    target = np.where(w_c > 0, hu_c + 8.0 * tex, hu_g + 25.0 * tex)
    w = np.where(w_c > 0, w_c, 0.7 * w_g).astype(np.float32)
    labels = np.where(w_c > 0, 2, np.where(w_g > 0, 1, 0)).astype(np.uint8)
    names = {1: "RUL", 2: "RML", 3: "RLL", 4: "LUL", 5: "LLL"}
    return _Lesion("consolidation", side, sl, w, target.astype(np.float32), labels, lobe=names[lobe])


def _nodules(rng, lung, grid, spacing, coarse) -> list[_Lesion]:
    cmask, cstep, cdist = coarse
    out = []
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(2.0, 5.0)
        w = (cmask > 0) & (cdist > r + 6.0)
        if not w.any():
            continue
        ci = np.array([c[0] for c in _pick_centres(rng, w.astype(float), 1)], float) * [1, cstep, cstep]
        half = [r / s + 2 for s in spacing]
        sl = _box(ci, half, lung.shape)
        zz, yy, xx = _box_coords(sl, grid)
        c = [grid[i][int(ci[i])] for i in range(3)]
        dist = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        pixel = min(spacing[1:])
        # thick slices make small nodules partial-volume averaged; approximate by the z-distance scale
        soft = np.clip((r - dist) / pixel + 0.5, 0.0, 1.0)
        side = int(cmask[tuple(int(round(v)) for v in ci * [1, 1 / cstep, 1 / cstep])])
        soft = soft * (lung[sl] == side)
        soft[soft < _W_MIN] = 0.0
        if not np.any(soft > 0):
            continue
        labels = np.where(soft > 0, 4, 0).astype(np.uint8)
        target = np.full(soft.shape, rng.uniform(*HU_NODULE), dtype=np.float32)
        out.append(_Lesion("nodule", side, sl, soft.astype(np.float32), target, labels))
    return out


# --------------------------------------------------------------------- main


def _normalise_kind(kind: str) -> str:
    key = str(kind).strip()
    if key in ("NP", "CAP", "COVID-19"):
        return key
    try:
        return _KIND_ALIASES[key.lower()]
    except KeyError:
        raise ValueError(f"kind must be 'NP', 'CAP' or 'COVID-19' (or an alias), got {kind!r}") from None


def make_phantom(
    kind: str = "COVID-19",
    *,
    n_slices: int = 64,
    size: int = 512,
    spacing=(5.0, None, None),
    seed: int = 0,
    nodules: bool = False,
    severity: float | None = None,
) -> Phantom:
    """Build a synthetic chest CT with exact lung and lesion masks.

    Parameters
    ----------
    kind : {"NP", "CAP", "COVID-19"}
        Class; "normal", "cap", "covid" are accepted aliases (any case).
    n_slices : int
        Number of axial slices; ``n_slices * spacing[0]`` spans apex to bases.
    size : int
        In-plane matrix (``size`` x ``size``).
    spacing : tuple
        (z, y, x) mm; in-plane ``None`` means a 350 mm field of view over ``size``.
    seed : int
        Seed of every random choice; the same arguments give the same phantom.
    nodules : bool
        Add one to three solid 4-10 mm nodules (lesion type 4).
    severity : float, optional
        0..1 extent of disease; drawn from the seed when None.

    Returns
    -------
    Phantom
        int16 HU volume (identity direction, LPS origin centred on 0), masks, label
        and one dict per lesion with ``type``, ``lung``, ``centre_zyx`` (voxel
        index), ``centre_mm``, ``n_voxels``, ``labels`` and, for CAP, ``lobe``.
    """
    label = _normalise_kind(kind)
    if int(n_slices) < 4 or int(size) < 32:
        raise ValueError(f"need n_slices >= 4 and size >= 32, got {n_slices}, {size}")
    nz, n = int(n_slices), int(size)
    sp = list(spacing) + [None] * (3 - len(spacing))
    dz = float(sp[0]) if sp[0] is not None else 5.0
    dy = float(sp[1]) if sp[1] is not None else FOV_MM / n
    dx = float(sp[2]) if sp[2] is not None else FOV_MM / n
    spacing_zyx = (dz, dy, dx)
    origin = tuple(-(m - 1) / 2.0 * s for m, s in zip((nz, n, n), spacing_zyx, strict=True))
    zc = origin[0] + dz * np.arange(nz)
    yc = (origin[1] + dy * np.arange(n)).astype(np.float32)
    xc = (origin[2] + dx * np.arange(n)).astype(np.float32)
    grid = (zc, yc, xc)
    pixel = min(dy, dx)

    rng = np.random.default_rng(seed)
    # independent streams so that lesions of one kind do not change the anatomy
    # (spawning a fifth stream leaves the first four, and so older phantoms, unchanged)
    r_anat, r_tree, r_les, r_noise, r_gut = (np.random.default_rng(s) for s in rng.spawn(5))
    if severity is None:
        severity = float(r_les.uniform(0.25, 0.85))
    severity = float(np.clip(severity, 0.0, 1.0))
    a = _random_anatomy(r_anat, zc[0] - dz / 2.0, nz * dz)

    hu = np.empty((nz, n, n), dtype=np.float32)
    lung = np.empty((nz, n, n), dtype=np.uint8)
    cavity = np.empty((nz, n, n), dtype=bool)
    Y, X = yc[:, None], xc[None, :]
    surfaces = (a.diaphragm(Y, X), a.apex(Y, X, -1.0), a.apex(Y, X, 1.0))
    surfaces = tuple(s.astype(np.float32) for s in surfaces)
    for k in range(nz):
        hu[k], lung[k], cavity[k] = _anatomy_slice(a, float(zc[k]), Y, X, dz, surfaces)
    _gastric_content(r_gut, hu, spacing_zyx)

    # slow perfusion-like variation of the parenchyma, and milder in soft tissue
    tex = _smooth_field(r_anat, hu.shape, spacing_zyx, 20.0)
    tex *= np.where(lung > 0, np.float32(16.0), np.where(cavity | (hu > -200), np.float32(6.0), 0))
    hu += tex
    del tex

    # coarse lung grid for centre sampling and distances to the pleura
    cstep = max(1, int(round(3.0 / pixel)))
    cmask = lung[:, ::cstep, ::cstep]
    cdist = ndimage.distance_transform_edt(cmask > 0, sampling=(dz, cstep * dy, cstep * dx))
    coarse = (cmask, cstep, cdist)

    if label == "COVID-19":
        lesions = _covid_lesions(r_les, a, lung, grid, spacing_zyx, severity, coarse)
    elif label == "CAP":
        lesions = _cap_lesions(r_les, a, lung, grid, spacing_zyx, severity, coarse)
    else:
        lesions = []
    if nodules:
        lesions += _nodules(r_les, lung, grid, spacing_zyx, coarse)

    lesion_mask = np.zeros(lung.shape, dtype=np.uint8)
    prio = np.array([_LABEL_PRIORITY[i] for i in range(5)])
    for les in lesions:
        view = hu[les.sl]
        blended = view + les.weight * (les.target - view)
        np.maximum(view, np.where(les.weight > 0, blended, view), out=view)
        mview = lesion_mask[les.sl]
        take = prio[les.labels] > prio[mview]
        mview[take] = les.labels[take]

    _draw_trees(r_tree, a, hu, lung, cavity, grid, pixel, dz)

    # scanner: white noise scaled so that, once blurred with the PSF, it has the
    # wanted standard deviation (2-D Gaussian smoothing divides it by 2 sqrt(pi) sigma)
    psf = PSF_SIGMA_MM / pixel
    gain = 2.0 * np.sqrt(np.pi) * psf if psf > 0.35 else 1.0
    hu += r_noise.standard_normal(hu.shape, dtype=np.float32) * np.float32(NOISE_SIGMA_HU * gain)
    if psf > 0.35:
        hu = ndimage.gaussian_filter(hu, (0, psf, psf), truncate=3.0)
    np.clip(hu, HU_MIN, 3071.0, out=hu)
    hu_i16 = np.rint(hu).astype(np.int16)

    volume = CTVolume(hu=hu_i16, spacing=spacing_zyx, origin=origin, is_hu=True, source="phantom")
    records = []
    for les in lesions:
        own = les.labels > 0
        idx = np.argwhere(own)
        centre = idx.mean(axis=0) + [s.start for s in les.sl]
        rec = {
            "type": les.kind,
            "lung": "right" if les.side == 1 else "left",
            "centre_zyx": tuple(int(round(c)) for c in centre),
            "centre_mm": tuple(round(float(v), 2) for v in volume.index_to_world(centre)),
            "n_voxels": int(own.sum()),
            "labels": sorted(int(v) for v in np.unique(les.labels[own])),
        }
        if les.lobe:
            rec["lobe"] = les.lobe
        records.append(rec)
    log.debug("phantom %s seed %d: %d lesions, severity %.2f", label, seed, len(records), severity)
    return Phantom(volume=volume, lung_mask=lung, lesion_mask=lesion_mask, label=label, lesions=records)


def _draw_trees(rng, a: _Anatomy, hu, lung, cavity, grid, pixel, dz) -> None:
    """Pulmonary arteries, veins and airways (with trachea and main bronchi)."""
    zc = grid[0]
    lo = np.array([zc[0], -a.cav_ay + a.cav_cy, -a.cav_ax])
    hi = np.array([zc[-1], a.cav_ay + a.cav_cy, a.cav_ax])
    tc = a.carina_t
    z = a.z
    trachea_y = a.spine_y - a.vb_r - 20.0
    carina = np.array([z(tc), trachea_y, 0.0])
    hila = {
        1: (np.array([z(tc - 0.06), trachea_y - 8.0, -42.0]), np.array([z(tc - 0.1), -5.0, -30.0])),
        2: (np.array([z(tc - 0.09), trachea_y - 4.0, 46.0]), np.array([z(tc - 0.07), -2.0, 32.0])),
    }
    veins_root = {1: np.array([z(0.36), 8.0, -28.0]), 2: np.array([z(0.38), 10.0, 30.0])}
    arteries, veins, airways = [], [], []
    # coarse grids cannot show the finest branches: grow fewer, with the same trunks
    dens = float(np.clip(0.75 / pixel, 0.3, 1.0))
    n_art, n_vein = int(1800 * dens), int(1400 * dens)
    r_leaf = 0.45 * dens**-0.38
    # mediastinal pulmonary arteries: trunk from the right ventricle, then left and right
    trunk_top = np.array([z(tc - 0.05), -12.0, 14.0])
    arteries.append((np.array([z(0.47), -35.0, 20.0]), trunk_top, 13.0, 13.0))
    for side in (1, 2):
        bronchus_end, pa_root = hila[side]
        airways.append((carina, bronchus_end, 6.5 if side == 1 else 5.5, 5.0))
        arteries.append((trunk_top, pa_root, 10.0, 8.0))
        pts = _sample_lung_points(rng, a, side, n_art, (lo, hi))
        arteries += _grow_tree(rng, pa_root, pts, r_leaf, 0.38, 7.0)
        pts = _sample_lung_points(rng, a, side, n_vein, (lo, hi))
        veins += _grow_tree(rng, veins_root[side], pts, r_leaf, 0.38, 7.0)
        pts = _sample_lung_points(rng, a, side, 160, (lo, hi))
        airways += _grow_tree(rng, bronchus_end, pts, 0.55, 0.42, 5.0)
    airways.append((np.array([z(1.1), trachea_y + 2.0, 0.0]), carina, 9.0, 8.5))
    airways = [s for s in airways if s[2] > 0.6]  # distal bronchioles are below CT resolution

    vessel = np.zeros(hu.shape, dtype=np.float32)
    _rasterise(arteries + veins, vessel, grid, pixel, dz)
    wall = np.zeros(hu.shape, dtype=np.float32)
    _rasterise(airways, wall, grid, pixel, dz, grow=lambda r: r + 0.3 + 0.2 * r)
    lumen = np.zeros(hu.shape, dtype=np.float32)
    _rasterise(airways, lumen, grid, pixel, dz)
    flat = hu.reshape(-1)
    cav = cavity.reshape(-1)
    for channel, value in ((vessel, HU_BLOOD), (wall, HU_AIRWAY_WALL), (lumen, HU_AIR)):
        idx = np.flatnonzero(channel)
        idx = idx[cav[idx] & (flat[idx] < 100.0)]  # never paint over bone or outside the thorax
        frac = channel.reshape(-1)[idx]
        flat[idx] += frac * (value - flat[idx])
