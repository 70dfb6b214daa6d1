"""Paired views: the teacher's HR view and the student's LR view show the same crop and flip."""

import os
import signal
import time

import torch
import pytest

from src.data import IMAGENET_STD, ViewParams, make_view, make_views, sample_view_params
from src.demo import downsample


# Quick enough for make test-fast.
pytestmark = pytest.mark.fast


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
    params = sample_view_params(16, torch.Generator().manual_seed(0), hflip=True, crop_scale=0.5,
                                grid=16)
    assert params.flip.any() and not params.flip.all()
    assert (params.boxes[:, 2:] < 16).any(), "some views should be real crops"
    views = make_views(batch, {"lr": 24, "hr": 24}, params)
    # Interior pixels: bilinear sampling of a ramp is exact away from the image border.
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    difference = (views["lr"] - views["hr"])[inner].abs().max().item()
    assert difference < 0.05, difference

    # The check can fail: flip only the teacher's view and the pair falls apart.
    mirrored = ViewParams(params.boxes, ~params.flip, params.grid)
    unpaired = make_view(batch["hr"], 24, mirrored)
    assert (views["lr"] - unpaired)[inner].abs().max().item() > 1.0


def test_views_at_different_network_sizes_show_the_same_region():
    hr = _ramps(64, 4)
    batch = {"hr": hr, "lr": _lr_twin(hr, 4)}
    params = sample_view_params(4, torch.Generator().manual_seed(1), hflip=True, crop_scale=0.6,
                                grid=16)
    views = make_views(batch, {"lr": 16, "hr": 48}, params)
    hr_at_lr_size = torch.nn.functional.avg_pool2d(views["hr"], 3)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert (views["lr"] - hr_at_lr_size)[inner].abs().max().item() < 0.05


def test_training_view_without_crop_or_flip_equals_evaluation_view():
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    whole = ViewParams(torch.tensor([[0, 0, 8, 8]] * 3), torch.zeros(3, dtype=torch.bool), 8)
    assert torch.equal(make_view(images, 40, whole), make_view(images, 40, None))


def test_float_path_matches_the_uint8_path():
    """CUDA resizes floats; the CPU resizes uint8 with fixed-point weights and rounds to
    whole grey levels: the two agree within one grey level."""
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    params = sample_view_params(4, torch.Generator().manual_seed(2), True, 0.5, grid=16)
    for size in (8, 40):
        as_uint8 = make_view(images, size, params)
        as_float = make_view(images.float(), size, params)
        assert (as_uint8 - as_float).abs().max().item() <= 1.0 / 255 / min(IMAGENET_STD) + 1e-6


def test_view_params_are_reproducible_and_inside_the_image():
    first = sample_view_params(64, torch.Generator().manual_seed(5), True, 0.3, grid=64)
    again = sample_view_params(64, torch.Generator().manual_seed(5), True, 0.3, grid=64)
    assert torch.equal(first.boxes, again.boxes) and torch.equal(first.flip, again.flip)
    top, left, height, width = first.boxes.unbind(1)
    assert (height >= 1).all() and (width >= 1).all()
    assert (top + height <= 64).all() and (left + width <= 64).all()
    area = (height * width).float() / 64 ** 2
    assert area.min() > 0.25 and area.max() <= 1.0


def test_views_are_the_same_on_one_thread_and_after_a_fork():
    """Rows resized on threads of our own equal rows resized one by one, and a forked child
    (which inherits the thread pools but not their threads) still makes views."""
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(4))
    params = sample_view_params(6, torch.Generator().manual_seed(6), True, 0.3, grid=8)
    threaded = make_view(images, 40, params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(make_view(images, 40, params), threaded)
    finally:
        torch.set_num_threads(threads)
    child = os.fork()
    if child == 0:
        os._exit(0 if torch.equal(make_view(images, 40, params), threaded) else 1)
    deadline = time.monotonic() + 60
    while (finished := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if finished[0] == 0:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert finished[0] == child, "the forked child hung making a view"
    assert os.waitstatus_to_exitcode(finished[1]) == 0


def test_crop_scale_one_keeps_the_whole_image():
    """An aspect ratio other than 1 must not cut a strip off one side when no crop is asked
    for (the teacher cache's whole-image logits rely on it)."""
    params = sample_view_params(64, torch.Generator().manual_seed(7), True, 1.0, grid=8)
    assert torch.equal(params.boxes, torch.tensor([[0, 0, 8, 8]] * 64))
    cropped = sample_view_params(64, torch.Generator().manual_seed(7), True, 0.9, grid=8)
    assert torch.equal(cropped.flip, params.flip)
    assert (cropped.boxes[:, 2:] < 8).any()
