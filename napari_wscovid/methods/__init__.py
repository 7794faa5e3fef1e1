"""One module per detection method, chosen by the loaded network's architecture.

Each module provides ``detect_iter(volume, net, info, *, lung_mask, torch_device, timings,
...options)``, a generator yielding ``(done, total, message)`` and returning a
:class:`napari_wscovid.results.DetectionResult`. The options a method takes are its keyword
parameters: :func:`napari_wscovid.pipeline.detect_iter` refuses any other with a clear error
instead of dropping it. Shared stages live in :mod:`napari_wscovid.stages`, explanations in
:mod:`napari_wscovid.explain`.
"""

METHOD_MODULES = {
    "wsnet-hu2020": "napari_wscovid.methods.wsnet",
    "decovnet-zheng2020": "napari_wscovid.methods.decovnet",
    "fecnn-wu2021": "napari_wscovid.methods.fecnn",
}
#: The paper each architecture implements, for messages.
METHOD_NAMES = {
    "wsnet-hu2020": "WSNet (Hu et al. 2020)",
    "decovnet-zheng2020": "DeCoVNet (Zheng et al. 2020)",
    "fecnn-wu2021": "FeCNN (Wu et al. 2021)",
}
DEFAULT_ARCHITECTURE = "wsnet-hu2020"
