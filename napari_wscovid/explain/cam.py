"""Class activation maps from a WSNet forward pass, scaled for display."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from napari_wscovid.models.wsnet import WSNetOutput


def class_cams(output: WSNetOutput, class_index: int) -> dict[str, np.ndarray]:
    """Per-scale CAMs of one class, in [0, 1], for display.

    Parameters
    ----------
    output
        A forward pass of the network on ``N`` slices.
    class_index
        Index of the class whose maps are wanted.

    Returns
    -------
    dict
        Scale name -> ``(N, h, w)`` float32 array at the scale's own resolution.

    Notes
    -----
    Negative evidence is dropped (ReLU), as in Zhou et al.'s CAM: the score is a global
    max, so only positive responses can have made it. Each slice is then divided by its
    own maximum rather than by the volume's, so a slice with a faint lesion is still
    visible next to one with a strong lesion; the price is that brightness cannot be
    compared across slices (the slice probabilities carry that). A slice with no positive
    response stays all zeros instead of being divided by zero.
    """
    cams = {}
    for scale, cam in output.cams.items():
        maps = torch.relu(cam[:, class_index].detach().float())
        peak = maps.amax(dim=(1, 2), keepdim=True)
        maps = torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), 0.0)
        cams[scale] = maps.cpu().numpy().astype(np.float32, copy=False)
    return cams


def upsample_maps(maps: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinearly resize ``(N, h, w)`` maps to ``(N, *size)`` input resolution.

    ``align_corners=False`` treats each map cell as covering a square of input pixels,
    which is how the convolutions and poolings tile the input.
    """
    tensor = torch.as_tensor(np.asarray(maps, dtype=np.float32) if not torch.is_tensor(maps) else maps)
    size = (size, size) if isinstance(size, int) else tuple(size)
    resized = F.interpolate(tensor.float()[:, None], size=size, mode="bilinear", align_corners=False)
    return resized[:, 0].detach().cpu().numpy()
