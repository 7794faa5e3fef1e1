"""Lung segmentation: 1 = right lung, 2 = left lung (LPS: the right lung is at small x)."""

from napari_wscovid.lung.api import segment_lungs

__all__ = ["segment_lungs"]
