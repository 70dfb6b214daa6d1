"""LR images rendered from HR twins: the box filter that makes an LR image from its HR twin
(``make_demo_data.py``), the other degradations a data set's LR images may have been made
with (``--degradation``, for unlabelled HR images without an LR twin), how far a data set's
LR images are from each, and ``--lr-from-hr``'s views at sub-pixel phases the LR set does
not hold."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import ImageSet


def box_downsample(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Each LR pixel the mean of its ``scale`` x ``scale`` HR block, rounded to a grey level:
    how ``make_demo_data.py`` makes every LR image from its HR twin."""
    return F.avg_pool2d(hr.float(), scale).round_().to(torch.uint8)


# Mean grey-level difference allowed between the LR images and their box-filtered HR twins
# for --lr-from-hr: rounding alone (another library's box filter) stays well below it.
LR_RENDER_TOLERANCE = 1.0


# How an LR image may have been made from its HR twin. box: the mean of each scale x scale
# block (also what an "area" resize does at a whole factor); the others are PIL's resize
# filters, which widen their kernel when shrinking (antialiased). Each maps (H, W, 3) uint8
# HR images to (H/scale, W/scale, 3).
PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
DEGRADATIONS = ("box", *PIL_FILTERS)
# When a degradation is too far from the labelled pairs (LR images made with it would look
# unlike the images the student is tested on): a mean grey-level error more than
# DEGRADATION_SLACK above the best degradation's, or above DEGRADATION_WARNING at all. JPEG
# rounding alone leaves about 2 grey levels on 16 px images made exactly the right way.
DEGRADATION_SLACK = 1.0
DEGRADATION_WARNING = 5.0


def degradation_warning(errors: dict[str, float], chosen: str) -> str | None:
    """Why LR twins made by ``chosen`` would not look like the data (None if they would);
    ``errors`` as ``degradation_errors`` returns them, best first."""
    best = next(iter(errors))
    if errors[chosen] > errors[best] + DEGRADATION_SLACK:
        return (f"the {chosen} degradation differs from the labelled LR images by "
                f"{errors[chosen]:.1f} grey levels on average, {best} by {errors[best]:.1f}")
    if errors[chosen] > DEGRADATION_WARNING:
        return (f"no degradation reproduces the labelled LR images: the best, {best}, differs "
                f"by {errors[best]:.1f} grey levels on average (more than "
                f"{DEGRADATION_WARNING:g}); give the unlabelled images with their LR twins")
    return None


def describe_errors(errors: dict[str, float]) -> str:
    """``degradation_errors``' result as one line: ``box 0.00, bicubic 4.22, ...``."""
    return ", ".join(f"{name} {error:.2f}" for name, error in errors.items())


def degrade(hr: np.ndarray, scale: int, degradation: str) -> np.ndarray:
    """(N, H, W, 3) ``uint8`` HR images shrunk by ``scale`` the way ``degradation`` names."""
    if degradation == "box":    # a copy: decoded images may be read-only arrays
        pixels = torch.tensor(np.asarray(hr)).permute(0, 3, 1, 2)
        return box_downsample(pixels, scale).permute(0, 2, 3, 1).numpy()
    height, width = hr.shape[1] // scale, hr.shape[2] // scale
    return np.stack([np.asarray(Image.fromarray(np.asarray(image)).resize(
        (width, height), PIL_FILTERS[degradation])) for image in hr]) if len(hr) \
        else np.empty((0, height, width, 3), np.uint8)


def degradation_errors(lr: np.ndarray, hr: np.ndarray, scale: int) -> dict[str, float]:
    """Per degradation, the mean absolute grey-level difference between (B, h, w, 3) LR
    images and their (B, H, W, 3) HR twins degraded that way: about 0 for the one the LR
    images were made with. Sorted best first."""
    errors = {name: float(np.abs(degrade(hr, scale, name).astype(np.float32)
                                 - lr.astype(np.float32)).mean())
              for name in DEGRADATIONS}
    return dict(sorted(errors.items(), key=lambda item: item[1]))


def box_filter_differences(lr: np.ndarray, hr: np.ndarray, scale: int) -> np.ndarray:
    """Per image, the mean absolute difference in grey levels between (B, h, w, 3) LR
    images and their (B, H, W, 3) HR twins box-filtered by ``scale``: about 0 when the LR
    images were made that way (``make_demo_data.py``)."""
    shrunk = degrade(hr, scale, "box").astype(np.float32)
    return np.abs(shrunk - np.asarray(lr, dtype=np.float32)).mean(axis=(1, 2, 3))


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
