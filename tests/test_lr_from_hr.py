"""--lr-from-hr: LR views rendered from HR twins at sampling phases the LR set lacks, the
teacher seeing the very same shifted HR view."""

import json

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
import pytest

from conftest import TINY_TRAIN_ARGS, assert_one_line_error, run_script
from src.data import ImageSet, batch_indices, epoch_generator, load_or_create_split
from src.lr_render import render_lr_from_hr
from src.distill import HardLabels
from src import stages, trainer
from src.trainer import FitConfig, Runtime, train_one_epoch


def _block_mean(hr: np.ndarray, scale: int) -> np.ndarray:
    """Box filter of a (3, H, W) image, written out independently of the tool's."""
    channels, height, width = hr.shape
    blocks = hr.reshape(channels, height // scale, scale, width // scale, scale)
    return np.round(blocks.astype(np.float64).mean(axis=(2, 4))).astype(np.uint8)


def _shifted(hr: np.ndarray, down: int, right: int) -> np.ndarray:
    """``hr`` moved up by ``down`` and left by ``right`` pixels, edges repeated."""
    padded = np.pad(hr, ((0, 0), (0, down), (0, right)), mode="edge")
    return padded[:, down:, right:]


@pytest.mark.fast
def test_rendered_lr_is_the_shifted_hr_twin_box_filtered():
    scale = 4
    hr = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8,
                       generator=torch.Generator().manual_seed(0))
    lr, shifted_hr = render_lr_from_hr(hr, scale, torch.Generator().manual_seed(1))
    assert lr.shape == (48, 3, 8, 8) and lr.dtype == torch.uint8
    assert shifted_hr.shape == hr.shape and shifted_hr.dtype == torch.uint8
    offsets = []
    for row in range(len(hr)):
        image = hr[row].numpy()
        matches = [(down, right) for down in range(scale) for right in range(scale)
                   if np.array_equal(shifted_hr[row].numpy(), _shifted(image, down, right))]
        assert len(matches) == 1, (row, matches)      # the teacher's view: one whole shift
        offsets.append(matches[0])
        # The student's view: exactly that shifted twin, box-filtered.
        assert np.array_equal(lr[row].numpy(), _block_mean(shifted_hr[row].numpy(), scale))
        stored_lr = _block_mean(image, scale)
        assert np.array_equal(lr[row].numpy(), stored_lr) == (matches[0] == (0, 0))
    assert len(set(offsets)) >= 8, offsets            # phases vary within a batch
    again = render_lr_from_hr(hr, scale, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], lr) and torch.equal(again[1], shifted_hr)


class _RecordingStudent(HardLabels):
    """A linear LR student that keeps every training view it is given."""

    def __init__(self, classes: int):
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, classes)), "lr")
        self.seen = []

    def forward(self, views, batch):
        self.seen.append({key: view.clone() for key, view in views.items()}
                         | {"index": batch["index"].clone()})
        return super().forward(views, batch)


def _training_views(tiny_data, tmp_path, lr_from_hr: int):
    split = load_or_create_split(tiny_data, tmp_path, seed=0, quiet=True)
    images = ImageSet.load(split, tiny_data, ["hr", "lr"], cache_dir=None, quiet=True)
    objective = _RecordingStudent(len(split.classes))
    # Native sizes, no crop, no flip: the views are the rendered images, only normalised.
    cfg = FitConfig(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, lr_factor=0.5,
                    lr_patience=1, min_lr=0.0, patience=1, monitor="last", hflip=False,
                    crop_scale=1.0, seed=0, amp=False, channels_last=False,
                    view_sizes={"lr": 8, "hr": 32}, lr_from_hr=lr_from_hr)
    generator = epoch_generator(0, 1)
    batches = batch_indices(split.indices("train"), 8, generator)
    train_one_epoch(objective, images, batches, cfg.view_sizes, cfg, generator,
                    torch.optim.SGD(objective.parameters(), lr=1e-3),
                    Runtime(torch.device("cpu"), False, False), "test")
    stored_lr = torch.from_numpy(images.pixels["lr"]).permute(0, 3, 1, 2).float()
    lr = torch.cat([seen["lr"] for seen in objective.seen])
    hr = torch.cat([seen["hr"] for seen in objective.seen])
    index = torch.cat([seen["index"] for seen in objective.seen])
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    grey_levels = lambda view: (view * std + mean) * 255         # noqa: E731
    return grey_levels(lr), grey_levels(hr), stored_lr[index]


@pytest.mark.fast
def test_training_views_are_rendered_and_the_teacher_sees_the_same_shift(tiny_data, tmp_path):
    lr, hr, stored_lr = _training_views(tiny_data, tmp_path / "on", lr_from_hr=4)
    # The HR view the teacher gets, box-filtered, is the LR view the student gets ...
    box_filtered = torch.nn.functional.avg_pool2d(hr.round(), 4).round()
    assert (box_filtered - lr).abs().max().item() < 0.01
    # ... and most LR views are not the stored LR images: they were rendered.
    differs = (lr - stored_lr).abs().amax(dim=(1, 2, 3)) > 0.5
    assert differs.float().mean().item() > 0.5, differs
    # Without the flag the student's views are the stored LR images themselves.
    lr, _, stored_lr = _training_views(tiny_data, tmp_path / "off", lr_from_hr=0)
    assert (lr - stored_lr).abs().max().item() < 0.01


@pytest.mark.fast
def test_kd_student_with_lr_from_hr_trains_on_views_rendered_from_hr(finished_run, tmp_path,
                                                                    monkeypatch):
    """In force, not echoed: every training batch's LR views are rendered from its HR
    views by the 4x box filter (observed in the trainer), and the run records the flag."""
    data_dir, out_dir, _, _ = finished_run
    rendered = []

    def recording(hr, scale, generator):
        lr, shifted_hr = render_lr_from_hr(hr, scale, generator)
        rendered.append((scale, tuple(hr.shape[-2:]), tuple(lr.shape[-2:]), len(hr)))
        return lr, shifted_hr
    monkeypatch.setattr(trainer, "render_lr_from_hr", recording)
    assert stages.train_main("kd_student", [
        "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--teacher-ckpt",
        str(out_dir / "teacher" / "best.pt"), "--lr-from-hr", *TINY_TRAIN_ARGS]) == 0
    train_rows = (pd.read_csv(tmp_path / "split.csv")["subset"] == "train").sum()
    assert {entry[:3] for entry in rendered} == {(4, (32, 32), (8, 8))}
    assert sum(entry[3] for entry in rendered) == train_rows      # one epoch, every batch
    config = json.loads((tmp_path / "kd_student" / "config.json").read_text())
    assert config["args"]["lr_from_hr"] is True


def test_lr_from_hr_refuses_lr_images_made_another_way(finished_run, data_copy, tmp_path):
    _, out_dir, _, _ = finished_run
    # LR images made by nearest-neighbour sampling, not by the box filter the views use.
    for path in (data_copy / "train").glob("*.png"):
        twin = Image.open(data_copy / "upscale_train" / path.name)
        twin.resize((8, 8), Image.Resampling.NEAREST).save(path)
    common = ["--data-dir", data_copy, "--out-dir", tmp_path, *TINY_TRAIN_ARGS,
              "--teacher-ckpt", out_dir / "teacher" / "best.pt"]
    result = run_script("train_kd_student.py", *common, "--lr-from-hr")
    assert_one_line_error(result, "--lr-from-hr", "box-filtered by 4", "grey levels")
    assert not (tmp_path / "kd_student" / "best.pt").exists()
    # The same data train without the flag: only the rendering needed the box filter.
    assert run_script("train_kd_student.py", *common).returncode == 0
    # check_data.py says beforehand whether the flag can be used.
    report = run_script("check_data.py", "--data-dir", data_copy).stdout
    assert "--lr-from-hr cannot be used" in report, report


def test_check_data_says_when_lr_from_hr_can_be_used(tiny_data):
    report = run_script("check_data.py", "--data-dir", tiny_data).stdout
    assert "box-filtered to LR size: 0.00 grey levels apart" in report, report
    assert "--lr-from-hr can be used" in report, report


def test_lr_from_hr_refuses_cached_teacher_logits(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    result = run_script("train_kd_student.py", "--data-dir", data_dir, "--out-dir", tmp_path,
                        "--teacher-ckpt", out_dir / "teacher" / "best.pt", "--lr-from-hr",
                        "--teacher-cache", *TINY_TRAIN_ARGS)
    assert_one_line_error(result, "--teacher-cache", "--lr-from-hr")
