"""The shared split: stratified 8:1:1, deterministic, saved once and reused by every stage."""

import numpy as np
import pandas as pd
import pytest

from src.cli import ToolError
from src.data import load_or_create_split, make_split


# Quick enough for make test-fast.
pytestmark = pytest.mark.fast


def _table(counts: dict) -> pd.DataFrame:
    rows = [(f"train/{label}_{i}.png", f"upscale_train/{label}_{i}.png", label)
            for label, count in counts.items() for i in range(count)]
    return pd.DataFrame(rows, columns=["img_path", "upscale_img_path", "label"])


def test_split_is_stratified_8_1_1_within_rounding():
    counts = {"a": 10, "b": 23, "c": 47, "d": 100}
    split = make_split(_table(counts), seed=0)
    for label, count in counts.items():
        subsets = split[split["label"] == label]["subset"].value_counts()
        assert abs(subsets["train"] - 0.8 * count) <= 1
        assert abs(subsets["val"] - 0.1 * count) <= 1
        assert abs(subsets["test"] - 0.1 * count) <= 1
    assert set(split["subset"]) == {"train", "val", "test"}


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    table = _table({"a": 30, "b": 30})
    first, again = make_split(table, seed=3), make_split(table, seed=3)
    assert first["subset"].tolist() == again["subset"].tolist()
    assert first["subset"].tolist() != make_split(table, seed=4)["subset"].tolist()


def test_class_too_small_to_stratify_is_an_error():
    with pytest.raises(ToolError, match="class 'b' has 9 image"):
        make_split(_table({"a": 30, "b": 9}), seed=0)


def test_saved_split_is_reused_even_with_another_seed(tiny_data, tmp_path, capsys):
    first = load_or_create_split(tiny_data, tmp_path, seed=0)
    saved_bytes = (tmp_path / "split.csv").read_bytes()
    again = load_or_create_split(tiny_data, tmp_path, seed=7)
    assert "reusing" in capsys.readouterr().out
    assert (tmp_path / "split.csv").read_bytes() == saved_bytes
    assert first.frame["subset"].tolist() == again.frame["subset"].tolist()
    assert first.classes == again.classes == sorted(first.frame["label"].unique())


def test_all_stages_used_the_same_split(finished_run):
    data_dir, out_dir, _, _ = finished_run
    split = pd.read_csv(out_dir / "split.csv")
    test_rows = split[split["subset"] == "test"]["img_path"].tolist()
    fingerprints = set()
    for stage in ("teacher", "student", "kd_student"):
        predictions = pd.read_csv(out_dir / stage / "test_predictions.csv")
        assert predictions["img_path"].tolist() == test_rows
        import json
        config = json.loads((out_dir / stage / "config.json").read_text())
        fingerprints.add(config["split"]["fingerprint"])
    assert len(fingerprints) == 1
    assert np.isclose(len(test_rows) / len(split), 0.1, atol=0.05)
