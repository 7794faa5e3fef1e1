"""Shared fixtures. Real-data tests skip with a reason when ../shared/data is absent."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSCOVID_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public chest-CT data beside the repository, or a skip saying why not."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set WSCOVID_SHARED_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def covid_ct_md(shared_data) -> Path:
    """Folder holding the three COVID-CT-MD DICOM series."""
    root = shared_data / "covid-ct-md" / "sample_data"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    return root


@pytest.fixture(scope="session")
def dicom_robustness(shared_data) -> Path:
    root = shared_data / "dicom-robustness"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    return root


# ---------------------------------------------------------------------------- a real PACS (Orthanc)
SAMPLE_DICOM = Path(__file__).resolve().parents[1] / "sample_data" / "phantom_covid" / "dicom"
ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PACS_USER, PACS_PASSWORD = "wscovid", "not-a-real-secret"


@pytest.fixture(autouse=True)
def _autosave_in_tmp(monkeypatch, tmp_path):
    """Edited boxes are autosaved per user; tests keep theirs in their own folder."""
    monkeypatch.setenv("WSCOVID_AUTOSAVE_DIR", str(tmp_path / "autosave"))


@pytest.fixture(autouse=True)
def _torch_thread_state_restored():
    """Fail the test that leaves this thread's autograd mode changed; give the next test the
    torch thread count this one started with.

    Grad and inference mode are per-thread globals; a generator that yields inside
    ``torch.inference_mode()`` leaves its caller in that mode while it is suspended, and
    every later test then fails far from the cause (CI at 570d983: 27 unrelated failures).
    """
    import sys

    torch = sys.modules.get("torch")
    before = (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) if torch else (True, False)
    threads = torch.get_num_threads() if torch else None
    yield
    torch = sys.modules.get("torch")
    if torch is None:
        return
    # A test may set torch's thread count on purpose (a CLI's --threads, a cohort study run in
    # this process); the tests after it get the count they started with.
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    after = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    if after != before:
        import gc

        gc.collect()  # finalises an abandoned generator, which restores the mode for later tests
        torch.set_grad_enabled(before[0])
        pytest.fail(f"torch (grad enabled, inference mode) went from {before} to {after} in this test")


@pytest.fixture
def unused_port():
    """A function returning a loopback TCP port nobody listens on (for servers a test starts)."""
    return free_port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A fresh Orthanc with DICOMweb and basic auth on loopback, holding the sample study."""
    import requests

    if ORTHANC is None or not DICOMWEB_PLUGIN.exists():
        pytest.skip(
            "Orthanc and its DICOMweb plugin are not installed (apt install orthanc orthanc-dicomweb)"
        )
    root = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "wscovid-test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {PACS_USER: PACS_PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")  # noqa: SIM115 - closed after the server stops
    server = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    auth = (PACS_USER, PACS_PASSWORD)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{base}/system", auth=auth, timeout=1).raise_for_status()
                break
            except requests.RequestException:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.2)
        for f in sorted(SAMPLE_DICOM.glob("*.dcm")):
            requests.post(f"{base}/instances", data=f.read_bytes(), auth=auth, timeout=30).raise_for_status()
        yield {"base": base, "dicomweb": f"{base}/dicom-web", "dicom_port": dicom_port, "auth": auth}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def pacs_login(monkeypatch, tmp_path):
    monkeypatch.setenv("WSCOVID_PACS_USER", PACS_USER)
    monkeypatch.setenv("WSCOVID_PACS_PASSWORD", PACS_PASSWORD)
    monkeypatch.setenv("WSCOVID_PACS_CONFIG", str(tmp_path / "absent.json"))
    monkeypatch.delenv("WSCOVID_PACS_TOKEN", raising=False)


def tiny_network(kind: str):
    """A tiny, seeded DeCoVNet or FeCNN (eval mode) for the methods other than WSNet."""
    import torch

    torch.manual_seed(0)
    if kind == "decovnet":
        from napari_wscovid.models.decovnet import DeCoVNet, tiny_decovnet_config

        return DeCoVNet(tiny_decovnet_config()).eval()
    if kind == "fecnn":
        from napari_wscovid.models.fecnn import FeCNN, tiny_fecnn_config

        return FeCNN(tiny_fecnn_config()).eval()
    raise ValueError(f"no tiny network for {kind!r}")


class StopAfter:
    """A stop signal (``is_set()``, as :class:`threading.Event`) that answers "not yet" ``calls``
    times, then "stop": it stops a run at a chosen point of its explanation."""

    def __init__(self, calls: int):
        self.left = calls

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0
