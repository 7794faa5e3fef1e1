"""Detection methods other than Hu et al.'s, selected by the loaded network's architecture.

Each module provides ``detect_iter(volume, net, info, *, lung_mask, torch_device, ...)``, a
generator yielding ``(done, total, message)`` and returning a
:class:`napari_wscovid.results.DetectionResult`; :func:`napari_wscovid.pipeline.detect_iter`
segments the lungs, loads the network and hands over to it.
"""

METHOD_MODULES = {
    "decovnet-zheng2020": "napari_wscovid.methods.decovnet",
    "fecnn-wu2021": "napari_wscovid.methods.fecnn",
}
