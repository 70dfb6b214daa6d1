"""One training per stage folder at a time: a second start is refused naming the first, a
lock left by a dead process is taken over, and under torchrun the lock is the job's."""

import json
import os
import platform
import signal
import subprocess
import sys

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


def _holder(**changes) -> dict:
    holder = runlock._this_process()
    holder.update(job="another job", **changes)
    return holder


@pytest.mark.fast
def test_which_holders_count_as_gone():
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert runlock.holder_is_gone(_holder(pid=ended.pid))             # no such process
    assert not runlock.holder_is_gone(_holder())                        # this very process
    # The same PID started at another time is a later process (a PID reused after the
    # holder died), as is any PID after the machine restarted.
    assert runlock.holder_is_gone(_holder(start_ticks="1"))
    assert runlock.holder_is_gone(_holder(boot_id="an earlier boot"))
    # Another host's process cannot be checked from here: it counts as running.
    assert not runlock.holder_is_gone(_holder(pid=ended.pid, host="elsewhere"))


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
