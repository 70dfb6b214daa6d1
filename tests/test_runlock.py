"""One training per stage folder at a time: a second start is refused naming the first, a
lock left by a dead process is taken over, and under torchrun the lock is the job's."""

import json
import os
import platform
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY_TRAIN_ARGS, assert_one_line_error, run_script, run_worker, \
    worker_command
from src import runlock
from src.cli import ToolError


def test_a_second_start_in_the_same_folder_is_refused_naming_the_first(tiny_data, tmp_path):
    out_dir = tmp_path / "run"
    # The first run stops itself at its first step, lock held: a chosen point, not a wait
    # that a busy machine could stretch past the end of the run.
    command, env = worker_command("teacher", tmp_path / "record", "--data-dir", tiny_data,
                                  "--out-dir", out_dir, *TINY_TRAIN_ARGS, processes=1,
                                  env={"DDP_STOP": "0:1:0"})
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = out_dir / ".teacher.lock"
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the first run ended before its first step"
        # Other settings: had it run, its config.json would sit beside the first's weights.
        second = run_script("train_teacher.py", "--data-dir", tiny_data, "--out-dir", out_dir,
                            *TINY_TRAIN_ARGS, "--lr", "5e-4")
        assert_one_line_error(second, f"{out_dir / 'teacher'} is being trained by another "
                                      f"process (PID {first.pid} on {platform.node()}")
        assert "use another --out-dir" in second.stderr and str(lock) in second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    config = json.loads((out_dir / "teacher" / "config.json").read_text())
    assert config["args"]["lr"] == 1e-3            # the first run's record, untouched
    assert not lock.exists()                        # released at the end


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tiny_data, tmp_path):
    out_dir = tmp_path / "run"
    killed = run_worker("teacher", tmp_path / "record", "--data-dir", tiny_data, "--out-dir",
                        out_dir, *TINY_TRAIN_ARGS, processes=1, env={"DDP_KILL": "0:1:0"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    lock = out_dir / ".teacher.lock"
    killed_pid = json.loads(lock.read_text())["pid"]            # left behind

    result = run_script("train_teacher.py", "--data-dir", tiny_data, "--out-dir", out_dir,
                        *TINY_TRAIN_ARGS, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert f"note: took over {lock}, left by PID {killed_pid} on {platform.node()}, which " \
           f"no longer runs" in result.stdout
    assert (out_dir / "teacher" / "best.pt").exists() and not lock.exists()


# Each racer waits for the go, then tries to take the lock and says whether it won; a
# winner holds it until the test has counted. Each racer acts on what it read of the lock's
# holder a moment late, racer k 0.1*k s, as on a busy machine: the old takeover (read the
# holder, decide it is gone, replace the file) then let several racers win.
RACER = """
import pathlib, sys, time
from src import runlock
from src.cli import ToolError
read_holder = runlock._read_holder
late = 0.1 * int(sys.argv[3])
runlock._read_holder = lambda *args: (read_holder(*args), time.sleep(late))[0]
lock, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
while not go.exists():
    pass
try:
    runlock.acquire(lock, "runs/teacher")
    print("won", flush=True)
    while go.exists():
        time.sleep(0.01)
except ToolError:
    print("refused", flush=True)
"""


@pytest.mark.fast
def test_processes_racing_for_a_lock_left_by_a_dead_run_let_one_win(tmp_path):
    """Before, two processes could both decide a stale holder was gone and both take over
    (read, decide, replace). A kernel lock leaves no such window."""
    lock, go = tmp_path / ".teacher.lock", tmp_path / "go"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    lock.write_text(json.dumps({"job": "a killed run", "pid": ended.pid,
                                "host": platform.node(), "since": "earlier"}))
    racers = [subprocess.Popen([sys.executable, "-c", RACER, lock, go, str(index)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True) for index in range(4)]
    time.sleep(1)                  # let them start; the go starts the race
    go.touch()
    verdicts = [next(line.strip() for line in racer.stdout
                     if line.strip() in ("won", "refused")) for racer in racers]
    go.unlink()
    for racer in racers:
        racer.wait(timeout=60)
    assert sorted(verdicts) == ["refused"] * 3 + ["won"], verdicts


@pytest.mark.fast
def test_under_torchrun_the_lock_is_the_jobs_not_the_ranks(tmp_path, monkeypatch):
    lock = tmp_path / ".teacher.lock"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    held = runlock.acquire(lock, "runs/teacher")            # rank 0 takes it
    assert held["job"] == "torchrun job-a"
    # Rank 1 of the same job (another PID, the same rendezvous id) finds it its own.
    assert runlock.acquire(lock, "runs/teacher")["pid"] == held["pid"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")       # another job while a is running
    with pytest.raises(ToolError, match=f"runs/teacher is being trained by another process "
                                        f"\\(PID {os.getpid()} on "):
        runlock.acquire(lock, "runs/teacher")
    runlock.release(lock)                                      # job b never removes a's lock
    assert lock.exists()
    # Without a rendezvous id (torchrun's default "none") the job is its master address.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert runlock.job_identity() == "torchrun node0:29500"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    runlock.release(lock)
    assert not lock.exists()
