"""Qt widgets of the plugin; each is a thin layer over the core modules.

``DetectionWidget`` is imported on first use, so the reader and writer can use
the pure helpers in :mod:`napari_wscovid._widgets.layers` without loading Qt.
"""

__all__ = ["DetectionWidget"]


def __getattr__(name):
    if name == "DetectionWidget":
        from napari_wscovid._widgets.detection import DetectionWidget

        return DetectionWidget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
