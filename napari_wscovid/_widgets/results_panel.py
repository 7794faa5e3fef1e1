"""Read-only view of a detection: probabilities, involvement, per-slice plot, box list."""

from __future__ import annotations

import math

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_wscovid._widgets.slice_plot import SliceProbabilityPlot
from napari_wscovid.results import Box, DetectionResult
from napari_wscovid.review import place

# A box's number is the probability of its class on its slice (the boxes of one slice share it).
_BOX_COLUMNS = ("slice", "class", "slice P(class)", "area mm²", "origin")


def summary_text(result: DetectionResult) -> str:
    """Patient-level summary in plain text (one line per fact)."""
    lines = [f"Predicted: {result.call_text}"]
    for name, p in zip(result.classes, np.asarray(result.patient_probs, dtype=float), strict=False):
        lines.append(f"  P({name}) = {p:.3f}")
    lines.append(f"Lung volume: {result.lung_volume_ml:.0f} mL")
    total = result.involvement.get("total_percent") if result.involvement else None
    if total is not None and math.isfinite(float(total)):
        if result.unexplained_slices:  # the slices not explained may hold more
            lines.append(
                f"Involvement: at least {float(total):.1f} % of lung "
                f"({len(result.unexplained_slices)} slices not explained)"
            )
        elif result.involvement_partial:
            lines.append(
                f"Involvement: at least {float(total):.1f} % of lung (only the "
                f"{len(result.saliency_slices)} slice(s) you stopped on are explained)"
            )
        else:
            lines.append(f"Involvement: {float(total):.1f} % of lung")
    if result.explain_note:
        lines.append(result.explain_note)
    lines.append(f"Device: {result.device}")
    info = result.model_info or {}
    lines.append(f"Model: {info.get('name') or 'unnamed'} {info.get('version') or ''}".rstrip())
    return "\n".join(lines)


#: Shown under every result: what this is, and where its measured performance is.
RESEARCH_NOTICE = (
    "Research software, not a diagnosis: on held-out real CT the default model was right on 2 of 3 "
    "patients and called a lung tumour CAP, with boxes. See the model card in the README for its measured "
    "performance."
)
STATUS_TITLES = {
    "needs_review": "Needs review: the scan may be why the answer is wrong",
    "out_of_scope": "Out of scope: this does not look like a chest CT the networks can read",
    "ok": "Scan checks",
}
DOUBTFUL_ANSWER_TITLE = "Needs review: the network's answer on this scan is doubtful"
STATUS_COLORS = {"needs_review": "#ffd60a", "out_of_scope": "#ff6961", "ok": "#d0d0d0"}
INVOLVEMENT_TIP = (
    "Involvement: the share of the lung volume inside the thresholded saliency of the explained "
    "slices (the regions the boxes come from), in percent of the whole lung mask."
)


def sorted_boxes(boxes: list[Box]) -> list[Box]:
    """Highest score first; boxes without a score (drawn by the user) last."""
    return sorted(
        boxes, key=lambda b: (not math.isfinite(b.score), -b.score if math.isfinite(b.score) else 0)
    )


class ResultsPanel(QWidget):
    """Summary, per-slice probability plot and the box list of the last run."""

    slice_requested = Signal(int)
    box_requested = Signal(object)  # a Box

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._summary = QLabel("No detection yet.")
        self._summary.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self._summary.setToolTip(INVOLVEMENT_TIP)
        self._notice = QLabel(RESEARCH_NOTICE)
        self._notice.setWordWrap(True)
        # said first when the scan's quality makes the answer doubtful (napari_wscovid.quality)
        self._banner = QLabel("")
        self._banner.setWordWrap(True)
        self._banner.setVisible(False)
        self._plot = SliceProbabilityPlot()
        self._plot.slice_clicked.connect(self.slice_requested)
        self._table = QTableWidget(0, len(_BOX_COLUMNS))
        self._table.setHorizontalHeaderLabels(_BOX_COLUMNS)
        self._table.horizontalHeaderItem(4).setToolTip(
            "detected: the model's; edited / added: yours; (new): added by the latest re-run"
        )
        self._table.horizontalHeaderItem(3).setToolTip(
            "A detected box: the area of the lesion region it was drawn around. A box you drew or "
            "edited: the area of the rectangle (the region under it is not known)."
        )
        self._table.horizontalHeaderItem(2).setToolTip(
            "The network's probability of the box's class for the whole slice, not a score of the box "
            "itself; boxes you drew have none (–)."
        )
        self._table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self._table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self._table.setSelectionMode(QAbstractItemView.SingleSelection)
        self._table.verticalHeader().setVisible(False)
        self._table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self._table.cellClicked.connect(self._on_cell_clicked)
        self._boxes: list[Box] = []

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._banner)
        layout.addWidget(self._summary)
        layout.addWidget(self._notice)
        layout.addWidget(QLabel("Probability per slice:"))
        layout.addWidget(self._plot)
        layout.addWidget(QLabel("Lesion boxes (click to go there):"))
        layout.addWidget(self._table)

    def set_result(self, result: DetectionResult | None) -> None:
        self._show_status(result)
        if result is None:
            self._summary.setText("No detection yet.")
            self._plot.set_data(np.zeros((0, 0)), ())
            return
        self._summary.setText(summary_text(result))
        self._plot.set_data(result.slice_probs, result.classes)

    def refresh_summary(self, result: DetectionResult) -> None:
        """The summary again, after slices were explained on demand (involvement, slices left)."""
        self._summary.setText(summary_text(result))

    def _show_status(self, result: DetectionResult | None) -> None:
        status = result.status if result is not None else ""
        flags = [f for f in (result.qc if result is not None else []) if f.get("severity") != "info"]
        if status in ("", "ok") and not flags:
            self._banner.setVisible(False)
            return
        title = STATUS_TITLES.get(status, "Check the scan")
        if status == "needs_review" and not any(f.get("severity") == "severe" for f in flags):
            title = DOUBTFUL_ANSWER_TITLE  # the scan passed its checks; the network's fit did not
        lines = [f"<b>{title}</b>"] + [
            f"{f['severity']}: {f['name']} = {f['value']}: {f['message']}" for f in flags
        ]
        self._banner.setText("<br>".join(lines))
        color = STATUS_COLORS.get(status, STATUS_COLORS["ok"])
        self._banner.setStyleSheet(f"background-color: {color}; color: black; padding: 4px;")
        self._banner.setVisible(True)

    def set_boxes(self, boxes: list[Box], new=frozenset()) -> None:
        """Show ``boxes``; those whose ``(slice, y0, x0, y1, x1)`` is in ``new`` were added by the
        latest re-run and say so in the origin column."""
        self._boxes = sorted_boxes(list(boxes))
        self._table.setRowCount(len(self._boxes))
        for row, box in enumerate(self._boxes):
            score = f"{box.score:.2f}" if math.isfinite(box.score) else "–"
            origin = box.origin
            if place(box) in new:
                origin += " (new)"
            values = (str(box.slice), box.class_name, score, f"{box.area_mm2:.0f}", origin)
            for col, text in enumerate(values):
                self._table.setItem(row, col, QTableWidgetItem(text))

    def set_current_slice(self, index: int) -> None:
        self._plot.set_current_slice(index)

    @property
    def boxes(self) -> list[Box]:
        """Boxes in the order shown."""
        return list(self._boxes)

    def _on_cell_clicked(self, row: int, _column: int) -> None:
        if 0 <= row < len(self._boxes):
            self.box_requested.emit(self._boxes[row])
