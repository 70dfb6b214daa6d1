"""Bad input: one ``error:`` line naming the problem, exit status 2, nothing overwritten."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_TRAIN_ARGS, assert_one_line_error, make_tiny_dataset, run_script
from src.data import load_images


def test_missing_data_folder(tmp_path):
    result = run_script("train_teacher.py", "--data-dir", tmp_path / "nowhere",
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS)
    assert_one_line_error(result, "data folder", "nowhere", "not found")


def test_missing_csv_column(data_copy, tmp_path):
    table = pd.read_csv(data_copy / "train.csv").drop(columns=["label"])
    table.to_csv(data_copy / "train.csv", index=False)
    result = run_script("train_student.py", "--data-dir", data_copy,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS)
    assert_one_line_error(result, "train.csv", "missing column(s) label")
    assert_one_line_error(run_script("check_data.py", "--data-dir", data_copy),
                          "missing column(s) label")


def test_missing_image(data_copy, tmp_path):
    (data_copy / "train" / "TRAIN_00005.png").unlink()
    result = run_script("train_student.py", "--data-dir", data_copy,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS)
    assert_one_line_error(result, "image not found", "TRAIN_00005.png")


def test_corrupt_and_truncated_images(data_copy, tmp_path):
    (data_copy / "upscale_train" / "TRAIN_00002.png").write_bytes(b"this is not a png")
    result = run_script("train_teacher.py", "--data-dir", data_copy,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS, "--no-cache")
    assert_one_line_error(result, "not an image", "TRAIN_00002.png")

    hr = data_copy / "upscale_train" / "TRAIN_00003.png"
    hr.write_bytes(hr.read_bytes()[: len(hr.read_bytes()) // 2])
    (data_copy / "upscale_train" / "TRAIN_00002.png").unlink()
    shutil.copy(hr.with_name("TRAIN_00004.png"), hr.with_name("TRAIN_00002.png"))
    result = run_script("train_teacher.py", "--data-dir", data_copy,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS, "--no-cache",
                        "--overwrite")
    assert_one_line_error(result, "unreadable image", "TRAIN_00003.png")


def test_check_data_lists_every_problem_and_exits_non_zero(data_copy):
    (data_copy / "train" / "TRAIN_00001.png").unlink()
    (data_copy / "upscale_train" / "TRAIN_00002.png").write_bytes(b"junk")
    # An HR twin from another sample: same size, other content.
    shutil.copy(data_copy / "upscale_train" / "TRAIN_00010.png",
                data_copy / "upscale_train" / "TRAIN_00011.png")
    table = pd.read_csv(data_copy / "train.csv")
    table.loc[0, "label"] = "rare_bird"
    table.to_csv(data_copy / "train.csv", index=False)
    result = run_script("check_data.py", "--data-dir", data_copy)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "image not found" in out and "TRAIN_00001.png" in out
    assert "not an image" in out and "TRAIN_00002.png" in out
    assert "TRAIN_00011.png" in out and "probably not the same sample" in out
    assert "class 'rare_bird' has 1 image(s)" in out


def test_lr_hr_sizes_that_cannot_be_a_pair(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    table = pd.read_csv(data / "train.csv")
    # upscale_img_path pointing at the LR images: the "HR twin" is no bigger than the LR one.
    table["upscale_img_path"] = table["img_path"]
    table.to_csv(data / "train.csv", index=False)
    common = ["--data-dir", data, "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS]
    # A teacher of this very split (one of another split is refused before the images).
    assert run_script("train_teacher.py", *common).returncode == 0
    result = run_script("train_kd_student.py", *common)
    assert_one_line_error(result, "HR images are 8x8 and LR images 8x8", "scaled up")


def test_class_too_small_to_split(data_copy, tmp_path):
    table = pd.read_csv(data_copy / "train.csv")
    table.loc[0, "label"] = "rare_bird"
    table.to_csv(data_copy / "train.csv", index=False)
    result = run_script("train_teacher.py", "--data-dir", data_copy,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS)
    assert_one_line_error(result, "class 'rare_bird' has 1 image(s)", "at least 10")


def test_dataset_changed_since_the_split(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    table = pd.read_csv(data / "train.csv")
    table.loc[3, "label"] = table.loc[30, "label"] if table.loc[3, "label"] != table.loc[30, "label"] \
        else table.loc[31, "label"]
    table.to_csv(data / "train.csv", index=False)
    run = tmp_path / "run"
    shutil.copytree(out_dir, run)
    result = run_script("test_student.py", "--data-dir", data, "--out-dir", run)
    assert_one_line_error(result, "no longer matches the saved split", "1 changed")


def test_label_unknown_to_checkpoint(finished_run, tmp_path):
    _, out_dir, _, _ = finished_run
    other = make_tiny_dataset(tmp_path / "five", classes=5)
    run = tmp_path / "run"
    assert run_script("train_teacher.py", "--data-dir", other, "--out-dir", run,
                      *TINY_TRAIN_ARGS).returncode == 0
    result = run_script("test_teacher.py", "--data-dir", other, "--out-dir", run,
                        "--ckpt", out_dir / "teacher" / "best.pt")
    assert_one_line_error(result, "another class list", "labels unknown to it")


def test_missing_teacher_checkpoint(tiny_data, tmp_path):
    result = run_script("train_kd_student.py", "--data-dir", tiny_data,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS,
                        "--teacher-ckpt", tmp_path / "nope.pt")
    assert_one_line_error(result, "teacher checkpoint", "nope.pt", "not found")


def test_teacher_checkpoint_of_another_architecture(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    checkpoint = torch.load(out_dir / "teacher" / "best.pt", weights_only=True)
    checkpoint["arch"] = "resnet34"   # resnet18 weights under a resnet34 label
    torch.save(checkpoint, tmp_path / "teacher.pt")
    result = run_script("train_kd_student.py", "--data-dir", data_dir,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS,
                        "--teacher-ckpt", tmp_path / "teacher.pt")
    assert_one_line_error(result, "teacher.pt", "does not fit a resnet34")


def test_student_checkpoint_as_teacher(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    result = run_script("train_kd_student.py", "--data-dir", data_dir,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS,
                        "--teacher-ckpt", out_dir / "student" / "best.pt")
    assert_one_line_error(result, "trained on LR images", "must be an HR model")


def test_not_a_checkpoint(finished_run, tmp_path):
    data_dir, _, _, _ = finished_run
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result = run_script("train_kd_student.py", "--data-dir", data_dir,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS,
                        "--teacher-ckpt", tmp_path / "junk.pt")
    assert_one_line_error(result, "junk.pt", "not a readable checkpoint")


def test_imagenet_weights_unavailable_offline(tiny_data, tmp_path, monkeypatch):
    import torchvision

    from src.cli import ToolError
    from src.models import build_model

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    try:
        build_model("resnet50", 4, "imagenet")
    except ToolError as error:
        message = str(error)
    else:
        raise AssertionError("expected a ToolError")
    assert "resnet50-" in message and str(tmp_path / "torch") in message
    assert "--weights none" in message and "\n" not in message


def test_out_dir_not_writable(tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run_script("train_teacher.py", "--data-dir", tiny_data, "--out-dir",
                        blocker / "run", *TINY_TRAIN_ARGS)
    assert_one_line_error(result, "cannot write to --out-dir", "a_file")


def test_empty_csv(data_copy, tmp_path):
    (data_copy / "train.csv").write_text("")
    result = run_script("train_teacher.py", "--data-dir", data_copy,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS)
    assert_one_line_error(result, "train.csv", "file is empty")
    (data_copy / "train.csv").write_text("img_path,upscale_img_path,label\n")
    result = run_script("train_teacher.py", "--data-dir", data_copy,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS)
    assert_one_line_error(result, "train.csv", "no rows")


def test_missing_csv(data_copy, tmp_path):
    (data_copy / "train.csv").unlink()
    result = run_script("train_teacher.py", "--data-dir", data_copy,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS)
    assert_one_line_error(result, "train.csv", "file not found")


def test_duplicate_image_paths(data_copy, tmp_path):
    table = pd.read_csv(data_copy / "train.csv")
    table.loc[1, "img_path"] = "train/" + table.loc[0, "img_path"].split("/")[-1]
    table.to_csv(data_copy / "train.csv", index=False)
    result = run_script("train_teacher.py", "--data-dir", data_copy,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS)
    assert_one_line_error(result, "duplicate img_path", "TRAIN_00000.png")


def test_grey_rgba_and_palette_images_are_converted(data_copy, tmp_path):
    from PIL import Image

    expected = {}
    for name, mode in (("TRAIN_00000.png", "L"), ("TRAIN_00001.png", "RGBA"),
                       ("TRAIN_00002.png", "P")):
        for folder in ("train", "upscale_train"):
            path = data_copy / folder / name
            rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
            if mode == "P":
                # 16 colours: a palette index read as a grey level would be 0..15.
                Image.open(path).quantize(16).save(path)
                saved = Image.open(path)
                palette = np.asarray(saved.getpalette()[:48], dtype=np.float64).reshape(16, 3)
                expected[path] = palette[np.asarray(saved)]
                assert expected[path].max() > 15 and np.abs(expected[path] - rgb).mean() < 40
            else:
                Image.open(path).convert(mode).save(path)
                # Grey: ITU-R 601 luma, repeated over the three channels; RGBA: its RGB.
                grey = rgb @ np.array([0.299, 0.587, 0.114])
                expected[path] = np.repeat(grey[..., None], 3, -1) if mode == "L" else rgb
    for path, pixels in expected.items():
        decoded = load_images(path.parent, [path.name], None, "TEST", quiet=True)[0]
        assert np.abs(decoded - pixels).max() <= 1, path
    assert run_script("check_data.py", "--data-dir", data_copy).returncode == 0
    result = run_script("train_kd_student.py", "--data-dir", data_copy,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS,
                        "--teacher-ckpt", tmp_path / "none.pt")
    assert_one_line_error(result, "teacher checkpoint")   # got past the data
    result = run_script("train_student.py", "--data-dir", data_copy,
                        "--out-dir", tmp_path / "run", *TINY_TRAIN_ARGS)
    assert result.returncode == 0, result.stderr


def _snapshot(folder):
    return {path.relative_to(folder): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_bad_input_with_overwrite_leaves_a_finished_run_untouched(finished_run, data_copy,
                                                                   tmp_path):
    _, out_dir, _, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out_dir, run)
    before = _snapshot(run)
    (data_copy / "upscale_train" / "TRAIN_00004.png").write_bytes(b"broken")
    for script, extra in (("train_teacher.py", ["--no-cache"]),
                          ("train_kd_student.py", ["--teacher-ckpt", tmp_path / "nope.pt"])):
        result = run_script(script, "--data-dir", data_copy, "--out-dir", run,
                            *TINY_TRAIN_ARGS, "--overwrite", *extra)
        assert_one_line_error(result)
    result = run_script("train_student.py", "--data-dir", tmp_path / "missing", "--out-dir",
                        run, *TINY_TRAIN_ARGS, "--overwrite")
    assert_one_line_error(result, "data folder")
    assert _snapshot(run) == before


@pytest.mark.parametrize("script, flag, value", [
    ("run_seeds.py", "--seeds", "-1"), ("run_seeds.py", "--split-seed", "-1"),
    ("compare_recipes.py", "--seeds", "-1"), ("compare_recipes.py", "--teacher-weights", "nan"),
    ("evaluate_all.py", "--bootstrap-seed", "-1"), ("evaluate_all.py", "--batch-size", "-1"),
    ("check_data.py", "--pair-tolerance", "inf"),
    ("check_data.py", "--pair-tolerance", "nan"), ("make_demo_data.py", "--seed", "-1"),
])
def test_runner_and_tool_scripts_refuse_negative_and_non_finite_numbers(tiny_data, tmp_path,
                                                                         script, flag, value):
    """The scripts beside the train stages check their numbers before any work too (a
    negative seed reached numpy as a traceback; NaN weights reached the teachers' average)."""
    out = tmp_path / "out"
    where = ["--out", out] if script == "make_demo_data.py" else \
        ["--data-dir", tiny_data] + ([] if script == "check_data.py" else ["--out-dir", out])
    assert_one_line_error(run_script(script, *where, flag, value), flag)
    assert not out.exists()
