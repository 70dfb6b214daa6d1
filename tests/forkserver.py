"""Run the top-level scripts as fresh processes without paying their imports each time.

A script run spends about 5 s of the 2-core CI machine importing torch, torchvision,
pandas, scikit-learn, matplotlib and ``src`` before it does anything, and the suite runs
scripts some 300 times. The server started here imports all of that once and runs no
model code; each script then runs in a ``fork`` of it, which is a new process with its own
exit status, signals, working folder, environment, stdout and stderr, exactly as
``subprocess.run`` would give, minus the imports.

What a fork cannot give is what a new interpreter reads at its start: ``PYTHON*``
variables, the OpenMP thread count and the like. ``run_script`` therefore sends a run with
extra environment variables to a real ``subprocess.run`` instead.

Protocol: one JSON request a line (argv, cwd, env, stdout and stderr files) on a pipe; the
server answers on another with ``{"pid": ...}`` at the start and ``{"returncode": ...}`` at
the end.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def serve(requests_fd: int, replies_fd: int) -> None:
    # Everything a script imports at its start, and what its stages import later.
    import matplotlib
    matplotlib.use("Agg")
    for module in ("matplotlib.pyplot", "sklearn.metrics", "sklearn.model_selection", "timm",
                   "torch", "src.compare", "src.predict", "src.seeds", "src.stages"):
        importlib.import_module(module)
    import numpy
    import random
    import runpy

    requests = os.fdopen(requests_fd, "r")
    replies = os.fdopen(replies_fd, "w", buffering=1)
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            requests.close()
            replies.close()
            os.setpgid(0, 0)       # so a timeout stops the script's own children too
            stdin = os.open(os.devnull, os.O_RDONLY)
            stdout = os.open(request["stdout"], os.O_WRONLY | os.O_TRUNC)
            stderr = os.open(request["stderr"], os.O_WRONLY | os.O_TRUNC)
            for source, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
                os.dup2(source, target)
                os.close(source)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            script = request["argv"][0]
            sys.argv = list(request["argv"])
            sys.path[0] = str(Path(script).resolve().parent)
            # A new interpreter seeds these from the system; forks would all share one state.
            random.seed()
            numpy.random.seed()
            # The script's own exit (SystemExit or an uncaught exception) ends this process
            # the way it ends a fresh one: atexit handlers run, buffers are flushed.
            runpy.run_path(script, run_name="__main__")
            sys.exit(0)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


class ForkServer:
    """The client: ``run(argv, cwd, timeout)`` answers like ``subprocess.run`` with
    ``capture_output=True, text=True``."""

    def __init__(self) -> None:
        requests_read, self._requests = os.pipe()
        self._replies, replies_write = os.pipe()
        root = Path(__file__).resolve().parent.parent
        # The protocol has its own pipes: the server's stdio stay free for the scripts.
        self._process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from tests.forkserver import serve; "
             "serve(int(sys.argv[1]), int(sys.argv[2]))", str(requests_read),
             str(replies_write)], cwd=root, pass_fds=(requests_read, replies_write),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        os.close(requests_read)
        os.close(replies_write)
        self._pending = b""

    def _reply(self, deadline: float | None) -> dict | None:
        while b"\n" not in self._pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._replies], [], [], wait)
            if not ready:
                return None
            chunk = os.read(self._replies, 4096)
            if not chunk:
                raise RuntimeError(f"the fork server ended (exit {self._process.wait()})")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as folder:
            stdout, stderr = Path(folder) / "stdout", Path(folder) / "stderr"
            stdout.touch()
            stderr.touch()
            request = {"argv": argv, "cwd": str(cwd), "env": dict(os.environ),
                       "stdout": str(stdout), "stderr": str(stderr)}
            os.write(self._requests, (json.dumps(request) + "\n").encode())
            deadline = time.monotonic() + timeout
            pid = self._reply(None)["pid"]
            finished = self._reply(deadline)
            if finished is None:
                os.killpg(pid, signal.SIGKILL)
                self._reply(None)
                raise subprocess.TimeoutExpired(argv, timeout, stdout.read_text(),
                                                stderr.read_text())
            return subprocess.CompletedProcess(argv, finished["returncode"],
                                               stdout.read_text(), stderr.read_text())

    def close(self) -> None:
        os.close(self._requests)
        self._process.wait(timeout=30)
        os.close(self._replies)
