"""Plumbing shared by every script: one-line errors, atomic writes, run folders, run records."""

from __future__ import annotations

import argparse
import ctypes
import difflib
import errno
import io
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm


class ToolError(Exception):
    """A problem the user can fix (bad input, missing file, misuse).

    Scripts print it as one line and exit with status 2; no traceback.
    """


EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# glibc's malloc hands every freed block above its mmap threshold (128 KiB, rising to
# 32 MiB at most) back to the kernel, so each batch of views and each training step's
# activations were page-faulted and zero-filled anew: on a 2-core CPU that made training
# steps 35-45% slower (benchmark.py with and without LRKD_DEFAULT_MALLOC; README, "Speed").
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT_FREED_BYTES = 1 << 30
DEFAULT_MALLOC_VARIABLE = "LRKD_DEFAULT_MALLOC"


def keep_freed_memory() -> str:
    """Ask the C library to keep freed blocks of up to 1 GiB for reuse instead of returning
    them to the kernel; says what was done. ``LRKD_DEFAULT_MALLOC=1`` leaves it alone."""
    if os.environ.get(DEFAULT_MALLOC_VARIABLE):
        return f"C library default ({DEFAULT_MALLOC_VARIABLE} is set)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "C library default (no mallopt here)"
    if mallopt(M_MMAP_THRESHOLD, KEPT_FREED_BYTES) and mallopt(M_TRIM_THRESHOLD,
                                                                 KEPT_FREED_BYTES):
        return "freed blocks up to 1 GiB kept for reuse (glibc mallopt)"
    return "C library default (mallopt refused)"


def write_whole_lines() -> None:
    """Make every printed line go out in one write, its text and newline together.

    Under torchrun several processes share one stdout and stderr. With PYTHONUNBUFFERED
    set (as on CI's machines) ``print`` writes the text and the newline separately, so two
    processes' lines ran together ("...imageserror: ..."). Line buffering without
    write-through keeps a line's parts until its newline and hands them to the file in
    one ``write``, which the kernel does not interleave for a pipe below 4 KiB. tqdm
    flushes its own partial lines, so progress bars still draw."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True, write_through=False)


def _argument_error(parser: argparse.ArgumentParser, message: str) -> None:
    """argparse's error without its usage dump (37 lines for a train script), with a
    "did you mean" for a mistyped option or choice; --help still prints the usage."""
    guesses = []
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if unknown:
        for token in unknown.group(1).split():
            if token.startswith("--"):
                guesses += difflib.get_close_matches(token.split("=")[0],
                                                     parser._option_string_actions, n=1)
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        options = [option.strip(" '") for option in choice.group(2).split(",")]
        guesses += difflib.get_close_matches(choice.group(1), options, n=1)
    hint = f"; did you mean {' '.join(guesses)}?" if guesses else ""
    parser.exit(EXIT_ERROR, f"error: {message}{hint} ({parser.prog} --help lists the "
                            f"options)\n")


# Every script's parser reports a mistake in one line (imported by every script).
argparse.ArgumentParser.error = _argument_error


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's ``main`` and turn expected failures into one line and an exit code.

    SIGTERM is treated like Ctrl-C so that a killed job gets the same clean stop. Every
    line, from any process, is written whole (``write_whole_lines``).
    """

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    write_whole_lines()
    signal.signal(signal.SIGTERM, _terminate)
    keep_freed_memory()
    try:
        sys.exit(main() or 0)
    except ToolError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        print("interrupted: finished epochs are saved; rerun with --resume to continue",
              file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def progress_bar(iterable, **options):
    """tqdm that draws only on a terminal: a log file gets the scripts' one line per epoch,
    not thousands of carriage-return updates (tqdm's ``disable=None``). Under torchrun only
    rank 0 draws."""
    options.setdefault("disable", None if os.environ.get("RANK", "0") == "0" else True)
    return tqdm(iterable, **options)


def require_at_least_one(values: dict[str, int | None]) -> None:
    """One-line error for the first flag (``{"--steps": 0}``) below 1; ``None`` is unset."""
    for flag, value in values.items():
        if value is not None and value < 1:
            raise ToolError(f"{flag} must be at least 1 (got {value})")


def require_at_least_zero(values: dict) -> None:
    """One-line error for the first flag below 0 or not finite (``{"--seeds": [0, -1]}``:
    a list checks each value); ``None`` is unset."""
    for flag, value in values.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and not (math.isfinite(item) and item >= 0):
                raise ToolError(f"{flag} must be a finite number, at least 0 (got {item})")


def publish_table(folder: Path, stem: str, table: str, summary: dict) -> None:
    """Print a result table and keep it as ``<folder>/<stem>.md`` beside the full
    ``<stem>.json``."""
    print()
    print(table)
    write_text(Path(folder) / f"{stem}.md", table + "\n")
    write_json(Path(folder) / f"{stem}.json", summary)
    print(f"-> {Path(folder) / stem}.md, {stem}.json")


def split_passthrough(argv: list[str], reserved: set[str], who: str) -> tuple[list, list]:
    """``[own options] -- [options for the scripts it runs]``: the two lists. Options the
    runner sets itself (``reserved``) may not appear after ``--``."""
    if "--" not in argv:
        return argv, []
    own, passthrough = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    clash = reserved & set(passthrough)
    if clash:
        raise ToolError(f"{', '.join(sorted(clash))} after -- is set by {who} itself")
    return own, passthrough


# --- atomic writes -------------------------------------------------------------------
# Every result file is written to a temporary file beside it and renamed over the old one,
# so a crash or a full disk mid-write leaves the previous good file in place.

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files are created as open() would: read-write for all, less the umask (mkstemp's 0600
# would keep a colleague on a shared machine from reading the results).
FILE_MODE = 0o666 & ~_umask()
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` survive a power cut (the folder's entry on disk)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass                      # some file systems cannot sync a folder
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        tmp_path.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            raise ToolError(f"cannot write {path}: the disk or quota is full "
                            f"({_free_space(path.parent)}); the previous file, if any, is "
                            f"untouched") from None
        raise
    _sync_folder(path.parent)


def _free_space(folder: Path) -> str:
    return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free in {folder}"


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: Path, frame) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def save_torch(path: Path, obj: Any) -> None:
    # Serialised in memory first: torch.save's own file writer reports a full disk as a
    # cryptic RuntimeError ("inline_container.cc"), a plain write as ENOSPC or EDQUOT.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def load_torch(path: Path, what: str) -> Any:
    """A file written by ``save_torch``, loaded safely: only tensors and plain values are
    unpickled (``weights_only``), so a planted pickle cannot run code. Anything else is
    refused in one line naming ``what`` the file was for."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ToolError(f"{what} {path}: file not found") from None
    except pickle.UnpicklingError as error:
        # PyTorch's own message advises turning the safety off: never shown.
        unsafe = re.search(r"unsupported GLOBAL (\S+)", str(error))
        if unsafe:
            raise ToolError(f"{what} {path} holds more than tensors and plain values "
                            f"({unsafe.group(1)}), which this tool never writes; refused "
                            f"(unpickling it could run code)") from None
        raise ToolError(f"{what} {path} is not a readable checkpoint (not a PyTorch "
                        f"file)") from None
    except Exception as error:
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
        raise ToolError(f"{what} {path} is not a readable checkpoint ({reason})") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ToolError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise ToolError(f"{path}: not valid JSON ({error})") from None


# --- folders -------------------------------------------------------------------------

def ensure_writable_dir(path: Path, flag: str = "--out-dir") -> Path:
    """Create ``path`` if needed and prove we can write there, before any work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ToolError(f"cannot write to {flag} {path}: {error.strerror or error}") from None
    return path


def run_record(args: dict, extra: dict | None = None) -> dict:
    """What ``config.json`` keeps: every argument, library versions, code version."""
    import numpy
    import torchvision

    record = {
        "args": args,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "numpy": numpy.__version__,
        },
        "code_version": _git_commit(),
        "host": platform.node(),
    }
    record.update(extra or {})
    return record


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ToolError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ToolError(f"--device {name}: not a device name (try auto, cpu, cuda, cuda:1)") from None
