"""The Fashion-MNIST writer (on idx files the test writes itself) and the balanced subset
split."""

import gzip

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import assert_one_line_error, make_tiny_dataset, run_script
from src.cli import ToolError
from src.data import load_or_create_split
from src.demo import downsample
from src.fashion_mnist import CLASS_NAMES, read_fashion_mnist


def _write_idx(folder, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    header = (0x803).to_bytes(4, "big") + b"".join(
        size.to_bytes(4, "big") for size in images.shape)
    label_header = (0x801).to_bytes(4, "big") + len(labels).to_bytes(4, "big")
    for name, data in (("train-images-idx3-ubyte", header + images.tobytes()),
                       ("train-labels-idx1-ubyte", label_header + labels.tobytes())):
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as handle:
                handle.write(data)
        else:
            (folder / name).write_bytes(data)
    # The held-out files must never be read: make them unreadable as idx.
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"must not be read")


def _fake_fashion_mnist(per_class: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(len(labels)) % 256     # every image distinct
    images[:, 0, 1] = np.arange(len(labels)) // 256
    return images, labels


@pytest.mark.fast
@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_are_read_raw_or_gzipped(tmp_path, gz):
    images, labels = _fake_fashion_mnist()
    _write_idx(tmp_path, images, labels, gz)
    read_images, read_labels = read_fashion_mnist(tmp_path)
    assert np.array_equal(read_images, images) and np.array_equal(read_labels, labels)


def test_fashion_mnist_writes_the_dacon_layout_from_train_files_only(tmp_path):
    images, labels = _fake_fashion_mnist(per_class=12)
    _write_idx(tmp_path / "idx", images, labels, gz=True)
    out = tmp_path / "fm"
    result = run_script("make_demo_data.py", "--fashion-mnist", tmp_path / "idx", "--out", out,
                        "--per-class", "10", "--test-images", "12", "--lr-size", "7",
                        "--scale", "4")
    assert result.returncode == 0, result.stderr
    train = pd.read_csv(out / "train.csv")
    test = pd.read_csv(out / "test.csv")
    test_labels = pd.read_csv(out / "test_labels.csv")
    assert list(train.columns) == ["img_path", "upscale_img_path", "label"]
    assert list(test.columns) == ["ID", "img_path"]
    assert train["label"].value_counts().to_dict() == {name: 10 for name in CLASS_NAMES}
    assert len(test) == 12 and list(test_labels["ID"]) == list(test["ID"])

    def source_of(hr: np.ndarray) -> int:
        """Which fake photo an HR twin is (HR 28 px: the photo itself, in grey)."""
        matches = np.flatnonzero((images == hr[..., 0]).all((1, 2)))
        assert len(matches) == 1 and (hr == hr[..., :1]).all()
        return int(matches[0])

    labelled_sources = set()
    for row in train.head(10).itertuples():
        lr = np.asarray(Image.open(out / row.img_path).convert("RGB"))
        hr = np.asarray(Image.open(out / row.upscale_img_path).convert("RGB"))
        assert lr.shape == (7, 7, 3) and hr.shape == (28, 28, 3)
        assert np.array_equal(lr, downsample(hr, 4))          # LR = HR box-filtered
        source = source_of(hr)
        assert CLASS_NAMES[labels[source]] == row.label
        labelled_sources.add(source)
    assert list(test_labels.columns) == ["ID", "label", "upscale_img_path"]
    for row, labelled in zip(test.itertuples(), test_labels.itertuples()):
        lr = np.asarray(Image.open(out / row.img_path).convert("RGB"))
        hr = np.asarray(Image.open(out / labelled.upscale_img_path).convert("RGB"))
        assert lr.shape == (7, 7, 3) and np.array_equal(lr, downsample(hr, 4))
        assert CLASS_NAMES[labels[source_of(hr)]] == labelled.label
        assert source_of(hr) not in labelled_sources
    # Test images come from photos outside train.csv: no LR image of test equals one of
    # train (the photos are random noise, so equal LR images would mean equal photos).
    train_lr = {Image.open(out / path).tobytes() for path in train["img_path"]}
    assert not any(Image.open(out / path).tobytes() in train_lr for path in test["img_path"])
    assert run_script("check_data.py", "--data-dir", out).returncode == 0

    too_many = run_script("make_demo_data.py", "--fashion-mnist", tmp_path / "idx", "--out",
                          tmp_path / "fm2", "--per-class", "13")
    assert_one_line_error(too_many, "--per-class 13", "has only 12 images")
    too_many = run_script("make_demo_data.py", "--fashion-mnist", tmp_path / "idx", "--out",
                          tmp_path / "fm4", "--per-class", "10", "--test-images", "12",
                          "--unlabelled", "9")
    assert_one_line_error(too_many, "only 20 images are left")
    missing = run_script("make_demo_data.py", "--fashion-mnist", tmp_path, "--out",
                         tmp_path / "fm3")
    assert_one_line_error(missing, "train-images-idx3-ubyte", "not found")


def test_fashion_mnist_unlabelled_images_are_other_photos_without_labels(tmp_path):
    images, labels = _fake_fashion_mnist(per_class=12)
    _write_idx(tmp_path / "idx", images, labels, gz=True)
    common = ["--fashion-mnist", tmp_path / "idx", "--per-class", "10", "--test-images", "12",
              "--lr-size", "7", "--scale", "4"]
    plain, extended = tmp_path / "plain", tmp_path / "extended"
    assert run_script("make_demo_data.py", *common, "--out", plain).returncode == 0
    result = run_script("make_demo_data.py", *common, "--out", extended, "--unlabelled", "8")
    assert result.returncode == 0, result.stderr
    for name in ("train.csv", "test.csv", "test_labels.csv"):     # the rest is unchanged
        assert (plain / name).read_bytes() == (extended / name).read_bytes()
    table = pd.read_csv(extended / "unlabelled.csv")
    assert list(table.columns) == ["upscale_img_path"] and len(table) == 8
    photos = [np.asarray(Image.open(extended / path).convert("RGB"))[..., 0]
              for path in table["upscale_img_path"]]
    sources = {int(np.flatnonzero((images == photo).all((1, 2)))[0]) for photo in photos}
    used = {int(np.flatnonzero((images == np.asarray(Image.open(extended / path))[..., 0])
                               .all((1, 2)))[0])
            for path in [*pd.read_csv(extended / "train.csv")["upscale_img_path"],
                         *pd.read_csv(extended / "test_labels.csv")["upscale_img_path"]]}
    assert len(sources) == 8 and not sources & used
    # No file the tool reads names a label of the unlabelled images.
    assert not any("UNL_" in path.read_text() for path in extended.glob("*.csv")
                   if path.name != "unlabelled.csv")


@pytest.mark.fast
def test_balanced_subset_split_is_drawn_once_and_checked(tmp_path):
    tiny_data = make_tiny_dataset(tmp_path / "data", classes=4, per_class=14)
    split = load_or_create_split(tiny_data, tmp_path, seed=0, per_class=10, quiet=True)
    counts = split.frame["label"].value_counts()
    assert set(counts) == {10} and len(counts) == 4
    assert len(split.frame) == 40 and set(split.frame["subset"]) == {"train", "val", "test"}
    again = load_or_create_split(tiny_data, tmp_path, seed=0, quiet=True)
    assert again.frame.equals(split.frame)        # reused, rows the data has beside are fine
    with pytest.raises(ToolError, match="was made with 10 images per class"):
        load_or_create_split(tiny_data, tmp_path, seed=0, per_class=12, quiet=True)
    with pytest.raises(ToolError, match="has only 14 image"):
        load_or_create_split(tiny_data, tmp_path / "other", seed=0, per_class=15, quiet=True)
    other_seed = load_or_create_split(tiny_data, tmp_path / "seed1", seed=1, per_class=10,
                                      quiet=True)
    assert set(other_seed.frame["img_path"]) != set(split.frame["img_path"])
