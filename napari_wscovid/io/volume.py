"""The CT volume every other module works on.

Geometry convention (BAD_INPUTS case 23): arrays are indexed (z, y, x) and every
geometric quantity here is given in the same (z, y, x) order, so it can be handed
to napari as ``scale`` / ``translate`` without reordering. World coordinates are
patient LPS millimetres (DICOM / ITK convention) written as (z_LPS, y_LPS, x_LPS).

``direction[:, a]`` is the unit vector of array axis ``a`` expressed in world
(z, y, x) components, i.e. ITK's direction matrix with both axes reversed:
``direction_zyx = direction_itk[::-1, ::-1]``. A voxel index ``(k, j, i)`` maps to

    world = origin + direction @ (spacing * (k, j, i))
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

#: Largest volume a reader will hold in memory (bytes) unless told otherwise.
DEFAULT_MAX_BYTES = 4 * 1024**3
#: Bytes a loaded volume takes per voxel: float32 HU plus a bool padding mask.
BYTES_PER_VOXEL = 5


def available_memory_bytes() -> int | None:
    """Memory the system can still give this process (Linux MemAvailable; psutil elsewhere);
    None when it cannot be told."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def check_load_size(
    name: str, n_voxels: int, detail: str, max_bytes: int, available: int | None | str = "now"
) -> None:
    """Refuse, before any pixel is read, a volume above ``max_bytes`` or above the memory the
    system has left (``available`` bytes; by default measured now), naming both figures."""
    estimate = int(n_voxels) * BYTES_PER_VOXEL
    if estimate > max_bytes:
        raise CTLoadError(
            f"{name} would need about {estimate / 1024**3:.2f} GiB ({detail}, {BYTES_PER_VOXEL} bytes per "
            f"voxel), above the limit max_bytes={max_bytes / 1024**3:.2f} GiB; refused before reading pixels"
        )
    if available == "now":
        available = available_memory_bytes()
    if available is not None and estimate > available:
        raise CTLoadError(
            f"{name} would need about {estimate / 1024**3:.2f} GiB ({detail}) but only "
            f"{available / 1024**3:.2f} GiB of memory is free; refused before reading pixels. Close other "
            "programs or layers, or open a part of the series"
        )


class CTLoadError(ValueError):
    """A file or series that cannot be loaded; the message names the file and the reason."""


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder, described without reading its pixels."""

    key: str  # pseudonymous series key (never a UID or a patient identifier)
    modality: str
    n_slices: int
    rows: int
    columns: int
    description: str  # SeriesDescription, protocol text; no patient data
    files: tuple[str, ...] = field(repr=False, default=())
    excluded: tuple[str, ...] = ()  # human-readable reasons why files were left out
    is_ct: bool = True
    incomplete: bool = False  # some files are truncated or corrupt; loading it is refused


def grid_geometry(shape, spacing, origin, direction) -> dict:
    """:meth:`CTVolume.geometry` of a grid given by its parts (a grid known without its voxels)."""
    return {
        "shape": [int(n) for n in shape],
        "spacing": [round(float(s), 6) for s in spacing],
        "origin": [round(float(o), 4) for o in origin],
        "direction": np.round(np.asarray(direction, dtype=float), 6).tolist(),
    }


@dataclass
class CTVolume:
    """A CT (or display-intensity) volume with its geometry in millimetres."""

    hu: np.ndarray  # (z, y, x); Hounsfield units when is_hu, float32 or int16
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, float, float]  # (z, y, x) mm, patient LPS, centre of voxel (0, 0, 0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))  # see module docstring
    is_hu: bool = True
    series_key: str = ""
    source: str = ""  # format, e.g. "DICOM", "NIfTI"; never a path or a patient name
    warnings: list[str] = field(default_factory=list)
    padding_mask: np.ndarray | None = None  # True where a voxel is padding / outside the FOV

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if self.hu.ndim != 3:
            raise ValueError(f"CTVolume.hu must be 3-D (z, y, x), got shape {self.hu.shape}")
        if not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise CTLoadError(f"spacing must be finite and positive, got {self.spacing}")
        if not self.series_key:
            self.series_key = geometry_key(self.hu.shape, self.spacing, self.origin, self.direction)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu.shape)

    @property
    def is_axis_aligned(self) -> bool:
        return bool(np.allclose(np.abs(self.direction), np.eye(3), atol=1e-6))

    def index_to_world(self, index_zyx) -> np.ndarray:
        """Voxel indices (..., 3) in (z, y, x) -> LPS mm (..., 3) in (z, y, x)."""
        idx = np.asarray(index_zyx, dtype=float)
        return np.asarray(self.origin) + (idx * np.asarray(self.spacing)) @ self.direction.T

    def world_to_index(self, world_zyx) -> np.ndarray:
        """LPS mm (..., 3) in (z, y, x) -> fractional voxel indices (..., 3)."""
        w = np.asarray(world_zyx, dtype=float) - np.asarray(self.origin)
        return (w @ np.linalg.inv(self.direction).T) / np.asarray(self.spacing)

    def geometry(self) -> dict:
        """A JSON-friendly description of the grid, used to match boxes to a CT."""
        return grid_geometry(self.shape, self.spacing, self.origin, self.direction)

    def layer_kwargs(self) -> dict:
        """``scale``/``translate`` (and ``rotate`` when oblique) for a napari layer, its axes
        named for the patient in mm (:data:`LAYER_AXES`)."""
        kwargs = {"scale": self.spacing, "translate": self.origin, **LAYER_AXES}
        if not self.is_axis_aligned:
            kwargs["rotate"] = self.direction.tolist()
        return kwargs


#: Every layer on a CT names its axes z / y / x in millimetres (napari would say -3, -2, -1 in
#: pixels); all layers must agree or napari ignores the units.
LAYER_AXES = {"axis_labels": ("z", "y", "x"), "units": ("mm", "mm", "mm")}


def geometry_key(shape, spacing, origin, direction) -> str:
    """A short, stable, non-identifying key derived from the grid alone."""
    text = repr(
        (
            tuple(int(n) for n in shape),
            tuple(round(float(s), 4) for s in spacing),
            tuple(round(float(o), 2) for o in origin),
            tuple(np.round(np.asarray(direction, dtype=float).ravel(), 4)),
        )
    )
    return "ct-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def pseudonymous_key(*identifiers: str, salt: str = "napari-wscovid") -> str:
    """Hash identifiers (e.g. a SeriesInstanceUID) into a key that reveals none of them."""
    digest = hashlib.sha256("\x1f".join((salt, *identifiers)).encode()).hexdigest()
    return "ct-" + digest[:12]
