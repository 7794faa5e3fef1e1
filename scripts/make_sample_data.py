"""Write the bundled sample: a synthetic COVID-19 chest CT as a DICOM series plus its lesion mask.

    python scripts/make_sample_data.py [--overwrite]

The parameters are those of ``napari_wscovid._sample_data.FALLBACK_KWARGS``, so an install
without ``sample_data/`` regenerates the very same study.
"""

from __future__ import annotations

import argparse
import json
import shutil

from napari_wscovid._sample_data import FALLBACK_KWARGS, SAMPLE_DIR
from napari_wscovid.io.write import write_dicom_series, write_image
from napari_wscovid.phantom import make_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if SAMPLE_DIR.exists():
        if not args.overwrite:
            raise SystemExit(f"{SAMPLE_DIR} exists; pass --overwrite to rebuild it")
        shutil.rmtree(SAMPLE_DIR)
    SAMPLE_DIR.mkdir(parents=True)
    phantom = make_phantom(**FALLBACK_KWARGS)
    # RLE lossless keeps the series a few MB while every HU stays exact.
    write_dicom_series(
        phantom.volume, SAMPLE_DIR / "dicom", series_description="napari-wscovid phantom", compress=True
    )
    write_image(phantom.lesion_mask, SAMPLE_DIR / "lesion_mask.nii.gz", like=phantom.volume)
    write_image(phantom.lung_mask, SAMPLE_DIR / "lung_mask.nii.gz", like=phantom.volume)
    info = {
        "generator": "napari_wscovid.phantom.make_phantom",
        "kwargs": FALLBACK_KWARGS,
        "label": phantom.label,
        "lesions": len(phantom.lesions),
        "lesion_codes": {"1": "GGO", "2": "consolidation", "3": "crazy paving", "4": "nodule"},
        "lung_codes": {"1": "right", "2": "left"},
    }
    (SAMPLE_DIR / "README.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
