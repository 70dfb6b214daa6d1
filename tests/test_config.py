"""A run reproduced from its own record: ``--config RUN/config.json`` makes the saved
settings the defaults, flags given win, and a record that does not fit is one line."""

import json
import shutil

import pandas as pd
import pytest

from conftest import TINY_TRAIN_ARGS, assert_one_line_error, run_script
from src.arguments import config_flags, jsonable, parse_train_arguments, preset_overrides
from src.cli import ToolError

RUN_ARGS = [*TINY_TRAIN_ARGS[:-6], "--epochs", "2", "--deterministic", "--seed", "3",
            "--lr", "2e-3", "--no-hflip"]


def test_a_rerun_from_a_runs_config_gives_the_same_history(tiny_data, tmp_path):
    first, rerun = tmp_path / "first", tmp_path / "rerun"
    result = run_script("train_student.py", "--data-dir", tiny_data, "--out-dir", first,
                        *RUN_ARGS)
    assert result.returncode == 0, result.stderr
    config = first / "student" / "config.json"
    result = run_script("train_student.py", "--config", config, "--out-dir", rerun)
    assert result.returncode == 0, result.stderr
    assert f"note: --out-dir {rerun} replaces the saved run's {first}" in result.stdout

    def history(run):
        return pd.read_csv(run / "student" / "history.csv").drop(columns=["seconds"])
    pd.testing.assert_frame_equal(history(rerun), history(first))
    saved, again = (json.loads((run / "student" / "config.json").read_text())["args"]
                    for run in (first, rerun))
    assert saved.pop("out_dir") != again.pop("out_dir")
    assert again.pop("config") == str(config) and saved.pop("config") is None
    assert again == saved and saved["seed"] == 3 and saved["hflip"] is False

    # run_seeds.py takes the run's settings as its shared flags: the same seed and split
    # seed train the same history.
    seeds = tmp_path / "seeds"
    result = run_script("run_seeds.py", "--data-dir", tiny_data, "--out-dir", seeds,
                        "--config", config, "--seeds", "3", "--split-seed", "3",
                        "--stages", "student")
    assert result.returncode == 0, result.stderr
    assert f"settings from {config}: --recipe reference" in result.stdout
    pd.testing.assert_frame_equal(history(seeds / "seeds" / "seed3"), history(first))

    # predict.py names runs the same way: their best.pt, the first run's data and folder.
    result = run_script("predict.py", "--config", config, rerun / "student" / "config.json")
    assert result.returncode == 0, result.stderr
    assert f"from the mean probabilities of 2 checkpoints: {first / 'student' / 'best.pt'}, " \
           f"{rerun / 'student' / 'best.pt'} -> {first / 'ensemble_submission.csv'}" \
        in result.stdout
    assert len(pd.read_csv(first / "ensemble_submission.csv")) == \
        len(pd.read_csv(tiny_data / "test.csv"))


def _record(tmp_path, stage: str, flags: list[str], **extra) -> str:
    path = tmp_path / f"{stage}-config.json"
    path.write_text(json.dumps({"stage": stage, **extra,
                                "args": jsonable(parse_train_arguments(stage, flags))}))
    return str(path)


@pytest.mark.fast
def test_flags_given_win_over_the_config_which_wins_over_its_preset(tmp_path):
    config = _record(tmp_path, "kd_student", ["--recipe", "consistent", "--alpha", "0.5",
                                              "--epochs", "7", "--method", "kd+at"])
    saved = parse_train_arguments("kd_student", ["--config", config])
    # The preset's alpha (0.1) does not come back over the value the run trained with.
    assert (saved.recipe, saved.alpha, saved.beta, saved.epochs, saved.method) == \
        ("consistent", 0.5, 0.9, 7, "kd+at")
    given = ["--config", config, "--alpha", "0.3"]
    assert parse_train_arguments("kd_student", given).alpha == 0.3
    assert preset_overrides("kd_student", given) == \
        [f"note: --alpha 0.3 replaces the saved run's 0.5 ({config})"]
    # A preset named now owns what presets set: reference's are the parser defaults.
    renamed = parse_train_arguments("kd_student", ["--config", config, "--recipe", "reference"])
    assert (renamed.recipe, renamed.schedule, renamed.mixup, renamed.epochs) == \
        ("reference", "plateau", 0.0, 7)
    assert renamed.alpha is None          # the per-method default (0.7 with kd), filled later


def test_a_config_that_does_not_fit_is_one_line(tiny_data, tmp_path):
    teacher = _record(tmp_path, "teacher", [])
    result = run_script("train_student.py", "--config", teacher, "--out-dir", tmp_path / "run")
    assert_one_line_error(result, f"--config {teacher} records a train_teacher.py run; "
                                  f"train_student.py takes a student run's config.json")
    assert not (tmp_path / "run").exists()
    assert_one_line_error(run_script("predict.py", "--config", teacher),
                          f"--config {teacher} records a train_teacher.py run; predict.py "
                          f"takes a student or kd_student run's config.json")
    newer = _record(tmp_path, "student", [], code_version="abc123")
    record = json.loads(open(newer).read())
    record["args"]["sharpness_aware"] = 0.05
    open(newer, "w").write(json.dumps(record))
    with pytest.raises(ToolError, match=r"holds settings this version has no flag for "
                                        r"\(--sharpness-aware\): written by another version "
                                        r"of the tool \(abc123\)"):
        parse_train_arguments("student", ["--config", newer])
    not_a_record = tmp_path / "summary.json"
    not_a_record.write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(ToolError, match="is not a run's config.json"):
        parse_train_arguments("student", ["--config", str(not_a_record)])
    with pytest.raises(ToolError, match="--config .*missing.json: file not found"):
        parse_train_arguments("student", ["--config", str(tmp_path / "missing.json")])


@pytest.mark.fast
def test_a_runners_flags_from_a_record_train_as_the_record_says(finished_run, tmp_path):
    """run_seeds.py/compare_recipes.py turn a record into shared flags: parsed by the stage,
    those flags give every recorded setting back, except what the runner sets itself (data,
    folders, seed, teacher), and the run's starting teacher becomes the runner's own."""
    _, out_dir, _, _ = finished_run
    teacher = str(out_dir / "teacher" / "best.pt")
    flags = ["--recipe", "consistent", "--alpha", "0.5", "--mixup", "0", "--no-hflip",
             "--method", "kd+at", "--feature-layers", "layer3,layer4", "--weights", teacher,
             "--teacher-ckpt", teacher, "--seed", "4", "--epochs", "7"]
    config = _record(tmp_path, "kd_student", flags)
    shared = config_flags(config, "run_seeds.py")
    assert shared[shared.index("--weights") + 1] == "teacher"
    assert "--teacher-ckpt" not in shared and "--seed" not in shared
    saved = json.loads(open(config).read())["args"]
    again = jsonable(parse_train_arguments("kd_student", shared))
    differing = {key for key in saved if again[key] != saved[key]}
    assert differing == {"weights", "teacher_ckpt", "seed"}
    assert (again["mixup"], again["hflip"], again["alpha"]) == (0.0, False, 0.5)


def test_compare_recipes_takes_a_runs_record_as_its_shared_flags(finished_run, tmp_path):
    """compare_recipes.py --config: every recipe's baseline and KD student train with the
    record's settings (a flag after -- still wins), on the runner's own split and teacher."""
    data_dir, out_dir, _, _ = finished_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("split.csv", "split.json"):
        shutil.copy(out_dir / name, run / name)
    shutil.copytree(out_dir / "teacher", run / "teacher")
    record = tmp_path / "config.json"
    saved = json.loads((out_dir / "student" / "config.json").read_text())
    saved["args"].update(lr=3e-4, crop_scale=0.9, batch_size=6)
    record.write_text(json.dumps(saved))
    result = run_script("compare_recipes.py", "--data-dir", data_dir, "--out-dir", run,
                        "--config", record, "--seeds", "0", "--resamples", "100",
                        "--recipes", "plain=--method kd", "--", "--batch-size", "8",
                        timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"settings from {record}: --recipe reference" in result.stdout
    for stage in ("student", "kd_student"):
        trained = json.loads((run / "recipes" / "plain" / "seed0" / stage /
                              "config.json").read_text())["args"]
        assert (trained["lr"], trained["crop_scale"], trained["epochs"], trained["arch"]) \
            == (3e-4, 0.9, saved["args"]["epochs"], saved["args"]["arch"]), stage
        assert trained["batch_size"] == 8              # the flag after -- wins
        assert trained["out_dir"] != saved["args"]["out_dir"] and trained["seed"] == 0
