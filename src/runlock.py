"""One training at a time per stage folder.

Two commands training the same stage into the same ``--out-dir`` would both pass the
"folder already holds a run" check and then write one run's ``config.json`` beside the
other's weights. So a train stage first takes ``<out-dir>/.<stage folder>.lock``, a small
JSON file naming the process that holds it; a second start refuses in one line, naming that
process and host. A lock left behind by a process that no longer runs (killed, machine
restarted) is taken over with a note. Under torchrun the lock belongs to the job: every rank
of one job holds it together, and another job is refused.

The file is created with ``os.link`` from a fully written temporary file, so it never exists
half written and two starters cannot both create it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

from .cli import ToolError
from .distributed import launched_by_torchrun


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> str | None:
    """When ``pid`` started, in clock ticks since boot (Linux): a reused PID differs."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rsplit(")", 1)[1].split()[19]   # field 22; the name before ")" may hold spaces


def _boot_id() -> str | None:
    return _read_text("/proc/sys/kernel/random/boot_id")


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
            "boot_id": _boot_id(), "start_ticks": _start_ticks(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def holder_is_gone(holder: dict) -> bool:
    """True when the lock's process is known to have ended: same host, and the machine
    restarted since, or no such PID, or that PID now belongs to a later process. A holder on
    another host cannot be checked from here and counts as running."""
    if holder.get("host") != platform.node():
        return False
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:       # alive, another user's
        return False
    return bool(holder.get("start_ticks")) and _start_ticks(pid) != holder["start_ticks"]


def _read_holder(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}                 # unreadable: cannot be ours, cannot be checked


def _write(lock: Path, me: dict, replace: bool) -> bool:
    """Create (or with ``replace`` overwrite) ``lock`` atomically; False if it exists."""
    staging = lock.with_name(f"{lock.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(me, indent=1))
    try:
        if replace:
            os.replace(staging, lock)
            return True
        os.link(staging, lock)
        return True
    except FileExistsError:
        return False
    finally:
        staging.unlink(missing_ok=True)


def acquire(lock: Path, what: str) -> dict:
    """Take ``lock`` for this job or raise a one-line ToolError naming who holds it.
    Returns what the lock says (this process)."""
    me = _this_process()
    for _ in range(3):            # a holder may release or a rank may write between steps
        if _write(lock, me, replace=False):
            return me
        holder = _read_holder(lock)
        if holder is None:
            continue
        if holder.get("job") == me["job"]:
            return holder         # another rank of this very job took it
        if holder and not holder_is_gone(holder):
            raise ToolError(
                f"{what} is being trained by another process (PID {holder.get('pid')} on "
                f"{holder.get('host')}, since {holder.get('since')}); wait for it to end or "
                f"use another --out-dir (if that process no longer runs, delete {lock})")
        _write(lock, me, replace=True)
        if (_read_holder(lock) or {}).get("job") == me["job"]:
            print(f"note: took over {lock}, left by PID {holder.get('pid')} on "
                  f"{holder.get('host')}, which no longer runs" if holder else
                  f"note: replaced the unreadable lock {lock}")
            return me
    raise ToolError(f"could not take {lock}: other processes keep changing it")


def release(lock: Path) -> None:
    """Remove ``lock`` if this job holds it (never another job's)."""
    holder = _read_holder(lock)
    if holder and holder.get("job") == job_identity():
        lock.unlink(missing_ok=True)


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
