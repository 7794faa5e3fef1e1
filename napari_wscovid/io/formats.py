"""Non-DICOM readers: NIfTI (nibabel), MHA/MHD/NRRD (SimpleITK), PNG/JPG (Pillow).

Every reader returns a :class:`CTVolume` in patient LPS, (z, y, x) order, reoriented (axes permuted
and flipped, never interpolated) so that its direction is as close to identity as the data allows:
axis 0 runs inferior -> superior, axis 1 anterior -> posterior, axis 2 right -> left.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import numpy as np

from .isolated import read_isolated
from .volume import CTLoadError, CTVolume, check_load_size

logger = logging.getLogger(__name__)

# Stored values below this are padding or outside the field of view, not tissue: real air is about
# -1000 HU with noise well above -1200, while scanners pad with -2000, -2048 or -3024 (case 26).
PADDING_HU_THRESHOLD = -1500.0
# A volume with no value below this is not in HU (air is about -1000 HU) (case 27).
HU_AIR_EVIDENCE = -200.0

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _warn(warnings: list[str], message: str) -> None:
    warnings.append(message)
    logger.warning(message)


def check_memory(name: str, shape, max_bytes: int, available: int | None | str = "now") -> int:
    """``check_load_size`` for a volume of ``shape`` (``available`` as there); its voxel count."""
    n_voxels = int(np.prod([int(s) for s in shape], dtype=np.int64))
    size = " x ".join(str(int(s)) for s in shape)
    check_load_size(f"{name}: {size} voxels", n_voxels, "the whole volume", max_bytes, available)
    return n_voxels


def nearest_identity_geometry(shape, spacing, origin, direction):
    """The axis permutation and flips that turn a grid nearest the identity (diagonal positive),
    and the grid they give: ``(perm, flipped axes, shape, spacing, origin, direction)``. No
    voxel is touched (the SR reader needs the grid of a CT it does not hold)."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    spacing = [float(s) for s in spacing]
    origin = np.asarray(origin, dtype=float)
    perm = max(itertools.permutations(range(3)), key=lambda p: sum(abs(direction[w, p[w]]) for w in range(3)))
    shape = [int(shape[a]) for a in perm]
    spacing = [spacing[a] for a in perm]
    direction = direction[:, list(perm)]
    flipped = []
    for w in range(3):
        if direction[w, w] < 0:
            origin = origin + direction[:, w] * spacing[w] * (shape[w] - 1)
            direction[:, w] = -direction[:, w]
            flipped.append(w)
    return perm, flipped, tuple(shape), tuple(spacing), tuple(float(o) for o in origin), direction


def reorient_nearest_identity(hu, spacing, origin, direction, mask=None):
    """Permute and flip axes (no interpolation) so the direction is nearest identity, diagonal positive."""
    perm, flipped, _, spacing, origin, direction = nearest_identity_geometry(
        hu.shape, spacing, origin, direction
    )
    hu = np.transpose(hu, perm)
    mask = None if mask is None else np.transpose(mask, perm)
    for w in flipped:
        hu = np.flip(hu, axis=w)
        mask = None if mask is None else np.flip(mask, axis=w)
    hu = np.ascontiguousarray(hu)
    mask = None if mask is None else np.ascontiguousarray(mask)
    return hu, spacing, origin, direction, mask


def _finish(name, data, spacing, origin, direction, source, warnings, *, check_hu=True) -> CTVolume:
    """Float32 data, HU check, NaN and padding masking, reorientation: the common tail of every reader."""
    hu = np.asarray(data, dtype=np.float32)
    if hu.size == 0:
        raise CTLoadError(f"{name}: image of shape {hu.shape} has no voxels; refused")
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise CTLoadError(
            f"{name}: voxel spacing {tuple(spacing)} is zero, negative or not a number; refused"
        )
    mask = ~np.isfinite(hu)
    if mask.any():
        _warn(warnings, f"{name}: {int(mask.sum())} NaN/infinite voxel(s) masked as padding")
    finite = hu[~mask]
    is_hu = check_hu and finite.size > 0 and float(finite.min()) < HU_AIR_EVIDENCE
    if check_hu and not is_hu:
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (np.nan, np.nan)
        _warn(
            warnings,
            f"{name}: values {low:g}..{high:g} do not look like Hounsfield units (nothing below "
            f"{HU_AIR_EVIDENCE:g}, where air is about -1000 HU): treated as display intensities "
            "(is_hu=False)",
        )
    if is_hu:
        mask |= hu < PADDING_HU_THRESHOLD
        hu[mask] = -1024.0
    else:
        hu[mask] = 0.0
    hu, spacing, origin, direction, mask = reorient_nearest_identity(hu, spacing, origin, direction, mask)
    return CTVolume(
        hu=hu,
        spacing=spacing,
        origin=origin,
        direction=direction,
        is_hu=is_hu,
        source=source,
        warnings=warnings,
        padding_mask=mask if mask.any() else None,
    )


# ------------------------------------------------------------------------------------------ NIfTI


def _affine_problem(affine) -> str | None:
    if affine is None:
        return "not set"
    affine = np.asarray(affine, dtype=float)
    if not np.all(np.isfinite(affine)):
        return "contains NaN/infinite values"
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(norms < 1e-6):
        return f"has a zero voxel size (column norms {np.round(norms, 4).tolist()})"
    rotation = affine[:3, :3] / norms
    if not np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-4):
        return "is sheared (axes not orthogonal)"
    return None


def _raw_pixdim(image, path: Path) -> np.ndarray:
    """pixdim[1:4] as stored: nibabel silently replaces negative values by their absolute value."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as handle:
            raw = type(image.header).from_fileobj(handle, check=False)
        return np.asarray(raw["pixdim"][1:4], dtype=float)
    except Exception:
        return np.asarray(image.header["pixdim"][1:4], dtype=float)


def _nifti_affine(header, pixdim, name: str, warnings: list[str]) -> np.ndarray:
    """Choose sform or qform (RAS) and say why; refuse when neither is usable (case 21)."""
    try:
        sform, s_code = header.get_sform(coded=True)
    except Exception:
        sform, s_code = None, 0
    try:
        qform, q_code = header.get_qform(coded=True)
    except Exception:
        qform, q_code = None, 0
    s_problem = _affine_problem(sform) if s_code else "not set"
    q_problem = _affine_problem(qform) if q_code else "not set"
    if np.any(~np.isfinite(pixdim)) or np.any(pixdim <= 0):
        _warn(warnings, f"{name}: pixdim {pixdim.tolist()} has zero, negative or NaN voxel sizes")
    if s_code and s_problem is None:
        if q_code and q_problem is None:
            rotation_diff = np.abs(sform[:3, :3] - qform[:3, :3]).max()
            shift_diff = np.abs(sform[:3, 3] - qform[:3, 3]).max()
            if rotation_diff > 1e-3 or shift_diff > 1e-2:
                _warn(
                    warnings,
                    f"{name}: qform and sform disagree (matrix differs by {rotation_diff:.4f}, origin by "
                    f"{shift_diff:.2f} mm); using the sform, as nibabel and most tools do",
                )
        return np.asarray(sform, dtype=float)
    if q_code and q_problem is None:
        if s_code:
            _warn(
                warnings,
                f"{name}: sform {s_problem}; falling back to the qform (rigid) — any shear is dropped",
            )
        return np.asarray(qform, dtype=float)
    if s_code or q_code:
        raise CTLoadError(f"{name}: no usable orientation: sform {s_problem}, qform {q_problem}; refused")
    zooms = np.where(np.isfinite(pixdim) & (pixdim > 0), pixdim, 1.0)
    _warn(warnings, f"{name}: neither qform nor sform is set: voxel-only volume, spacing {zooms.tolist()} mm")
    return np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])  # RAS of an identity LPS grid


def load_nifti(path: str | os.PathLike, *, max_bytes: int) -> CTVolume:
    """Read a NIfTI-1/2 file; RAS world coordinates are converted to LPS (case 22)."""
    import nibabel as nib

    path = Path(path)
    name = path.name
    try:
        image = nib.load(str(path))
    except Exception as exc:
        raise CTLoadError(f"{name}: unreadable NIfTI ({type(exc).__name__})") from exc
    shape = tuple(int(s) for s in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise CTLoadError(f"{name}: {len(shape)}-D image {shape}; only 3-D volumes are supported")
    if len(shape) < 2:
        raise CTLoadError(f"{name}: {len(shape)}-D image; not a volume")
    check_memory(name, shape, max_bytes)
    warnings: list[str] = []
    affine_ras = _nifti_affine(image.header, _raw_pixdim(image, path), name, warnings)
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    try:
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(shape + (1,) * (3 - len(shape)))
    except Exception as exc:
        raise CTLoadError(f"{name}: pixel data unreadable or truncated ({type(exc).__name__})") from exc
    matrix = affine_lps[:3, :3]
    spacing_xyz = np.linalg.norm(matrix, axis=0)
    direction_xyz = matrix / spacing_xyz
    return _finish(
        name,
        np.transpose(data, (2, 1, 0)),  # NIfTI arrays are (i, j, k) = (x, y, z)
        spacing_xyz[::-1],
        affine_lps[:3, 3][::-1],
        direction_xyz[::-1, ::-1],
        "NIfTI",
        warnings,
    )


# --------------------------------------------------------------------------------- MHA/MHD/NRRD


def load_itk(path: str | os.PathLike, *, max_bytes: int, in_process: bool = False) -> CTVolume:
    """Read MHA/MHD/NRRD with SimpleITK (LPS); its (x, y, z) spacing/origin reordered to (z, y, x).

    ITK reads in a child process (:mod:`.isolated`): its MetaImage and NRRD readers crash, loop or
    run out of memory on damaged headers of a few bytes (found by an audit), and pick a reader by
    content, so a DICOM file renamed ``.mha`` reaches GDCM."""
    path = Path(path)
    name = path.name
    image = read_isolated("itk", path, max_bytes, in_process)
    data = image.pixels
    dim = image.dimension
    direction_itk = np.eye(3)
    direction_itk[:dim, :dim] = np.asarray(image.direction, dtype=float).reshape(dim, dim)
    spacing_xyz = np.ones(3)
    spacing_xyz[:dim] = image.spacing
    origin_xyz = np.zeros(3)
    origin_xyz[:dim] = image.origin
    if dim == 2:
        data = data[None]
    warnings: list[str] = []
    if not np.allclose(direction_itk.T @ direction_itk, np.eye(3), atol=1e-4):
        raise CTLoadError(f"{name}: direction matrix is not orthonormal (sheared); refused")
    source = "NRRD" if path.suffix.lower() in (".nrrd", ".nhdr") else "MetaImage"
    return _finish(
        name, data, spacing_xyz[::-1], origin_xyz[::-1], direction_itk[::-1, ::-1], source, warnings
    )


# ---------------------------------------------------------------------------------------- 2-D


def load_2d_image(path: str | os.PathLike, *, max_bytes: int, in_process: bool = False) -> CTVolume:
    """A PNG/JPG slice as a one-slice volume of display intensities (is_hu=False, case 27).

    Pillow decodes in a child process (:mod:`.isolated`): a 516 kB PNG took it 4 GB and 100 s."""
    path = Path(path)
    name = path.name
    data = read_isolated("picture", path, max_bytes, in_process).pixels  # writable (a float TIFF's was not)
    warnings: list[str] = []
    _warn(
        warnings,
        f"{name}: 2-D image of display intensities, not Hounsfield units (is_hu=False); pixel size unknown, "
        "1 mm assumed",
    )
    return _finish(
        name, data[None], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "image", warnings, check_hu=False
    )


def format_of(path: str | os.PathLike) -> str:
    """'dicom', 'nifti', 'itk' or 'image', from the path alone."""
    path = Path(path)
    lower = path.name.lower()
    if path.is_dir():
        return "dicom"
    if lower.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if lower.endswith(ITK_SUFFIXES):
        return "itk"
    if lower.endswith(IMAGE_SUFFIXES):
        return "image"
    return "dicom"
