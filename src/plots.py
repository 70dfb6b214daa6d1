"""Figures: learning curves of two runs and the test comparison of the three models."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .cli import atomic_write  # noqa: E402


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    atomic_write(Path(path), lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
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
