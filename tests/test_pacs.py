"""Results where radiologists read: SEG and SR written with highdicom, checked by dciodvfy, and a
round trip through a real Orthanc (DICOMweb in, detect, SEG/SR out over STOW-RS and C-STORE,
queried and read back). The server is started on loopback by the fixture and stopped after."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom")
pytest.importorskip("dicomweb_client")

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "phantom_covid" / "dicom"


def _study_uid(folder: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _dciodvfy_errors(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy is not installed (apt install dicom3tools)")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def sample_run():
    from napari_wscovid import detect, load_ct

    volume = load_ct(str(SAMPLE))
    return volume, detect(volume, model="tiny-test", saliency="positive")


def _box_key(b):
    return (b.slice, b.y0, b.x0, b.y1, b.x1)


def test_seg_and_sr_are_valid_and_read_back(tmp_path, sample_run):
    from napari_wscovid.io.dicom_objects import (
        read_seg_labels,
        read_source_datasets,
        read_sr_boxes,
        write_dicom_objects,
    )

    volume, result = sample_run
    assert result.boxes, "the sample run should give boxes to write"
    seg, sr = write_dicom_objects(tmp_path, volume, read_source_datasets(SAMPLE, volume.series_key), result)
    assert _dciodvfy_errors(seg) == [] and _dciodvfy_errors(sr) == []

    boxes, meta = read_sr_boxes(sr)
    assert sorted(map(_box_key, boxes)) == sorted(map(_box_key, result.boxes))
    assert meta["geometry"] == volume.geometry() and meta["series_key"] == volume.series_key
    assert {b.origin for b in boxes} == {"detected"}

    labels, geometry, names = read_seg_labels(seg)
    assert names[1] == "Right lung" and names[2] == "Left lung"
    # the SEG omits empty frames: compare on the slices it holds; lesion (3) overrides lung
    first = int(round((geometry["origin"][0] - volume.origin[0]) / volume.spacing[0]))
    expected = result.lung_mask[first : first + labels.shape[0]]
    assert geometry["spacing"] == volume.geometry()["spacing"]
    assert np.array_equal(labels[labels != 3], expected[labels != 3])
    assert (labels == 3).any() == bool(result.boxes)


def test_sr_keeps_edited_and_rejected_boxes(tmp_path, sample_run):
    import dataclasses

    from napari_wscovid.io.dicom_objects import build_sr, read_source_datasets
    from napari_wscovid.io.dicom_objects import read_sr_boxes as read_back

    volume, result = sample_run
    edited = [
        dataclasses.replace(result.boxes[0], origin="edited", y1=result.boxes[0].y1 + 3),
        dataclasses.replace(result.boxes[1], origin="rejected"),
        dataclasses.replace(result.boxes[2], origin="added", class_name="COVID-19", source="user"),
    ]
    sr = build_sr(volume, read_source_datasets(SAMPLE, volume.series_key), result, edited)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    boxes, _ = read_back(tmp_path / "sr.dcm")
    assert [(b.origin, b.class_name, _box_key(b)) for b in boxes] == [
        (b.origin, b.class_name, _box_key(b)) for b in edited
    ]


def test_sr_carries_the_status_and_the_flags_behind_it(tmp_path, sample_run):
    import dataclasses

    import pydicom

    from napari_wscovid.io.dicom_objects import build_sr, read_source_datasets

    volume, result = sample_run
    flag = {"name": "low_confidence", "severity": "warn", "value": 0.41, "message": "below 0.50"}
    doubtful = dataclasses.replace(result, status="needs_review", qc=[flag])
    build_sr(volume, read_source_datasets(SAMPLE, volume.series_key), doubtful).save_as(
        tmp_path / "sr.dcm", enforce_file_format=True
    )
    meanings = {
        str(elem.value)
        for elem in pydicom.dcmread(tmp_path / "sr.dcm").iterall()
        if elem.keyword == "CodeMeaning"
    }
    assert "needs_review" in meanings and "warn: low_confidence = 0.41" in meanings
    assert _dciodvfy_errors(tmp_path / "sr.dcm") == []


def test_dicom_needs_a_dicom_input(tmp_path):
    from napari_wscovid.cli import main

    nifti = SAMPLE.parent / "lung_mask.nii.gz"
    assert main(["detect", str(nifti), "--out", str(tmp_path), "--model", "tiny-test", "--dicom"]) == 2


def test_round_trip_through_orthanc(orthanc, pacs_login, tmp_path, sample_run):
    """DICOMweb in -> detect -> SEG and SR -> STOW-RS into the same study -> QIDO/WADO back ->
    the SR read back gives the same boxes."""
    from dicomweb_client.api import DICOMwebClient

    from napari_wscovid.cli import main
    from napari_wscovid.io.boxes_io import load_boxes
    from napari_wscovid.io.dicom_objects import read_sr_boxes

    study = _study_uid(SAMPLE)
    out = tmp_path / "out"
    args = ["detect", f"dicomweb:{orthanc['dicomweb']}/studies/{study}", "--out", str(out)]
    args += ["--model", "tiny-test", "--send-to", f"dicomweb:{orthanc['dicomweb']}", "-q"]
    assert main(args) == 0
    assert _dciodvfy_errors(out / "seg.dcm") == [] and _dciodvfy_errors(out / "sr.dcm") == []
    local, _ = load_boxes(out / "boxes.json")
    assert local and sorted(map(_box_key, local)) == sorted(map(_box_key, sample_run[1].boxes))

    import requests

    client = DICOMwebClient(orthanc["dicomweb"], session=requests.Session())
    client._session.auth = orthanc["auth"]
    modalities = {s["00080060"]["Value"][0] for s in client.search_for_series(study_instance_uid=study)}
    assert {"CT", "SEG", "SR"} <= modalities
    import pydicom

    sent_uid = str(pydicom.dcmread(out / "sr.dcm", stop_before_pixels=True).SOPInstanceUID)
    sr_series = [
        s["0020000E"]["Value"][0]
        for s in client.search_for_series(study_instance_uid=study)
        if s["00080060"]["Value"][0] == "SR"
    ]
    found = [
        ds for uid in sr_series for ds in client.retrieve_series(study, uid) if ds.SOPInstanceUID == sent_uid
    ]
    assert len(found) == 1, "the SR sent is in the study, once"
    found[0].save_as(tmp_path / "back.dcm", enforce_file_format=True)
    boxes, meta = read_sr_boxes(tmp_path / "back.dcm")
    assert len(boxes) == len(local)
    assert sorted(map(_box_key, boxes)) == sorted(map(_box_key, local))  # same slices, same corners


def test_c_store_to_orthanc(orthanc, tmp_path, sample_run):
    import requests

    from napari_wscovid.io.dicom_objects import read_source_datasets, write_dicom_objects
    from napari_wscovid.io.pacs import send

    volume, result = sample_run
    paths = write_dicom_objects(tmp_path, volume, read_source_datasets(SAMPLE, volume.series_key), result)
    assert send(f"dimse://ORTHANC@127.0.0.1:{orthanc['dicom_port']}", paths) == 2
    import pydicom

    uid = str(pydicom.dcmread(paths[1], stop_before_pixels=True).SOPInstanceUID)
    found = requests.post(
        f"{orthanc['base']}/tools/find",
        json={"Level": "Instance", "Query": {"SOPInstanceUID": uid}},
        auth=orthanc["auth"],
        timeout=30,
    ).json()
    assert len(found) == 1


def test_pacs_failures_are_clear(orthanc, pacs_login, monkeypatch, tmp_path, unused_port):
    from napari_wscovid.io.pacs import PACSError, credentials, fetch_study, list_studies

    study = _study_uid(SAMPLE)
    assert any(s["study_uid"] == study for s in list_studies(orthanc["dicomweb"]))
    monkeypatch.setenv("WSCOVID_PACS_PASSWORD", "wrong")
    with pytest.raises(PACSError, match="HTTP 401 \\(check the credentials\\)") as err:
        fetch_study(f"dicomweb:{orthanc['dicomweb']}/studies/{study}", tmp_path / "a")
    assert "wrong" not in str(err.value) and study not in str(err.value)
    down = f"dicomweb:http://127.0.0.1:{unused_port()}/dicom-web/studies/{study}"
    with pytest.raises(PACSError, match="cannot reach the PACS"):
        fetch_study(down, tmp_path / "b")
    # a credentials file others may read is refused
    monkeypatch.delenv("WSCOVID_PACS_USER")
    config = tmp_path / "pacs.json"
    user, password = orthanc["auth"]
    config.write_text(json.dumps({"user": user, "password": password}))
    os.chmod(config, 0o644)
    monkeypatch.setenv("WSCOVID_PACS_CONFIG", str(config))
    with pytest.raises(PACSError, match="chmod 600"):
        credentials()
    os.chmod(config, 0o600)
    assert credentials() == {"user": user, "password": password}


@pytest.mark.real_data
def test_real_series_round_trip_through_orthanc(orthanc, pacs_login, shared_data, tmp_path):
    """A real series (Lung-PET-CT-Dx, JPEG-LS) uploaded to Orthanc, read over DICOMweb, SEG and SR
    stored back and the SR's boxes re-read onto the same grid."""
    import requests

    from napari_wscovid.cli import main
    from napari_wscovid.io.boxes_io import load_boxes
    from napari_wscovid.io.dicom_objects import read_sr_boxes

    folder = shared_data / "lung-pet-ct-dx" / "Lung_Dx-A0001"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    files = [f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() == ".dcm"]
    for f in files:
        requests.post(f"{orthanc['base']}/instances", data=f.read_bytes(), auth=orthanc["auth"], timeout=60)
    import pydicom

    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    out = tmp_path / "out"
    args = ["detect", f"dicomweb:{orthanc['dicomweb']}/studies/{study}", "--out", str(out), "-q"]
    args += ["--model", "tiny-test", "--lung-method", "classical"]
    args += ["--send-to", f"dicomweb:{orthanc['dicomweb']}"]
    assert main(args) == 0
    assert _dciodvfy_errors(out / "seg.dcm") == [] and _dciodvfy_errors(out / "sr.dcm") == []
    stored = requests.post(
        f"{orthanc['base']}/tools/find",
        json={"Level": "Series", "Query": {"StudyInstanceUID": study, "Modality": "SEG\\SR"}},
        auth=orthanc["auth"],
        timeout=30,
    ).json()
    assert len(stored) >= 2, "SEG and SR stored in the real study"
    local, meta_local = load_boxes(out / "boxes.json")
    boxes, meta = read_sr_boxes(out / "sr.dcm")
    assert meta["geometry"] == meta_local["geometry"]
    assert sorted(map(_box_key, boxes)) == sorted(map(_box_key, local))

    # boxes placed across the real grid (whatever the random test network found) come back exactly
    from napari_wscovid import load_ct
    from napari_wscovid.io.dicom_objects import build_sr, read_source_datasets
    from napari_wscovid.results import Box

    volume = load_ct(str(folder))
    result = type("Run", (), {})()
    result.model_info, result.classes = {"name": "test", "version": "1"}, ("NP", "CAP")
    result.patient_probs, result.predicted_class = np.array([0.4, 0.6]), "CAP"
    result.lung_volume_ml, result.involvement, result.status = 1000.0, {}, "ok"
    placed = [
        Box(z, y, x, y + h, x + w, "CAP", 0.5, origin=origin)
        for z, y, x, h, w, origin in [
            (0, 0, 0, 10, 12, "detected"),
            (31, 200, 300, 37, 41, "edited"),
            (volume.shape[0] - 1, 500, 480, 12, 32, "added"),
        ]
    ]
    build_sr(volume, read_source_datasets(folder, volume.series_key), result, placed).save_as(
        tmp_path / "placed.dcm", enforce_file_format=True
    )
    back, _ = read_sr_boxes(tmp_path / "placed.dcm")
    assert [(_box_key(b), b.origin) for b in back] == [(_box_key(b), b.origin) for b in placed]


def test_research_copies_carry_no_identity_and_keep_their_references(tmp_path, sample_run, caplog):
    import logging
    import warnings

    import pydicom

    from napari_wscovid.io.dicom_objects import read_source_datasets, read_sr_boxes, write_dicom_objects

    volume, result = sample_run
    datasets = read_source_datasets(SAMPLE, volume.series_key)
    for ds in datasets:  # give the sample an identity to remove, in free text and a private tag too
        ds.PatientName, ds.PatientID, ds.StudyDate = "DOEJANE", "MRN-12345", "20200304"
        ds.StudyDescription, ds.SeriesDescription = "CT CHEST DOEJANE", "DOEJANE lung"
        ds.ProtocolName, ds.ImageComments = "DOEJANE protocol", "ward of DOEJANE"
        ds.private_block(0x0011, "ACME", create=True).add_new(0x01, "LO", "DOEJANE MRN-12345")
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_dicom_objects(tmp_path, volume, datasets, result, research_copies=True)
    # highdicom's warning about a one-word name quoted it, on stderr
    assert not [str(w.message) for w in caught if "DOEJANE" in str(w.message)]
    assert "DOEJANE" not in caplog.text and "MRN-12345" not in caplog.text
    original = pydicom.dcmread(tmp_path / "sr.dcm")
    assert str(original.PatientName) == "DOEJANE"  # the PACS copy keeps the identity
    for name in ("seg.dcm", "sr.dcm"):
        path = tmp_path / "research" / name
        text = path.read_bytes()
        assert b"DOE" not in text and b"MRN-12345" not in text and b"20200304" not in text
        assert datasets[0].StudyInstanceUID.encode() not in text
        copy_ = pydicom.dcmread(path)
        assert (
            copy_.PatientIdentityRemoved == "YES"
            and copy_.SOPClassUID == pydicom.dcmread(tmp_path / name).SOPClassUID
        )
        assert _dciodvfy_errors(path) == []
    seg, sr = (pydicom.dcmread(tmp_path / "research" / n) for n in ("seg.dcm", "sr.dcm"))
    assert seg.StudyInstanceUID == sr.StudyInstanceUID  # one consistent map for both objects
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for series in s.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    frames = {
        str(ref.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }
    assert frames <= referenced  # both point at the same remapped CT images
    boxes, _ = read_sr_boxes(tmp_path / "research" / "sr.dcm")
    assert sorted(map(_box_key, boxes)) == sorted(map(_box_key, result.boxes))


def test_a_busy_pacs_is_said_busy_not_a_traceback(tmp_path):
    """dicomweb-client retries HTTP 503 and then raises retrying's RetryError, which is not a
    requests error: the command line ended in a traceback with exit 1."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from napari_wscovid.cli import main
    from napari_wscovid.io.pacs import PACSError, list_studies

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/dicom-web"
        with pytest.raises(PACSError, match=r"is busy \(HTTP 503, after 3 tries\)"):
            list_studies(url)
        code = main(["detect", f"dicomweb:{url}/studies/1.2.3", "--out", str(tmp_path / "o"), "-q"])
        assert code == 2
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "positions",
    [
        np.concatenate([[0.0, 3.7, 7.4], 7.4 + 2.5 * np.arange(1, 20)]),  # uneven: the loader resamples
        1.25 * np.arange(16) + np.where(np.arange(16) % 2, 0.03, 0.0),  # jitter under no resampling step
    ],
)
def test_sr_boxes_land_on_the_loaders_slices_of_an_unevenly_spaced_series(tmp_path, positions):
    """The SR reader rebuilt the CT's grid from the median step and the number of images, the
    loader from the mean step or its resampled grid: on an uneven series the boxes came back one
    slice off, or on a grid no CT of the viewer had."""
    import pydicom.uid

    from napari_wscovid import load_ct
    from napari_wscovid.io.dicom_objects import build_sr, read_source_datasets, read_sr_boxes
    from napari_wscovid.results import Box, DetectionResult
    from tests.io.io_builders import ct_dataset, save

    series = pydicom.uid.generate_uid()
    for k, z in enumerate(positions):
        save(ct_dataset(z=float(z), series_uid=series, instance=k + 1), tmp_path / "ct" / f"s{k:03d}.dcm")
    volume = load_ct(str(tmp_path / "ct"))
    boxes = [Box(k, 2, 2, 8, 8, "COVID-19", 0.9) for k in (1, volume.shape[0] // 2, volume.shape[0] - 1)]
    result = DetectionResult(
        classes=("NP", "CAP", "COVID-19"),
        slice_probs=np.zeros((volume.shape[0], 3)),
        patient_probs=np.array([0.1, 0.2, 0.7]),
        lung_mask=np.zeros(volume.shape, np.uint8),
        boxes=boxes,
        model_info={"name": "test"},
    )
    sr = build_sr(volume, read_source_datasets(str(tmp_path / "ct"), volume.series_key), result)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    back, meta = read_sr_boxes(tmp_path / "sr.dcm")
    from napari_wscovid.io.boxes_io import geometry_mismatch

    assert geometry_mismatch(meta["geometry"], volume.geometry()) == ""
    assert [b.slice for b in back] == [b.slice for b in boxes]
