"""The decode-once paths feed the same pixels and pairing as straightforward ones."""

import itertools
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision import transforms
import pytest

from conftest import TINY_TRAIN_ARGS, run_script
from src.data import IMAGENET_MEAN, IMAGENET_STD, ImageSet, gather_batch, load_images, \
    load_or_create_split, make_view, sample_view_params
from src.distill import Distiller
from src.models import build_model, load_checkpoint
from src.predict import predict_probabilities
from src.trainer import Runtime


@pytest.mark.fast
def test_disk_cache_holds_exactly_the_decoded_pixels(tiny_data, tmp_path):
    split = load_or_create_split(tiny_data, tmp_path, seed=0, quiet=True)
    direct = ImageSet.load(split, tiny_data, ["lr", "hr"], cache_dir=None, quiet=True)
    cached = ImageSet.load(split, tiny_data, ["lr", "hr"], tmp_path / "cache", quiet=True)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    again = ImageSet.load(split, tiny_data, ["lr", "hr"], tmp_path / "cache", quiet=True)
    for resolution in ("lr", "hr"):
        assert np.array_equal(direct.pixels[resolution], cached.pixels[resolution])
        assert np.array_equal(cached.pixels[resolution], again.pixels[resolution])
    # Row i of every resolution is row i of the split: pairs stay pairs.
    batch = gather_batch(cached, np.array([5, 2, 7]), ["lr", "hr"], pin=False)
    for position, row in enumerate([5, 2, 7]):
        lr_file = tiny_data / split.frame["img_path"].iloc[row]
        hr_file = tiny_data / split.frame["upscale_img_path"].iloc[row]
        assert np.array_equal(batch["lr"][position].permute(1, 2, 0).numpy(),
                              np.asarray(Image.open(lr_file).convert("RGB")))
        assert np.array_equal(batch["hr"][position].permute(1, 2, 0).numpy(),
                              np.asarray(Image.open(hr_file).convert("RGB")))
    assert batch["index"].tolist() == [5, 2, 7]


@pytest.mark.fast
def test_memory_mapped_cache_gives_the_same_batches(tiny_data, tmp_path):
    """A cache too large for memory is memory-mapped; batches must not depend on that
    (same rows, same order, so each sample keeps its crop and flip)."""
    split = load_or_create_split(tiny_data, tmp_path, seed=0, quiet=True)
    in_memory = ImageSet.load(split, tiny_data, ["lr", "hr"], tmp_path / "cache", quiet=True)
    mapped = ImageSet(split, {resolution: np.load(next((tmp_path / "cache").glob(
        f"{resolution.upper()}-*.npy")), mmap_mode="r") for resolution in ("lr", "hr")},
        in_memory.labels)
    assert isinstance(mapped.pixels["hr"], np.memmap)
    rows = np.array([9, 2, 30, 5])
    expected = gather_batch(in_memory, rows, ["lr", "hr"], pin=False)
    batch = gather_batch(mapped, rows, ["lr", "hr"], pin=False)
    assert batch["index"].tolist() == rows.tolist()
    for key in ("lr", "hr", "labels"):
        assert torch.equal(batch[key], expected[key]), key


@pytest.mark.fast
def test_cached_views_match_a_per_image_pil_pipeline_and_stay_paired(tiny_data, tmp_path):
    """Our views from the disk cache (both resolutions, one crop and flip per sample)
    against the straightforward path: open each file with PIL, cut that sample's box at
    the file's own resolution, mirror it, resize, ToTensor, Normalize. Equal within resize
    rounding at both resolutions, so the cache changes neither pixels nor pairing."""
    split = load_or_create_split(tiny_data, tmp_path, seed=0, quiet=True)
    decoded = ImageSet.load(split, tiny_data, ["lr", "hr"], tmp_path / "cache", quiet=True)
    cached = ImageSet.load(split, tiny_data, ["lr", "hr"], tmp_path / "cache", quiet=True)
    assert all(np.array_equal(decoded.pixels[r], cached.pixels[r]) for r in ("lr", "hr"))
    rows = np.arange(8)
    batch = gather_batch(cached, rows, ["lr", "hr"], pin=False)
    params = sample_view_params(len(rows), torch.Generator().manual_seed(3), True, 0.3, grid=8)
    assert params.flip.any() and not params.flip.all()
    assert (params.boxes[:, 2:] < 8).any()  # some real crops, not only whole images
    to_tensor = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    columns = {"lr": "img_path", "hr": "upscale_img_path"}
    for resolution, column in columns.items():
        ours = make_view(batch[resolution], 32, params)
        for position, row in enumerate(rows):
            pil = Image.open(tiny_data / split.frame[column].iloc[row]).convert("RGB")
            cell = pil.width // params.grid
            top, left, height, width = (params.boxes[position] * cell).tolist()
            view = pil.crop((left, top, left + width, top + height))
            if params.flip[position]:
                view = view.transpose(Image.FLIP_LEFT_RIGHT)
            expected = to_tensor(view.resize((32, 32), Image.BILINEAR))
            # PIL rounds its resized image to 8 bits: 1.5 grey levels over the smallest std.
            assert (ours[position] - expected).abs().max().item() < \
                1.5 / 255 / min(IMAGENET_STD), (resolution, position)


@pytest.mark.fast
def test_cached_teacher_logits_equal_the_online_teacher_without_augmentation():
    torch.manual_seed(0)
    student, teacher = build_model("resnet18", 4).eval(), build_model("resnet18", 4).eval()
    hr_views = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        all_teacher_logits = torch.cat([torch.randn(3, 4), teacher(hr_views)])
    views = {"lr": torch.randn(6, 3, 32, 32), "hr": hr_views}
    batch = {"labels": torch.tensor([0, 1, 2, 3, 0, 1]), "index": torch.arange(3, 9)}
    online = Distiller(student, [teacher], "kd").eval()
    cached = Distiller(student, [], "kd", None,
                       cached_teacher_logits=all_teacher_logits).eval()
    _, online_terms = online(views, batch)
    _, cached_terms = cached(views, batch)
    for name in ("ce", "kd"):
        assert torch.allclose(online_terms[name], cached_terms[name], atol=1e-5)
    assert "cached_teacher_logits" not in cached.state_dict()


def test_teacher_cache_trains_end_to_end_and_is_reused(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out_dir, run)
    args = ["--data-dir", data_dir, "--out-dir", run, *TINY_TRAIN_ARGS, "--teacher-cache",
            "--overwrite"]
    first = run_script("train_kd_student.py", *args)
    assert first.returncode == 0, first.stderr
    cache_file = Path(re.search(r"cached teacher logits for \d+ images -> (\S+)",
                                first.stdout).group(1))
    config = json.loads((run / "kd_student" / "config.json").read_text())
    assert config["teacher"]["mode"] == "cached logits"
    # The cache holds the teacher's view of each split row's HR image, in split.csv's
    # order: recomputed here from the files, row by row.
    split = pd.read_csv(run / "split.csv")
    teacher_ckpt = run / "teacher" / "best.pt"
    model, meta = load_checkpoint(teacher_ckpt)
    hr_pixels = load_images(data_dir, split["upscale_img_path"].tolist(), None, "HR",
                            quiet=True)
    runtime = Runtime(torch.device("cpu"), amp=False, channels_last=False)
    expected = predict_probabilities(model, meta, teacher_ckpt, hr_pixels, "HR", 8, runtime,
                                     tta=False)
    cached = torch.load(cache_file, weights_only=True)
    assert cached.shape == expected.shape
    assert torch.allclose(cached.float().softmax(1), expected, atol=1e-5)
    second = run_script("train_kd_student.py", *args)
    assert second.returncode == 0, second.stderr
    assert f"teacher logits from {cache_file}" in second.stdout


@pytest.mark.fast
def test_cache_is_keyed_by_image_content(data_copy, tmp_path):
    """A moved dataset reuses its cache; two images swapped, with their sizes and dates
    kept, get a new cache holding the swapped pixels."""
    split = load_or_create_split(data_copy, tmp_path / "out", seed=0, quiet=True)
    cache_dir = tmp_path / "cache"
    before = ImageSet.load(split, data_copy, ["lr"], cache_dir, quiet=True).pixels["lr"]
    moved = Path(shutil.move(data_copy, tmp_path / "moved"))
    ImageSet.load(split, moved, ["lr"], cache_dir, quiet=True)
    assert len(list(cache_dir.glob("*.npy"))) == 1

    files = [moved / path for path in split.frame["img_path"]]
    first, second = next((a, b) for a, b in itertools.combinations(range(len(files)), 2)
                         if files[a].stat().st_size == files[b].stat().st_size
                         and files[a].read_bytes() != files[b].read_bytes())
    dates = [(files[i].stat().st_atime_ns, files[i].stat().st_mtime_ns) for i in (first, second)]
    first_bytes, second_bytes = files[first].read_bytes(), files[second].read_bytes()
    files[first].write_bytes(second_bytes)
    files[second].write_bytes(first_bytes)
    for i, date in zip((first, second), dates):
        os.utime(files[i], ns=date)
    after = ImageSet.load(split, moved, ["lr"], cache_dir, quiet=True).pixels["lr"]
    assert len(list(cache_dir.glob("*.npy"))) == 2
    assert np.array_equal(after[first], before[second])
    assert np.array_equal(after[second], before[first])
