"""npe2 sample: a synthetic COVID-19 chest CT (phantom) and its true lesion mask."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from napari_wscovid._reader import ct_layer_data

logger = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_data" / "phantom_covid"
LESION_LAYER = "true lesions (phantom)"
# Used when the shipped DICOM series is absent (e.g. a wheel install): same kind and seed.
FALLBACK_KWARGS = {"kind": "COVID-19", "seed": 0, "n_slices": 64, "size": 256}


def load_sample_phantom() -> list[tuple]:
    """The phantom CT (Image) and its true lesion mask (hidden Labels), in patient mm."""
    dicom_dir = SAMPLE_DIR / "dicom"
    mask_file = SAMPLE_DIR / "lesion_mask.nii.gz"
    if dicom_dir.is_dir() and any(dicom_dir.iterdir()):
        from napari_wscovid.io import load_ct

        volume = load_ct(dicom_dir)
        lesion_mask = _read_mask(mask_file, volume.shape) if mask_file.is_file() else None
    else:
        from napari_wscovid.phantom import make_phantom

        logger.info(
            "sample DICOM series not found at %s; generating the phantom instead (%s)",
            dicom_dir,
            ", ".join(f"{k}={v}" for k, v in FALLBACK_KWARGS.items()),
        )
        phantom = make_phantom(**FALLBACK_KWARGS)
        volume, lesion_mask = phantom.volume, phantom.lesion_mask
    layers = [ct_layer_data(volume, name=f"CT {volume.series_key}")]
    if lesion_mask is not None:
        layers.append(
            (
                np.asarray(lesion_mask, dtype=np.uint8),
                {
                    **volume.layer_kwargs(),
                    "name": LESION_LAYER,
                    "visible": False,
                    "opacity": 0.5,
                    "features": {
                        "index": [0, 1, 2, 3, 4],
                        "lesion": ["none", "ground glass", "consolidation", "crazy paving", "nodule"],
                    },
                    "metadata": {"wscovid_geometry": volume.geometry(), "series_key": volume.series_key},
                },
                "labels",
            )
        )
    return layers


def _read_mask(path: Path, shape) -> np.ndarray | None:
    import SimpleITK as sitk

    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # SimpleITK arrays are (z, y, x)
    if tuple(mask.shape) != tuple(shape):
        logger.warning("sample lesion mask has shape %s, the CT %s; not shown", mask.shape, tuple(shape))
        return None
    return mask
