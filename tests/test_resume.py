"""Never lose a run: kill and resume, reproducibility, numerical faults."""

import json
import signal

import pandas as pd
import pytest
import torch

from conftest import TINY_TRAIN_ARGS, assert_one_line_error, run_script, run_worker
from src.arguments import jsonable, parse_train_arguments
from src.stages import settings_differences

RESUME_ARGS = [*TINY_TRAIN_ARGS[:-4], "--epochs", "4", "--batch-size", "8", "--lr", "1e-3",
               "--deterministic", "--patience", "10"]


# The fixed-budget path: per-batch cosine schedule and paired mixing draws must resume too.
COSINE_MIX_ARGS = ["--schedule", "cosine", "--warmup-epochs", "1", "--select-by", "last",
                   "--mixup", "0.4", "--cutmix", "1.0"]


def _train_and_test(data_dir, out_dir, *extra):
    result = run_script("train_student.py", "--data-dir", data_dir, "--out-dir", out_dir,
                        *RESUME_ARGS, *extra)
    assert result.returncode == 0, result.stderr
    return result


def _outcome(out_dir):
    """What a finished run leaves, minus wall-clock times and absolute paths."""
    result = run_script("test_student.py", "--data-dir", out_dir.parent / "data",
                        "--out-dir", out_dir, "--assets-dir", out_dir / "assets")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out_dir / "student" / "test_metrics.json").read_text())
    metrics.pop("checkpoint")
    history = pd.read_csv(out_dir / "student" / "history.csv").drop(columns=["seconds"])
    best = torch.load(out_dir / "student" / "best.pt", weights_only=True)["model"]
    return metrics, history, best


@pytest.mark.parametrize("extra", [[], COSINE_MIX_ARGS], ids=["plateau", "cosine-mixing"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_data, tmp_path, extra):
    data = tmp_path / "data"
    import shutil
    shutil.copytree(tiny_data, data)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _train_and_test(data, straight, *extra)

    # Killed at a chosen step (epoch 2's second batch), not after a wait a busy machine
    # could stretch past the end of the run.
    died = run_worker("student", tmp_path / "record", "--data-dir", data, "--out-dir", killed,
                      *RESUME_ARGS, *extra, processes=1, env={"DDP_KILL": "0:2:1"})
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert len(pd.read_csv(killed / "student" / "history.csv")) == 1
    killed_pid = json.loads((killed / ".student.lock").read_text())["pid"]

    resumed = _train_and_test(data, killed, *extra, "--resume")
    assert "resuming after epoch" in resumed.stdout
    # The killed run's lock is taken over, and released at the end.
    assert f"left by PID {killed_pid} on" in resumed.stdout
    assert not (killed / ".student.lock").exists()
    metrics_straight, history_straight, best_straight = _outcome(straight)
    metrics_killed, history_killed, best_killed = _outcome(killed)
    assert metrics_killed == metrics_straight
    pd.testing.assert_frame_equal(history_killed, history_straight)
    for key, value in best_straight.items():
        assert torch.equal(value, best_killed[key]), key
    config = json.loads((killed / "student" / "config.json").read_text())
    assert len(config["resumed"]) == 1


def test_same_command_twice_gives_identical_metrics(tiny_data, tmp_path):
    import shutil
    shutil.copytree(tiny_data, tmp_path / "data")
    first, second = tmp_path / "first", tmp_path / "second"
    _train_and_test(tmp_path / "data", first)
    _train_and_test(tmp_path / "data", second)
    metrics_first, history_first, _ = _outcome(first)
    metrics_second, history_second, _ = _outcome(second)
    assert metrics_first == metrics_second
    pd.testing.assert_frame_equal(history_first, history_second)


def test_resume_refuses_other_settings_and_finished_runs(finished_run, tmp_path):
    data_dir, out_dir, _, _ = finished_run
    import shutil
    run = tmp_path / "run"
    shutil.copytree(out_dir, run)
    result = run_script("train_student.py", "--data-dir", data_dir, "--out-dir", run,
                        *TINY_TRAIN_ARGS, "--resume")
    assert result.returncode == 0 and "finished run; nothing to resume" in result.stdout
    # A longer budget for a finished run is refused, saying how to go on from it.
    before = (run / "student" / "best.pt").read_bytes()
    result = run_script("train_student.py", "--data-dir", data_dir, "--out-dir", run,
                        *TINY_TRAIN_ARGS[:-6], "--epochs", "3", *TINY_TRAIN_ARGS[-4:],
                        "--resume")
    assert_one_line_error(result, "--epochs 1 -> 3", "the run is finished",
                          f"--weights {run / 'student' / 'best.pt'} --out-dir NEW")
    assert (run / "student" / "best.pt").read_bytes() == before

    # Make it look interrupted: an unfinished run resumed with another learning rate.
    last = run / "student" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["finished"] = False
    torch.save(state, last)
    (run / "student" / "train_summary.json").unlink()
    before = last.read_bytes()
    result = run_script("train_student.py", "--data-dir", data_dir, "--out-dir", run,
                        *TINY_TRAIN_ARGS[:-2], "--lr", "5e-4", "--resume")
    assert_one_line_error(result, "--resume with other settings", "--lr 0.001 -> 0.0005")
    assert last.read_bytes() == before
    result = run_script("train_teacher.py", "--data-dir", data_dir, "--out-dir",
                        tmp_path / "empty", *TINY_TRAIN_ARGS, "--resume")
    assert_one_line_error(result, "nothing to resume")


def test_non_finite_loss_stops_the_stage(tiny_data, tmp_path):
    result = run_script("train_student.py", "--data-dir", tiny_data, "--out-dir", tmp_path,
                        *TINY_TRAIN_ARGS[:-2], "--lr", "1e30")
    assert_one_line_error(result, "training loss became", "try a lower --lr")
    assert not (tmp_path / "student" / "best.pt").exists()


@pytest.mark.fast
def test_a_flag_added_after_a_run_counts_as_its_default():
    # A run saved before --fitnet-weight existed trained as its default does: kept when
    # the default is wanted, refused when another value is.
    wanted = jsonable(parse_train_arguments("kd_student", ["--method", "kd"]))
    saved = {key: value for key, value in wanted.items() if key != "fitnet_weight"}
    assert settings_differences(saved, wanted, "kd_student") == []
    other = {**wanted, "fitnet_weight": 10.0}
    assert settings_differences(saved, other, "kd_student") == ["--fitnet-weight 100.0 -> 10.0"]
    # A recorded value is compared as recorded.
    assert settings_differences({**saved, "lr": 0.5}, wanted, "kd_student") == \
        [f"--lr 0.5 -> {wanted['lr']!r}"]
