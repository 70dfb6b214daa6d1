"""LR images rendered from HR twins: the box filter that makes an LR image from its HR twin
(``make_demo_data.py``), how far a data set's LR images are from it, and ``--lr-from-hr``'s
views at sub-pixel phases the LR set does not hold."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import ImageSet


def box_downsample(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Each LR pixel the mean of its ``scale`` x ``scale`` HR block, rounded to a grey level:
    how ``make_demo_data.py`` makes every LR image from its HR twin."""
    return F.avg_pool2d(hr.float(), scale).round_().to(torch.uint8)


# Mean grey-level difference allowed between the LR images and their box-filtered HR twins
# for --lr-from-hr: rounding alone (another library's box filter) stays well below it.
LR_RENDER_TOLERANCE = 1.0


def box_filter_differences(lr: np.ndarray, hr: np.ndarray, scale: int) -> np.ndarray:
    """Per image, the mean absolute difference in grey levels between (B, h, w, 3) LR
    images and their (B, H, W, 3) HR twins box-filtered by ``scale``: about 0 when the LR
    images were made that way (``make_demo_data.py``)."""
    def channels_first(pixels):   # a copy: decoded images may be read-only arrays
        return torch.tensor(pixels).permute(0, 3, 1, 2)
    shrunk = box_downsample(channels_first(hr), scale).float()
    return (shrunk - channels_first(lr).float()).abs().mean(dim=(1, 2, 3)).numpy()


def lr_render_error(images: ImageSet, scale: int, limit: int = 512) -> float:
    """Mean of ``box_filter_differences`` over the first ``limit`` training images: small
    when LR views rendered from HR twins look like the LR images."""
    index = images.split.indices("train")[:limit]
    return float(box_filter_differences(images.pixels["lr"][index], images.pixels["hr"][index],
                                        scale).mean())


def render_lr_from_hr(hr: torch.Tensor, scale: int, generator: torch.Generator):
    """New LR images from a ``uint8`` HR batch (B, 3, H, W): each HR twin shifted by a random
    whole number of HR pixels (0 to ``scale`` - 1 down and right, edges repeated), then
    box-filtered by ``scale``. A shift that is not a whole LR pixel samples the photo at
    another phase, giving an LR image the LR set does not hold and an LR-only model cannot
    make; the shifted HR batch is returned beside it, for the teacher to see the same view.
    """
    height, width = hr.shape[-2:]
    offsets = torch.randint(0, scale, (len(hr), 2), generator=generator).to(hr.device)
    padded = F.pad(hr.float(), (0, scale - 1, 0, scale - 1), mode="replicate")
    shifted = torch.empty(hr.shape, dtype=torch.float32, device=hr.device)
    for down in range(scale):
        for right in range(scale):
            rows = ((offsets[:, 0] == down) & (offsets[:, 1] == right)).nonzero()[:, 0]
            shifted[rows] = padded[rows, :, down:down + height, right:right + width]
    return box_downsample(shifted, scale), shifted.to(torch.uint8)
