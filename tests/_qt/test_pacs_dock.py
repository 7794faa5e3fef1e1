"""The "Open from PACS" dock and the detection dock's "Send to PACS" against a real Orthanc."""

from __future__ import annotations

import pytest

from tests._qt.conftest import as_plugin_sees_it

pytest.importorskip("dicomweb_client")


@pytest.fixture
def messages(monkeypatch):
    from napari_wscovid._widgets import detection, pacs

    shown: list[str] = []
    for module in (detection, pacs):
        monkeypatch.setattr(module, "show_error", lambda m: shown.append(f"error: {m}"))
        monkeypatch.setattr(module, "show_info", lambda m: shown.append(f"info: {m}"))
    return shown


def test_open_from_pacs_then_send_results_back(viewer, qtbot, orthanc, pacs_login, messages):
    import requests

    from napari_wscovid._widgets.detection import DetectionWidget
    from napari_wscovid._widgets.pacs import PacsWidget

    browser = PacsWidget(as_plugin_sees_it(viewer))
    qtbot.addWidget(browser)
    browser._url.setText(orthanc["dicomweb"])
    browser.list_studies()
    qtbot.waitUntil(lambda: browser._table.rowCount() >= 1 and browser._list_btn.isEnabled(), timeout=30000)
    assert all("Doe" not in browser._table.item(0, c).text() for c in range(browser._table.columnCount()))
    browser.open_selected()
    qtbot.waitUntil(lambda: any(layer.name.startswith("CT ") for layer in viewer.layers), timeout=60000)
    ct = next(layer for layer in viewer.layers if layer.name.startswith("CT "))
    assert ct.metadata["dicom_source"] and ct.data.shape == (64, 256, 256)

    dock = DetectionWidget(as_plugin_sees_it(viewer))
    qtbot.addWidget(dock)
    dock._model_combo.setCurrentText("tiny-test")
    dock._run_btn.click()
    qtbot.waitUntil(lambda: dock._worker is None, timeout=120000)
    assert dock._result is not None
    sent = dock._send_to(f"dicomweb:{orthanc['dicomweb']}")
    qtbot.waitUntil(lambda: any("Stored SEG and SR" in m for m in messages), timeout=60000)
    assert sent is not None and not [m for m in messages if m.startswith("error")]
    series = requests.get(f"{orthanc['base']}/series?expand", auth=orthanc["auth"], timeout=30).json()
    assert {"SEG", "SR"} <= {s["MainDicomTags"].get("Modality") for s in series}


def test_unreachable_pacs_says_so(viewer, qtbot, pacs_login, messages, unused_port):
    from napari_wscovid._widgets.pacs import PacsWidget

    port = unused_port()
    browser = PacsWidget(as_plugin_sees_it(viewer))
    qtbot.addWidget(browser)
    browser._url.setText(f"http://127.0.0.1:{port}/dicom-web")
    browser.list_studies()
    qtbot.waitUntil(lambda: "cannot reach the PACS" in browser._status.text(), timeout=30000)
    assert browser._list_btn.isEnabled() and not browser._cancel_btn.isEnabled()
