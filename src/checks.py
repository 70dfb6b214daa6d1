"""``check_data.py``'s inspection of a dataset: counts, sizes and every problem found.

Structural problems (no folder, no CSV, missing columns, duplicate paths) stop at once
with a ToolError; per-file and per-label problems are all collected and reported.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cli import ToolError, progress_bar
from .data import MIN_IMAGES_PER_CLASS, decode_image, pair_scale, paths_outside, \
    read_test_table, read_train_table
from .lr_render import LR_RENDER_TOLERANCE, box_filter_differences, degradation_errors, \
    degradation_warning, describe_errors
from .transfer import equal_to_labelled, primary_resolution, read_unlabelled


@dataclass
class Report:
    rows: int = 0
    test_rows: int = 0
    class_counts: Counter = field(default_factory=Counter)
    sizes: dict = field(default_factory=lambda: {"LR": Counter(), "HR": Counter(),
                                                 "test": Counter()})
    problems: dict = field(default_factory=dict)   # kind -> list of messages
    # Mean grey-level difference of each LR image from its HR twin box-filtered to LR size.
    pair_differences: list = field(default_factory=list)
    # Per degradation (lr_render.DEGRADATIONS), its mean error on a sample of the pairs.
    degradation_errors: dict = field(default_factory=dict)
    degradation_pairs: int = 0
    # --unlabelled: how many images, of which resolution, and how many equal labelled ones.
    unlabelled: dict | None = None

    def add(self, kind: str, message: str) -> None:
        self.problems.setdefault(kind, []).append(message)

    @property
    def problem_count(self) -> int:
        return sum(len(messages) for messages in self.problems.values())


def _decode_many(paths: list[Path], description: str) -> list:
    """Decode every path; each result is the array, or the error message for that file."""

    def decode(path: Path):
        try:
            return decode_image(path)
        except ToolError as error:
            return str(error)

    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        return list(progress_bar(pool.map(decode, paths), total=len(paths), desc=description,
                         unit="img", leave=False))


def _size(pixels: np.ndarray) -> tuple[int, int]:
    return int(pixels.shape[1]), int(pixels.shape[0])


# Labelled pairs on which each degradation is measured (PIL resizes: a few seconds).
DEGRADATION_PAIRS = 512


def _check_unlabelled(report: Report, path: Path, lr_images: list, hr_images: list) -> None:
    """What --unlabelled PATH holds, as the KD stage will read it: every file decoded, sizes
    against the labelled images', and how many equal a labelled image (the stage drops
    those). A folder or CSV it cannot read at all stops with a ToolError."""
    sizes = {kind: report.sizes[kind].most_common(1)[0][0][0]
             for kind in ("LR", "HR") if report.sizes[kind]}
    source = read_unlabelled(path, sizes.get("LR"), sizes.get("HR"))
    labelled = {"lr": lr_images, "hr": hr_images}
    info = {"path": str(path), "images": 0, "resolutions": sorted(source.paths),
            "duplicates": 0}
    for resolution, relative_paths in source.paths.items():
        decoded = _decode_many([source.base / item for item in relative_paths],
                               f"unlabelled {resolution.upper()} images")
        info["images"] = len(decoded)
        side = sizes.get(resolution.upper())
        for relative, pixels in zip(relative_paths, decoded):
            if isinstance(pixels, str):
                report.add("unlabelled", pixels)
            elif side is not None and pixels.shape[:2] != (side, side):
                report.add("unlabelled", f"{source.base / relative} is {pixels.shape[1]}x"
                                         f"{pixels.shape[0]}, but labelled "
                                         f"{resolution.upper()} images are {side}x{side}")
        if resolution == primary_resolution(source):
            info["duplicates"] = int(equal_to_labelled(decoded, labelled[resolution]).sum())
    report.unlabelled = info


def check_dataset(data_dir: Path, pair_tolerance: float = 16.0,
                  unlabelled: Path | None = None) -> Report:
    data_dir = Path(data_dir)
    table = read_train_table(data_dir)
    report = Report(rows=len(table), class_counts=Counter(table["label"]))
    for label, count in sorted(report.class_counts.items()):
        if count < MIN_IMAGES_PER_CLASS:
            report.add("labels", f"class {label!r} has {count} image(s); the stratified 8:1:1 "
                                 f"split needs at least {MIN_IMAGES_PER_CLASS}")

    for column in ("img_path", "upscale_img_path"):
        for path in paths_outside(data_dir, table[column]):
            report.add("paths", f"{path} leads outside {data_dir} (absolute, '..' or a "
                                f"symbolic link): training warns, --strict-paths refuses")
    lr_images = _decode_many([data_dir / p for p in table["img_path"]], "LR images")
    hr_images = _decode_many([data_dir / p for p in table["upscale_img_path"]], "HR images")
    for kind, images in (("LR", lr_images), ("HR", hr_images)):
        for pixels in images:
            if isinstance(pixels, str):
                report.add("files", pixels)
            else:
                report.sizes[kind][_size(pixels)] += 1
    for kind in ("LR", "HR"):
        if len(report.sizes[kind]) > 1:
            common = report.sizes[kind].most_common(1)[0][0]
            report.add("sizes", f"{kind} images come in {len(report.sizes[kind])} sizes "
                                f"(most are {common[0]}x{common[1]}); training needs one size")

    sample = []         # well-formed pairs of one scale, for the degradation errors
    for lr_path, hr_path, lr, hr in zip(table["img_path"], table["upscale_img_path"],
                                        lr_images, hr_images):
        if isinstance(lr, str) or isinstance(hr, str):
            continue
        difference, problem = _pair_problem(lr, hr, pair_tolerance)
        if difference is not None:
            report.pair_differences.append(difference)
            if not problem and len(sample) < DEGRADATION_PAIRS and (
                    not sample or sample[0][0].shape == lr.shape
                    and sample[0][1].shape == hr.shape):
                sample.append((lr, hr))
        if problem:
            report.add("pairs", f"{lr_path} / {hr_path}: {problem}")
    if sample:
        lr_sample, hr_sample = (np.stack(side) for side in zip(*sample))
        scale = pair_scale(lr_sample.shape[1:3], hr_sample.shape[1:3])
        report.degradation_errors = degradation_errors(lr_sample, hr_sample, scale)
        report.degradation_pairs = len(sample)
    if unlabelled is not None:
        _check_unlabelled(report, unlabelled, lr_images, hr_images)

    try:
        test_table = read_test_table(data_dir)
    except ToolError as error:
        report.add("test", str(error))
    else:
        report.test_rows = len(test_table)
        duplicated = test_table["ID"][test_table["ID"].duplicated()]
        if len(duplicated):
            report.add("test", f"test.csv: {len(duplicated)} duplicate ID(s), "
                               f"first {duplicated.iloc[0]}")
        for pixels in _decode_many([data_dir / p for p in test_table["img_path"]], "test images"):
            if isinstance(pixels, str):
                report.add("files", pixels)
            else:
                report.sizes["test"][_size(pixels)] += 1
        if report.sizes["LR"] and report.sizes["test"] \
                and set(report.sizes["test"]) - set(report.sizes["LR"]):
            report.add("sizes", f"test images are {_sizes_text(report.sizes['test'])} but LR "
                                f"training images {_sizes_text(report.sizes['LR'])}")
    return report


def _pair_problem(lr: np.ndarray, hr: np.ndarray,
                  tolerance: float) -> tuple[float | None, str | None]:
    """The mean difference of an LR image from its box-filtered HR twin (None when the sizes
    do not allow one), and why the two do not look like one sample (None if they do)."""
    (lr_h, lr_w), (hr_h, hr_w) = lr.shape[:2], hr.shape[:2]
    scale = pair_scale((lr_h, lr_w), (hr_h, hr_w))
    if scale is None:
        return None, f"HR {hr_w}x{hr_h} is not the LR {lr_w}x{lr_h} scaled by one whole factor"
    difference = float(box_filter_differences(lr[None], hr[None], scale)[0])
    if difference > tolerance:
        return difference, (f"the HR image shrunk to LR size differs by {difference:.1f} grey "
                            f"levels on average (> {tolerance:g}): probably not the same sample")
    return difference, None


def _sizes_text(sizes: Counter) -> str:
    return ", ".join(f"{w}x{h}" for (w, h) in sorted(sizes))


def print_report(report: Report, limit: int = 10) -> None:
    print(f"train.csv: {report.rows} rows, {len(report.class_counts)} classes; "
          f"test.csv: {report.test_rows} rows")
    counts = sorted(report.class_counts.items(), key=lambda item: (-item[1], item[0]))
    width = max((len(label) for label, _ in counts), default=5)
    print("images per class:")
    for label, count in counts:
        print(f"  {label:<{width}}  {count}")
    for kind in ("LR", "HR", "test"):
        if report.sizes[kind]:
            sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in report.sizes[kind].most_common())
            print(f"{kind} image sizes: {sizes}")
    if report.pair_differences:
        difference = float(np.mean(report.pair_differences))
        verdict = "can" if difference <= LR_RENDER_TOLERANCE else "cannot"
        # Whether the data allow --lr-from-hr, not advice to use it: on Fashion-MNIST it
        # cost 1.14 points against the consistent recipe (docs/results.md).
        print(f"LR images vs their HR twins box-filtered to LR size: {difference:.2f} grey "
              f"levels apart on average (--lr-from-hr {verdict} be used: it needs at most "
              f"{LR_RENDER_TOLERANCE:g}; measured worse than without it, docs/results.md)")
    if report.degradation_errors:
        best = next(iter(report.degradation_errors))
        print(f"LR images vs their HR twins degraded each way, mean grey-level error on "
              f"{report.degradation_pairs} pairs: {describe_errors(report.degradation_errors)}"
              f"; best: {best} (what "
              f"train_kd_student.py --degradation auto uses for unlabelled HR images)")
        warning = degradation_warning(report.degradation_errors, best)
        if warning:
            print(f"WARNING: {warning}")
    if report.unlabelled is not None:
        info = report.unlabelled
        print(f"unlabelled ({info['path']}): {info['images']} images, "
              f"{' + '.join(kind.upper() for kind in info['resolutions'])}"
              + (f"; {info['duplicates']} equal a labelled image (train_kd_student.py drops "
                 f"them)" if info["duplicates"] else ""))
    if not report.problems:
        print("no problems found")
        return
    print(f"{report.problem_count} problem(s):")
    for kind, messages in report.problems.items():
        print(f"  {kind}: {len(messages)}")
        for message in messages[:limit]:
            print(f"    {message}")
        if len(messages) > limit:
            print(f"    ... and {len(messages) - limit} more")
