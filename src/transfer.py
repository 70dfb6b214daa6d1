"""Transfer sets: images without labels that a teacher labels for the KD student.

``--unlabelled PATH`` names them: a folder of images, or a CSV with ``upscale_img_path``
(HR images) and/or ``img_path`` (LR images), paths relative to the CSV's folder (DACON's
``test.csv`` is such a CSV: LR images only). A folder's images are HR or LR by their size.
An HR image without an LR twin gets one by ``--degradation`` (the one that reproduces the
labelled pairs best, by default). HR teachers need the HR images; an LR pseudo-teacher
(``--pseudo-teacher``) labels LR images.

The unlabelled rows follow the split's labelled rows in one ``ImageSet`` (``subset``
``unlabelled``, label -1), their pixels kept in their own arrays (``StackedRows``), so the
trainer, the views, the caches and the teachers treat both alike. Each training batch of
labelled rows takes ``--unlabelled-ratio`` times as many unlabelled rows, in turn from a
shuffled pass over the unlabelled set that continues across epochs (``unlabelled_batches``).
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cli import ToolError
from .data import ImageSet, RESOLUTION_COLUMN, Split, content_fingerprint, decode_image, \
    load_images, normalize_path, read_table
from .lr_render import DEGRADATIONS, degradation_errors, degradation_warning, degrade, \
    describe_errors

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
UNLABELLED = "unlabelled"
# Labelled pairs on which --degradation auto is chosen (a few seconds of PIL resizes).
DEGRADATION_SAMPLE = 256


def add_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    """The KD student's transfer-set flags."""
    group = parser.add_argument_group(
        "transfer set", "Images without labels that the teacher labels for the student.")
    group.add_argument("--unlabelled", type=Path, default=None, metavar="PATH",
                       help="a transfer set: images without labels that the teacher labels "
                            "for the student (distillation terms only, no cross-entropy): a "
                            "folder of HR (or, with --pseudo-teacher, LR) images, told apart "
                            "by size, or a CSV with upscale_img_path and/or img_path, "
                            "relative to its folder (DACON's test.csv works with "
                            "--pseudo-teacher). HR images without an LR twin get one by "
                            "--degradation; images equal to a labelled image of the split "
                            "are dropped")
    group.add_argument("--unlabelled-ratio", type=float, default=1.0, metavar="R",
                       help="unlabelled images per labelled image in each batch. One epoch "
                            "stays one pass over the labelled training images; each batch "
                            "of B labelled images takes R*B unlabelled ones, in turn from a "
                            "shuffled pass over the unlabelled set that goes on across epochs "
                            "(so an epoch costs about 1+R times a labelled-only one)")
    group.add_argument("--degradation", choices=("auto", *DEGRADATIONS), default="auto",
                       help="how an unlabelled HR image without an LR twin gets one: box "
                            "(block mean), or PIL's nearest, bilinear, bicubic or lanczos "
                            "resize; auto: the one that best reproduces the labelled pairs' "
                            "LR images (check_data.py lists each one's error)")
    group.add_argument("--pseudo-teacher", type=Path, nargs="+", default=None, metavar="CKPT",
                       help="LR models (a student of an earlier round; several are averaged) "
                            "as teachers instead of the HR teacher: they label the very LR "
                            "view the student sees, so --unlabelled may hold LR images "
                            "without HR twins (a Noisy Student round: the new student gets "
                            "the augmentation and mixing of this recipe)")


@dataclass
class UnlabelledSource:
    """Where the unlabelled images are: ``base`` and, per resolution present, the paths
    relative to it (``{"hr": [...], "lr": [...]}``); a resolution may be missing."""

    path: Path
    base: Path
    paths: dict

    @cached_property
    def fingerprint(self) -> str:
        """The images' bytes, in order, at every resolution given: changed files under the
        same names are another transfer set (for the teacher-logit cache and --resume).
        Hashed once: the logit cache and the record both ask for it."""
        files = [self.base / relative for resolution in sorted(self.paths)
                 for relative in self.paths[resolution]]
        return content_fingerprint(files, "unlabelled")


def read_unlabelled(path: Path, lr_size: int, hr_size: int | None,
                    needs_hr: bool = False) -> UnlabelledSource:
    """The unlabelled images named by ``--unlabelled`` (a folder or a CSV). A folder's images
    are HR when they have the labelled HR size, LR when they have the LR size. ``needs_hr``
    (an HR teacher labels them): LR images alone are refused."""
    source = _unlabelled_source(Path(path), lr_size, hr_size)
    if needs_hr and "hr" not in source.paths:
        raise ToolError(f"--unlabelled {path}: LR images only, but an HR teacher needs the HR "
                        f"twin of every image it labels; give HR images, or label LR images "
                        f"with --pseudo-teacher")
    return source


def _unlabelled_source(path: Path, lr_size: int, hr_size: int | None) -> UnlabelledSource:
    if path.is_dir():
        files = sorted(item.name for item in path.iterdir()
                       if item.is_file() and item.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ToolError(f"--unlabelled {path}: no images in the folder (looked for "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))})")
        side = decode_image(path / files[0]).shape[:2]
        sizes = {"lr": lr_size, "hr": hr_size}
        resolution = next((key for key, size in sizes.items() if size and side == (size, size)),
                          None)
        if resolution is None:
            known = " or ".join(f"{size}x{size} ({key.upper()})" for key, size in sizes.items()
                                if size)
            raise ToolError(f"--unlabelled {path}: {files[0]} is {side[1]}x{side[0]}, neither "
                            f"the labelled images' {known} size")
        return UnlabelledSource(path, path, {resolution: files})
    if not path.is_file():
        raise ToolError(f"--unlabelled {path}: no such folder or CSV file")
    try:
        columns = list(pd.read_csv(path, nrows=0).columns.str.strip())
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        columns = []        # not a CSV at all: said below, as for one without the columns
    present = [column for column in ("upscale_img_path", "img_path") if column in columns]
    if not present:
        raise ToolError(f"--unlabelled {path}: a CSV needs an upscale_img_path (HR) or img_path "
                        f"(LR) column (found: {', '.join(columns) or 'none'})")
    table = read_table(path, present)
    return UnlabelledSource(path, path.parent, {
        resolution: table[column].map(normalize_path).tolist()
        for resolution, column in RESOLUTION_COLUMN.items() if column in present})


def labelled_sizes(split: Split, data_dir: Path) -> tuple[int, int]:
    """The sides of the labelled LR and HR images (of the split's first row), to tell what
    an unlabelled folder holds before anything is decoded in bulk."""
    row = split.frame.iloc[0]
    return tuple(int(decode_image(Path(data_dir) / row[column]).shape[0])
                 for column in ("img_path", "upscale_img_path"))


def choose_degradation(images: ImageSet, scale: int, wanted: str) -> tuple[str, dict]:
    """``wanted``, or with ``auto`` the degradation that best reproduces the labelled training
    pairs' LR images from their HR twins; returns it and every degradation's mean error.
    Prints which it uses, and a loud warning when it is far from the data."""
    index = images.split.indices("train")[:DEGRADATION_SAMPLE]
    errors = degradation_errors(images.pixels["lr"][index], images.pixels["hr"][index], scale)
    chosen = next(iter(errors)) if wanted == "auto" else wanted
    print(f"degradation for unlabelled HR images: {chosen} "
          f"({'chosen: ' if wanted == 'auto' else ''}mean error against {len(index)} labelled "
          f"pairs, grey levels: {describe_errors(errors)})")
    warning = degradation_warning(errors, chosen)
    if warning:
        print(f"WARNING: {warning}: LR images made from unlabelled HR images will not look "
              f"like the images the student is tested on")
    return chosen, errors


def primary_resolution(source: UnlabelledSource) -> str:
    """The resolution whose decoded pixels identify an unlabelled image: HR when given."""
    return "hr" if "hr" in source.paths else "lr"


def equal_to_labelled(unlabelled, labelled) -> np.ndarray:
    """Per unlabelled image (an array of rows, or a list with error strings for unreadable
    files), whether its pixels equal those of any of the ``labelled`` images."""
    def digest(pixels):
        return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).digest()
    known = {digest(pixels) for pixels in labelled if not isinstance(pixels, str)}
    return np.array([not isinstance(pixels, str) and digest(pixels) in known
                     for pixels in unlabelled], dtype=bool)


def add_unlabelled(images: ImageSet, source: UnlabelledSource, resolutions, degradation: str,
                   cache_dir: Path | None, quiet: bool = False) -> tuple[ImageSet, dict]:
    """``images`` with the unlabelled rows after the labelled ones: their pixels at every
    resolution in ``resolutions`` (LR made by ``degradation`` where only HR is given),
    without any image whose pixels equal a labelled image of the split (dropped, counted;
    compared at ``primary_resolution``, which ``images`` must hold, so that every load of
    the same source keeps the same rows). Returns the new ImageSet and what was done, for
    config.json."""
    resolutions = sorted(resolutions)
    primary = primary_resolution(source)
    scale = images.image_size("hr") // images.image_size("lr") \
        if "hr" in images.pixels and "lr" in images.pixels else None
    pixels = {resolution: load_images(source.base, source.paths[resolution], cache_dir,
                                      f"UNLABELLED-{resolution.upper()}", quiet=quiet)
              for resolution in source.paths if resolution in resolutions
              or resolution == primary}
    record = {"source": str(source.path), "given": sorted(source.paths), "degradation": None,
              "fingerprint": source.fingerprint}
    for resolution, array in pixels.items():
        side = images.image_size(resolution) if resolution in images.pixels else None
        if side is not None and array.shape[1:3] != (side, side):
            raise ToolError(f"--unlabelled {source.path}: {resolution.upper()} images are "
                            f"{array.shape[2]}x{array.shape[1]} but the labelled ones "
                            f"{side}x{side}")
    if "lr" in resolutions and "lr" not in pixels:
        if scale is None:
            raise ToolError("--unlabelled: HR images only, and no labelled HR twins to measure "
                            "the degradation on")
        chosen, errors = choose_degradation(images, scale, degradation)
        pixels["lr"] = degrade(pixels["hr"], scale, chosen)
        record.update(degradation=chosen, degradation_errors=errors)

    count = len(pixels[primary])
    duplicate = equal_to_labelled(pixels[primary], images.pixels[primary])
    keep = np.flatnonzero(~duplicate)
    if duplicate.any():
        print(f"unlabelled: dropped {int(duplicate.sum())} of {count} image(s) whose pixels "
              f"equal a labelled image of the split (train, validation or test)")
    if not len(keep):
        raise ToolError(f"--unlabelled {source.path}: every image equals a labelled one")
    record.update(images=count, dropped_duplicates=int(duplicate.sum()), used=len(keep))

    name = "upscale_img_path" if "hr" in source.paths else "img_path"
    rows = pd.DataFrame({column: "" for column in images.split.frame.columns},
                        index=range(len(keep)))
    rows[name] = [source.paths["hr" if "hr" in source.paths else "lr"][row] for row in keep]
    rows["subset"] = UNLABELLED
    frame = pd.concat([images.split.frame, rows], ignore_index=True)
    split = replace(images.split, frame=frame)
    stacked = {resolution: StackedRows([images.pixels[resolution],
                                        pixels[resolution][keep]])
               for resolution in resolutions}
    labels = np.concatenate([images.labels, np.full(len(keep), -1, dtype=np.int64)])
    return ImageSet(split, stacked, labels), record


class StackedRows:
    """Row-indexable like one (sum of N_i, ...) array, over several arrays left as they are
    (a labelled cache may be memory-mapped; copying it to append rows would double it)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(part) for part in parts])
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index)
        rows = np.empty((len(index), *self.shape[1:]), dtype=self.dtype)
        for part, start, stop in zip(self.parts, self.starts[:-1], self.starts[1:]):
            inside = (index >= start) & (index < stop)
            if inside.any():
                rows[inside] = part[index[inside] - start]
        return rows


def sweep_order(count: int, seed: int, sweep: int) -> np.ndarray:
    """The order of the unlabelled rows in pass ``sweep``: depends on (seed, sweep) alone."""
    key = hashlib.sha256(f"unlabelled/{seed}/{sweep}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    return torch.randperm(count, generator=generator).numpy()


def unlabelled_batches(positions: np.ndarray, batches: list[np.ndarray], ratio: float,
                       seed: int, epoch: int) -> list[np.ndarray]:
    """For each labelled batch of epoch ``epoch``, its ``round(ratio * len(batch))``
    unlabelled rows (positions in the ImageSet). Epoch after epoch they are taken in turn
    from shuffled passes over ``positions``, each row once a pass; where an epoch starts in
    that stream depends on the epoch alone, so a resumed run takes the same rows."""
    counts = [round(ratio * len(batch)) for batch in batches]
    per_epoch = sum(counts)
    start = (epoch - 1) * per_epoch
    stream, first_sweep = [], start // len(positions)
    needed = start + per_epoch - first_sweep * len(positions)
    sweep = first_sweep
    while len(stream) * len(positions) < needed:
        stream.append(positions[sweep_order(len(positions), seed, sweep)])
        sweep += 1
    order = np.concatenate(stream)[start - first_sweep * len(positions):][:per_epoch]
    bounds = np.cumsum([0] + counts)
    return [order[low:high] for low, high in zip(bounds[:-1], bounds[1:])]
