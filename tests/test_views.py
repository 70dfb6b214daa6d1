"""Paired views: the teacher's HR view and the student's LR view show the same crop and flip."""

import torch

from src.data import ViewParams, make_view, make_views, sample_view_params
from src.demo import downsample


def _ramps(size: int, batch: int) -> torch.Tensor:
    """HR images whose red channel rises left to right and green top to bottom, so any
    difference in crop or flip between two views shows up as a difference in values."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 240
    image = torch.zeros(3, size, size)
    image[0] = coords.view(1, size)
    image[1] = coords.view(size, 1)
    image[2] = 128
    return image.round().to(torch.uint8).expand(batch, 3, size, size).clone()


def _lr_twin(hr: torch.Tensor, scale: int) -> torch.Tensor:
    lr = [downsample(image.permute(1, 2, 0).numpy(), scale) for image in hr]
    return torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in lr])


def test_views_stay_paired_under_crop_and_flip():
    hr = _ramps(64, 16)
    batch = {"hr": hr, "lr": _lr_twin(hr, 4)}
    params = sample_view_params(16, torch.Generator().manual_seed(0), hflip=True, crop_scale=0.5)
    assert params.flip.any() and not params.flip.all()
    views = make_views(batch, {"lr": 24, "hr": 24}, params)
    # Interior pixels: bilinear sampling of a ramp is exact away from the image border.
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    difference = (views["lr"] - views["hr"])[inner].abs().max().item()
    assert difference < 0.05, difference

    # The check can fail: flip only the teacher's view and the pair falls apart.
    mirrored = ViewParams(params.centre, params.extent, ~params.flip)
    unpaired = make_view(batch["hr"], 24, mirrored)
    assert (views["lr"] - unpaired)[inner].abs().max().item() > 1.0


def test_views_at_different_network_sizes_show_the_same_region():
    hr = _ramps(64, 4)
    batch = {"hr": hr, "lr": _lr_twin(hr, 4)}
    params = sample_view_params(4, torch.Generator().manual_seed(1), hflip=True, crop_scale=0.6)
    views = make_views(batch, {"lr": 16, "hr": 48}, params)
    hr_at_lr_size = torch.nn.functional.avg_pool2d(views["hr"], 3)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert (views["lr"] - hr_at_lr_size)[inner].abs().max().item() < 0.05


def test_training_view_without_crop_or_flip_equals_evaluation_view():
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    identity = ViewParams(torch.zeros(3, 2), torch.ones(3, 2), torch.zeros(3, dtype=torch.bool))
    assert torch.allclose(make_view(images, 40, identity), make_view(images, 40, None), atol=1e-5)


def test_view_params_are_reproducible_from_the_generator():
    first = sample_view_params(8, torch.Generator().manual_seed(5), True, 0.75)
    again = sample_view_params(8, torch.Generator().manual_seed(5), True, 0.75)
    assert torch.equal(first.centre, again.centre) and torch.equal(first.flip, again.flip)
    assert (first.extent <= 1).all() and (first.centre.abs() <= 1 - first.extent + 1e-6).all()
