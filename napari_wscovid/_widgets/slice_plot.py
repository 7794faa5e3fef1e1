"""A small per-slice probability plot drawn with QPainter (no plotting dependency)."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QPointF, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

from napari_wscovid._widgets.layers import class_color

# Room for the axis labels on the left and bottom and the legend on top.
_LEFT, _RIGHT, _TOP, _BOTTOM = 26, 6, 16, 16


class SliceProbabilityPlot(QWidget):
    """Probability of each class (y, 0..1) against slice index (x).

    Clicking emits :attr:`slice_clicked` with the slice under the mouse; slices
    without lung (NaN rows) leave gaps in the curves.
    """

    slice_clicked = Signal(int)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._probs = np.zeros((0, 0), dtype=float)
        self._classes: tuple[str, ...] = ()
        self._current = -1
        self.setMinimumHeight(120)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setToolTip(
            "Probability of each class (vertical, 0 to 1) on each slice (horizontal, slice index); "
            "gaps are slices without lung. The white line marks the slice in view; the dashed line "
            "is P = 0.5. Click to go to a slice."
        )

    def set_data(self, slice_probs, classes) -> None:
        probs = np.asarray(slice_probs, dtype=float)
        self._probs = probs.reshape(len(probs), -1) if probs.size else np.zeros((0, 0))
        self._classes = tuple(classes)
        self.update()

    def set_current_slice(self, index: int) -> None:
        if index != self._current:
            self._current = int(index)
            self.update()

    def legend_entries(self) -> list[tuple[str, str]]:
        """(class name, colour) of each curve, as the legend draws them."""
        return [(name, class_color(name, self._classes)) for name in self._classes]

    @property
    def n_slices(self) -> int:
        return int(self._probs.shape[0])

    def slice_at(self, x: float) -> int:
        """The slice index under widget x coordinate ``x``."""
        n = self.n_slices
        if n <= 1:
            return 0
        width = max(self.width() - _LEFT - _RIGHT, 1)
        frac = (x - _LEFT) / width
        return int(np.clip(round(frac * (n - 1)), 0, n - 1))

    def _point(self, i: int, p: float) -> QPointF:
        n = max(self.n_slices - 1, 1)
        w = self.width() - _LEFT - _RIGHT
        h = self.height() - _TOP - _BOTTOM
        return QPointF(_LEFT + w * i / n, _TOP + h * (1.0 - p))

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt override)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        painter.fillRect(self.rect(), QColor("#1e1e1e"))
        painter.setPen(QPen(QColor("#555555"), 1, Qt.DashLine))
        painter.drawLine(self._point(0, 0.5), self._point(max(self.n_slices - 1, 1), 0.5))
        for k, name in enumerate(self._classes):
            painter.setPen(QPen(QColor(class_color(name, self._classes)), 1.5))
            previous = None
            for i in range(self.n_slices):
                p = self._probs[i, k] if k < self._probs.shape[1] else np.nan
                if not np.isfinite(p):
                    previous = None
                    continue
                point = self._point(i, float(p))
                if previous is not None:
                    painter.drawLine(previous, point)
                previous = point
        if 0 <= self._current < self.n_slices:
            painter.setPen(QPen(QColor("#ffffff"), 1))
            painter.drawLine(self._point(self._current, 0.0), self._point(self._current, 1.0))
        self._draw_axes_and_legend(painter)
        painter.end()

    def _draw_axes_and_legend(self, painter: QPainter) -> None:
        font = painter.font()
        font.setPointSize(7)
        painter.setFont(font)
        painter.setPen(QColor("#bbbbbb"))
        for p in (0.0, 0.5, 1.0):  # y axis: probability
            point = self._point(0, p)
            painter.drawText(QPointF(2, point.y() + 3), f"{p:g}")
        bottom = self.height() - 3
        painter.drawText(QPointF(_LEFT, bottom), "slice 0")
        end_label = f"{self.n_slices - 1}" if self.n_slices else ""
        painter.drawText(QPointF(self.width() - _RIGHT - 6 * len(end_label), bottom), end_label)
        if 0 <= self._current < self.n_slices:
            painter.setPen(QColor("#ffffff"))
            x = self._point(self._current, 0.0).x()
            painter.drawText(QPointF(min(x + 3, self.width() - 60), bottom), f"in view: {self._current}")
        x = float(_LEFT)
        for name, color in self.legend_entries():  # legend along the top
            painter.setPen(QPen(QColor(color), 2))
            painter.drawLine(QPointF(x, 8), QPointF(x + 10, 8))
            painter.setPen(QColor("#dddddd"))
            painter.drawText(QPointF(x + 13, 11), name)
            x += 13 + 6 * len(name) + 10

    def mousePressEvent(self, event) -> None:  # noqa: N802 (Qt override)
        if self.n_slices:
            self.slice_clicked.emit(self.slice_at(event.pos().x()))
