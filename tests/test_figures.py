"""Figures readable at the DACON's 25 classes and at 10: every class named, nothing drawn
over the data, no tick names on top of each other."""

import numpy as np
import pytest

from src import plots
from src.demo import class_names


# Quick enough for make test-fast.
pytestmark = pytest.mark.fast


@pytest.fixture()
def drawn(monkeypatch):
    """The figure a plot function made, drawn (so text has its size) instead of saved."""
    figures = []

    def keep(figure, path, tight=True):
        if tight:
            figure.tight_layout()
        figure.canvas.draw()
        figures.append(figure)
        return path
    monkeypatch.setattr(plots, "_save", keep)
    return figures


def _boxes(texts):
    return [text.get_window_extent() for text in texts if text.get_text()]


def _assert_apart(boxes, what):
    for first, second in zip(boxes, boxes[1:]):
        assert not first.overlaps(second), f"{what}: {first} overlaps {second}"


def _classes(count):
    return class_names()[:count] if count <= 25 else [f"class {i}" for i in range(count)]


@pytest.mark.parametrize("count", [10, 25])
def test_tsne_names_every_class_in_a_legend_below_the_panels(drawn, tmp_path, count):
    rng = np.random.default_rng(0)
    labels = np.arange(200) % count
    embeddings = {name: (rng.normal(size=(200, 2)) + labels[:, None], 0.5)
                  for name in ("HR teacher", "LR baseline student", "LR KD student")}
    plots.plot_embeddings(embeddings, labels, _classes(count), tmp_path / "tsne.png")
    figure = drawn[0]
    legend = figure.legends[0]
    assert [text.get_text() for text in legend.get_texts()] == _classes(count)
    styles = {(tuple(np.round(handle.get_facecolor()[0], 3)), handle.get_paths()[0].vertices.tobytes())
              for handle in legend.legend_handles}
    assert len(styles) == count, "two classes share a colour and marker"
    below = min(axis.get_window_extent().y0 for axis in figure.axes)
    assert legend.get_window_extent().y1 <= below, "the legend covers a panel"
    _assert_apart(sorted(_boxes(legend.get_texts()), key=lambda box: (box.y0, box.x0)),
                  "legend names")


@pytest.mark.parametrize("count", [10, 25])
def test_per_class_f1_keeps_its_legend_off_the_bars_and_names_apart(drawn, tmp_path, count):
    rng = np.random.default_rng(1)
    per_class = {name: rng.random(count) for name in ("HR teacher", "LR baseline student",
                                                       "LR KD student")}
    per_class["LR KD student"][-1] = 1.0      # a full bar on the last class, by the old legend
    plots.plot_per_class_f1(per_class, _classes(count), tmp_path / "f1.png")
    figure = drawn[0]
    axes = figure.axes[0]
    legend = axes.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == list(per_class)
    assert not legend.get_window_extent().overlaps(axes.get_window_extent())
    assert not legend.get_window_extent().overlaps(axes.title.get_window_extent())
    names = axes.get_yticklabels()
    assert [text.get_text() for text in names] == _classes(count)
    _assert_apart(sorted(_boxes(names), key=lambda box: box.y0), "class names")
    assert "%" in axes.get_xlabel()


@pytest.mark.parametrize("count", [10, 25])
def test_confusion_matrix_tick_names_stay_apart(drawn, tmp_path, count):
    rng = np.random.default_rng(2)
    matrices = {name: rng.integers(0, 5, (count, count)) for name in
                ("LR baseline student", "LR KD student")}
    plots.plot_confusion(matrices, _classes(count), tmp_path / "confusion.png")
    figure = drawn[0]
    for axis in figure.axes[:2]:
        _assert_apart(sorted(_boxes(axis.get_xticklabels()), key=lambda box: box.x0),
                      "predicted class names")
        _assert_apart(sorted(_boxes(axis.get_yticklabels()), key=lambda box: box.y0),
                      "true class names")
