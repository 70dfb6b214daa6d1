"""Every script runs end to end on tiny data, and writes what the README promises."""

import json

import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from conftest import TINY_TRAIN_ARGS, assert_one_line_error, make_tiny_dataset, run_script
from src import arguments

SCRIPTS = ["check_data.py", "make_demo_data.py", "train_teacher.py", "train_student.py",
           "train_kd_student.py", "test_teacher.py", "test_student.py", "test_kd_student.py"]


@pytest.mark.fast
def test_test_stages_write_metrics_with_accuracy_macro_f1_and_n(finished_run):
    _, out_dir, _, _ = finished_run
    split = pd.read_csv(out_dir / "split.csv")
    for stage in ("teacher", "student", "kd_student"):
        metrics = json.loads((out_dir / stage / "test_metrics.json").read_text())
        assert metrics["n"] == int((split["subset"] == "test").sum())
        predictions = pd.read_csv(out_dir / stage / "test_predictions.csv")
        assert predictions["img_path"].tolist() == \
            split[split["subset"] == "test"]["img_path"].tolist()
        # Recomputed from the per-image predictions by scikit-learn, as the competition
        # scores it: a class in the labels that is never predicted counts with F1 0.
        assert metrics["accuracy"] == pytest.approx(
            accuracy_score(predictions["label"], predictions["prediction"]))
        assert metrics["macro_f1"] == pytest.approx(
            f1_score(predictions["label"], predictions["prediction"], average="macro",
                     zero_division=0))


def test_training_writes_history_checkpoints_and_run_record(finished_run):
    _, out_dir, _, _ = finished_run
    for stage in ("teacher", "student", "kd_student"):
        history = pd.read_csv(out_dir / stage / "history.csv")
        assert {"epoch", "train_loss", "train_ce", "train_acc", "val_loss", "val_acc", "lr",
                "seconds"} <= set(history.columns)
        assert len(history) == 1
        for name in ("best.pt", "last.pt", "train_summary.json", "config.json"):
            assert (out_dir / stage / name).exists(), (stage, name)
        config = json.loads((out_dir / stage / "config.json").read_text())
        assert config["versions"]["torch"] and config["args"]["epochs"] == 1
    kd_history = pd.read_csv(out_dir / "kd_student" / "history.csv")
    assert {"loss_ce", "loss_kd"} <= set(kd_history.columns)


def test_last_test_stage_prints_comparison_and_writes_figures(finished_run):
    _, out_dir, assets_dir, outputs = finished_run
    printed = outputs["test_kd_student.py"].stdout
    for title in ("HR teacher", "LR baseline student", "LR KD student", "KD - baseline"):
        assert title in printed
    assert "warning" not in printed      # same settings for both students
    comparison = json.loads((out_dir / "comparison.json").read_text())
    assert comparison["comparable"] is True
    for name in ("test_accuracy_comparison", "kd_vs_hard_train_acc", "kd_vs_hard_train_loss",
                 "kd_vs_hard_val_acc", "kd_vs_hard_val_loss"):
        png = (assets_dir / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name


def test_comparison_warns_when_students_differ_in_settings(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(out_dir, copy)
    result = run_script("train_kd_student.py", "--data-dir", data_dir, "--out-dir", copy,
                        *TINY_TRAIN_ARGS, "--seed", "5", "--overwrite")
    assert result.returncode == 0, result.stderr
    result = run_script("test_kd_student.py", "--data-dir", data_dir, "--out-dir", copy,
                        "--assets-dir", tmp_path / "assets")
    assert result.returncode == 0, result.stderr
    assert "warning: baseline and KD student were trained with different settings: seed" \
        in result.stdout


@pytest.mark.fast
def test_check_data_passes_clean_data(tiny_data):
    result = run_script("check_data.py", "--data-dir", tiny_data)
    assert result.returncode == 0, result.stderr
    assert "40 rows, 4 classes" in result.stdout and "no problems found" in result.stdout
    assert "LR image sizes: 8x8 (40)" in result.stdout
    assert "HR image sizes: 32x32 (40)" in result.stdout


@pytest.mark.fast
def test_demo_data_is_deterministic(tmp_path):
    first, second = make_tiny_dataset(tmp_path / "a"), make_tiny_dataset(tmp_path / "b")
    for name in ("train.csv", "test.csv", "train/TRAIN_00003.png",
                 "upscale_train/TRAIN_00003.png", "test/TEST_00002.png"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_make_demo_data_script_refuses_to_overwrite(tmp_path):
    args = ["--out", tmp_path / "demo", "--per-class", "10", "--classes", "2",
            "--test-images", "2", "--lr-size", "8"]
    assert run_script("make_demo_data.py", *args).returncode == 0
    assert_one_line_error(run_script("make_demo_data.py", *args), "already holds a dataset")


def test_finished_stage_is_not_overwritten_without_a_flag(finished_run):
    data_dir, out_dir, _, _ = finished_run
    best = out_dir / "teacher" / "best.pt"
    before = best.read_bytes()
    result = run_script("train_teacher.py", "--data-dir", data_dir, "--out-dir", out_dir,
                        *TINY_TRAIN_ARGS)
    assert_one_line_error(result, "already holds a finished run", "--resume", "--overwrite")
    assert best.read_bytes() == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help(script):
    result = run_script(script, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


@pytest.mark.parametrize("parser", [arguments.train_parser("teacher"),
                                    arguments.train_parser("kd_student"),
                                    arguments.test_parser("student")])
def test_every_flag_has_help_text(parser):
    for action in parser._actions:
        assert action.help, action.option_strings
