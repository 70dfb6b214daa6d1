"""Transfer sets (``--unlabelled``): degradations, paired views of unlabelled rows, leakage,
coverage under torchrun, resume, pseudo-teachers, the self-training baseline, bad input."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import TINY_TRAIN_ARGS, assert_one_line_error, run_script, run_worker
from src.data import IMAGENET_MEAN, IMAGENET_STD, ImageSet, load_or_create_split
from src.demo import write_demo_dataset
from src.distill import Distiller, HardLabels
from src.lr_render import DEGRADATIONS, box_downsample, degradation_errors, degrade
from src.transfer import StackedRows, add_unlabelled, choose_degradation, read_unlabelled, \
    unlabelled_batches
from src.trainer import FitConfig, Runtime, fit
from test_distributed import ranks

UNLABELLED = 32         # = the tiny split's 32 training images: one pass per epoch at ratio 1


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory):
    """The tiny data set with 32 unlabelled HR images, and a teacher trained on it."""
    root = tmp_path_factory.mktemp("transfer")
    data = write_demo_dataset(root / "data", per_class=10, test_images=6, lr_size=8, scale=4,
                              seed=1, num_classes=4, progress=False, unlabelled=UNLABELLED)
    out_dir = root / "run"
    result = run_script("train_teacher.py", "--data-dir", data, "--out-dir", out_dir,
                        *TINY_TRAIN_ARGS)
    assert result.returncode == 0, result.stderr
    return data, out_dir


def new_run(transfer_run, tmp_path, name="run"):
    """A fresh run folder on the shared split (copied), and the teacher's checkpoint."""
    _, out_dir = transfer_run
    run = tmp_path / name
    run.mkdir()
    for file in ("split.csv", "split.json"):
        shutil.copy(out_dir / file, run / file)
    return run, out_dir / "teacher" / "best.pt"


def photo_like(rng, count: int, size: int) -> np.ndarray:
    """Smooth images (sums of low-frequency waves), as photos are at these sizes."""
    y, x = np.mgrid[0:size, 0:size] / size
    images = np.full((count, size, size, 3), 128.0)
    for image in images:
        for _ in range(6):
            frequency, phase = rng.uniform(0.5, 4, 2), rng.uniform(0, 2 * np.pi)
            image += rng.uniform(10, 40, 3) * np.sin(
                2 * np.pi * (frequency[0] * x + frequency[1] * y) + phase)[..., None]
    return np.clip(images + rng.normal(0, 3, images.shape), 0, 255).astype(np.uint8)


def as_jpeg(pixels: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, subsampling=0)
    return np.asarray(Image.open(buffer).convert("RGB"))


@pytest.mark.fast
@pytest.mark.parametrize("degradation", DEGRADATIONS)
def test_rendered_lr_equals_stored_lr_within_jpeg_rounding(degradation, capsys):
    """LR images made by a known degradation and stored as JPEG: that degradation renders
    them back to within JPEG's own rounding, the others do not, and auto picks it."""
    hr = photo_like(np.random.default_rng(0), 16, 64)
    exact = degrade(hr, 4, degradation)
    stored = np.stack([as_jpeg(image) for image in exact])
    jpeg_rounding = np.abs(stored.astype(float) - exact).mean()
    errors = degradation_errors(stored, hr, 4)
    assert errors[degradation] == pytest.approx(jpeg_rounding, abs=1e-4)
    assert 0 < jpeg_rounding < 3
    assert next(iter(errors)) == degradation
    assert all(error > errors[degradation] + 0.3 for name, error in errors.items()
               if name != degradation)
    assert np.array_equal(degradation_errors(exact, hr, 4)[degradation], 0.0)
    images = ImageSet(split=_FakeSplit(16), pixels={"lr": stored, "hr": hr},
                      labels=np.zeros(16, dtype=np.int64))
    assert choose_degradation(images, 4, "auto")[0] == degradation
    assert "WARNING" not in capsys.readouterr().out
    worst = list(errors)[-1]
    choose_degradation(images, 4, worst)
    assert f"WARNING: the {worst} degradation differs" in capsys.readouterr().out


class _FakeSplit:
    def __init__(self, count):
        self.count = count

    def indices(self, subset):
        return np.arange(self.count)


def test_box_degradation_is_the_box_filter():
    hr = photo_like(np.random.default_rng(1), 3, 32)
    expected = box_downsample(torch.tensor(hr).permute(0, 3, 1, 2), 4).permute(0, 2, 3, 1)
    assert np.array_equal(degrade(hr, 4, "box"), expected.numpy())


def grey_levels(view: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (view * std + mean) * 255


class Recorder(HardLabels):
    """The baseline objective, keeping every training batch's views and rows."""

    def __init__(self, model):
        super().__init__(model, "lr")
        self.seen = []

    def forward(self, views, batch):
        if self.training:
            self.seen.append(({key: view.detach().clone() for key, view in views.items()},
                              {key: value for key, value in batch.items()}))
        return super().forward(views, batch)


def load_with_unlabelled(data, out_dir, resolutions=("hr", "lr")):
    split = load_or_create_split(data, out_dir, 0, quiet=True)
    images = ImageSet.load(split, data, ["hr", "lr"], None, quiet=True)
    source = read_unlabelled(data / "unlabelled.csv", 8, 32)
    return add_unlabelled(images, source, list(resolutions), "auto", None, quiet=True)


def test_the_teacher_sees_the_hr_twin_of_every_unlabelled_view(transfer_run, tmp_path):
    """With flips and paired mixup, each row's HR view box-filtered is its LR view (to
    rounding), for unlabelled rows as for labelled ones; another row's is not (control)."""
    data, _ = transfer_run
    run, _ = new_run(transfer_run, tmp_path)
    images, record = load_with_unlabelled(data, run)
    assert record["degradation"] == "box" and record["used"] == UNLABELLED
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    objective = Recorder(model)
    cfg = FitConfig(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, lr_factor=0.5,
                    lr_patience=1, min_lr=0.0, patience=5, monitor="last", hflip=True,
                    crop_scale=1.0, seed=3, amp=False, channels_last=False,
                    view_sizes={"lr": 8, "hr": 32}, mixup=0.4, unlabelled_ratio=1.0)
    fit(objective, images, cfg, run / "kd_student", Runtime(torch.device("cpu"), False, False),
        {}, resume=False)
    unlabelled_rows = 0
    for views, batch in objective.seen:
        labels = batch["labels"]
        unlabelled = labels < 0
        unlabelled_rows += int(unlabelled.sum())
        assert not (labels[~unlabelled] < 0).any()
        # Labelled rows first, then the batch's unlabelled rows, mixed among themselves.
        partner = batch["mix"].partner
        assert torch.equal(unlabelled[partner], unlabelled)
        shrunk = torch.nn.functional.avg_pool2d(grey_levels(views["hr"]), 4)
        lr = grey_levels(views["lr"])
        difference = (shrunk - lr).abs().amax(dim=(1, 2, 3))
        assert difference.max() < 0.51, difference
        control = (shrunk.roll(1, 0) - lr).abs().mean(dim=(1, 2, 3))
        assert control.min() > 5, control
    assert unlabelled_rows == UNLABELLED


def test_unlabelled_stream_covers_each_row_once_a_pass_and_depends_on_the_epoch_alone():
    positions = np.arange(100, 130)
    batches = [np.arange(8)] * 3 + [np.arange(6)]        # 30 labelled rows
    for ratio, epochs in ((1.0, 3), (0.5, 4), (2.0, 2)):
        stream = np.concatenate([np.concatenate(unlabelled_batches(
            positions, batches, ratio, 7, epoch)) for epoch in range(1, epochs + 1)])
        assert len(stream) == round(30 * ratio) * epochs
        for start in range(0, len(stream) - 29, 30):   # every whole pass: each row once
            assert sorted(stream[start:start + 30]) == list(positions)
    first = unlabelled_batches(positions, batches, 1.0, 7, 2)
    again = unlabelled_batches(positions, batches, 1.0, 7, 2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert [len(part) for part in first] == [8, 8, 8, 6]


def test_stacked_rows_index_like_one_array():
    parts = [np.arange(12).reshape(4, 3), np.arange(100, 106).reshape(2, 3)]
    stacked, joined = StackedRows(parts), np.concatenate(parts)
    index = np.array([5, 0, 3, 4, 4])
    assert np.array_equal(stacked[index], joined[index])
    assert stacked.shape == joined.shape and len(stacked) == 6


def test_a_planted_duplicate_of_a_test_image_is_dropped(transfer_run, tmp_path):
    data, out_dir = transfer_run
    copy = shutil.copytree(data, tmp_path / "data")
    split = pd.read_csv(out_dir / "split.csv")
    test_row = split[split["subset"] == "test"].iloc[0]
    shutil.copy(copy / test_row["upscale_img_path"], copy / "unlabelled" / "PLANTED.png")
    table = pd.read_csv(copy / "unlabelled.csv")
    table.loc[len(table)] = ["./unlabelled/PLANTED.png"]
    table.to_csv(copy / "unlabelled.csv", index=False)

    run, teacher = new_run(transfer_run, tmp_path)
    result = run_script("train_kd_student.py", "--data-dir", copy, "--out-dir", run,
                        *TINY_TRAIN_ARGS, "--teacher-ckpt", teacher,
                        "--unlabelled", copy / "unlabelled.csv")
    assert result.returncode == 0, result.stderr
    assert f"dropped 1 of {UNLABELLED + 1} image(s)" in result.stdout
    record = json.loads((run / "kd_student" / "config.json").read_text())["unlabelled"]
    assert (record["images"], record["dropped_duplicates"], record["used"]) == \
        (UNLABELLED + 1, 1, UNLABELLED)
    checked = run_script("check_data.py", "--data-dir", copy, "--unlabelled",
                         copy / "unlabelled.csv")
    assert checked.returncode == 0, checked.stdout
    assert f"{UNLABELLED + 1} images, HR; 1 equal a labelled image" in checked.stdout
    assert "best: box" in checked.stdout


def test_unlabelled_rows_are_covered_exactly_once_per_epoch_across_two_processes(
        transfer_run, tmp_path):
    data, _ = transfer_run
    run, teacher = new_run(transfer_run, tmp_path)
    record = tmp_path / "record"
    result = run_worker("kd_student", record, "--data-dir", data, "--out-dir", run,
                        *TINY_TRAIN_ARGS[:-6], "--epochs", "2", "--batch-size", "8",
                        "--lr", "1e-3", "--teacher-ckpt", teacher,
                        "--unlabelled", data / "unlabelled.csv", "--mixup", "0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    split = pd.read_csv(run / "split.csv")
    train = set(np.flatnonzero(split["subset"] == "train"))
    unlabelled = set(range(len(split), len(split) + UNLABELLED))
    per_rank = ranks(record)
    for epoch in ("1", "2"):
        rows = [rank["rows"][epoch] for rank in per_rank]
        assert all(rows), "each process trains on a share"
        assert not set(rows[0]) & set(rows[1])
        together = sorted(rows[0] + rows[1])
        assert together == sorted(train | unlabelled)
        for share in rows:       # both kinds of rows on each process
            assert set(share) & unlabelled and set(share) & train


def test_killed_mid_epoch_with_unlabelled_images_resumes_to_the_uninterrupted_result(
        transfer_run, tmp_path):
    data, _ = transfer_run
    flags = [*TINY_TRAIN_ARGS[:-6], "--epochs", "3", "--batch-size", "8", "--lr", "1e-3",
             "--deterministic", "--schedule", "cosine", "--warmup-epochs", "1",
             "--select-by", "last", "--mixup", "0.4", "--cutmix", "1",
             "--unlabelled", str(data / "unlabelled.csv"), "--unlabelled-ratio", "0.75"]
    straight, teacher = new_run(transfer_run, tmp_path, "straight")
    killed, _ = new_run(transfer_run, tmp_path, "killed")
    common = ["--data-dir", data, "--teacher-ckpt", teacher, *flags]
    # One thread everywhere, as the worker runs: thread counts change float rounding.
    one_thread = {"OMP_NUM_THREADS": "1"}
    assert run_script("train_kd_student.py", "--out-dir", straight, *common,
                      env=one_thread).returncode == 0
    died = run_worker("kd_student", tmp_path / "record", "--out-dir", killed, *common,
                      processes=1, env={"DDP_KILL": "0:2:2", **one_thread})
    assert died.returncode != 0
    assert len(pd.read_csv(killed / "kd_student" / "history.csv")) == 1   # inside epoch 2
    resumed = run_script("train_kd_student.py", "--out-dir", killed, *common, "--resume",
                         env=one_thread)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stdout
    histories = [pd.read_csv(run / "kd_student" / "history.csv").drop(columns=["seconds"])
                 for run in (straight, killed)]
    pd.testing.assert_frame_equal(*histories)
    weights = [torch.load(run / "kd_student" / "best.pt", weights_only=True)["model"]
               for run in (straight, killed)]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_a_pseudo_teacher_labels_the_students_own_lr_view():
    """--pseudo-teacher: the teacher is handed the LR view (an HR teacher the HR view)."""
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, images):
            seen["teacher"] = images
            return torch.zeros(len(images), 4)

    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    views = {"lr": torch.randn(2, 3, 8, 8), "hr": torch.randn(2, 3, 32, 32)}
    batch = {"labels": torch.tensor([1, -1]), "index": torch.tensor([0, 1])}
    for resolution in ("lr", "hr"):
        distiller = Distiller(student, [Probe()], "kd", None,
                              teacher_resolution=resolution)
        _, terms = distiller(views, batch)
        assert seen["teacher"] is views[resolution]
        assert torch.isfinite(terms["ce"]) and torch.isfinite(terms["kd"])


@pytest.mark.fast
def test_logit_and_feature_terms_of_two_teachers_teach_on_unlabelled_rows():
    """On a batch of unlabelled rows only: no cross-entropy, and the dkd and at terms of
    two teachers are each non-zero and each reach the student's weights on their own."""
    from src.models import build_model
    torch.manual_seed(0)
    student = build_model("resnet18", 4, "none", 32)
    teachers = [build_model("resnet18", 4, "none", 32).eval() for _ in range(2)]
    weights = {"dkd_warmup": 0, "feature_layers": ("layer2",), "teacher_weights": [1, 3]}
    distiller = Distiller(student, teachers, "dkd+at", weights, [32, 32], probe_size=32)
    views = {"lr": torch.randn(4, 3, 32, 32), "hr": torch.randn(4, 3, 32, 32)}
    batch = {"labels": torch.full((4,), -1), "index": torch.arange(4)}
    _, terms = distiller(views, batch)
    assert terms["ce"].item() == 0
    for name in ("dkd", "at"):
        assert terms[name].item() > 0
        student.zero_grad()
        terms[name].backward(retain_graph=True)
        gradient = sum(parameter.grad.abs().sum() for parameter in student.parameters()
                       if parameter.grad is not None)
        assert gradient > 0, name
        assert all(parameter.grad is None for teacher in distiller.teachers
                   for parameter in teacher.parameters())


def test_pseudo_teacher_round_on_lr_only_test_images(transfer_run, tmp_path):
    data, out_dir = transfer_run
    first, teacher = new_run(transfer_run, tmp_path, "first")
    assert run_script("train_student.py", "--data-dir", data, "--out-dir", first,
                      *TINY_TRAIN_ARGS).returncode == 0
    second, _ = new_run(transfer_run, tmp_path, "second")
    result = run_script("train_kd_student.py", "--data-dir", data, "--out-dir", second,
                        *TINY_TRAIN_ARGS, "--pseudo-teacher", first / "student" / "best.pt",
                        "--unlabelled", data / "test.csv")
    assert result.returncode == 0, result.stderr
    config = json.loads((second / "kd_student" / "config.json").read_text())
    assert config["teacher"]["resolution"] == "lr"
    assert config["teacher"]["checkpoints"] == [str(first / "student" / "best.pt")]
    assert config["unlabelled"]["given"] == ["lr"] and config["unlabelled"]["used"] == 6
    both = run_script("train_kd_student.py", "--data-dir", data, "--out-dir", second,
                      *TINY_TRAIN_ARGS, "--pseudo-teacher", first / "student" / "best.pt",
                      "--teacher-ckpt", teacher, "--overwrite")
    assert_one_line_error(both, "not both")
    hr_model = run_script("train_kd_student.py", "--data-dir", data, "--out-dir", second,
                          *TINY_TRAIN_ARGS, "--pseudo-teacher", teacher, "--overwrite")
    assert_one_line_error(hr_model, "a pseudo-teacher must be an LR model")
    assert (second / "kd_student" / "best.pt").exists()     # nothing lost


def test_compare_recipes_adds_a_self_training_baseline(transfer_run, tmp_path):
    """A recipe with --unlabelled is also run with the seed's own LR baseline as its only
    teacher, on the same unlabelled images, and compared with it."""
    data, _ = transfer_run
    run, teacher = new_run(transfer_run, tmp_path)
    (run / "teacher").mkdir()
    shutil.copy(teacher, run / "teacher" / "best.pt")
    result = run_script("compare_recipes.py", "--data-dir", data, "--out-dir", run,
                        "--seeds", "0", "--recipes",
                        f"transfer=--recipe consistent --unlabelled {data / 'unlabelled.csv'}",
                        "--", *TINY_TRAIN_ARGS[:-6], "--epochs", "2", "--batch-size", "8",
                        "--lr", "1e-3", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "recipes" / "summary.json").read_text())
    row = summary["recipes"][0]
    assert set(row["against"]) == {"own", "self-training"}
    baseline = run / "recipes" / "transfer" / "seed0" / "student" / "best.pt"
    self_trained = json.loads((run / "recipes" / "transfer.self-training" / "seed0" /
                               "kd_student" / "config.json").read_text())
    kd = json.loads((run / "recipes" / "transfer" / "seed0" / "kd_student" /
                     "config.json").read_text())
    assert self_trained["teacher"]["checkpoints"] == [str(baseline)]
    assert self_trained["teacher"]["resolution"] == "lr" and kd["teacher"]["resolution"] == "hr"
    assert self_trained["unlabelled"] == kd["unlabelled"]
    for key in ("recipe", "alpha", "beta", "mixup", "cutmix", "epochs", "unlabelled_ratio"):
        assert self_trained["args"][key] == kd["args"][key], key
    assert row["self_training"]["accuracy"] == [json.loads(
        (run / "recipes" / "transfer.self-training" / "seed0" / "kd_student" /
         "test_metrics.json").read_text())["accuracy"]]
    table = (run / "recipes" / "summary.md").read_text()
    assert "| transfer | self-training |" in table and "| transfer: self-training | own |" in table


@pytest.fixture(scope="module")
def finished_kd(transfer_run, tmp_path_factory):
    """A finished KD run that bad input must leave as it is."""
    run, teacher = new_run(transfer_run, tmp_path_factory.mktemp("finished"))
    result = run_script("train_kd_student.py", "--data-dir", transfer_run[0], "--out-dir", run,
                        *TINY_TRAIN_ARGS, "--teacher-ckpt", teacher)
    assert result.returncode == 0, result.stderr
    return run


@pytest.mark.parametrize("problem", ["empty folder", "unreadable file", "wrong size",
                                     "lr only for an hr teacher", "csv without columns",
                                     "an image given as the csv"])
def test_bad_unlabelled_input_is_one_line_and_loses_nothing(transfer_run, finished_kd,
                                                            tmp_path, problem):
    data, _ = transfer_run
    run = Path(shutil.copytree(finished_kd, tmp_path / "run"))
    teacher = transfer_run[1] / "teacher" / "best.pt"
    bad = tmp_path / "bad"
    bad.mkdir()
    expected = {"empty folder": "no images in the folder",
                "unreadable file": "not an image",
                "wrong size": "neither the labelled images'",
                "lr only for an hr teacher": "LR images only",
                "csv without columns": "needs an upscale_img_path",
                "an image given as the csv": "needs an upscale_img_path"}[problem]
    if problem == "unreadable file":
        shutil.copy(data / "unlabelled" / "UNL_00000.png", bad / "a.png")
        (bad / "b.png").write_bytes(b"not a png")
    elif problem == "wrong size":
        Image.new("RGB", (20, 20)).save(bad / "a.png")
    elif problem == "lr only for an hr teacher":
        bad = data / "test.csv"
    elif problem == "csv without columns":
        bad = tmp_path / "extra.csv"
        bad.write_text("path\na.png\n")
    elif problem == "an image given as the csv":
        bad = data / "unlabelled" / "UNL_00000.png"
    flags = ["--data-dir", data, "--out-dir", run, *TINY_TRAIN_ARGS, "--teacher-ckpt", teacher]
    before = (run / "kd_student" / "best.pt").read_bytes()
    result = run_script("train_kd_student.py", *flags, "--unlabelled", bad, "--overwrite")
    assert_one_line_error(result, expected)
    assert (run / "kd_student" / "best.pt").read_bytes() == before
    if problem != "lr only for an hr teacher":
        checked = run_script("check_data.py", "--data-dir", data, "--unlabelled", bad)
        assert checked.returncode != 0 and "Traceback" not in checked.stderr
        assert expected in checked.stdout + checked.stderr


def test_unlabelled_ratio_is_checked_before_any_work(transfer_run, tmp_path):
    data, _ = transfer_run
    result = run_script("train_kd_student.py", "--data-dir", data, "--out-dir",
                        tmp_path / "never", *TINY_TRAIN_ARGS, "--unlabelled-ratio", "0")
    assert_one_line_error(result, "--unlabelled-ratio must be positive")
    assert not (tmp_path / "never").exists()


@pytest.mark.fast
def test_a_ratio_that_gives_no_unlabelled_image_is_refused_before_any_work(tiny_data,
                                                                          tmp_path):
    """Before, --unlabelled-ratio 0.01 passed the checks and raised a raw ValueError inside
    fit, after --overwrite had deleted the earlier run."""
    result = run_script("train_kd_student.py", "--data-dir", tiny_data, "--out-dir",
                        tmp_path / "run", *TINY_TRAIN_ARGS, "--unlabelled", tiny_data,
                        "--unlabelled-ratio", "0.01")
    assert_one_line_error(result, "--unlabelled-ratio 0.01 gives no unlabelled image in a "
                                  "batch of 8 (round(0.01 x 8) = 0)")
    assert not (tmp_path / "run").exists()


@pytest.mark.fast
def test_seed_in_a_recipes_flags_is_replaced_for_its_baselines_too(monkeypatch, tmp_path):
    """Before, only the KD student's flags had {seed} replaced: the plain and the
    self-training baselines were given the literal '{seed}'."""
    from src import compare
    calls = []
    monkeypatch.setattr(compare, "run_stage_in",
                        lambda run, stage, *args: calls.append((stage, args[2])))
    recipes = {"mine": ["--unlabelled", str(tmp_path / "u{seed}.csv")]}
    compare._train_recipes(recipes, [], [3], [tmp_path / "teacher.pt"], None, tmp_path,
                           tmp_path, 1)
    assert [stage for stage, _ in calls] == ["student", "kd_student", "kd_student"]
    for stage, flags in calls:
        assert not any("{seed}" in flag for flag in flags), (stage, flags)
        if stage == "kd_student":
            assert str(tmp_path / "u3.csv") in flags


@pytest.mark.fast
def test_lr_from_hr_with_a_transfer_set_is_refused_before_the_runner_trains(transfer_run,
                                                                           tmp_path):
    """Its self-training baseline (an LR pseudo-teacher) cannot take --lr-from-hr: before,
    that surfaced only after the plain baseline had trained."""
    data, out_dir = transfer_run
    result = run_script("compare_recipes.py", "--data-dir", data, "--out-dir", out_dir,
                        "--seeds", "0", "--recipes",
                        f"hr=--lr-from-hr --unlabelled {data / 'unlabelled.csv'}", "--",
                        *TINY_TRAIN_ARGS)
    assert_one_line_error(result, "recipe hr:", "--lr-from-hr renders views for an HR teacher")
    assert not (out_dir / "recipes" / "hr").exists()


def _replace_an_unlabelled_image(data: Path, by: int) -> None:
    """Unlabelled image ``by`` copied over the first one: other pixels, the same name."""
    paths = pd.read_csv(data / "unlabelled.csv")["upscale_img_path"]
    shutil.copy(data / paths.iloc[by], data / paths.iloc[0])


def test_unlabelled_images_changed_in_place_are_noticed(transfer_run, tmp_path):
    """Before, the teacher-logit cache and --resume knew the unlabelled images by their
    paths: files replaced under the same names got the old images' logits, and a resumed
    run went on with other images."""
    data = Path(shutil.copytree(transfer_run[0], tmp_path / "data"))
    run, teacher = new_run(transfer_run, tmp_path)
    common = ["--data-dir", data, "--out-dir", run, "--teacher-ckpt", teacher,
              *TINY_TRAIN_ARGS, "--unlabelled", data / "unlabelled.csv"]
    first = run_script("train_kd_student.py", *common, "--teacher-cache")
    assert first.returncode == 0, first.stderr
    assert "cached teacher logits for" in first.stdout
    again = run_script("train_kd_student.py", *common, "--teacher-cache", "--overwrite")
    assert "teacher logits from" in again.stdout                 # same images: reused
    _replace_an_unlabelled_image(data, by=1)
    changed = run_script("train_kd_student.py", *common, "--teacher-cache", "--overwrite")
    assert changed.returncode == 0, changed.stderr
    assert "cached teacher logits for" in changed.stdout         # computed anew

    killed = tmp_path / "killed"
    shutil.copytree(run, killed, ignore=shutil.ignore_patterns("kd_student", ".*lock"))
    flags = ["--data-dir", data, "--out-dir", killed, "--teacher-ckpt", teacher,
             *TINY_TRAIN_ARGS[:-6], "--epochs", "2", *TINY_TRAIN_ARGS[-4:],
             "--unlabelled", data / "unlabelled.csv"]
    died = run_worker("kd_student", tmp_path / "record", *flags, processes=1,
                      env={"DDP_KILL": "0:2:0"})
    assert died.returncode != 0
    _replace_an_unlabelled_image(data, by=2)
    resumed = run_script("train_kd_student.py", *flags, "--resume")
    assert_one_line_error(resumed, "--resume: the unlabelled images changed since")
