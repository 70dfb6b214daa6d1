"""Shared fixtures: a tiny generated dataset and one finished three-stage run on it.

Everything runs on the CPU with ResNet18 at 16 px for one epoch, so a stage takes seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from src import distributed
from src.demo import write_demo_dataset

from forkserver import ForkServer

ROOT = Path(__file__).resolve().parent.parent
TINY_TRAIN_ARGS = ["--arch", "resnet18", "--weights", "none", "--input-size", "16",
                   "--epochs", "1", "--batch-size", "8", "--lr", "1e-3"]


_fork_server: ForkServer | None = None


def run_script(script: str, *args, cwd: Path = ROOT, timeout: int = 300,
               env: dict | None = None):
    """Run a top-level script as a user would (``env``: extra environment variables) in a
    new process; returns the CompletedProcess. The process is a fork of a server that has
    imported the libraries once (tests/forkserver.py), unless ``env`` asks for something a
    new interpreter reads at its start."""
    global _fork_server
    argv = [str(ROOT / script), *map(str, args)]
    if env:
        return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, **env})
    if _fork_server is None:
        _fork_server = ForkServer()
    return _fork_server.run(argv, cwd, timeout)


def pytest_sessionfinish(session, exitstatus):
    if _fork_server is not None:
        _fork_server.close()


def worker_command(stage: str, record: Path, *args, processes: int = 2,
                   env: dict | None = None) -> tuple[list[str], dict]:
    """The command line and environment that run ``stage`` through tests/ddp_worker.py:
    under torchrun with ``processes`` > 1, as plain Python with 1. ``env`` may set the
    worker's DDP_* variables (a kill or a stop at a chosen step)."""
    record.mkdir(parents=True, exist_ok=True)
    command = [*distributed.launcher(processes), "-m", "tests.ddp_worker", stage, *map(str, args)]
    # One thread a process where two share the 2-core CI machine; one process alone runs
    # as a script would, so its numbers match a plain run's.
    threads = {"OMP_NUM_THREADS": "1"} if processes > 1 else {}
    return command, {**os.environ, **threads, "DDP_RECORD": str(record), **(env or {})}


def run_worker(stage: str, record: Path, *args, processes: int = 2, env: dict | None = None,
               timeout: int = 300):
    """``stage`` through tests/ddp_worker.py, to its end (``worker_command``)."""
    command, environment = worker_command(stage, record, *args, processes=processes, env=env)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=environment)


def assert_one_line_error(result, *fragments: str) -> None:
    """A bad input ends with exit status 2 and one ``error:`` line, never a traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def assert_each_term_trains_the_student(terms: dict, student) -> None:
    """Every distillation term on its own puts a gradient on the student: a term computed
    on detached outputs would pass a check of the summed loss, since the cross-entropy
    alone reaches every parameter."""
    for name, value in terms.items():
        if name == "ce":
            continue
        student.zero_grad(set_to_none=True)
        value.backward(retain_graph=True)
        moved = sum(p.grad.abs().sum().item() for p in student.parameters()
                    if p.grad is not None)
        assert moved > 0, f"the {name} term puts no gradient on the student"
    student.zero_grad(set_to_none=True)


def tensorboard_events(folder: Path):
    """The events a --tensorboard run wrote, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def make_tiny_dataset(path: Path, classes: int = 4, per_class: int = 10) -> Path:
    return write_demo_dataset(path, per_class=per_class, test_images=6, lr_size=8, scale=4,
                              seed=1, num_classes=classes, progress=False)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A read-only tiny dataset; tests that damage data copy it first."""
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture()
def data_copy(tiny_data, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


@pytest.fixture(scope="session")
def finished_run(tiny_data, tmp_path_factory):
    """All three stages trained (one epoch) and tested on the tiny dataset.

    Returns (data_dir, out_dir, assets_dir, outputs) with each script's CompletedProcess.
    """
    out_dir = tmp_path_factory.mktemp("runs") / "run"
    # No --assets-dir: a run's figures belong in its own folder by default.
    assets_dir = out_dir / "figures"
    outputs = {}
    common = ["--data-dir", tiny_data, "--out-dir", out_dir]
    for script in ("train_teacher.py", "train_student.py", "train_kd_student.py"):
        outputs[script] = run_script(script, *common, *TINY_TRAIN_ARGS)
        assert outputs[script].returncode == 0, outputs[script].stderr
    for script in ("test_teacher.py", "test_student.py", "test_kd_student.py"):
        outputs[script] = run_script(script, *common)
        assert outputs[script].returncode == 0, outputs[script].stderr
    return tiny_data, out_dir, assets_dir, outputs
