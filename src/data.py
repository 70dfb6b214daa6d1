"""The DACON layout, the shared split, decoded images, batches and paired HR/LR views.

Images are decoded once per dataset into ``uint8`` arrays cached under
``<out-dir>/cache/`` and reused by every stage; epochs only index those arrays.
Augmentation runs on whole batches (on the GPU when there is one) and draws one crop and
one flip per sample that is applied to every resolution, so the teacher always sees the HR
twin of exactly the view the student sees.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import re
import shutil
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from .cli import DISK_FULL, ToolError, atomic_write, progress_bar, read_json, write_csv, write_json

TRAIN_COLUMNS = ("img_path", "upscale_img_path", "label")
TEST_COLUMNS = ("ID", "img_path")
SUBSETS = ("train", "val", "test")
# A run folder's split, in the order it is written: split.csv's presence marks it complete.
SPLIT_FILES = ("split.json", "split.csv")
# 8:1:1 leaves a class of n images about n/10 validation and test images; below 10 one of
# them would be empty and stratification impossible.
MIN_IMAGES_PER_CLASS = 10
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESOLUTION_COLUMN = {"lr": "img_path", "hr": "upscale_img_path"}


# --- the table -------------------------------------------------------------------------

def read_table(csv_path: Path, required_columns) -> pd.DataFrame:
    """Read a CSV as strings and check it has rows and the columns we need."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ToolError(f"{csv_path}: file not found")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ToolError(f"{csv_path}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ToolError(f"{csv_path}: not a readable CSV ({reason})") from None
    table.columns = [str(column).strip() for column in table.columns]
    missing = [column for column in required_columns if column not in table.columns]
    if missing:
        raise ToolError(f"{csv_path}: missing column(s) {', '.join(missing)} "
                        f"(found: {', '.join(table.columns) or 'none'})")
    if table.empty:
        raise ToolError(f"{csv_path}: no rows")
    table = table[list(required_columns)].apply(lambda column: column.str.strip())
    for column in required_columns:
        empty = table.index[table[column] == ""]
        if len(empty):
            raise ToolError(f"{csv_path}: empty {column} in row {empty[0] + 2}")
    return table


def normalize_path(relative: str) -> str:
    """``./train/a.png`` and ``train/a.png`` name the same file."""
    return PurePosixPath(relative.replace("\\", "/")).as_posix()


# --strict-paths: refuse image paths that lead outside their data folder instead of warning.
# Set once from the command line (set_path_policy) rather than passed down the dozen call
# chains that reach load_images.
_STRICT_PATHS = False


def set_path_policy(args) -> None:
    global _STRICT_PATHS
    _STRICT_PATHS = bool(getattr(args, "strict_paths", False))


def paths_outside(folder: Path, relative_paths) -> list[str]:
    """The paths (as written) that lead outside ``folder``: absolute, climbing out with
    ``..``, or through a symbolic link to elsewhere."""
    root = Path(folder).resolve()
    return [path for path in relative_paths
            if not (root / path).resolve().is_relative_to(root)]


def check_paths(folder: Path, relative_paths, what: str) -> None:
    """A one-line warning (an error with --strict-paths) for images read from outside
    ``folder``: a shared CSV or folder could make a run read any file its user can."""
    outside = paths_outside(folder, relative_paths)
    if not outside:
        return
    message = (f"{what}: {len(outside)} image path(s) lead outside {folder} (absolute, "
               f"'..' or a symbolic link; first: {outside[0]})")
    if _STRICT_PATHS:
        raise ToolError(f"{message}; refused by --strict-paths")
    print(f"warning: {message}; --strict-paths refuses them")


def read_train_table(data_dir: Path) -> pd.DataFrame:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ToolError(f"data folder {data_dir} not found (pass --data-dir, or write the demo "
                        f"data with: python make_demo_data.py)")
    csv_path = data_dir / "train.csv"
    table = read_table(csv_path, TRAIN_COLUMNS)
    for column in ("img_path", "upscale_img_path"):
        table[column] = table[column].map(normalize_path)
        duplicated = table[column][table[column].duplicated()]
        if len(duplicated):
            raise ToolError(f"{csv_path}: {len(duplicated)} duplicate {column} value(s), "
                            f"first {duplicated.iloc[0]}")
    return table.reset_index(drop=True)


def read_test_table(data_dir: Path) -> pd.DataFrame:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ToolError(f"data folder {data_dir} not found (pass --data-dir)")
    table = read_table(data_dir / "test.csv", TEST_COLUMNS)
    table["img_path"] = table["img_path"].map(normalize_path)
    return table.reset_index(drop=True)


# --- the split -------------------------------------------------------------------------

@dataclass
class Split:
    """The labelled rows with a ``subset`` column (train/val/test) and the class list."""

    frame: pd.DataFrame
    classes: list[str]
    seed: int
    fingerprint: str              # the rows and which subset each is in (assignment_fingerprint)
    data_fingerprint: str = ""    # the rows alone: what checkpoints before 2026-12 recorded

    def rows(self, subset: str) -> pd.DataFrame:
        return self.frame[self.frame["subset"] == subset]

    def indices(self, subset: str) -> np.ndarray:
        """Positions of a subset's rows in ``frame`` (and so in the image cache)."""
        return np.flatnonzero(self.frame["subset"].to_numpy() == subset)

    def all_for_training(self) -> "Split":
        """The same split with every labelled row in training (``--final-fit``): same rows,
        order and fingerprint, so caches of its images and teacher logits still apply."""
        return replace(self, frame=self.frame.assign(subset="train"))

    def label_ids(self) -> np.ndarray:
        lookup = {name: index for index, name in enumerate(self.classes)}
        return self.frame["label"].map(lookup).to_numpy(dtype=np.int64)


def assignment_fingerprint(frame: pd.DataFrame) -> str:
    """The split's identity: its rows and the subset each went to. Two splits of the same
    data made with another seed differ here, so a teacher trained on one is never taken
    for a teacher of the other (it trained on the other's validation and test rows)."""
    return table_fingerprint(frame.sort_values("img_path"), (*TRAIN_COLUMNS, "subset"))


def table_fingerprint(frame: pd.DataFrame, columns) -> str:
    digest = hashlib.sha256()
    for row in frame[list(columns)].itertuples(index=False):
        digest.update("\x1f".join(row).encode())
        digest.update(b"\x1e")
    return digest.hexdigest()[:16]


def make_split(table: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Stratified 8:1:1 split of the labelled rows (train, val, test)."""
    counts = table["label"].value_counts()
    too_small = counts[counts < MIN_IMAGES_PER_CLASS].sort_values()
    if len(too_small):
        label, count = too_small.index[0], int(too_small.iloc[0])
        raise ToolError(f"class {label!r} has {count} image(s); a stratified 8:1:1 split needs "
                        f"at least {MIN_IMAGES_PER_CLASS} per class "
                        f"({len(too_small)} class(es) too small)")
    positions = np.arange(len(table))
    labels = table["label"].to_numpy()
    # scikit-learn is imported when a split is made, not at every start (about a second).
    from sklearn.model_selection import train_test_split
    train_pos, held_out = train_test_split(positions, test_size=0.2, stratify=labels,
                                           random_state=seed)
    val_pos, test_pos = train_test_split(held_out, test_size=0.5, stratify=labels[held_out],
                                         random_state=seed)
    subset = np.empty(len(table), dtype=object)
    subset[train_pos], subset[val_pos], subset[test_pos] = "train", "val", "test"
    return table.assign(subset=subset)


def balanced_subset(table: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """``per_class`` rows of every class, drawn at random (for quick iterations on large
    data); rows keep their order in ``train.csv``."""
    counts = table["label"].value_counts()
    short = counts[counts < per_class]
    if len(short):
        raise ToolError(f"--split-per-class {per_class}: class {short.index[0]!r} has only "
                        f"{int(short.iloc[0])} image(s)")
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(np.flatnonzero(table["label"].to_numpy() == label),
                                        per_class, replace=False)
                             for label in sorted(counts.index)])
    return table.iloc[np.sort(chosen)].reset_index(drop=True)


def load_or_create_split(data_dir: Path, out_dir: Path, seed: int, quiet: bool = False,
                         per_class: int | None = None) -> Split:
    """Reuse ``<out-dir>/split.csv`` if present (checking it still matches the data),
    otherwise split ``train.csv`` (or a balanced subset of ``per_class`` images of each
    class) and save it, so every stage sees the same images."""
    table = read_train_table(data_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    # Stages started at once in one --out-dir (say, with different seeds) take turns: the
    # second reuses the split the first wrote instead of writing its own over it.
    with open(Path(out_dir) / ".split.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _load_or_create_split(table, data_dir, out_dir, seed, quiet, per_class)


def _load_or_create_split(table: pd.DataFrame, data_dir: Path, out_dir: Path, seed: int,
                          quiet: bool, per_class: int | None) -> Split:
    split_json, split_csv = (Path(out_dir) / name for name in SPLIT_FILES)
    data_fingerprint = table_fingerprint(table.sort_values("img_path"), TRAIN_COLUMNS)
    if split_csv.exists():
        saved = read_table(split_csv, (*TRAIN_COLUMNS, "subset"))
        meta = read_json(split_json)
        saved_per_class = meta.get("per_class")
        if per_class is not None and per_class != saved_per_class:
            raise ToolError(f"{split_csv} was made with "
                            + (f"{saved_per_class} images per class" if saved_per_class
                               else "every labelled image")
                            + f", not --split-per-class {per_class}; use a new --out-dir")
        _check_split_matches(saved, table, split_csv, data_dir,
                             subset=saved_per_class is not None)
        if meta.get("seed") != seed and not quiet:
            print(f"note: reusing {split_csv} (made with seed {meta.get('seed')}); "
                  f"--seed {seed} sets initialisation and data order only")
        return Split(saved, list(meta["classes"]), int(meta["seed"]),
                     assignment_fingerprint(saved), meta.get("fingerprint", data_fingerprint))
    if per_class is not None:
        table = balanced_subset(table, per_class, seed)
    frame = make_split(table, seed)
    classes = sorted(frame["label"].unique())
    counts = frame["subset"].value_counts()
    # split.csv last: its presence says the split is complete, so a run killed between the
    # two writes leaves a folder the next run splits afresh instead of one it cannot read.
    write_json(split_json, {"seed": seed, "fingerprint": data_fingerprint, "classes": classes,
                            "counts": {name: int(counts.get(name, 0)) for name in SUBSETS},
                            "per_class": per_class})
    write_csv(split_csv, frame)
    if not quiet:
        print(f"split {len(frame)} images of {len(classes)} classes into "
              + ", ".join(f"{name} {counts.get(name, 0)}" for name in SUBSETS)
              + f" (seed {seed}) -> {split_csv}")
    return Split(frame, classes, seed, assignment_fingerprint(frame), data_fingerprint)


def copy_split(from_dir: Path, to_dir: Path) -> None:
    """Give ``to_dir`` the split of ``from_dir`` unless it has one: each file copied whole
    and in writing order, so a copy cut short is redone rather than half read."""
    if (Path(to_dir) / SPLIT_FILES[-1]).exists():
        return
    for name in SPLIT_FILES:
        atomic_write(Path(to_dir) / name,
                     lambda tmp, source=Path(from_dir) / name: shutil.copyfile(source, tmp))


def _check_split_matches(saved: pd.DataFrame, table: pd.DataFrame, split_csv: Path,
                         data_dir: Path, subset: bool = False) -> None:
    """The data still holds every row of the split, unchanged (and, unless the split is
    of a balanced ``subset``, no row besides)."""
    saved_rows = dict(zip(saved["img_path"], zip(saved["upscale_img_path"], saved["label"])))
    rows = dict(zip(table["img_path"], zip(table["upscale_img_path"], table["label"])))
    added = set() if subset else rows.keys() - saved_rows.keys()
    removed = saved_rows.keys() - rows.keys()
    changed = [path for path in rows.keys() & saved_rows.keys() if rows[path] != saved_rows[path]]
    if added or removed or changed:
        raise ToolError(
            f"{data_dir / 'train.csv'} no longer matches the saved split {split_csv} "
            f"({len(added)} row(s) added, {len(removed)} removed, {len(changed)} changed); "
            f"use a new --out-dir to split again")


# --- decoding and the image cache ------------------------------------------------------

# Far above any image this task has (DACON's HR twins are 256 px), far below what hangs or
# exhausts a machine: a 20000x20000 PNG of a few kilobytes (a decompression bomb) would
# need 1.2 GB decoded.
MAX_IMAGE_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 8192 * 8192


def decode_image(path: Path) -> np.ndarray:
    """Decode one image as an RGB ``uint8`` array (grey, RGBA and palette are converted;
    16-bit grey is scaled to 8 bits). Only regular files of at most MAX_IMAGE_BYTES and
    MAX_IMAGE_PIXELS are read: a FIFO would hang the run, a bomb exhaust its memory."""
    try:
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode):
            raise ToolError(f"not a regular file: {path} (images must be files; a pipe or "
                            f"device would hang the run)")
        if status.st_size > MAX_IMAGE_BYTES:
            raise ToolError(f"image {path} is {status.st_size / 2**20:.0f} MiB, over the "
                            f"{MAX_IMAGE_BYTES // 2**20} MiB this tool reads")
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise _bomb(path, image.width * image.height, f"{image.width}x{image.height}, ")
            image.load()
            return _to_rgb8(image, path)
    except FileNotFoundError:
        raise ToolError(f"image not found: {path}") from None
    except UnidentifiedImageError:
        raise ToolError(f"not an image: {path}") from None
    except Image.DecompressionBombError as error:
        # PIL's own guard, at twice its limit, refuses before the size is known to us.
        count = re.search(r"\((\d+) pixels\)", str(error))
        raise _bomb(path, int(count.group(1)) if count else 0, "") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ToolError(f"unreadable image {path} (truncated or corrupt: {error})") from None


def _bomb(path: Path, pixels: int, size: str) -> ToolError:
    return ToolError(f"image {path} is {size}{pixels:,} pixels, over the {MAX_IMAGE_PIXELS:,} "
                     f"this tool decodes (a decompression bomb?)")


def _to_rgb8(image: Image.Image, path: Path) -> np.ndarray:
    """RGB ``uint8``. PIL's convert("RGB") clips 16-bit grey to white, so 16-bit values are
    scaled (65535 -> 255) first; 32-bit integer and float images have no range to scale
    by and are refused."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise ToolError(f"image {path} holds 32-bit values ({image.mode}); save it with "
                            f"8 or 16 bits per channel")
        grey = np.round(values / 257).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        raise ToolError(f"image {path} holds floating-point pixels (mode F); save it with 8 "
                        f"or 16 bits per channel")
    return np.asarray(image.convert("RGB"))


def _decode_all(paths: list[Path], target: np.ndarray, description: str) -> None:
    """Decode ``paths`` into ``target`` (N, H, W, 3), checking every image has its size."""
    height, width = target.shape[1:3]

    def decode_into(position: int) -> None:
        pixels = decode_image(paths[position])
        if pixels.shape[:2] != (height, width):
            raise ToolError(f"{paths[position]} is {pixels.shape[1]}x{pixels.shape[0]} but "
                            f"{paths[0]} is {width}x{height}; all {description} images must "
                            f"share one size (check_data.py lists them)")
        target[position] = pixels

    # PIL releases the GIL while decoding, so threads decode in parallel.
    pool = ThreadPoolExecutor(min(16, os.cpu_count() or 1))
    try:
        for _ in progress_bar(pool.map(decode_into, range(len(paths))), total=len(paths),
                      desc=f"decoding {description} images", unit="img", leave=False):
            pass
    finally:
        # On the first bad image, stop at once instead of decoding the rest.
        pool.shutdown(wait=True, cancel_futures=True)


def content_fingerprint(paths: list[Path], description: str) -> str:
    """Key of a cache: the image files' bytes, in order. A moved dataset keeps its cache; a
    changed image gets a new one, whatever its size and date. Hashing reads the files but
    decodes nothing: ~3 s on 2 cores for 15,834 DACON-sized JPEG pairs, against ~25 s to decode."""

    def file_digest(path: Path) -> bytes:
        try:
            return hashlib.sha256(path.read_bytes()).digest()
        except FileNotFoundError:
            raise ToolError(f"image not found: {path}") from None
        except OSError as error:
            raise ToolError(f"cannot read image {path}: {error.strerror}") from None

    digest = hashlib.sha256()
    # File reads and hashing release the GIL, so threads overlap them.
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        for file_hash in progress_bar(pool.map(file_digest, paths), total=len(paths),
                              desc=f"checking {description} images", unit="img", leave=False):
            digest.update(file_hash)
    return digest.hexdigest()[:16]


def load_images(data_dir: Path, relative_paths, cache_dir: Path | None, description: str,
                quiet: bool = False, memory_map: bool = False) -> np.ndarray:
    """All images of one resolution as an (N, H, W, 3) ``uint8`` array, decoded once.

    With ``cache_dir`` the array is kept in ``<cache_dir>/<description>-<key>.npy``, keyed
    by the files' contents, and reused by later stages and runs.
    A cache larger than half the available memory is memory-mapped instead of read in, as
    is every cache with ``memory_map`` (processes on one node then share one copy).
    """
    check_paths(data_dir, relative_paths, f"{description} images")
    paths = [Path(data_dir) / relative for relative in relative_paths]
    first = decode_image(paths[0])
    shape = (len(paths), *first.shape)
    if cache_dir is None:
        pixels = np.empty(shape, dtype=np.uint8)
        _decode_all(paths, pixels, description)
        return pixels

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file = cache_dir / f"{description}-{content_fingerprint(paths, description)}.npy"
    if cache_file.exists():
        pixels = _read_cache(cache_file, shape, memory_map, description, quiet)
        if pixels is not None:
            return pixels
    pixels = _write_cache(cache_file, paths, shape, description, quiet)
    if pixels is not None:        # no room on disk: decoded into memory
        return pixels
    return _read_cache(cache_file, shape, memory_map, description, quiet)


def _write_cache(cache_file: Path, paths: list[Path], shape: tuple, description: str,
                 quiet: bool) -> np.ndarray | None:
    """Decode the images into ``cache_file``; where the disk has no room for it, into
    memory instead (returned)."""
    size = math.prod(shape)
    _remove_dead_partials(cache_file)
    # A name of this process's own: processes of several nodes sharing a cache folder may
    # decode at once; each renames a complete file into place.
    partial = cache_file.with_name(f"{cache_file.stem}.{socket.gethostname()}-"
                                   f"{os.getpid()}.partial.npy")
    pixels = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
    try:
        # The map is sparse: without its blocks reserved, a disk or quota that fills while
        # decoding kills the process with SIGBUS and no word.
        _reserve(partial)
    except OSError as error:
        del pixels
        partial.unlink(missing_ok=True)
        if error.errno not in DISK_FULL:
            raise
        if not quiet:
            print(f"note: no room for the {description} cache {cache_file} (needs "
                  f"{size / 2**30:.2f} GiB; {shutil.disk_usage(cache_file.parent).free / 2**30:.2f}"
                  f" GiB free, or a quota is full): decoding into memory only")
        pixels = np.empty(shape, dtype=np.uint8)
        _decode_all(paths, pixels, description)
        return pixels
    try:
        _decode_all(paths, pixels, description)
        pixels.flush()
        with open(partial, "rb+") as written:
            os.fsync(written.fileno())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        del pixels                # unmapped before the rename or the removal
    os.replace(partial, cache_file)
    if not quiet:
        print(f"cached {len(paths)} {description} images "
              f"({size / 2**20:.0f} MiB) -> {cache_file}")
    return None


def _reserve(path: Path) -> None:
    """Allocate every block of ``path`` now (ENOSPC or EDQUOT here, not SIGBUS later)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _remove_dead_partials(cache_file: Path) -> None:
    """Remove half-written caches of this host's processes that no longer run (killed
    while decoding): they hold disk space and are never read."""
    host = socket.gethostname()
    for partial in cache_file.parent.glob(f"{cache_file.stem}.{host}-*.partial.npy"):
        pid = partial.name[:-len(".partial.npy")].rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_runs(int(pid)):
            partial.unlink(missing_ok=True)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_cache(cache_file: Path, shape: tuple, memory_map: bool, description: str,
                quiet: bool) -> np.ndarray | None:
    """The cached images; None (the file removed, to be rebuilt) when the file is not a
    complete cache of ``shape``: a disk error or an edit can leave it so."""
    size = math.prod(shape)
    available = _available_memory()
    mapped = memory_map or (available is not None and size > available / 2)
    try:
        pixels = np.load(cache_file, mmap_mode="r" if mapped else None)
        if pixels.shape != shape or pixels.dtype != np.uint8:
            raise ValueError(f"holds {pixels.dtype} {pixels.shape}, not uint8 {shape}")
    except (OSError, ValueError, EOFError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
        print(f"note: the {description} cache {cache_file} is damaged ({reason}): "
              f"removed, decoding the images again")
        cache_file.unlink(missing_ok=True)
        return None
    if mapped and not memory_map and not quiet:
        print(f"note: the {description} cache ({size / 2**30:.1f} GiB) is more than half "
              f"the available memory ({available / 2**30:.1f} GiB): reading it from disk "
              f"(memory-mapped); epochs will be slower")
    return pixels


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class ImageSet:
    """Decoded images of the split, per resolution, aligned with ``split.frame``."""

    split: Split
    pixels: dict[str, np.ndarray]   # "lr"/"hr" -> (N, H, W, 3) uint8
    labels: np.ndarray              # (N,) class ids

    @classmethod
    def load(cls, split: Split, data_dir: Path, resolutions, cache_dir: Path | None,
             quiet: bool = False, memory_map: bool = False) -> "ImageSet":
        pixels = {}
        for resolution in resolutions:
            column = RESOLUTION_COLUMN[resolution]
            pixels[resolution] = load_images(data_dir, split.frame[column].tolist(), cache_dir,
                                             resolution.upper(), quiet=quiet,
                                             memory_map=memory_map)
        if "lr" in pixels and "hr" in pixels:
            check_pair_sizes(pixels["lr"].shape[1:3], pixels["hr"].shape[1:3])
        return cls(split, pixels, split.label_ids())

    def image_size(self, resolution: str) -> int:
        return int(self.pixels[resolution].shape[1])


def pair_scale(lr_size, hr_size) -> int | None:
    """The whole factor (> 1) by which the HR size scales the LR size, or None if none does."""
    (lr_h, lr_w), (hr_h, hr_w) = lr_size, hr_size
    if hr_h % lr_h or hr_w % lr_w or hr_h // lr_h != hr_w // lr_w or hr_h <= lr_h:
        return None
    return hr_h // lr_h


def check_pair_sizes(lr_size, hr_size) -> None:
    """The HR twin must be the LR image scaled by one whole factor (4 on DACON)."""
    (lr_h, lr_w), (hr_h, hr_w) = lr_size, hr_size
    if pair_scale(lr_size, hr_size) is None:
        raise ToolError(f"HR images are {hr_w}x{hr_h} and LR images {lr_w}x{lr_h}: the HR twin "
                        f"must be the LR image scaled up by one whole factor (4 on DACON); "
                        f"are upscale_img_path and img_path swapped or from other samples?")


# --- batches ---------------------------------------------------------------------------

def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """One generator per (seed, epoch): data order and augmentation of an epoch do not
    depend on what ran before it, so a resumed run repeats an interrupted one exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def batch_indices(indices: np.ndarray, batch_size: int, generator: torch.Generator | None,
                  drop_last: bool = False) -> list[np.ndarray]:
    """Split ``indices`` into batches, shuffled when a generator is given."""
    order = indices
    if generator is not None:
        order = indices[torch.randperm(len(indices), generator=generator).numpy()]
    stop = len(order) - len(order) % batch_size if drop_last and len(order) > batch_size \
        else len(order)
    return [order[start:start + batch_size] for start in range(0, stop, batch_size)]


def gather_batch(images: ImageSet, index: np.ndarray, resolutions, pin: bool) -> dict:
    """Host tensors for one batch: ``uint8`` images (N, 3, H, W) per resolution, labels, and
    the rows' positions in the split (``index``)."""
    batch = {}
    for resolution in resolutions:
        pixels = torch.from_numpy(np.ascontiguousarray(images.pixels[resolution][index]))
        pixels = pixels.permute(0, 3, 1, 2)
        batch[resolution] = pixels.pin_memory() if pin else pixels
    labels = torch.from_numpy(images.labels[index])
    batch["labels"] = labels.pin_memory() if pin else labels
    batch["index"] = torch.from_numpy(np.asarray(index, dtype=np.int64))
    return batch


def iterate_batches(images: ImageSet, batches: list[np.ndarray], resolutions, device):
    """Yield batches on ``device``; the next batch is gathered while this one is used."""
    pin = device.type == "cuda"
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(gather_batch, images, batches[0], resolutions, pin) \
            if batches else None
        for position in range(len(batches)):
            batch = pending.result()
            if position + 1 < len(batches):
                pending = pool.submit(gather_batch, images, batches[position + 1],
                                      resolutions, pin)
            yield {key: value.to(device, non_blocking=True) for key, value in batch.items()}


# --- paired views ----------------------------------------------------------------------

@dataclass
class ViewParams:
    """One random crop and flip per sample. Boxes are whole cells of a ``grid`` x ``grid``
    lattice laid over the image (the smallest image of the batch: the LR one when both
    are there), so at every resolution, a whole multiple of the grid, the box falls on
    pixel boundaries and cuts exactly the same region out of the LR image and its HR twin."""

    boxes: torch.Tensor    # (B, 4) int64: top, left, height, width in grid cells
    flip: torch.Tensor     # (B,) True where the view is mirrored left-right
    grid: int


def sample_view_params(batch_size: int, generator: torch.Generator, hflip: bool,
                       crop_scale: float, grid: int, crop_ratio=(3 / 4, 4 / 3)) -> ViewParams:
    """RandomResizedCrop-style boxes: area fraction in [crop_scale, 1], aspect ratio in
    ``crop_ratio`` (log-uniform), position uniform inside the image."""
    uniform = lambda *shape: torch.rand(shape, generator=generator)  # noqa: E731
    area = crop_scale + (1 - crop_scale) * uniform(batch_size)
    log_low, log_high = math.log(crop_ratio[0]), math.log(crop_ratio[1])
    ratio = torch.exp(log_low + (log_high - log_low) * uniform(batch_size))
    width = torch.sqrt(area * ratio).mul(grid).round().clamp(1, grid).long()
    height = torch.sqrt(area / ratio).mul(grid).round().clamp(1, grid).long()
    top = (uniform(batch_size) * (grid - height + 1)).long().clamp(max=grid - 1)
    left = (uniform(batch_size) * (grid - width + 1)).long().clamp(max=grid - 1)
    flip = uniform(batch_size) < 0.5 if hflip else torch.zeros(batch_size, dtype=torch.bool)
    boxes = torch.stack([top, left, height, width], 1)
    if crop_scale >= 1:
        # The whole image: an aspect ratio other than 1 would otherwise still cut a strip
        # off one side. (The draws above are kept, so the flips do not depend on this.)
        boxes = torch.tensor([0, 0, grid, grid]).expand(batch_size, 4).clone()
    return ViewParams(boxes, flip, grid)


def _resize_into(images: torch.Tensor, out: torch.Tensor) -> None:
    """Bilinear resize into ``out``, antialiased when shrinking (as torchvision's
    ``Resize``). This is ``F.interpolate``'s own kernel, called with ``out=`` so that every
    crop lands straight in its row of the batch, with no per-crop copy and no ``cat``."""
    if images.shape[-2:] == out.shape[-2:]:
        out.copy_(images)
    else:
        torch.ops.aten._upsample_bilinear2d_aa.out(images, list(out.shape[-2:]), False,
                                                   None, None, out=out)


_row_pools: dict[int, ThreadPoolExecutor] = {}
# A forked child (a DataLoader worker, say) inherits the pools but not their threads.
os.register_at_fork(after_in_child=_row_pools.clear)


def _row_pool(lanes: int) -> ThreadPoolExecutor:
    if lanes not in _row_pools:
        _row_pools[lanes] = ThreadPoolExecutor(lanes, thread_name_prefix="view-rows")
    return _row_pools[lanes]


def make_view(pixels: torch.Tensor, size: int, params: ViewParams | None) -> torch.Tensor:
    """Crop, flip and resize a ``uint8`` batch (B, 3, H, W) to ``size`` and normalise it.

    ``params=None`` gives the evaluation view: the whole image, resized. On the CPU the
    resize runs on ``uint8`` (torch's vectorised fixed-point path, rounding to whole grey
    levels like PIL); on an accelerator on floats.
    """
    if pixels.device.type != "cpu" and pixels.dtype == torch.uint8:
        pixels = pixels.float()
    # Contiguous rows: the normalisation below runs several times faster on them than on
    # the channels-last layout the kernel would otherwise pick.
    resized = torch.empty((len(pixels), pixels.shape[1], size, size), dtype=pixels.dtype,
                          device=pixels.device)
    if params is None:
        _resize_into(pixels, resized)
    else:
        side = pixels.shape[-1]
        if side % params.grid or pixels.shape[-2] != side:
            raise ValueError(f"a {side}px image is not a whole multiple of the "
                             f"{params.grid}-cell crop grid")
        boxes = (params.boxes * (side // params.grid)).tolist()
        flips = params.flip.tolist()

        def resize_rows(rows: range) -> None:
            for row in rows:
                top, left, height, width = boxes[row]
                crop = pixels[row:row + 1, :, top:top + height, left:left + width]
                # Mirroring the crop before resizing it equals mirroring the view (bilinear
                # weights are symmetric) and copies far fewer pixels when upsampling.
                _resize_into(crop.flip(-1) if flips[row] else crop, resized[row:row + 1])

        lanes = torch.get_num_threads() if pixels.device.type == "cpu" else 1
        if lanes > 1:
            # One 224 px resize is too small for torch to spread over its threads; rows on
            # threads of our own are (torch releases the GIL in its kernels).
            list(_row_pool(lanes).map(resize_rows, [range(lane, len(boxes), lanes)
                                                    for lane in range(lanes)]))
        else:
            resize_rows(range(len(boxes)))
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    # (x / 255 - mean) / std, in place on the one float copy (measured fastest on the CPU).
    return resized.float().sub_(255 * mean).mul_(1 / (255 * std))


def make_views(batch: dict, sizes: dict[str, int], params: ViewParams | None) -> dict:
    """Views of every resolution in ``sizes`` (``{"lr": 224, "hr": 224}``) from one set of
    crop/flip parameters, so the views stay paired."""
    return {resolution: make_view(batch[resolution], size, params)
            for resolution, size in sizes.items()}


def view_grid(batch: dict, sizes: dict[str, int]) -> int:
    """The crop grid of a batch: the side of its smallest image."""
    return min(batch[resolution].shape[-1] for resolution in sizes)
