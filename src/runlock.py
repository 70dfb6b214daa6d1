"""One training at a time per stage folder.

Two commands training the same stage into the same ``--out-dir`` would both pass the
"folder already holds a run" check and then write one run's ``config.json`` beside the
other's weights. So a train stage first takes ``<out-dir>/.<stage folder>.lock``: an
exclusive ``fcntl.flock`` on that file, which the kernel releases when the process ends
however it ends, so a killed run leaves nothing to take over and two starters cannot both
win a race for a stale lock. The file names the holder (job, PID, host, start time), so a
second start refuses in one line naming that process. Under torchrun the lock belongs to
the job: the first rank to lock it writes the job's identity, the job's other ranks find it
their own, and another job is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

from .cli import ToolError
from .distributed import launched_by_torchrun

# The lock files this process holds, by path: (open file, job). Closing one unlocks it.
_held: dict[Path, tuple[int, str]] = {}


def job_identity() -> str:
    """What every rank of one job shares and no other running job does: torchrun's
    rendezvous id, or its master address and port (``--rdzv-id`` defaults to "none");
    a process on its own is its host and PID."""
    if launched_by_torchrun():
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if run_id != "none":
            return f"torchrun {run_id}"
        return f"torchrun {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    return f"{platform.node()} pid {os.getpid()}"


def _this_process() -> dict:
    return {"job": job_identity(), "pid": os.getpid(), "host": platform.node(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_holder(fd: int) -> dict | None:
    """What the open lock file says: None when empty (its holder has not written yet),
    {} when unreadable."""
    text = os.pread(fd, 1 << 16, 0)
    if not text.strip():
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _lock_file(lock: Path) -> tuple[int, bool]:
    """Open ``lock`` (created if missing) and try to lock it: (fd, locked). A file that
    its holder removed while we opened it is opened again: a lock on a removed file would
    hold nothing."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        try:
            same_file = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return fd, locked
        os.close(fd)


def acquire(lock: Path, what: str) -> dict:
    """Take ``lock`` for this job or raise a one-line ToolError naming who holds it.
    Returns what the lock says (this process, or the rank of this job that took it)."""
    me = _this_process()
    for _ in range(100):          # the holder may not have written its name yet
        fd, locked = _lock_file(lock)
        holder = _read_holder(fd)
        if locked:
            if holder and holder.get("job") != me["job"]:
                print(f"note: took over {lock}, left by PID {holder.get('pid')} on "
                      f"{holder.get('host')}, which no longer runs")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me, indent=1).encode(), 0)
            _held[lock] = (fd, me["job"])
            return me
        os.close(fd)
        if holder is None:
            time.sleep(0.05)
            continue
        if holder.get("job") == me["job"]:
            return holder         # another rank of this very job took it
        raise ToolError(
            f"{what} is being trained by another process (PID {holder.get('pid')} on "
            f"{holder.get('host')}, since {holder.get('since')}); wait for it to end or "
            f"use another --out-dir ({lock} is locked while it runs)")
    raise ToolError(f"could not take {lock}: it stays locked by a process that never "
                    f"names itself")


def release(lock: Path) -> None:
    """Remove ``lock`` if this job holds it (never another job's), and unlock it."""
    job = job_identity()
    if lock in _held and _held[lock][1] == job:
        fd, _ = _held.pop(lock)
        lock.unlink(missing_ok=True)
        os.close(fd)              # unlocked only once the file is gone
        return
    try:                          # taken by another rank of this job
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        if (_read_holder(fd) or {}).get("job") == job:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextmanager
def stage_lock(stage_dir: Path, release_it: bool = True):
    """Hold ``<parent>/.<stage folder>.lock`` while a stage trains into ``stage_dir``;
    ``release_it`` False leaves the removal to another rank of the job (rank 0)."""
    lock = stage_dir.parent / f".{stage_dir.name}.lock"
    acquire(lock, str(stage_dir))
    try:
        yield lock
    finally:
        if release_it:
            release(lock)
