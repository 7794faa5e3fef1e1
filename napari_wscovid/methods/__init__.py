"""One module per detection method, chosen by the loaded network's architecture.

Each module provides ``detect_iter(volume, net, info, *, lung_mask, torch_device, timings,
...options)``, a generator yielding ``(done, total, message)`` and returning a
:class:`napari_wscovid.results.DetectionResult`. The options a method takes are its keyword
parameters: :func:`napari_wscovid.pipeline.detect_iter` refuses any other with a clear error
instead of dropping it. Shared stages live in :mod:`napari_wscovid.stages`, explanations in
:mod:`napari_wscovid.explain`.
"""

from napari_wscovid.architectures import DECOVNET, FECNN, WSNET

METHOD_MODULES = {
    WSNET: "napari_wscovid.methods.wsnet",
    DECOVNET: "napari_wscovid.methods.decovnet",
    FECNN: "napari_wscovid.methods.fecnn",
}
#: The paper each architecture implements, for messages.
METHOD_NAMES = {
    WSNET: "WSNet (Hu et al. 2020)",
    DECOVNET: "DeCoVNet (Zheng et al. 2020)",
    FECNN: "FeCNN (Wu et al. 2021)",
}
DEFAULT_ARCHITECTURE = WSNET
