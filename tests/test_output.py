"""What the scripts print reads without the source: lines printed by several processes at
once (torchrun's ranks share stdout and stderr) arrive whole, a run says what it trains and
what its epoch lines mean, and a typo gets a suggestion."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT, TINY_TRAIN_ARGS, assert_one_line_error, run_script

REFUSALS = 2000
MESSAGE = ("--batch-size 3 is the global batch: it must give each of the 2 processes at least "
           "2 images")

# Each process refuses REFUSALS times through run_main, the path every script's error
# takes, and prints a note to stdout each time, as two ranks refusing a flag do at once.
WRITER = f"""
import pathlib, sys
from src.cli import ToolError, run_main

# Start together: say ready, wait for the go, so that the two loops overlap.
folder = pathlib.Path(sys.argv[1])
(folder / "ready-{{rank}}").touch()
while not (folder / "go").exists():
    pass

def refuse():
    print("note: a line on stdout, written by rank {{rank}}")
    raise ToolError({MESSAGE!r})

for _ in range({REFUSALS}):
    try:
        run_main(refuse)
    except SystemExit:
        pass
"""


@pytest.mark.fast
def test_lines_from_two_processes_never_run_together(tmp_path):
    # Both processes write to the same open files, unbuffered as on CI's machines, where
    # print's text and newline went out as two writes and ran two ranks' lines together.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        writers = [subprocess.Popen([sys.executable, "-c", WRITER.replace("{rank}", str(rank)),
                                     tmp_path], cwd=ROOT, env=env, stdout=out, stderr=err)
                   for rank in range(2)]
        while not all((tmp_path / f"ready-{rank}").exists() for rank in range(2)):
            if any(writer.poll() is not None for writer in writers):
                break  # one died before it was ready: its exit code is checked below
            time.sleep(0.01)
        (tmp_path / "go").touch()
        returncodes = [writer.wait(timeout=120) for writer in writers]
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert returncodes == [0, 0], stderr[-2000:]
    errors = stderr.splitlines()
    assert len(errors) == 2 * REFUSALS
    assert set(errors) == {f"error: {MESSAGE}"}, [line for line in errors
                                                   if line != f"error: {MESSAGE}"][:3]
    notes = stdout.splitlines()
    assert sorted(set(notes)) == [f"note: a line on stdout, written by rank {rank}"
                                  for rank in range(2)]
    assert len(notes) == 2 * REFUSALS


def test_a_train_script_says_what_it_trains_and_how_to_read_its_epochs(finished_run):
    _, out_dir, _, outputs = finished_run
    teacher = outputs["train_teacher.py"].stdout
    assert "HR teacher: resnet18 from scratch on HR" in teacher and "none weights" not in teacher
    assert "(* marks the best epoch so far by val_loss: its weights are best.pt; lr is the " \
           "rate at the epoch's end)" in teacher
    kd = outputs["train_kd_student.py"].stdout
    assert f"  taught by teacher {out_dir / 'teacher' / 'best.pt'}: method kd temperature 4, " \
           f"beta 0.3, alpha 0.7 (cross-entropy)" in kd
    history = pd.read_csv(out_dir / "kd_student" / "history.csv")
    epoch_line = next(line for line in kd.splitlines() if line.startswith("epoch   1"))
    assert f"lr {history['lr_end'].iloc[0]:.2e}" in epoch_line


@pytest.mark.fast
def test_a_run_selecting_its_last_epoch_marks_no_epoch_best(tiny_data, tmp_path):
    result = run_script("train_student.py", "--data-dir", tiny_data, "--out-dir", tmp_path,
                        *TINY_TRAIN_ARGS[:-6], "--epochs", "2", *TINY_TRAIN_ARGS[-4:],
                        "--schedule", "cosine", "--select-by", "last")
    assert result.returncode == 0, result.stderr
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and not any(line.endswith("*") for line in epochs)
    assert "(the last epoch's weights are the model: best.pt)" in result.stdout
    history = pd.read_csv(tmp_path / "student" / "history.csv")
    assert history["lr_end"].iloc[-1] < history["lr"].iloc[-1]       # cosine: the rate fell


@pytest.mark.fast
@pytest.mark.parametrize("argv, suggestion", [
    (["--recipe", "consistant"], "did you mean consistent?"),
    (["--unlabeled", "x"], "did you mean --unlabelled?"),
])
def test_a_typo_gets_one_line_and_a_suggestion_not_the_usage(argv, suggestion, capsys):
    from src.arguments import parse_train_arguments
    with pytest.raises(SystemExit) as stop:
        parse_train_arguments("kd_student", argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "usage:" not in error
    assert error.startswith("error: ") and suggestion in error


@pytest.mark.fast
def test_a_missing_teacher_names_teacher_ckpt(tiny_data, tmp_path):
    result = run_script("train_kd_student.py", "--data-dir", tiny_data, "--out-dir", tmp_path,
                        *TINY_TRAIN_ARGS)
    assert_one_line_error(result, f"teacher checkpoint {tmp_path / 'teacher' / 'best.pt'} not "
                                  f"found", "--teacher-ckpt")
