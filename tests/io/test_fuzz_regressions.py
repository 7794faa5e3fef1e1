"""Inputs the fuzzers (fuzz/) found that broke a reader, kept so the fixes stay fixed.

Each file under tests/data/fuzz_regressions/ is the crashing input as atheris wrote it; each
must now be refused with the reader's own error naming the file, and nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from napari_wscovid.io import CTLoadError, isolated, load_ct
from napari_wscovid.io import dicom as dicom_io

CASES = Path(__file__).resolve().parents[1] / "data" / "fuzz_regressions"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        # pylibjpeg-rle panicked on a corrupt segment; pyo3's PanicException is a BaseException, so it
        # passed the per-file `except Exception` and took the whole load down
        ("rle_decoder_panic.dcm", "(nothing padded): rle_decoder_panic.dcm: PanicException"),
        # a transfer syntax UID parsed as a sequence: pydicom failed only when the header was read
        ("lazy_element_fails_in_header.dcm", "unreadable DICOM header (BytesLengthException)"),
        # an element after the pixel data made GDCM allocate 2 GB for a 1 kB file; pydicom, reading it in
        # the GDCM child, asks for as much and meets the child's memory ceiling, so it is refused
        ("element_after_pixel_data_gdcm_2gb.dcm", "asked for far more memory than an image of this size"),
        # JPEG Lossless (GDCM's to decode) with broken fragment items: GDCM took 3.1 GB for 1.3 kB
        ("jpeg_fragments_gdcm_3gb.dcm", "damaged compressed pixel data, ValueError: Unexpected tag"),
        # JPEG Lossless whose frame lacks the start-of-image marker: GDCM took 4 GB for 769 bytes
        ("jpeg_without_soi_gdcm_4gb.dcm", "the compressed JPEG frame has no start-of-image marker"),
        # JPEG Lossless whose Huffman counts announce more codes than the segment holds: GDCM took
        # 1.5 GB and 10 s for 912 bytes (CI's fuzz run, 2026-11-29)
        ("jpeg_huffman_overrun_gdcm_1gb.dcm", "a JPEG Huffman table is damaged"),
        # JPEG Lossless with bytes that are no marker after its frame header: GDCM took 3.2 GB
        ("jpeg_no_marker_after_frame_header_gdcm_3gb.dcm", "has byte 0xbb where a marker belongs"),
        # JPEG Lossless of 18-bit precision: GDCM died of a segmentation fault (fuzzing, 2026-11-30)
        ("jpeg_18_bit_precision_gdcm_segfault.dcm", "gives a sample precision of 18 bits"),
        # a NIfTI header with a zero-length axis loaded as a (0, 3, 4) volume napari cannot show
        ("zero_length_axis.nii", "image of shape (0, 3, 4) has no voxels"),
    ],
)
def test_fuzzed_file_is_refused_by_name(name, reason):
    with pytest.raises(CTLoadError, match=name) as info:
        load_ct(CASES / name)
    assert reason in str(info.value)


def test_gdcm_reads_a_rewritten_copy_without_the_trailing_garbage(monkeypatch):
    """A stray element after the pixel data of an enhanced CT made GDCM take 3.6 GB; GDCM now gets
    pydicom's copy without it, and the two frames load."""
    import SimpleITK as sitk

    given = []

    class Recording(sitk.ImageFileReader):
        def SetFileName(self, name):  # noqa: N802 (SimpleITK's name)
            given.append(name)
            return super().SetFileName(name)

    # GDCM runs in a child process when loading; the rewrite is checked here, in this process
    monkeypatch.setattr(sitk, "ImageFileReader", Recording)
    image = dicom_io._read_with_gdcm(CASES / "trailing_element_gdcm_3gb.dcm")
    assert image.GetSize() == (8, 8, 2)
    assert len(given) == 1 and not given[0].endswith("trailing_element_gdcm_3gb.dcm")
    monkeypatch.undo()
    assert load_ct(CASES / "trailing_element_gdcm_3gb.dcm").shape == (2, 8, 8)


def test_gdcm_gets_no_file_meta_element_it_could_misread():
    """An element of unknown VR ('AI') in the file meta header made GDCM allocate 740 MB, never
    given back, for a 1 kB file (found by CI's fuzzing run); the copy GDCM reads has only the four
    file meta elements that name the object and its encoding. Memory is checked as this process's
    resident size after GDCM read the file here (loading runs it in a child), which kept the 740 MB."""
    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    image = dicom_io._read_with_gdcm(CASES / "file_meta_unknown_vr_gdcm_740mb.dcm")
    assert image.GetNumberOfPixels() == 128
    assert process.memory_info().rss - before < 200 * 2**20
    assert load_ct(CASES / "file_meta_unknown_vr_gdcm_740mb.dcm").hu.size == 128


@pytest.mark.parametrize(("rows", "sof_rows", "reason"), [
    (40, 32, "the compressed image is 32 x 32 pixels but the header says 40 x 32"),
    (32, 60000, "the compressed image is 60000 x 32 pixels but the header says 32 x 32"),
])  # fmt: skip
def test_jpeg_frame_header_must_match_the_dicom_header(tmp_path, rows, sof_rows, reason):
    """GDCM sizes its buffers from the codestream: a frame header that disagrees with Rows x
    Columns is refused before GDCM reads the file."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    seed = Path(__file__).resolve().parents[2] / "fuzz" / "seeds" / "dicom" / "jpeg_lossless_sv1.dcm"
    ds = pydicom.dcmread(seed)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sof = frame.index(b"\xff\xc3")
    frame[sof + 5 : sof + 7] = sof_rows.to_bytes(2, "big")
    ds.PixelData = encapsulate([bytes(frame)])
    ds.Rows = rows
    path = tmp_path / "lying.dcm"
    ds.save_as(path)
    with pytest.raises(CTLoadError, match="lying.dcm") as info:
        load_ct(path)
    assert reason in str(info.value)


def test_a_boxes_csv_with_an_infinite_area_exports_and_reads_back_the_same(tmp_path, monkeypatch):
    """The boxes fuzzer (CI, 2026-11-29): a CSV row with area_mm2 "inf" loaded, and its JSON export
    (which holds no infinity) read back NaN. The row is now skipped and named, as an infinite score."""
    from napari_wscovid.io.boxes_io import load_boxes, save_boxes
    from tests.conftest import REPO_ROOT

    monkeypatch.syspath_prepend(str(REPO_ROOT / "fuzz"))
    from common import BOXES_GEOMETRY

    data = (CASES / "boxes_csv_infinite_area.bin").read_bytes()
    assert data[0] & 3 == 3  # the harness's mode byte: a CSV, checked against its CT's grid
    path = tmp_path / "fuzzed.csv"
    path.write_bytes(data[1:])
    boxes, meta = load_boxes(path, expected_geometry=BOXES_GEOMETRY)
    assert any("area_mm2 is 'inf', not an area" in reason for reason in meta["skipped"])

    def fields(box):  # NaN (an unknown score or area) equal to itself
        return tuple("nan" if isinstance(v, float) and v != v else v for v in box.as_dict().values())

    for name in ("again.boxes.json", "again.csv"):
        out = save_boxes(tmp_path / name, boxes, BOXES_GEOMETRY)
        again, again_meta = load_boxes(out, expected_geometry=BOXES_GEOMETRY)
        assert again_meta["skipped"] == [] and [fields(b) for b in again] == [fields(b) for b in boxes]


SEEDS = Path(__file__).resolve().parents[2] / "fuzz" / "seeds" / "dicom"


@pytest.fixture
def gdcm_without_header_checks(monkeypatch):
    """The GDCM child without ``_check_encapsulated``: the damaged frames reach GDCM itself, as a
    damage no check knows yet would."""
    script = (
        "import sys; from pathlib import Path; import napari_wscovid.io.dicom as d; "
        "d._check_encapsulated = lambda ds, name: None; "
        "from napari_wscovid.io.isolated import _child; sys.exit(_child(Path(sys.argv[1])))"
    )
    command = [sys.executable, "-c", script]
    monkeypatch.setattr(isolated, "_child_command", lambda folder: [*command, str(folder)])


def test_a_decoder_crash_refuses_the_file_and_the_others_still_decode(tmp_path, gdcm_without_header_checks):
    """GDCM dies of a segmentation fault on the 18-bit frame; in the child that costs one refusal
    naming the file, and a fresh child decodes the files after it."""
    import shutil

    files = [tmp_path / "a.dcm", tmp_path / "crashing.dcm", tmp_path / "c.dcm"]
    shutil.copy(SEEDS / "jpeg_lossless_sv1.dcm", files[0])
    shutil.copy(CASES / "jpeg_18_bit_precision_gdcm_segfault.dcm", files[1])
    shutil.copy(SEEDS / "jpeg_lossless_sv1.dcm", files[2])
    with isolated.Decoding("gdcm", [(f, 32 * 32 * 8) for f in files]) as decoded:
        with pytest.raises(CTLoadError, match=r"crashing\.dcm: the JPEG decoder \(GDCM\) crashed \(SIG"):
            decoded.result(files[1])
        first, last = (np.asarray(decoded.result(f).pixels) for f in (files[0], files[2]))
    assert first.shape[-2:] == (32, 32)
    np.testing.assert_array_equal(first, last)


@pytest.mark.parametrize("name", ["jpeg_huffman_overrun_gdcm_1gb.dcm", "jpeg_without_soi_gdcm_4gb.dcm"])
def test_a_decoder_asking_for_gigabytes_is_stopped_at_the_ceiling(name, gdcm_without_header_checks):
    """Damaged frames that made GDCM take 1.5 to 4 GB: under the child's address-space ceiling
    (about 1 GiB for a 32 x 32 image) the allocation fails and the file is refused by name."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the address-space ceiling (RLIMIT_AS) is enforced on Linux only")
    with pytest.raises(CTLoadError, match=name):
        load_ct(CASES / name)


def test_a_hung_decoder_is_stopped_and_named(tmp_path, monkeypatch):
    """A decoder that never returns is stopped at the time limit; the file it was on is named."""
    script = (
        "import sys, time; from pathlib import Path; "
        "Path(sys.argv[1], 'started').write_text('0'); time.sleep(60)"
    )
    command = [sys.executable, "-c", script]
    monkeypatch.setattr(isolated, "_child_command", lambda folder: [*command, str(folder)])
    monkeypatch.setattr(isolated, "_SECONDS_PER_FILE", 3.0)
    with pytest.raises(CTLoadError, match=r"sv1\.dcm: the JPEG decoder \(GDCM\) took longer than 3 s"):
        load_ct(SEEDS / "jpeg_lossless_sv1.dcm")


# An audit of the MetaImage/NRRD/picture readers (2026-11-30): tiny headers that crashed, hung or
# blocked ITK in the viewer's process. Each is now read in a child process and refused by name.
_MHD = "ObjectType = Image\nNDims = 3\nDimSize = 16 16 8\nElementType = MET_SHORT\nElementDataFile = {}\n"
_NRRD = "NRRD0004\ntype: short\ndimension: 3\nsizes: 16 16 8\nendian: little\nencoding: {}\n"
_ITK_CASES = {
    # a data-file pattern used as a printf format: SIGSEGV
    "format_string.mhd": _MHD.format("%s 1 8 1"),
    # NDims = -1 then ElementSpacing: SIGSEGV while the header was read
    "negative_ndims.mha": "ObjectType = Image\nNDims = -1\nElementSpacing = 1\nElementType = MET_SHORT\n"
    "ElementDataFile = LOCAL\n",
    # an ASCII NRRD token longer than ITK's 1 kB buffer: SIGSEGV
    "long_ascii_token.nrrd": (_NRRD.format("ascii") + "\n") + "1" * 1100,
    # a data-file pattern with a huge field width: heap corruption, SIGABRT
    "pattern_width.nhdr": _NRRD.format("raw") + "data file: x%0999999d.raw 1 8 1\n",
    # the data file is the terminal: ITK waited on stdin for as long as napari's terminal was open
    "stdin.mhd": _MHD.format("/dev/stdin"),
}


@pytest.mark.parametrize("name", sorted(_ITK_CASES))
def test_a_metaimage_or_nrrd_header_that_broke_itk_is_refused_by_name(name, tmp_path):
    path = tmp_path / name
    path.write_text(_ITK_CASES[name])
    with pytest.raises(CTLoadError, match=name.replace(".", r"\.")):
        load_ct(path)


def test_a_dicom_renamed_mha_does_not_reach_gdcm_in_this_process(tmp_path):
    """ITK picks its reader by content: the 18-bit JPEG DICOM renamed .mha went to GDCM, in the
    viewer's process, past the DICOM route's checks, and crashed it."""
    import shutil

    path = tmp_path / "renamed.mha"
    shutil.copy(CASES / "jpeg_18_bit_precision_gdcm_segfault.dcm", path)
    with pytest.raises(CTLoadError, match=r"renamed\.mha: the MetaImage/NRRD reader \(ITK\) crashed"):
        load_ct(path)


def test_damaged_compressed_metaimage_pixels_are_refused_not_shown(tmp_path):
    """ITK only printed "Uncompress failed" and returned an image of uninitialised memory."""
    path = tmp_path / "garbage.mha"
    compressed = "CompressedData = True\nCompressedDataSize = 100\nElementDataFile"
    header = _MHD.format("LOCAL").replace("ElementDataFile", compressed)
    path.write_bytes(header.encode() + bytes(range(100)))
    with pytest.raises(CTLoadError, match=r"garbage\.mha: damaged pixel data .*Uncompress failed"):
        load_ct(path)


def test_a_looping_itk_header_is_stopped_at_the_time_limit(tmp_path, monkeypatch):
    """24 bytes on which ITK's MetaImage reader loops forever (it was still spinning after 36 minutes)."""
    monkeypatch.setattr(isolated, "_SECONDS_PER_FILE", 3.0)
    path = tmp_path / "loop.mha"
    path.write_text("NDims = -1\nDimSize = 16\n")
    with pytest.raises(
        CTLoadError, match=r"loop\.mha: the MetaImage/NRRD reader \(ITK\) took longer than 3 s"
    ):
        load_ct(path)


def test_a_float_tiff_named_png_loads(tmp_path):
    """Pillow gave a read-only array for a 32-bit float image, and masking it raised a bare
    ValueError naming no file."""
    from PIL import Image

    path = tmp_path / "float.png"
    Image.fromarray(np.full((64, 64), -5.0, np.float32), "F").save(path, format="TIFF")
    volume = load_ct(path)
    assert volume.shape == (1, 64, 64) and not volume.is_hu


# An audit of the in-process DICOM decoders (2026-11-30): each compressed syntax now decodes in a
# child process, so what broke the viewer's process is a refusal naming the file.


def test_a_jpeg2000_decoder_writing_past_its_buffer_is_a_refusal():
    """A JP2 palette box turns 1 component of 8 bits into N of 16, which pylibjpeg-openjpeg wrote
    past the buffer it sized from the header: heap corruption, then an abort or a segfault."""
    with pytest.raises(
        CTLoadError, match=r"j2k_palette_heap_overflow\.dcm: the pixel decoder \(pydicom\) crashed"
    ):
        load_ct(CASES / "j2k_palette_heap_overflow.dcm")


def test_a_jp2_box_of_length_zero_is_stopped_at_the_time_limit(monkeypatch):
    """pydicom's JPEG 2000 header parser never advances past a JP2 box of length 0 (not 'jp2c')."""
    monkeypatch.setattr(isolated, "_SECONDS_PER_FILE", 3.0)
    with pytest.raises(
        CTLoadError, match=r"length_zero_hang\.dcm: the pixel decoder \(pydicom\) took longer than 3 s"
    ):
        load_ct(CASES / "jp2_box_length_zero_hang.dcm")


def test_a_codestream_of_many_tiles_and_components_meets_the_memory_ceiling():
    """A 4.4 kB JPEG 2000 codestream with 1024 tiles of 1024 components made OpenJPEG take 1.2 GB."""
    with pytest.raises(CTLoadError, match=r"j2k_tiles_components_1gb\.dcm: "):
        load_ct(CASES / "j2k_tiles_components_1gb.dcm")


def test_a_deflate_bomb_is_refused_before_pydicom_inflates_it(tmp_path, monkeypatch):
    """pydicom inflates a Deflated Explicit VR data set whole, even for a header: 1 MB of deflated
    zeros took 2.1-3.1 GB. The stream is now measured first (the cap lowered here to 1 MiB)."""
    import pydicom

    monkeypatch.setattr(dicom_io, "MAX_INFLATED_BYTES", 2**20)
    ds = pydicom.dcmread(SEEDS / "explicit_le.dcm")
    ds.add_new(0x00091010, "OB", bytes(4 * 2**20))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    path = tmp_path / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 2**20 // 8
    with pytest.raises(CTLoadError, match=r"bomb\.dcm: its deflated data set inflates to more than 1 MiB"):
        load_ct(path)
    assert load_ct(SEEDS / "deflated.dcm").shape == (1, 8, 8)  # an ordinary deflated file still loads
    # in a folder the bomb is left out of the series with its reason, not as "not DICOM"
    from napari_wscovid.io.dicom import scan_dicom

    assert any("bomb.dcm: its deflated data set inflates" in s for s in scan_dicom(tmp_path).skipped)


def test_a_child_that_cannot_start_is_a_refusal_naming_the_file(monkeypatch):
    """A child that dies before its first file (a broken install, no memory to import in) is
    reported for the file asked for, as every refusal must be."""
    command = [sys.executable, "-c", "raise SystemExit('cannot import SimpleITK')"]
    monkeypatch.setattr(isolated, "_child_command", lambda folder: [*command, str(folder)])
    with pytest.raises(CTLoadError, match=r"sv1\.dcm: the JPEG decoder \(GDCM\) could not be started .*ITK"):
        load_ct(SEEDS / "jpeg_lossless_sv1.dcm")


def test_trusted_reading_in_this_process_gives_the_same_volume(tmp_path):
    """``trusted=True`` (training's thousands of known pictures) skips the child, not the reader."""
    from PIL import Image

    from napari_wscovid.io.write import write_image

    picture = tmp_path / "slice.png"
    Image.fromarray((np.arange(64 * 48) % 251).astype(np.uint8).reshape(64, 48)).save(picture)
    volume = load_ct(SEEDS / "explicit_le.dcm")
    mha = tmp_path / "ct.mha"
    write_image(volume, mha)
    for path in (picture, mha):
        isolated_volume, trusted_volume = load_ct(path), load_ct(path, trusted=True)
        np.testing.assert_array_equal(isolated_volume.hu, trusted_volume.hu)
        assert isolated_volume.geometry() == trusted_volume.geometry()
