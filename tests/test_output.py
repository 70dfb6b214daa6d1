"""Lines printed by several processes at once (torchrun's ranks share stdout and stderr)
arrive whole: text and newline in one write, whatever PYTHONUNBUFFERED says."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

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
