"""Write the fuzzers' seed corpora under fuzz/seeds/<harness>/: small synthetic files only.

Each seed is a valid (or nearly valid) input the readers accept, built here with pydicom,
nibabel and the plugin's own writers, so no real scan is ever copied into the repository.
Run ``python fuzz/make_seeds.py`` after a format change; the files are committed (well under 1 MB).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np

SEEDS = Path(__file__).resolve().parent / "seeds"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BOXES_GEOMETRY  # noqa: E402


def _dicom_seeds(out: Path) -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        RLELossless,
    )

    def ct(rows=8, cols=8, frames=1, syntax=ExplicitVRLittleEndian, **extra) -> Dataset:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6"
        meta.TransferSyntaxUID = syntax
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [-10.0, -12.0, 3.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 2.0
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        if frames > 1:
            ds.NumberOfFrames = frames
        for keyword, value in extra.items():
            setattr(ds, keyword, value)
        pixels = (np.arange(rows * cols * frames, dtype=np.int16).reshape(frames, rows, cols) * 7) % 1400
        ds.PixelData = pixels.astype(">i2" if syntax == ExplicitVRBigEndian else "<i2").tobytes()
        return ds

    def write(ds: Dataset, name: str) -> None:
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        (out / name).write_bytes(buffer.getvalue())

    write(ct(), "explicit_le.dcm")
    write(ct(syntax=ImplicitVRLittleEndian), "implicit_le.dcm")
    write(ct(syntax=ExplicitVRBigEndian), "explicit_be.dcm")
    write(ct(syntax=DeflatedExplicitVRLittleEndian), "deflated.dcm")
    write(ct(PixelPaddingValue=-2000, PixelPaddingRangeLimit=-1500), "padding_range.dcm")
    no_position = ct()
    del no_position.ImagePositionPatient
    write(no_position, "no_position.dcm")
    no_rescale = ct()
    del no_rescale.RescaleSlope, no_rescale.RescaleIntercept
    write(no_rescale, "no_rescale.dcm")
    rle = ct()
    rle.compress(RLELossless)
    write(rle, "rle.dcm")
    enhanced = ct(frames=2)
    enhanced.SOPClassUID = enhanced.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    write(enhanced, "multiframe.dcm")
    try:
        from pydicom.uid import JPEG2000Lossless

        j2k = ct(rows=32, cols=32)
        j2k.compress(JPEG2000Lossless)
        write(j2k, "jpeg2000.dcm")
    except Exception as exc:  # the encoder plugin is optional
        print(f"no JPEG 2000 seed ({type(exc).__name__}: {exc})")
    try:
        from pydicom.uid import JPEGLSLossless

        jls = ct(rows=32, cols=32)
        jls.compress(JPEGLSLossless)
        write(jls, "jpeg_ls.dcm")
    except Exception as exc:  # pyjpegls is optional
        print(f"no JPEG-LS seed ({type(exc).__name__}: {exc})")
    # JPEG Lossless SV1 (COVID-CT-MD's transfer syntax): pydicom has no encoder for it, GDCM has;
    # its codestream and pixel module go into the same CT header as the other seeds.
    import SimpleITK as sitk

    pixels = ((np.arange(32 * 32).reshape(32, 32) * 7) % 1400 - 1024).astype(np.int16)
    tmp = out / "_gdcm_jpeg.dcm"
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(tmp))
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.Execute(sitk.GetImageFromArray(pixels))
    encoded = pydicom.dcmread(tmp)
    tmp.unlink()
    jpeg = ct(rows=32, cols=32, syntax=encoded.file_meta.TransferSyntaxUID)
    for keyword in ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PixelData"):
        setattr(jpeg, keyword, getattr(encoded, keyword))
    jpeg.RescaleSlope = encoded.get("RescaleSlope", 1)
    jpeg.RescaleIntercept = encoded.get("RescaleIntercept", 0)
    write(jpeg, "jpeg_lossless_sv1.dcm")


def _nifti_seeds(out: Path) -> None:
    import nibabel as nib

    data = (np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2) * 90) - 1024
    affine = np.diag([-0.7, -0.7, 2.0, 1.0])
    affine[:3, 3] = (10.0, 12.0, -30.0)

    def write(image, name: str) -> None:
        (out / name).write_bytes(image.to_bytes())

    both = nib.Nifti1Image(data, affine)
    both.set_qform(affine, code=1)
    both.set_sform(affine, code=1)
    write(both, "qform_sform.nii")
    sform_only = nib.Nifti1Image(data, affine)
    sform_only.set_qform(None, code=0)
    write(sform_only, "sform_only.nii")
    bare = nib.Nifti1Image(data, affine)
    bare.set_qform(None, code=0)
    bare.set_sform(None, code=0)
    write(bare, "no_orientation.nii")
    c, s = np.cos(0.3), np.sin(0.3)
    oblique = affine.copy()
    oblique[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ affine[:3, :3]
    write(nib.Nifti1Image(data.astype(np.float32), oblique), "oblique_float.nii")
    write(nib.Nifti1Image(data[:, :, 0], affine), "two_d.nii")
    write(nib.Nifti1Image(data.astype(np.uint8), affine, dtype=np.uint8), "uint8.nii")
    write(nib.Nifti2Image(data, affine), "nifti2.nii")


def _boxes_seeds(out: Path) -> None:
    from napari_wscovid.io.boxes_io import boxes_to_csv_text, boxes_to_json_text
    from napari_wscovid.results import Box

    boxes = [
        Box(1, 2, 3, 6, 7, "COVID-19", 0.87, 12.5, "detected", "joint"),
        Box(0, 0, 0, 1, 1, "CAP", float("nan"), 0.49, "added", "user"),
    ]
    doc = boxes_to_json_text(
        boxes, BOXES_GEOMETRY, series_key="ct-0", classes=("COVID-19", "CAP"), reviewed_slices=[0, 2]
    )
    csv_text = boxes_to_csv_text(boxes, BOXES_GEOMETRY)
    # the first byte picks the suffix and whether the CT's geometry is given (see fuzz_boxes.py)
    for mode, name, text in (
        (0, "boxes_json", doc),
        (2, "boxes_json_expected_geometry", doc),
        (1, "boxes_csv", csv_text),
        (3, "boxes_csv_expected_geometry", csv_text),
        (0, "empty_json", boxes_to_json_text([], BOXES_GEOMETRY)),
        (1, "empty_csv", boxes_to_csv_text([], BOXES_GEOMETRY)),
    ):
        (out / name).write_bytes(bytes([mode]) + text.encode())


def _weights_seeds(out: Path) -> None:
    import torch

    from napari_wscovid.models import registry
    from napari_wscovid.models.decovnet import DeCoVNet, DeCoVNetConfig
    from napari_wscovid.models.fecnn import FeCNN, FeCNNConfig
    from napari_wscovid.models.wsnet import WSNet, tiny_config

    torch.manual_seed(0)
    nets = {
        "wsnet": WSNet(tiny_config(input_size=32)),
        "decovnet": DeCoVNet(
            DeCoVNetConfig(widths=(2, 2, 2, 2, 2, 2), pool_depths=(2, 1), input_size=(16, 16))
        ),
        "fecnn": FeCNN(
            FeCNNConfig(
                stem_width=2,
                widths=(2, 2, 2, 2),
                depths=(1, 1, 1, 1),
                fpn_width=2,
                head_width=2,
                input_size=32,
            )
        ),
    }
    for name, net in nets.items():
        registry.save_model(net, out / f"{name}.safetensors", name=name, version="1", overwrite=True)
    # without the tensors' checksum, mutated tensor bytes reach the tensor checks instead of stopping there
    state = {k: v.detach().half() for k, v in nets["wsnet"].state_dict().items() if v.is_floating_point()}
    meta = {"format": registry.FORMAT, "config": json.dumps(nets["wsnet"].config.to_dict())}
    data = registry._safetensors_bytes(state, meta)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    del header["__metadata__"][registry.TENSOR_DIGEST_KEY]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    (out / "wsnet_no_digest.safetensors").write_bytes(
        len(text).to_bytes(8, "little") + text + data[8 + size :]
    )


def main() -> None:
    for name, build in (
        ("dicom", _dicom_seeds),
        ("nifti", _nifti_seeds),
        ("boxes", _boxes_seeds),
        ("weights", _weights_seeds),
    ):
        folder = SEEDS / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        build(folder)
        files = sorted(folder.iterdir())
        print(f"{name}: {len(files)} seeds, {sum(f.stat().st_size for f in files):,} bytes")


if __name__ == "__main__":
    main()
