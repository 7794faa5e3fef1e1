"""The "Open from PACS" dock: list studies over DICOMweb (QIDO-RS) and open one (WADO-RS) as the
reader opens a folder, with progress and cancel. A thin layer over :mod:`napari_wscovid.io.pacs`;
no patient name or ID is listed or put in a layer name."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

logger = logging.getLogger(__name__)

URL_ENV = "WSCOVID_PACS_URL"
COLUMNS = ("date", "description", "modalities", "series")


class PacsWidget(QWidget):
    """Browse a DICOMweb server's studies and open one in the viewer."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self._viewer = napari_viewer
        self._studies: list[dict] = []
        self._worker = None
        self._cancelled = False
        # studies read from the PACS stay on disk for the session: a SEG/SR sent back references them
        self._downloads = tempfile.TemporaryDirectory(prefix="wscovid-pacs-")
        self._url = QLineEdit(os.environ.get(URL_ENV, "http://127.0.0.1:8042/dicom-web"))
        self._url.setToolTip("DICOMweb root of the PACS; credentials come from WSCOVID_PACS_* (see README)")
        self._modality = QComboBox()
        self._modality.addItems(["CT", "any"])
        self._dates = QLineEdit()
        self._dates.setPlaceholderText("YYYYMMDD-YYYYMMDD (empty: any date)")
        self._list_btn = QPushButton("List studies")
        self._open_btn = QPushButton("Open selected")
        self._cancel_btn = QPushButton("Cancel")
        self._cancel_btn.setEnabled(False)
        self._table = QTableWidget(0, len(COLUMNS))
        self._table.setHorizontalHeaderLabels(COLUMNS)
        self._table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self._table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self._table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self._progress = QProgressBar()
        self._progress.setRange(0, 1)
        self._progress.setValue(0)
        self._status = QLabel("")
        self._status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Server", self._url)
        form.addRow("Modality", self._modality)
        form.addRow("Dates", self._dates)
        buttons = QHBoxLayout()
        for button in (self._list_btn, self._open_btn, self._cancel_btn):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self._table)
        layout.addWidget(self._progress)
        layout.addWidget(self._status)
        self._list_btn.clicked.connect(self.list_studies)
        self._open_btn.clicked.connect(self.open_selected)
        self._cancel_btn.clicked.connect(self._on_cancel)

    # ------------------------------------------------------------------ listing
    def list_studies(self):
        from napari.qt.threading import create_worker

        from napari_wscovid.io.pacs import list_studies

        url = self._url.text().strip()
        modality = None if self._modality.currentText() == "any" else self._modality.currentText()
        dates = self._dates.text().strip() or None
        # errors handed to _connect: napari re-raises those of a worker without an errored handler
        worker = create_worker(
            list_studies,
            url,
            modality=modality,
            date_range=dates,
            _start_thread=False,
            _connect={
                "returned": self._show_studies,
                "errored": lambda exc: self._fail(f"Studies not listed: {exc}"),
            },
        )
        self._start(worker, "Listing studies…")
        return worker

    def _show_studies(self, studies: list[dict]) -> None:
        self._studies = studies
        self._table.setRowCount(len(studies))
        for row, study in enumerate(studies):
            for col, key in enumerate(("date", "description", "modalities", "n_series")):
                self._table.setItem(row, col, QTableWidgetItem(str(study.get(key, ""))))
        if studies:
            self._table.selectRow(0)
        self._status.setText(f"{len(studies)} studies.")

    # ------------------------------------------------------------------ opening
    def open_selected(self):
        from napari.qt.threading import create_worker

        rows = self._table.selectionModel().selectedRows() if self._table.selectionModel() else []
        if not rows or not self._studies:
            show_info("List the studies and select one first.")
            return None
        study = self._studies[rows[0].row()]
        url = self._url.text().strip().rstrip("/")
        folder = Path(self._downloads.name) / f"study-{len(os.listdir(self._downloads.name)):03d}"
        self._cancelled = False
        worker = create_worker(
            self._download,
            f"{url}/studies/{study['study_uid']}",
            folder,
            _start_thread=False,
            _connect={
                "yielded": self._on_progress,
                "returned": self._add_layer,
                "errored": lambda exc: self._fail(f"Study not opened: {exc}"),
            },
        )
        self._start(worker, "Reading the study…")
        return worker

    def _download(self, address: str, folder: Path):
        """Generator for napari's worker: download (yielding progress), then load the CT."""
        from napari_wscovid.io import load_ct
        from napari_wscovid.io.pacs import fetch_study
        from napari_wscovid.stages import in_thread

        def work(report):
            return fetch_study(address, folder, progress=report, cancelled=lambda: self._cancelled)

        downloaded = yield from in_thread(work, "wscovid-pacs")
        yield (1, 1, "Loading the CT")
        return load_ct(str(downloaded)), str(downloaded)

    def _on_progress(self, update) -> None:
        done, total, message = update
        self._progress.setRange(0, max(int(total), 1))
        self._progress.setValue(int(done))
        self._status.setText(f"{message} ({done}/{total})" if total else message)

    def _add_layer(self, loaded) -> None:
        from napari_wscovid._reader import ct_layer_data

        volume, folder = loaded
        data, kwargs, _ = ct_layer_data(volume, dicom_source=folder)
        self._viewer.add_image(data, **kwargs)
        for warning in volume.warnings:
            logger.warning("%s: %s", volume.series_key, warning)
        self._status.setText(f"Opened {kwargs['name']}.")

    # ------------------------------------------------------------------ plumbing
    def _start(self, worker, message: str) -> None:
        self._worker = worker
        self._set_busy(True)
        self._status.setText(message)
        self._progress.setRange(0, 0)
        worker.finished.connect(lambda: self._set_busy(False))
        worker.start()

    def _set_busy(self, busy: bool) -> None:
        self._list_btn.setEnabled(not busy)
        self._open_btn.setEnabled(not busy)
        self._cancel_btn.setEnabled(busy)
        if not busy:
            self._progress.setRange(0, 1)
            self._progress.setValue(1 if "Opened" in self._status.text() else 0)

    def _on_cancel(self) -> None:
        self._cancelled = True  # the download stops at its next image
        self._status.setText("Cancelling…")

    def _fail(self, message: str) -> None:
        self._status.setText(message)
        # the worker's `finished` comes after `errored`: the buttons must not lag the message
        # (CI caught "cannot reach the PACS" shown while List was still disabled)
        self._set_busy(False)
        show_error(message)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt override)
        self._cancelled = True
        super().closeEvent(event)
