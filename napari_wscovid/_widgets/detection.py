"""The "Run detection" dock widget: controls, a worker, and hand-offs to layers.py.

torch is not imported here: the pipeline (which needs it) is imported when the
user presses "Run detection", so the plugin menu opens fast.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from importlib import import_module
from pathlib import Path

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_wscovid._widgets import layers as L
from napari_wscovid._widgets.results_panel import ResultsPanel
from napari_wscovid.architectures import WSNET
from napari_wscovid.io.boxes_io import (
    autosave_path,
    describe_skipped,
    load_boxes,
    save_boxes,
    write_autosave,
)
from napari_wscovid.io.volume import CTVolume
from napari_wscovid.lung import DEFAULT_LUNG_METHOD, LUNG_METHOD_LABELS
from napari_wscovid.results import Box, DetectionResult
from napari_wscovid.review import Reading, overlap, place, rerun_note

logger = logging.getLogger(__name__)

REGISTRY_MODULE = "napari_wscovid.models.registry"
FALLBACK_MODELS = ("default", "tiny-test")
CHOOSE_FILE = "Weights file…"

# (label, value passed on): "current" runs detection without saliency, then explains
# the slice in view on demand.
SALIENCY_SCOPES = (
    ("positive slices", "positive"),
    ("all slices", "all"),
    ("current slice only", "current"),
    ("none", "none"),
)
DEVICES = (("auto", "auto"), ("CPU", "cpu"), ("CUDA", "cuda"))
LUNG_CHOICES = tuple((label, method) for method, label in LUNG_METHOD_LABELS.items())
AUTOSAVE_DELAY_MS = 1000
_SLICE_DEBOUNCE_MS = 200
# Between two display steps: a zero delay let Qt run the next step before the repaint and timer
# events that were waiting, so two steps ran back to back (measured: 150-220 ms gaps).
_SHOW_STEP_GAP_MS = 5
# How often boxes held back during a drag try again to join the boxes layer
_BOXES_RETRY_MS = 150


class _RefreshingCombo(QComboBox):
    """A combo box that refreshes its items just before it opens."""

    def __init__(self, refresh, parent=None) -> None:
        super().__init__(parent)
        self._refresh = refresh

    def showPopup(self) -> None:  # noqa: N802 (Qt override)
        self._refresh()
        super().showPopup()


class WorkerError(Exception):
    """An error raised in a worker, passed on as a plain Exception."""


def _guarded(func, *args, **kwargs):
    """Run the generator function ``func``, re-raising RuntimeError as :class:`WorkerError`.

    superqt takes a RuntimeError returned by a worker for "the worker was deleted" and
    emits neither ``errored`` nor ``finished``; torch reports most failures as RuntimeError,
    so without this the widget would wait forever and the user would see no reason.
    """
    try:
        return (yield from func(*args, **kwargs))
    except RuntimeError as exc:
        raise WorkerError(str(exc)) from exc


def _being_edited(layer) -> bool:
    """Whether the mouse is down on the shapes layer (a box being moved, resized, drawn or a
    selection dragged), from napari's own flags; private, so each defaults to "not"."""
    return bool(
        getattr(layer, "_is_moving", False)
        or getattr(layer, "_is_creating", False)
        or getattr(layer, "_is_selecting", False)
        or getattr(layer, "_drag_start", None) is not None
    )


def _qt_alive(widget) -> bool:
    """Whether the Qt object behind ``widget`` still exists (a closed viewer deletes its docks
    while their workers may still report)."""
    try:
        widget.objectName()
    except RuntimeError:
        return False
    return True


def _camera(viewer):
    # napari 0.9 moved the camera to viewer.scene; older versions only have viewer.camera.
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def volume_from_layer(layer) -> CTVolume:
    """The CTVolume behind an image layer (ours carry it; others are rebuilt from scale/translate)."""
    volume = layer.metadata.get("wscovid_volume")
    if isinstance(volume, CTVolume) and volume.shape == tuple(layer.data.shape):
        return volume
    data = np.asarray(layer.data)
    if data.ndim != 3:
        raise ValueError(f"layer {layer.name!r} is {data.ndim}-D; detection needs a 3-D CT (z, y, x)")
    # A CT opened by another reader: assume Hounsfield units when air (about -1000) is present.
    is_hu = bool(np.issubdtype(data.dtype, np.number) and float(np.nanmin(data)) < -500)
    # its grid from napari's whole data-to-world transform (scale, translate, rotate, shear and
    # affine: another reader may place a CT with `affine` alone)
    origin = np.asarray(layer.data_to_world((0, 0, 0)), dtype=float)
    columns = np.stack(
        [np.asarray(layer.data_to_world(tuple(np.eye(3)[i])), float) - origin for i in range(3)], 1
    )
    spacing = np.linalg.norm(columns, axis=0)
    direction = columns / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ValueError(
            f"layer {layer.name!r} is sheared (its axes are not perpendicular in the world); "
            "detection needs a CT grid whose axes are"
        )
    volume = CTVolume(
        hu=data,
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in origin),
        direction=direction,
        is_hu=is_hu,
        source="napari layer",
    )
    if not is_hu:
        volume.warnings.append("intensities do not look like Hounsfield units; results may be unreliable")
    return volume


_collected_after_imports = False


def _default_detect_iter(volume, **kwargs):
    """The core's ``detect_iter``, imported on first use: torch loads when a run starts, not
    when the dock opens."""
    global _collected_after_imports
    from napari_wscovid.pipeline import detect_iter

    result = yield from detect_iter(volume, **kwargs)
    if not _collected_after_imports:
        # The first run's imports (torch, scikit-image, ...) add ~300,000 long-lived objects, and
        # Python's full collection of them then struck at some later moment: a 380-620 ms freeze
        # while the reader scrolled (benchmarks/bench_ui_stall.py). Done here, in the worker, it
        # falls inside the first run, which already waits on napari creating its layers.
        _collected_after_imports = True
        gc.collect()
    return result


def _default_explain_more(volume, result, slices, **kwargs):
    """The core's on-demand explanation of slices a run did not explain."""
    from napari_wscovid.methods.wsnet import explain_more

    return (yield from explain_more(volume, result, slices, **kwargs))


def is_integrated_gradients_method(result: DetectionResult) -> bool:
    """Whether ``result`` came from Hu et al.'s network, the one with per-slice IG saliency."""
    return (result.model_info or {}).get("architecture", WSNET) == WSNET


class DetectionWidget(QWidget):
    """Run weakly supervised COVID-19 / CAP detection on a CT layer and show why.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer to read the CT from and add result layers to.
    detect_iter, explain_more : callable, optional
        The detection generator and the on-demand slice explanation (the core's
        :func:`napari_wscovid.pipeline.detect_iter` and
        :func:`napari_wscovid.methods.wsnet.explain_more` by default); tests pass fakes.
    """

    def __init__(self, napari_viewer, *, detect_iter=None, explain_more=None) -> None:
        super().__init__()
        self._viewer = napari_viewer
        self._detect_iter = detect_iter or _default_detect_iter
        self._explain_more = explain_more or _default_explain_more
        self._worker = None
        self._run_started = 0.0
        self._run_ct = None  # the CT layer, volume and scope of the run in progress
        self._run_volume: CTVolume | None = None
        self._run_scope = ""
        self._run_succeeded = False
        self._rerun_note = ""  # what a re-run did to the boxes, for the status line
        self._new_boxes: set[tuple] = set()  # places of the boxes the latest re-run added
        self._result: DetectionResult | None = None
        self._send_target = ""  # the last PACS the user sent to, offered again
        self._result_ct = None  # the CT layer the current result belongs to
        self._result_volume: CTVolume | None = None
        self._result_scope = ""
        self._trackers: dict[int, L.BoxEditTracker] = {}
        self._slice_worker = None
        self._closed = False  # the dock was closed: workers still ending must not touch the viewer
        self._had_parent = False  # napari closes a dock by taking its widget out of the window
        self._showing = None  # the steps still to run to show a result, one per event-loop turn
        self._worker_finished = True
        self._run_params: dict = {}  # the settings of the run in progress
        self._result_params: dict = {}  # those of the run whose result is shown: its slices left use them
        self._unexplainable: set[int] = set()  # slices whose explanation failed: not tried again
        self._boxes_waiting: list[tuple] = []  # slices' boxes held back while a box is being dragged
        self._layers_created_by_showing: list = []  # removed again if the CT closes mid-showing
        self._explained: set[int] = set()
        self._pending_slice: int | None = None
        self._stop_explaining: threading.Event | None = None  # set by "Show now" during a run
        # after "Show now": the slices the run left are explained in the background until Cancel
        self._fill_left = False

        self._ct_combo = _RefreshingCombo(self._refresh_ct_layers)
        self._model_combo = _RefreshingCombo(self._refresh_models)
        self._model_combo.addItems(list(FALLBACK_MODELS) + [CHOOSE_FILE])
        self._model_combo.activated.connect(self._on_model_activated)
        self._device_combo = QComboBox()
        for label, value in DEVICES:
            self._device_combo.addItem(label, value)
        self._lung_combo = QComboBox()
        for label, value in LUNG_CHOICES:
            self._lung_combo.addItem(label, value)
        self._lung_combo.setCurrentIndex(self._lung_combo.findData(DEFAULT_LUNG_METHOD))
        self._lung_combo.setToolTip(
            "Lung segmentation. The hybrid adds consolidation touching the chest wall, which "
            "thresholds miss, as found by the bundled multi-view U-Net."
        )
        self._scope_combo = QComboBox()
        for label, value in SALIENCY_SCOPES:
            self._scope_combo.addItem(label, value)
        self._scope_combo.setToolTip(
            "Slices that get saliency and boxes. Positive slices: those the network calls COVID-19 or "
            "CAP, none when it calls the patient NP. All slices: every lung slice, whatever the call. "
            "Current slice only: the slice in view, when you stop on it."
        )
        self._ig_steps = QSpinBox()
        self._ig_steps.setRange(0, 512)
        self._ig_steps.setSpecialValueText("auto")  # 0 = chosen per slice by the completeness check
        self._ig_steps.setToolTip(
            "Integrated-gradients steps. Auto: 8, doubled (up to 64) on a slice until the attributions "
            "add up to the score change within 5%; a number fixes the steps for every slice."
        )
        self._min_area = QDoubleSpinBox()
        self._min_area.setRange(0.0, 1e5)
        self._min_area.setDecimals(1)
        self._min_area.setValue(20.0)
        self._min_area.setSuffix(" mm²")
        self._run_btn = QPushButton("Run detection")
        self._cancel_btn = QPushButton("Cancel")
        self._cancel_btn.setEnabled(False)
        self._show_now_btn = QPushButton("Show now")
        self._show_now_btn.setEnabled(False)
        self._show_now_btn.setToolTip(
            "Explain no further slice now: show the result with the slices explained so far (the "
            "most abnormal go first). The others are then explained in the background, any slice "
            "you stop on first; Cancel stops that. For Hu et al.'s network; DeCoVNet and FeCNN "
            "explain within their forward pass and just finish."
        )
        self._progress = QProgressBar()
        self._progress.setRange(0, 1)
        self._progress.setValue(0)
        self._status = QLabel("")
        self._position = QLabel("")  # the slice in view: index and millimetres
        self._position.setToolTip("Slice index in the CT array and its position along the patient's z axis")
        self._status.setWordWrap(True)
        self._export_btn = QPushButton("Export boxes…")
        self._import_btn = QPushButton("Import boxes…")
        self._send_btn = QPushButton("Send to PACS…")
        self._send_btn.setToolTip(
            "Store the lungs and lesion region (DICOM SEG) and the boxes as they are now, with the answer "
            "(DICOM SR), in the CT's study on a PACS"
        )
        # the class an annotator gives the selected boxes ("not a lesion" keeps a rejected finding)
        self._class_combo = QComboBox()
        self._class_combo.setToolTip("Class for the boxes selected in the lesion-boxes layer")
        self._class_btn = QPushButton("Set class of selected boxes")
        self._reviewed_box = QCheckBox("Slice reviewed")
        self._reviewed_box.setToolTip("Mark the slice in view as read; saved with the boxes (JSON)")
        self._reviewed_box.setEnabled(False)
        self._results = ResultsPanel()
        # edits are written to the CT's autosave a moment after each change (a burst of drags is
        # one write), so a crash loses at most that moment
        self._autosave_timer = QTimer(self)
        self._autosave_timer.setSingleShot(True)
        self._autosave_timer.setInterval(AUTOSAVE_DELAY_MS)
        self._autosave_timer.timeout.connect(self._autosave)
        self._autosaved_keys: set[str] = set()  # written in this session: never offered back
        self._autosave_pending: dict[int, object] = {}  # the boxes layers edited since the last write
        self._slice_timer = QTimer(self)
        self._slice_timer.setSingleShot(True)
        self._slice_timer.setInterval(_SLICE_DEBOUNCE_MS)

        form = QFormLayout()
        form.addRow("CT layer", self._ct_combo)
        form.addRow("Model", self._model_combo)
        form.addRow("Device", self._device_combo)
        form.addRow("Lungs", self._lung_combo)
        form.addRow("Saliency", self._scope_combo)
        form.addRow("IG steps", self._ig_steps)
        form.addRow("Min box area", self._min_area)
        buttons = QHBoxLayout()
        buttons.addWidget(self._run_btn)
        buttons.addWidget(self._show_now_btn)
        buttons.addWidget(self._cancel_btn)
        class_row = QHBoxLayout()
        class_row.addWidget(self._class_combo)
        class_row.addWidget(self._class_btn)
        class_row.addWidget(self._reviewed_box)
        io_buttons = QHBoxLayout()
        io_buttons.addWidget(self._export_btn)
        io_buttons.addWidget(self._import_btn)
        io_buttons.addWidget(self._send_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self._progress)
        layout.addWidget(self._status)
        layout.addWidget(self._position)
        layout.addWidget(self._results)
        layout.addLayout(class_row)
        layout.addLayout(io_buttons)

        self._run_btn.clicked.connect(self._on_run_clicked)
        self._cancel_btn.clicked.connect(self._on_cancel_clicked)
        self._show_now_btn.clicked.connect(self._on_show_now_clicked)
        self._export_btn.clicked.connect(self._on_export_clicked)
        self._import_btn.clicked.connect(self._on_import_clicked)
        self._send_btn.clicked.connect(self._on_send_clicked)
        self._class_btn.clicked.connect(self._on_set_class_clicked)
        self._reviewed_box.toggled.connect(self._on_reviewed_toggled)
        self._results.slice_requested.connect(self._go_to_slice)
        self._results.box_requested.connect(self._go_to_box)
        self._slice_timer.timeout.connect(self._explain_current_slice)

        layers_events = self._viewer.layers.events
        dims_events = self._viewer.dims.events
        # kept to be undone when the dock closes: a closed dock must not react to the viewer
        self._viewer_connections = [
            (layers_events.inserted, self._on_layers_changed),
            (layers_events.removed, self._on_layers_changed),
            (dims_events.current_step, self._on_current_step),
            (dims_events.order, self._orient_head_up),
            (dims_events.ndisplay, self._orient_head_up),
            (dims_events.ndisplay, self._show_3d),
        ]
        for emitter, callback in self._viewer_connections:
            emitter.connect(callback)
        self._hidden_in_3d: list = []  # layers hidden on entering 3-D, shown again in 2-D
        self._refresh_ct_layers()
        for layer in self._viewer.layers:
            self._watch_boxes_layer(layer)
        for layer in list(self._viewer.layers):
            self._offer_autosave(layer)

    # ------------------------------------------------------------------ controls
    def _refresh_ct_layers(self) -> None:
        current = self._ct_combo.currentText()
        names = [
            layer.name
            for layer in self._viewer.layers
            if type(layer).__name__ == "Image"
            and layer.ndim == 3
            and not layer.metadata.get("wscovid_result")
        ]
        self._ct_combo.blockSignals(True)
        self._ct_combo.clear()
        self._ct_combo.addItems(names)
        if current in names:
            self._ct_combo.setCurrentText(current)
        elif names:
            # Prefer the newest CT opened by our reader.
            ours = [n for n in names if "wscovid_volume" in self._viewer.layers[n].metadata]
            self._ct_combo.setCurrentText((ours or names)[-1])
        self._ct_combo.blockSignals(False)

    def _refresh_models(self) -> None:
        current = self._model_combo.currentText()
        try:
            registry = import_module(REGISTRY_MODULE)
            names = list(registry.available_models())
            # The default (the main method's trained network) first, so it is what a new user runs.
            default = registry.ALIASES.get("default")
            if default in names:
                names.remove(default)
                names.insert(0, default)
                current = default if current == "default" else current
        except Exception as exc:  # the registry is optional for choosing; the run reports real errors
            logger.debug("model registry unavailable: %s", exc)
            names = list(FALLBACK_MODELS)
        custom = [
            self._model_combo.itemText(i)
            for i in range(self._model_combo.count())
            if self._model_combo.itemText(i) not in (*FALLBACK_MODELS, CHOOSE_FILE, *names)
        ]
        self._model_combo.blockSignals(True)
        self._model_combo.clear()
        self._model_combo.addItems(names + custom + [CHOOSE_FILE])
        self._model_combo.setCurrentText(current if current in names + custom else names[0])
        self._model_combo.blockSignals(False)

    def _on_model_activated(self, index: int) -> None:
        if self._model_combo.itemText(index) != CHOOSE_FILE:
            return
        path, _ = QFileDialog.getOpenFileName(
            self, "Model weights", "", "Weights (*.safetensors *.pt *.pth);;All files (*)"
        )
        if path:
            self._model_combo.insertItem(index, path)
            self._model_combo.setCurrentIndex(index)
        else:
            self._model_combo.setCurrentIndex(0)

    def _on_layers_changed(self, event=None) -> None:
        self._refresh_ct_layers()
        layer = getattr(event, "value", None)
        if layer is not None and event.type == "inserted":
            self._watch_boxes_layer(layer)
            QTimer.singleShot(0, lambda: self._offer_autosave(layer))
        elif layer is not None and event.type == "removed":
            self._unwatch_boxes_layer(layer)
            if layer is self._result_ct:
                self._result, self._result_ct = None, None
                self._results.set_result(None)

    def _watch_boxes_layer(self, layer) -> None:
        """Track edits on any boxes layer (ours, or one opened from an exported file)."""
        if type(layer).__name__ == "Shapes" and layer.metadata.get("wscovid_boxes"):
            if id(layer) not in self._trackers:
                self._trackers[id(layer)] = L.BoxEditTracker(layer)
                layer.events.features.connect(self._refresh_box_list)
                layer.events.data.connect(self._schedule_autosave)
                layer.events.features.connect(self._schedule_autosave)
            self._refresh_box_list()

    def _unwatch_boxes_layer(self, layer) -> None:
        """Undo :meth:`_watch_boxes_layer` (a removed layer, a closing dock)."""
        tracker = self._trackers.pop(id(layer), None)
        if tracker is not None:
            tracker.disconnect()
            layer.events.features.disconnect(self._refresh_box_list)
            layer.events.data.disconnect(self._schedule_autosave)
            layer.events.features.disconnect(self._schedule_autosave)

    def _schedule_autosave(self, event=None, layer=None) -> None:
        """Autosave the boxes layer that changed (the event's source, else ``layer``) a moment
        from now: each edited layer goes to its own CT's autosave, whichever CT the dock shows."""
        layer = getattr(event, "source", None) if event is not None else layer
        tracker = self._trackers.get(id(layer))
        if tracker is None:
            return
        if tracker.is_paused:
            return  # detection's own boxes being shown: nothing of the annotator's to keep
        self._autosave_pending[id(layer)] = layer
        self._autosave_timer.start()

    def _autosave(self) -> None:
        """Write each edited boxes layer (rejected boxes and reviewed marks too) to its CT's autosave."""
        pending, self._autosave_pending = self._autosave_pending, {}
        for layer in pending.values():
            if layer not in self._viewer.layers:
                continue
            meta = layer.metadata
            key = meta.get("series_key") or ""
            if not key:  # no CT to tie it to: an autosave nobody would be offered back
                logger.warning("boxes of layer %r not autosaved: they are tied to no CT series", layer.name)
                continue
            try:
                write_autosave(
                    key,
                    L.layer_boxes(layer) + L.layer_rejected(layer),
                    meta["wscovid_geometry"],
                    model=meta.get("model"),
                    classes=meta.get("classes", ()),
                    reviewed_slices=L.layer_reviewed(layer),
                )
                self._autosaved_keys.add(key)
            except (OSError, ValueError, KeyError) as exc:  # never let autosave take the session down
                logger.warning("boxes not autosaved: %s", exc)

    def _offer_autosave(self, layer) -> None:
        """A CT opened again after a crash: offer the boxes autosaved for it in an earlier session."""
        if layer not in self._viewer.layers or type(layer).__name__ != "Image":
            return
        key = layer.metadata.get("series_key")
        if not key or layer.metadata.get("wscovid_result") or key in self._autosaved_keys:
            return
        path = autosave_path(key)
        if not path.is_file() or self._boxes_layer(layer.metadata.get("wscovid_geometry")) is not None:
            return  # (another CT's boxes layer is no reason not to offer this one's)
        self._autosaved_keys.add(key)  # asked once per session
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        answer = QMessageBox.question(
            self,
            "Restore edited boxes?",
            f"Boxes edited on {layer.name} were saved automatically at {when}, after their last "
            "export. Restore them?",
        )
        if answer == QMessageBox.Yes:
            self._ct_combo.setCurrentText(layer.name)
            self._import_boxes(path)

    def _ct_layer(self):
        name = self._ct_combo.currentText()
        return self._viewer.layers[name] if name in self._viewer.layers else None

    def _boxes_layer(self, geometry: dict | None = None):
        """The boxes layer of the CT in the dock (or of the grid ``geometry``), whatever the user
        renamed it to: a layer of ours on that grid, the one called "lesion boxes" first."""
        if geometry is None:
            ct = self._result_ct or self._ct_layer()
            geometry = ct.metadata.get("wscovid_geometry") if ct is not None else None
        ours = [
            la
            for la in self._viewer.layers
            if type(la).__name__ == "Shapes" and la.metadata.get("wscovid_boxes")
        ]
        for layer in sorted(ours, key=lambda la: la.name != L.BOXES_LAYER):
            if geometry is None or L.geometries_equal(layer.metadata.get("wscovid_geometry"), geometry):
                return layer
        return None

    def _scope(self) -> str:
        return self._scope_combo.currentData()

    def _detect_kwargs(self) -> dict:
        scope = self._scope()
        kwargs = {
            "model": self._model_combo.currentText(),
            "device": self._device_combo.currentData(),
            "lung_method": self._lung_combo.currentData(),
            "saliency": "none" if scope == "current" else scope,
            "min_box_area_mm2": float(self._min_area.value()),
        }
        if self._ig_steps.value() > 0:
            kwargs["ig_steps"] = int(self._ig_steps.value())
        return kwargs

    # ------------------------------------------------------------------ closing
    def closeEvent(self, event) -> None:  # noqa: N802 (Qt override)
        self._shutdown()
        super().closeEvent(event)

    def changeEvent(self, event) -> None:  # noqa: N802 (Qt override)
        # napari closes a dock by taking its widget out of the window (setParent(None)), without
        # closing it: losing the parent after having one is the dock being closed.
        if event.type() == QEvent.ParentChange:
            if self.parent() is not None:
                self._had_parent = True
            elif self._had_parent:
                self._shutdown()
        super().changeEvent(event)

    def _shutdown(self) -> None:
        """The dock is closing: save pending box edits, stop every worker, stop listening to the
        viewer. A run in progress is cancelled and its result, if it still arrives, discarded."""
        if self._closed:
            return
        if self._autosave_timer.isActive():
            self._autosave_timer.stop()
            self._autosave()  # an edit made in the last second is not lost with the dock
        self._closed = True
        self._finish_showing()  # a result half on screen is completed, never left in part
        self._slice_timer.stop()
        self._stop_slice_worker()
        if self._worker is not None:
            self._worker.quit()
        for emitter, callback in self._viewer_connections:
            emitter.disconnect(callback)
        for layer in self._viewer.layers:
            self._unwatch_boxes_layer(layer)

    # ------------------------------------------------------------------ running
    def _on_run_clicked(self) -> None:
        if self._worker is not None:
            show_info("Detection is already running.")
            return
        layer = self._ct_layer()
        if layer is None:
            show_error("Open a CT (File > Open) and choose it as the CT layer first.")
            return
        try:
            volume = volume_from_layer(layer)
        except ValueError as exc:
            show_error(f"Cannot run detection: {exc}")
            return
        self._stop_slice_worker()
        kwargs = self._detect_kwargs()
        self._run_succeeded = False
        self._run_ct, self._run_volume, self._run_scope = layer, volume, self._scope()
        self._run_params = {
            k: v
            for k, v in self._detect_kwargs().items()
            if k in ("model", "device", "ig_steps", "min_box_area_mm2")
        }
        self._run_started = time.perf_counter()
        self._worker_finished = False
        self._stop_explaining = threading.Event()
        kwargs["stop_explaining"] = self._stop_explaining
        self._set_running(True)
        self._status.setText("Starting…")
        self._worker = create_worker(
            _guarded,
            self._detect_iter,
            volume,
            **kwargs,
            _connect={
                "yielded": self._on_progress,
                "returned": self._on_detection_done,
                "errored": self._on_detection_errored,
                "aborted": self._on_detection_aborted,
                "finished": self._on_worker_finished,
            },
        )
        # A dock deleted with its viewer gets no more reports (Qt drops connections to deleted
        # receivers): its deletion itself stops the run.
        self.destroyed.connect(self._worker.quit)

    def _on_cancel_clicked(self) -> None:
        if self._worker is None:
            if self._slice_worker is not None:  # the slices left, explained in the background
                self._fill_left = False
                self._stop_slice_worker()
                self._status.setText("Stopped explaining the slices left; stop on one to explain it.")
            return
        if self._showing is not None:
            # the run has finished: stopping now would leave some layers of this result and some
            # of the last, so its last display steps run (a fraction of a second each)
            self._status.setText("Detection had already finished; its result is being put on screen.")
            return
        self._worker.quit()
        self._status.setText("Cancelling…")

    def _on_show_now_clicked(self) -> None:
        if self._worker is None or self._stop_explaining is None:
            return
        self._stop_explaining.set()
        self._show_now_btn.setEnabled(False)
        self._status.setText("Finishing with the slices explained so far…")

    def _set_running(self, running: bool) -> None:
        self._run_btn.setEnabled(not running)
        self._cancel_btn.setEnabled(running)
        # only a run that explains slices one by one has something to stop early
        self._show_now_btn.setEnabled(running and self._run_scope in ("positive", "all"))
        if running:
            self._progress.setRange(0, 0)  # busy until the first progress report

    def _gone(self) -> bool:
        """The dock was closed, or deleted with its viewer: late worker reports must not touch it."""
        return self._closed or not _qt_alive(self)

    def _on_progress(self, update) -> None:
        if self._gone():
            if self._worker is not None:
                self._worker.quit()  # the dock or the viewer is gone: stop at the next report
            return
        try:
            done, total, message = update
            total = max(int(total), 1)
            self._progress.setRange(0, total)
            self._progress.setValue(min(int(done), total))
        except (TypeError, ValueError):
            message = str(update)
        self._status.setText(str(message))

    def _on_detection_done(self, result: DetectionResult) -> None:
        if self._gone():
            return  # the dock was closed during the run: nobody asked for these layers any more
        layer = self._run_ct
        if layer is None or layer not in self._viewer.layers:
            show_warning("The CT layer was closed while detection ran; the result was discarded.")
            return
        # One layer per turn of the event loop: adding or refilling a dozen full-volume layers
        # in one go froze the viewer for 0.2-1 s (benchmarks/bench_ui_stall.py). The run counts
        # as running until the last step, so nothing can start on half-shown layers.
        self._showing = self._show_result(result, layer, self._run_volume, self._run_scope)
        self._show_next_step()

    def _show_next_step(self) -> None:
        steps = self._showing
        if steps is None:
            return
        if self._run_ct is not None and self._run_ct not in self._viewer.layers:
            self._discard_shown_part()
            return
        try:
            next(steps)
        except StopIteration:
            self._showing = None
            self._shown(self._result)
            return
        except Exception as exc:  # a bad result must not leave half the layers behind
            self._showing = None
            logger.exception("could not display the detection result")
            self._remove_layers_created_by_showing()
            self._status.setText("Failed: the result could not be shown; no layers were added.")
            show_error(f"Detection finished but its result could not be shown: {exc}")
            self._end_run()
            return
        if not self._closed:  # a closing dock runs the remaining steps itself (_finish_showing)
            QTimer.singleShot(_SHOW_STEP_GAP_MS, self._show_next_step)

    def _discard_shown_part(self) -> None:
        """The CT was closed while its result was being shown: the layers this showing created
        go, and nothing of the result is kept (no layer or answer tied to a CT no longer open)."""
        self._showing.close()
        self._showing = None
        self._remove_layers_created_by_showing()
        if self._result_ct is self._run_ct:
            self._result, self._result_ct = None, None
            self._results.set_result(None)
        show_warning("The CT layer was closed while its result was being shown; the result was discarded.")
        self._status.setText("The CT was closed; its result was discarded.")
        self._end_run()

    def _remove_layers_created_by_showing(self) -> None:
        for layer in self._layers_created_by_showing:
            if layer in self._viewer.layers:
                self._viewer.layers.remove(layer)
        self._layers_created_by_showing = []

    def _finish_showing(self) -> None:
        """The remaining display steps at once (the dock is closing: no time for more turns)."""
        while self._showing is not None and _qt_alive(self):
            self._show_next_step()

    def _shown(self, result: DetectionResult) -> None:
        seconds = time.perf_counter() - self._run_started
        self._status.setText(f"Done in {seconds:.1f} s: {result.call_text}.")
        if result.unexplained_slices:
            self._status.setText(
                f"{self._status.text()} {len(result.unexplained_slices)} slices not explained yet: "
                "explaining them in the background."
            )
        self._run_succeeded = True
        if self._rerun_note:
            self._status.setText(f"{self._status.text()} {self._rerun_note}")
        self._end_run()

    def _on_detection_errored(self, exc: Exception) -> None:
        logger.debug("detection failed", exc_info=exc)
        if self._gone():
            return
        self._status.setText("Failed; no layers were changed.")
        show_error(f"Detection failed: {exc}")

    def _on_detection_aborted(self) -> None:
        if self._gone():
            return
        self._status.setText("Cancelled; no layers were changed.")

    def _on_worker_finished(self) -> None:
        self._worker_finished = True
        self._end_run()

    def _end_run(self) -> None:
        """The run is over once its worker has finished and its result is on screen, in either order."""
        if self._showing is not None or not self._worker_finished:
            return
        self._worker = None
        if self._gone():
            return
        self._set_running(False)
        self._progress.setRange(0, 1)
        # a finished run shows a full bar; a cancelled or failed one an empty bar
        self._progress.setValue(1 if self._run_succeeded else 0)
        if self._explains_on_demand():
            self._slice_timer.start()  # explain the slice in view now that the run is over

    # ------------------------------------------------------------------ results -> layers
    def _show_result(self, result: DetectionResult, ct_layer, volume: CTVolume, scope: str):
        """Put a result on screen, as a generator: each ``next`` does one step (a layer, the boxes,
        the panel), so the viewer repaints and takes clicks in between."""
        kwargs = L.ct_layer_kwargs(ct_layer)
        geometry, key = volume.geometry(), volume.series_key
        shown = result
        if not is_integrated_gradients_method(result):
            scope = "none"  # DeCoVNet and FeCNN explain themselves with their own maps
        if (scope == "current" or result.unexplained_slices) and not result.saliency:
            # Empty maps, filled slice by slice as the user scrolls.
            empty = {name: np.zeros(volume.shape, np.uint8) for name in (*L.SALIENCY_LEVELS, "joint")}
            # the result holds the maps the layers show, so that slices explained later are in
            # what it exports (the lesion region of a DICOM SEG) as on screen
            result = shown = dataclasses.replace(result, saliency=empty)
        if scope == "current":  # what is explained is what the reader stopped on: never the whole
            result = shown = dataclasses.replace(result, involvement_partial=True)
        tuples = L.result_layer_data(shown, kwargs, geometry=geometry, series_key=key)
        if result.lesions:
            from napari_wscovid._widgets.lesion_layer import lesion_points_layer

            tuples.append(lesion_points_layer(result, volume))
        self._layers_created_by_showing = []
        for data, layer_kwargs, layer_type in tuples:
            new = L.result_layer(self._viewer, layer_kwargs["name"], layer_type) is None
            layer = L.upsert_layer(self._viewer, data, layer_kwargs, layer_type, colorbar=False)
            if new:
                self._layers_created_by_showing.append(layer)
            yield
            if new and layer.visible:  # a hidden map keeps napari's default: no bar
                L.show_colorbar(layer)
                yield
        L.remove_stale_result_layers(self._viewer, [t[1]["name"] for t in tuples])
        self._result, self._result_ct, self._result_volume, self._result_scope = (
            result,
            ct_layer,
            volume,
            scope,
        )
        self._explained = set(result.saliency_slices) if scope != "current" else set()
        self._unexplainable, self._boxes_waiting = set(), []
        self._fill_left = bool(result.unexplained_slices)
        # a re-run cancelled later must not change how this result's slices left are explained
        self._result_params = dict(self._run_params)
        # A re-run respects every correction of the user's on this CT: their edited and added boxes
        # stay and no detection comes back where they deleted one or moved it away.
        boxes_before = self._boxes_layer(geometry)
        current = L.layer_reading(boxes_before)
        reading, change = current.after_rerun(result.boxes)
        self._new_boxes = {place(b) for b in change["added"]} if current.touched else set()
        self._rerun_note = rerun_note(change) if current.touched else ""
        boxes_layer = self._install_boxes(
            reading,
            ct_layer=ct_layer,
            geometry=geometry,
            series_key=key,
            classes=result.classes,
            default_class=L.default_box_class(result.classes, result.patient_probs),
            model_info=result.model_info,
        )
        if boxes_before is None:
            self._layers_created_by_showing.append(boxes_layer)
        yield
        self._results.set_result(result)
        self._on_current_step()  # plot marker, position and reviewed mark of the slice in view

    def _install_boxes(
        self, reading: Reading, *, ct_layer, geometry, series_key, classes, default_class, model_info
    ):
        """Show ``reading`` in this CT's boxes layer (made when there is none): the layer then holds
        exactly its boxes, rejected detections and reviewed slices."""
        layer = self._boxes_layer(geometry)  # ours, on this CT's grid (whatever its name)
        if layer is None:
            self._free_boxes_name()
        data, kwargs, _ = L.boxes_layer_data(
            list(reading.boxes),
            L.ct_layer_kwargs(ct_layer),
            geometry=geometry,
            series_key=series_key,
            classes=classes,
            default_class=default_class,
            model_info=model_info,
            rejected=reading.rejected,
            reviewed=reading.reviewed,
        )
        if layer is None:
            from napari.layers import Layer

            # the layer object itself: napari's add_layer hands plugins a proxy of it, whose id
            # is not the one the edit trackers are keyed by
            layer = Layer.create(data, kwargs, "shapes")
            self._viewer.add_layer(layer)
            self._watch_boxes_layer(layer)
            with self._trackers[id(layer)].paused():
                L.refresh_box_colors(layer)
        else:
            self._replace_boxes(layer, list(reading.boxes), kwargs)
        self._refresh_box_list()
        self._refresh_class_choices(classes)
        self._show_reviewed(self._current_slice())
        return layer

    def _free_boxes_name(self) -> None:
        """Before a new boxes layer is made: a layer holding its name (another CT's boxes, or a
        layer not ours) is renamed, never overwritten."""
        holder = L.find_layer(self._viewer, L.BOXES_LAYER, "shapes")
        if holder is None:
            return
        if not holder.metadata.get("wscovid_boxes"):
            holder.name = f"{L.BOXES_LAYER} (not ours)"
            return
        holder.name = f"{L.BOXES_LAYER} {holder.metadata.get('series_key') or 'previous'} (kept)"
        if any(b.origin != "detected" for b in L.layer_boxes(holder)):
            show_info(f"Your edited boxes were kept in the layer {holder.name!r}.")

    def _replace_boxes(self, layer, boxes: list[Box], kwargs: dict) -> None:
        tracker = self._trackers.get(id(layer))
        if tracker is None:
            self._watch_boxes_layer(layer)
            tracker = self._trackers[id(layer)]
        with tracker.paused():
            layer.metadata = kwargs["metadata"]
            layer.feature_defaults = kwargs["feature_defaults"]
            L.set_transform(layer, kwargs)
            L.replace_boxes(layer, boxes)

    def _refresh_box_list(self, event=None) -> None:
        layer = self._boxes_layer()
        try:
            boxes = L.layer_boxes(layer) if layer is not None else []
        except ValueError:
            boxes = []
        self._results.set_boxes(boxes, new=self._new_boxes & {place(b) for b in boxes})

    # ------------------------------------------------------------------ navigation
    def _current_slice(self) -> int:
        layer = self._result_ct or self._ct_layer()
        if layer is None:
            return -1
        data_point = layer.world_to_data(self._viewer.dims.point)
        return int(np.clip(round(float(data_point[0])), 0, layer.data.shape[0] - 1))

    def _slice_world_z(self, layer, index: int) -> float:
        return float(np.asarray(layer.data_to_world((index, 0, 0)))[0])

    def _go_to_slice(self, index: int) -> None:
        layer = self._result_ct or self._ct_layer()
        if layer is None:
            return
        axis = self._viewer.dims.ndim - 3
        self._viewer.dims.set_point(axis, self._slice_world_z(layer, index))

    def _go_to_box(self, box: Box) -> None:
        layer = self._boxes_layer() or self._result_ct
        if layer is None:
            return
        centre = (box.slice, (box.y0 + box.y1 - 1) / 2, (box.x0 + box.x1 - 1) / 2)
        world = np.asarray(layer.data_to_world(centre), dtype=float)
        self._viewer.dims.set_point(self._viewer.dims.ndim - 3, float(world[0]))
        displayed = 2 if self._viewer.dims.ndisplay == 2 else 3
        _camera(self._viewer).center = tuple(world[-displayed:])

    def _on_current_step(self, event=None) -> None:
        index = self._current_slice()
        self._results.set_current_slice(index)
        self._position.setText(self._position_text(index))
        self._show_reviewed(index)
        if self._explains_on_demand(index):
            self._slice_timer.start()

    def _explains_on_demand(self, index: int | None = None) -> bool:
        """Whether a slice gets its saliency when the reader stops on it: any slice under "current
        slice only", and those a run stopped early ("Show now") left unexplained. Without
        ``index``: whether the current result has any such slice."""
        result = self._result
        if result is None:
            return False
        if self._result_scope == "current":
            return True
        if index is None:
            return bool(result.unexplained_slices)
        return index in result.unexplained_slices

    def _orient_head_up(self, event=None) -> None:
        """Coronal and sagittal views with the head at the top, as radiologists read them.

        Array axis 0 runs feet to head (the loader's LPS order), and napari draws the vertical
        axis downwards; so when z is the vertical axis of the view it is flipped up. Axial views
        keep anterior at the top (y down).
        """
        dims, camera = self._viewer.dims, _camera(self._viewer)
        if dims.ndim < 3 or not hasattr(camera, "orientation2d"):
            return
        z_axis = dims.ndim - 3
        vertical = dims.displayed[-2]
        orientation = list(camera.orientation)
        orientation[1] = "up" if vertical == z_axis else "down"
        camera.orientation = tuple(orientation)

    def _show_3d(self, event=None) -> None:
        """A 3-D view that shows something: the lung surfaces and the boxes at their slices.

        Rendered as a volume, the CT is a slab of body wall that hides both; it is hidden in 3-D
        (and shown again in 2-D), and the lung mask is drawn filled, as surfaces, instead of as
        the outline that suits a slice.
        """
        lung = L.find_layer(self._viewer, L.LUNG_LAYER, "labels")
        if self._viewer.dims.ndisplay == 3:
            ct_layers = [la for la in self._viewer.layers if "wscovid_volume" in la.metadata and la.visible]
            for layer in ct_layers:
                layer.visible = False
            self._hidden_in_3d = ct_layers
            if lung is not None:
                lung.contour = 0
        else:
            for layer in self._hidden_in_3d:
                if layer in self._viewer.layers:
                    layer.visible = True
            self._hidden_in_3d = []
            if lung is not None:
                lung.contour = L.LUNG_CONTOUR

    def _position_text(self, index: int) -> str:
        layer = self._result_ct or self._ct_layer()
        if layer is None or index < 0:
            return ""
        z_mm = float(np.asarray(layer.data_to_world((index, 0, 0)), dtype=float)[0])
        return f"Slice {index} of {layer.data.shape[0] - 1} · z = {z_mm:.1f} mm"

    # ------------------------------------------------------------------ current-slice saliency
    def _explain_current_slice(self) -> None:
        """Explain the slice in view when it is waiting for it, else (after "Show now") the most
        abnormal slice the run left, in the background, one at a time."""
        if self._result is None or self._worker is not None:
            return
        index = self._current_slice()
        wanted = None
        if (
            index >= 0
            and index not in self._explained
            and index not in self._unexplainable
            and self._explains_on_demand(index)
        ):
            if self._result.lung_mask[index].max() == 0:
                self._explained.add(index)  # nothing to explain outside the lungs
            else:
                wanted = index
        if wanted is not None:
            note = f"Explaining slice {wanted}…"
        else:
            if self._slice_worker is not None:
                return  # a slice of those left is under way: let it finish
            left = self._slices_left()
            if not left:
                return
            wanted = left[0]
            note = (
                f"Explaining the slices left, most abnormal first: slice {wanted}, {len(left)} left "
                "(Cancel stops; any slice you stop on goes first)"
            )
        if wanted == self._pending_slice:
            return
        # The user moved on: the previous slice's answer is no longer wanted.
        self._stop_slice_worker()
        self._pending_slice = wanted
        self._status.setText(note)
        result = self._result
        worker = create_worker(
            _guarded,
            self._explain_more,
            self._result_volume,
            result,
            [wanted],
            **self._result_params,
            _start_thread=False,
            # given here, not connected later: without an "errored" handler at creation superqt
            # adds one that re-raises into the Qt event loop
            _connect={"errored": lambda exc: self._on_slice_errored(exc, wanted, result)},
        )
        worker.returned.connect(lambda out: self._on_slices_explained(out, [wanted], result))
        # tied to this worker: a stopped one finishing later must not forget its successor
        worker.finished.connect(lambda: self._on_slice_worker_finished(worker))
        self._slice_worker = worker
        self._cancel_btn.setEnabled(True)
        worker.start()

    def _slices_left(self) -> list[int]:
        """The slices a run stopped early left unexplained and not explained since, in the order
        they are explained: most abnormal first. Empty when the reader stopped this (Cancel)."""
        result = self._result
        if result is None or not self._fill_left or self._result_scope == "current":
            return []
        left = [z for z in result.unexplained_slices if z not in self._explained | self._unexplainable]
        if not left:
            return []
        from napari_wscovid.stages import abnormality

        score = abnormality(result.slice_probs[left], result.classes)
        return [left[i] for i in np.argsort(-score, kind="stable")]

    def _stop_slice_worker(self) -> None:
        if self._slice_worker is not None:
            self._slice_worker.quit()
            self._slice_worker = None
            self._pending_slice = None
        if self._worker is None and not self._closed and _qt_alive(self):
            self._cancel_btn.setEnabled(False)

    def _on_slice_worker_finished(self, worker=None) -> None:
        if worker is not None and worker is not self._slice_worker:
            return  # stopped earlier, and perhaps already replaced
        self._pending_slice = None
        self._slice_worker = None
        if self._gone():
            return
        if self._worker is None:
            self._cancel_btn.setEnabled(False)
        if self._explains_on_demand():
            # The view may have moved on while this slice was computed; or more are left.
            self._slice_timer.start()

    def _on_slice_errored(self, exc: Exception, index: int, result: DetectionResult) -> None:
        """Said once; the slice is not tried again for this result (the same input would fail the
        same way), and the slices left stop being explained in the background."""
        logger.debug("slice %d not explained", index, exc_info=exc)
        if result is not self._result or self._gone():
            return
        self._unexplainable.add(index)
        stopped = ""
        if self._fill_left:
            self._fill_left = False
            stopped = " The slices left are no longer explained in the background; stop on one to try it."
        self._status.setText(f"Slice {index} could not be explained.{stopped}")
        show_error(f"Could not explain slice {index}: {exc}.{stopped}")

    def _on_slices_explained(self, out: dict, slices: list[int], result: DetectionResult) -> None:
        if result is not self._result or self._gone():
            return  # a newer result, or a closed dock: a late answer paints nothing
        for name, maps in (out.get("saliency") or {}).items():
            layer_name = L.JOINT_LAYER if name == "joint" else L.ig_layer_name(name)
            layer = L.find_layer(self._viewer, layer_name, "image")
            if layer is None:
                continue
            maps = np.asarray(maps)
            kept = result.saliency.get(name)
            for i, z in enumerate(slices):
                layer.data[z] = maps[i]
                if kept is not None and kept is not layer.data:
                    kept[z] = maps[i]
            if name == "joint":
                layer.contrast_limits = L.saliency_limits(np.asarray(layer.data))
            layer.refresh()
        self._explained.update(slices)
        new_boxes = [b for b in out.get("boxes", []) if b.slice in slices]
        if new_boxes:
            self._boxes_waiting.append((result, new_boxes))
            self._merge_waiting_boxes()
        self._record_explained(result, slices, out)
        self._status.setText(f"Slice {', '.join(map(str, slices))} explained.")
        if self._fill_left and not result.unexplained_slices:
            self._fill_left = False
            self._status.setText("Every slice the run left is explained now.")

    def _merge_waiting_boxes(self) -> None:
        """Add the boxes of slices explained after the run to the CT's boxes layer, never over an
        annotator's box or rejection. Held back while a box is being dragged or drawn: rebuilding
        the layer then would take the half-done move for the start of it, and lose it."""
        layer = self._boxes_layer()
        if self._gone() or layer is None:
            self._boxes_waiting = []
            return
        if _being_edited(layer):
            QTimer.singleShot(_BOXES_RETRY_MS, self._merge_waiting_boxes)
            return
        waiting, self._boxes_waiting = self._boxes_waiting, []
        new_boxes = [b for result, boxes in waiting if result is self._result for b in boxes]
        if new_boxes:
            existing = L.layer_boxes(layer)
            rejected = L.layer_rejected(layer)
            blockers = [b for b in existing if b.origin != "detected"] + rejected
            keep_new = [b for b in new_boxes if not any(overlap(b, u) for u in blockers)]
            _, kwargs, _ = L.boxes_layer_data(
                existing + keep_new,
                {"scale": tuple(layer.scale), "translate": tuple(layer.translate)},
                geometry=layer.metadata["wscovid_geometry"],
                series_key=layer.metadata.get("series_key", ""),
                classes=layer.metadata.get("classes", []),
                default_class=layer.metadata.get("default_class", ""),
                model_info=layer.metadata.get("model"),
                rejected=rejected,
                reviewed=L.layer_reviewed(layer),
            )
            self._replace_boxes(layer, existing + keep_new, kwargs)
            self._refresh_box_list()

    def _record_explained(self, result: DetectionResult, slices: list[int], out: dict) -> None:
        """Slices explained after the run join the result (its explained slices, their steps, the
        involvement), so that the panel and what is exported say what is on screen."""
        from napari_wscovid.boxes import involvement_with
        from napari_wscovid.stages import stopped_note

        before = result.ig_steps or (0,) * len(result.saliency_slices)
        steps = dict(zip(result.saliency_slices, before, strict=True))
        now = [int(v) for v in out.get("ig_steps", [0] * len(slices))]
        steps.update(zip(slices, now, strict=True))
        result.saliency_slices = tuple(sorted(steps))
        result.ig_steps = tuple(steps[z] for z in result.saliency_slices)
        if result.unexplained_slices:
            result.unexplained_slices = tuple(z for z in result.unexplained_slices if z not in slices)
            n_left = len(result.unexplained_slices)
            result.explain_note = stopped_note(len(result.saliency_slices), n_left)
        if out.get("masks") is not None:
            result.involvement = involvement_with(result.involvement, slices, out["masks"], result.lung_mask)
        self._results.refresh_summary(result)

    # ------------------------------------------------------------------ review
    def _refresh_class_choices(self, classes) -> None:
        current = self._class_combo.currentText()
        self._class_combo.clear()
        self._class_combo.addItems([*classes, L.NOT_A_LESION])
        if current:
            self._class_combo.setCurrentText(current)

    def _show_reviewed(self, index: int) -> None:
        layer = self._boxes_layer()
        self._reviewed_box.setEnabled(layer is not None and index >= 0)
        self._reviewed_box.blockSignals(True)
        self._reviewed_box.setChecked(layer is not None and index in L.layer_reviewed(layer))
        self._reviewed_box.blockSignals(False)

    def _on_reviewed_toggled(self, checked: bool) -> None:
        layer = self._boxes_layer()
        index = self._current_slice()
        if layer is not None and index >= 0:
            L.set_slice_reviewed(layer, index, checked)
            self._schedule_autosave(layer=layer)  # a metadata change: the layer emits no event for it

    def _on_set_class_clicked(self) -> None:
        layer = self._boxes_layer()
        if layer is None or not layer.selected_data:
            show_info("Select boxes in the 'lesion boxes' layer first (its select tool, or click them).")
            return
        changed = L.set_box_class(layer, sorted(layer.selected_data), self._class_combo.currentText())
        self._refresh_box_list()
        self._status.setText(f"{changed} box(es) set to {self._class_combo.currentText()}.")

    # ------------------------------------------------------------------ export / import
    def _on_export_clicked(self) -> None:
        layer = self._boxes_layer()
        if layer is None or (layer.nshapes == 0 and not L.layer_rejected(layer)):
            # said before a save dialog asks for a file name that would hold nothing
            show_info("There are no lesion boxes to export: run detection or draw boxes first.")
            return
        key = layer.metadata.get("series_key") or "lesion"  # "" would name a hidden ".boxes.json"
        path, chosen = QFileDialog.getSaveFileName(
            self,
            "Export lesion boxes",
            f"{key}.boxes.json",
            "Boxes JSON (*.json);;CSV (*.csv);;DICOM SR + SEG (*.dcm)",
        )
        if path and (path.lower().endswith(".dcm") or chosen.startswith("DICOM")):
            self._export_dicom(path if path.lower().endswith(".dcm") else f"{path}.dcm")
        elif path:
            # The file dialog has already asked before replacing a file; the old one is kept as .bak.
            self._export_boxes(path, overwrite=True)

    def _dicom_inputs(self):
        """(volume, DICOM source, result, boxes) for a SEG/SR of the boxes as they are now, or
        None after saying why not."""
        layer = self._boxes_layer()
        if self._result is None or self._result_ct is None or layer is None:
            show_info("Run detection first: a DICOM SR and SEG hold its answer and its boxes.")
            return None
        source = self._result_ct.metadata.get("dicom_source")
        if not source:
            show_error(
                "This CT was not read from DICOM, so a DICOM SR or SEG cannot reference its images; "
                "export the boxes as JSON or CSV instead."
            )
            return None
        return self._result_volume, source, self._result, L.layer_boxes(layer) + L.layer_rejected(layer)

    def _export_dicom(self, path) -> list[Path] | None:
        """Write the SR to ``path`` and the SEG beside it (``<name>.seg.dcm``)."""
        from napari_wscovid.io.dicom_objects import read_source_datasets, write_dicom_objects

        inputs = self._dicom_inputs()
        if inputs is None:
            return None
        volume, source, result, boxes = inputs
        path = Path(path)
        try:
            datasets = read_source_datasets(source, volume.series_key)
            written = write_dicom_objects(
                path.parent,
                volume,
                datasets,
                result,
                boxes,
                overwrite=True,  # the save dialog has asked
                names=(path.name[: -len(".dcm")] + ".seg.dcm", path.name),
            )
        except (OSError, ValueError) as exc:
            show_error(f"DICOM SR/SEG not written: {exc}")
            return None
        show_info(f"Wrote {written[1].name} ({len(boxes)} boxes) and {written[0].name}.")
        return written

    def _on_send_clicked(self) -> None:
        import os

        from qtpy.QtWidgets import QInputDialog

        target, ok = QInputDialog.getText(
            self,
            "Send to PACS",
            "Server (dicomweb:http://HOST:PORT/dicom-web or dimse://AET@HOST:PORT):",
            text=self._send_target or os.environ.get("WSCOVID_PACS_SEND_TO", ""),
        )
        if ok and target.strip():
            self._send_target = target.strip()
            self._send_to(self._send_target)

    def _send_to(self, target: str):
        """Write SEG and SR of the current result and boxes to a temporary folder and store them
        on ``target`` in a thread; returns the worker (None when nothing could be sent)."""
        import tempfile

        from napari.qt.threading import create_worker

        from napari_wscovid.io.dicom_objects import read_source_datasets, write_dicom_objects
        from napari_wscovid.io.pacs import send

        inputs = self._dicom_inputs()
        if inputs is None:
            return None
        volume, source, result, boxes = inputs

        def work():
            with tempfile.TemporaryDirectory(prefix="wscovid-send-") as folder:
                datasets = read_source_datasets(source, volume.series_key)
                paths = write_dicom_objects(folder, volume, datasets, result, boxes)
                return send(target, paths), len(boxes)

        worker = create_worker(
            work,
            _start_thread=False,
            _connect={
                "returned": lambda out: show_info(
                    f"Stored SEG and SR ({out[1]} boxes) on the PACS ({out[0]} objects)."
                ),
                "errored": lambda exc: show_error(f"Not sent to the PACS: {exc}"),
            },
        )
        self._send_btn.setEnabled(False)
        worker.finished.connect(lambda: self._send_btn.setEnabled(True))
        worker.start()
        return worker

    def _export_boxes(self, path, overwrite: bool = False) -> Path | None:
        """Write the "lesion boxes" layer to ``path`` (.json or .csv); returns the path or None."""
        layer = self._boxes_layer()
        if layer is None:
            show_error("There is no 'lesion boxes' layer to export; run detection first.")
            return None
        try:
            boxes = L.layer_boxes(layer)
            meta = layer.metadata
            written = save_boxes(
                path,
                boxes + L.layer_rejected(layer),  # rejected rows keep deletions across sessions
                meta["wscovid_geometry"],
                series_key=meta.get("series_key", ""),
                model=meta.get("model"),
                classes=meta.get("classes", ()),
                reviewed_slices=L.layer_reviewed(layer),
                overwrite=overwrite,
            )
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            show_error(
                f"Boxes not exported to {Path(path)}: {reason}. The boxes are still in the layer, "
                "and a file already at that path is unchanged."
            )
            return None
        reviewed = L.layer_reviewed(layer)
        if Path(written).suffix.lower() == ".csv" and reviewed:
            # the autosave is kept: it is then the only file that still holds the marks
            show_warning(
                f"Exported {len(boxes)} boxes to {Path(written).name}. A CSV holds boxes only: the "
                f"{len(reviewed)} slice(s) marked reviewed are not in it; they stay in the layer and its "
                "autosave, and a JSON export keeps them."
            )
            return written
        # exported: the autosave only has to cover edits made after this
        autosave_path(meta.get("series_key") or "").unlink(missing_ok=True)
        show_info(f"Exported {len(boxes)} boxes to {Path(written).name}.")
        return written

    def _on_import_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import lesion boxes", "", "Boxes (*.json *.csv)")
        if path:
            self._import_boxes(path)

    def _import_boxes(self, path) -> bool:
        """Load boxes onto the chosen CT; refused when they were made on another grid (case 36)."""
        layer = self._ct_layer()
        if layer is None:
            show_error("Open the CT the boxes belong to first.")
            return False
        try:
            volume = volume_from_layer(layer)
            boxes, meta = load_boxes(path, expected_geometry=volume.geometry())
        except ValueError as exc:
            show_error(f"Boxes not imported: {exc}")
            return False
        if meta["skipped"]:
            show_warning(describe_skipped(Path(path).name, meta["skipped"]))
        imported = Reading.from_rows(boxes, meta.get("reviewed_slices", []))
        existing = self._boxes_layer(volume.geometry())  # ours, on this CT's grid
        reading = L.layer_reading(existing).merged_with(imported)  # an empty layer: its marks stay
        if existing is not None and existing.nshapes:
            choice = self._ask_merge_or_replace(existing.nshapes, len(imported.boxes))
            if choice == "cancel":
                return False
            if choice == "replace":
                reading = imported
        self._new_boxes, self._rerun_note = set(), ""
        # a JSON's class list first; a CSV holds none, so this CT's layer keeps offering its own
        file_classes = [] if Path(path).suffix.lower() == ".csv" else list(meta.get("classes") or ())
        known = list(existing.metadata.get("classes") or ()) if existing is not None else []
        present = sorted({b.class_name for b in reading.boxes} - {L.NOT_A_LESION})
        classes = list(dict.fromkeys([*file_classes, *known, *present]))
        self._install_boxes(
            reading,
            ct_layer=layer,
            geometry=volume.geometry(),
            series_key=meta.get("series_key") or volume.series_key,
            classes=classes,
            default_class=L.default_box_class(classes),
            model_info=meta.get("model"),
        )
        return True

    def _ask_merge_or_replace(self, n_current: int, n_imported: int) -> str:
        """ "merge", "replace" or "cancel": what to do with a CT's boxes when a file is imported."""
        box = QMessageBox(self)
        box.setWindowTitle("Import lesion boxes")
        box.setText(
            f"This CT already has {n_current} box(es). Merge the {n_imported} imported box(es) with "
            "them, or replace them?"
        )
        merge = box.addButton("Merge", QMessageBox.AcceptRole)
        replace = box.addButton("Replace", QMessageBox.DestructiveRole)
        box.addButton(QMessageBox.Cancel)
        box.exec_()
        clicked = box.clickedButton()
        return "merge" if clicked is merge else "replace" if clicked is replace else "cancel"
