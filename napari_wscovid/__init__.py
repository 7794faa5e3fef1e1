"""napari-wscovid: weakly supervised COVID-19 / CAP detection and explanation on chest CT.

The public API is importable without napari or Qt; torch is imported only by the
functions that need it, so ``import napari_wscovid`` stays fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "CTVolume": "napari_wscovid.io.volume",
    "CTLoadError": "napari_wscovid.io.volume",
    "load_ct": "napari_wscovid.io",
    "list_series": "napari_wscovid.io",
    "make_phantom": "napari_wscovid.phantom",
    "segment_lungs": "napari_wscovid.lung",
    "detect": "napari_wscovid.pipeline",
    "detect_iter": "napari_wscovid.pipeline",
    "DetectionResult": "napari_wscovid.results",
    "Box": "napari_wscovid.results",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'napari_wscovid' has no attribute {name!r}")
