"""Figures: learning curves, the test comparison, per-class F1, confusion matrices, sample
predictions and t-SNE maps. Every function draws from numbers it is given and writes one
PNG atomically; none computes a metric."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
# Class names and run names are data, not TeX: "$x$" or a lone "$" in a label must show as
# written, not stop the figures (after the results were written) with a mathtext error.
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .cli import atomic_write  # noqa: E402


def _save(figure, path: Path, tight: bool = True) -> Path:
    if tight:
        figure.tight_layout()
    atomic_write(Path(path), lambda tmp: figure.savefig(tmp, dpi=120, format="png",
                                                        bbox_inches="tight"))
    plt.close(figure)
    return Path(path)


def plot_curves(histories: dict[str, pd.DataFrame], column: str, ylabel: str,
                path: Path) -> Path:
    """One line per run: ``column`` of each history against the epoch."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, history in histories.items():
        axes.plot(history["epoch"], history[column], marker="o", markersize=3, label=name)
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.set_title(f"{ylabel} per epoch")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_comparison(metrics: dict[str, dict], path: Path) -> Path:
    """Grouped bars: test accuracy and macro-F1 (in %) of each model, values printed."""
    names = list(metrics)
    figure, axes = plt.subplots(figsize=(7, 4))
    width = 0.38
    for offset, (key, label) in zip((-width / 2, width / 2),
                                    (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))):
        values = [100 * metrics[name][key] for name in names]
        bars = axes.bar([i + offset for i in range(len(names))], values, width, label=label)
        axes.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    axes.set_xticks(range(len(names)), names)
    axes.set_ylabel("test score (%)")
    axes.set_ylim(0, 105)
    n = metrics[names[0]].get("n")
    axes.set_title(f"Test accuracy and macro-F1 (n={n} test images)")
    axes.legend(loc="lower right")
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def plot_per_class_f1(per_class: dict[str, np.ndarray], classes: list[str], path: Path) -> Path:
    """Horizontal grouped bars: each class's test F1 for each model."""
    names = list(per_class)
    height = 0.8 / len(names)
    figure, axes = plt.subplots(figsize=(7, 1.2 + 0.32 * len(classes) * max(1, len(names) / 2)))
    positions = np.arange(len(classes))
    for offset, name in enumerate(names):
        axes.barh(positions + (offset - (len(names) - 1) / 2) * height,
                  100 * np.asarray(per_class[name]), height, label=name)
    axes.set_yticks(positions, classes, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("test F1 (%)")
    axes.set_xlim(0, 100)
    # The legend sits above the bars (a fixed pad in points, whatever the figure's height),
    # so it never covers a class's bars.
    axes.set_title("Per-class test F1", pad=24)
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(names), fontsize=8,
                frameon=False, borderaxespad=0.3)
    return _save(figure, path)


def plot_confusion(matrices: dict[str, np.ndarray], classes: list[str], path: Path) -> Path:
    """Row-normalised confusion matrices side by side (rows: true class)."""
    figure, axes = plt.subplots(1, len(matrices), figsize=(5.5 * len(matrices), 5.2),
                                squeeze=False)
    small = len(classes) > 12
    for number, (axis, (name, matrix)) in enumerate(zip(axes[0], matrices.items())):
        rows = matrix.sum(1, keepdims=True)
        normalised = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float),
                               where=rows > 0)
        image = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        axis.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6 if small else 8)
        # Panels share the class list: names on the first one only, so none overlap.
        axis.set_yticks(range(len(classes)), classes if number == 0 else [],
                        fontsize=6 if small else 8)
        axis.set_xlabel("predicted")
        if number == 0:
            axis.set_ylabel("true")
        accuracy = np.trace(matrix) / max(matrix.sum(), 1)
        axis.set_title(f"{name} (accuracy {100 * accuracy:.1f}%)")
    figure.colorbar(image, ax=axes[0].tolist(), fraction=0.02, label="share of the true class")
    return _save(figure, path, tight=False)


def plot_sample_predictions(samples: list[dict], path: Path) -> Path:
    """One column per test image: its LR image, its HR twin, the true label and the
    baseline's and KD student's predictions (green when right, red when wrong)."""
    figure, axes = plt.subplots(2, len(samples), figsize=(2.1 * len(samples), 5.0),
                                squeeze=False)
    for column, sample in enumerate(samples):
        for row, key in enumerate(("lr", "hr")):
            axis = axes[row][column]
            axis.imshow(sample[key], interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
        axes[0][column].set_title(f"true: {sample['label']}", fontsize=7)
        lines = [(f"base: {sample['baseline']}", sample["baseline"] == sample["label"]),
                 (f"KD: {sample['kd_student']}", sample["kd_student"] == sample["label"])]
        for number, (text, right) in enumerate(lines):
            axes[1][column].text(0.5, -0.12 - 0.13 * number, ("✓ " if right else "✗ ") + text,
                                 transform=axes[1][column].transAxes, ha="center", va="top",
                                 fontsize=7, color="green" if right else "red")
    axes[0][0].set_ylabel("LR input")
    axes[1][0].set_ylabel("HR twin")
    figure.suptitle("Test images: LR input, HR twin, and predictions")
    figure.subplots_adjust(bottom=0.2)
    return _save(figure, path)


# Colour and marker together: ten colours (tab10) that stay apart, then another marker for
# the next ten, so the 25 DACON classes get 25 styles a legend can name (styles repeat
# beyond 40 classes).
CLASS_MARKERS = ("o", "s", "^", "D")


def class_styles(count: int) -> list[tuple]:
    """A (colour, marker) per class."""
    colours = plt.get_cmap("tab10").colors
    return [(colours[index % 10], CLASS_MARKERS[(index // 10) % len(CLASS_MARKERS)])
            for index in range(count)]


def plot_embeddings(embeddings: dict[str, tuple], labels, classes: list[str],
                    path: Path) -> Path:
    """t-SNE maps of penultimate features, one panel per model, each class in its own colour
    and marker, named in a legend below the panels; each title gives the model's V-measure."""
    figure, axes = plt.subplots(1, len(embeddings), figsize=(4.6 * len(embeddings), 4.6),
                                squeeze=False)
    labels = np.asarray(labels)
    styles = class_styles(len(classes))
    handles = []
    for axis, (name, (points, v_measure)) in zip(axes[0], embeddings.items()):
        handles = [axis.scatter(points[labels == index, 0], points[labels == index, 1],
                                color=colour, marker=marker, s=10, linewidths=0)
                   for index, (colour, marker) in enumerate(styles)]
        axis.set_title(f"{name}\nV-measure {v_measure:.3f}", fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("t-SNE of penultimate features on the test images (true class)")
    figure.tight_layout()
    # Below the panels, as many columns as fit beside each other (three per panel).
    figure.legend(handles, classes, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  ncol=min(len(classes), 3 * len(embeddings)), fontsize=8, frameon=False,
                  markerscale=1.6, handletextpad=0.2, columnspacing=1.2)
    return _save(figure, path, tight=False)
