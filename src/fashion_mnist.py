"""Real images in the DACON layout, from the Fashion-MNIST ``train-*`` idx files.

Each 28x28 photo becomes an HR twin of ``lr_size * scale`` pixels (resized with PIL's
bicubic filter when that is not 28) and an LR image that is the HR twin box-filtered by
``scale``, as the demo data is. Labelled rows go to ``train.csv``; a disjoint draw of
further images, without labels, to ``test.csv``. Their labels and HR twins go to
``test_labels.csv`` and ``upscale_test/``, which are not part of the DACON layout: they
let ``compare_recipes.py`` score students and the teacher on these held-out images.

Only ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (optionally ``.gz``) are
ever opened: the ``t10k-*`` files stay unread, kept for an independent check of a recipe.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .cli import ToolError, progress_bar
from .demo import downsample, write_unlabelled_images

CLASS_NAMES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle_boot")
IMAGES_FILE, LABELS_FILE = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
# idx magic numbers: unsigned bytes, 3 dimensions (images) or 1 (labels).
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


def _idx_path(idx_dir: Path, name: str) -> Path:
    for candidate in (idx_dir / name, idx_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise ToolError(f"{name} (or {name}.gz) not found in {idx_dir} (Debian's "
                    f"dataset-fashion-mnist package puts it in /usr/share/datasets/fashion-mnist)")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file (raw or gzipped) as a uint8 array of the shape its header gives."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise ToolError(f"{path}: unreadable ({error})") from None
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        raise ToolError(f"{path}: not an idx file of {magic & 0xFF} dimension(s) "
                        f"(header {found if found is None else hex(found)})")
    dims = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != np.prod(shape):
        raise ToolError(f"{path}: header says {shape} but holds {body.size} values")
    return body.reshape(shape)


def read_fashion_mnist(idx_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) and labels (N,) of the ``train-*`` files in ``idx_dir``."""
    idx_dir = Path(idx_dir)
    images = read_idx(_idx_path(idx_dir, IMAGES_FILE), IMAGES_MAGIC)
    labels = read_idx(_idx_path(idx_dir, LABELS_FILE), LABELS_MAGIC)
    if len(images) != len(labels):
        raise ToolError(f"{idx_dir}: {len(images)} images but {len(labels)} labels")
    if labels.max(initial=0) >= len(CLASS_NAMES):
        raise ToolError(f"{idx_dir}: label {labels.max()} is not a Fashion-MNIST class (0-9)")
    return images, labels


def write_fashion_mnist_dataset(idx_dir: Path, out_dir: Path, per_class: int,
                                test_images: int, lr_size: int, scale: int, seed: int = 0,
                                progress: bool = True, unlabelled: int = 0) -> dict:
    """Write train.csv (``per_class`` images of each class), test.csv (``test_images`` other
    images, unlabelled), test_labels.csv and the image folders; with ``unlabelled``, also
    that many further HR images (``unlabelled/``, ``unlabelled.csv``: no labels anywhere),
    disjoint from both. Returns counts."""
    images, labels = read_fashion_mnist(idx_dir)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    chosen = []
    for label in range(len(CLASS_NAMES)):
        of_class = order[labels[order] == label]
        if len(of_class) < per_class:
            raise ToolError(f"--per-class {per_class}: class {CLASS_NAMES[label]} has only "
                            f"{len(of_class)} images in {idx_dir}")
        chosen.append(of_class[:per_class])
    labelled = np.sort(np.concatenate(chosen))
    rest = np.setdiff1d(order, labelled, assume_unique=True)
    rest = order[np.isin(order, rest)]        # keep the random order for the test draw
    if test_images + unlabelled > len(rest):
        raise ToolError(f"--test-images {test_images} + --unlabelled {unlabelled}: only "
                        f"{len(rest)} images are left after the labelled ones")
    test_draw, transfer = rest[:test_images], rest[test_images:test_images + unlabelled]

    out_dir = Path(out_dir)
    for folder in ("train", "upscale_train", "test", "upscale_test"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    hr_size = lr_size * scale

    def hr_twin(position: int) -> np.ndarray:
        photo = Image.fromarray(images[position])
        if hr_size != photo.width:
            photo = photo.resize((hr_size, hr_size), Image.Resampling.BICUBIC)
        return np.asarray(photo.convert("RGB"))

    rows = []
    for number, position in enumerate(progress_bar(
            labelled, desc="Fashion-MNIST train images", leave=False,
            disable=None if progress else True)):
        hr = hr_twin(position)
        name = f"TRAIN_{number:05d}.png"
        Image.fromarray(hr).save(out_dir / "upscale_train" / name)
        Image.fromarray(downsample(hr, scale)).save(out_dir / "train" / name)
        rows.append({"img_path": f"./train/{name}", "upscale_img_path": f"./upscale_train/{name}",
                     "label": CLASS_NAMES[labels[position]]})
    pd.DataFrame(rows).to_csv(out_dir / "train.csv", index=False)

    test_rows, test_labels = [], []
    for number, position in enumerate(test_draw):
        name = f"TEST_{number:05d}.png"
        hr = hr_twin(position)
        Image.fromarray(hr).save(out_dir / "upscale_test" / name)
        Image.fromarray(downsample(hr, scale)).save(out_dir / "test" / name)
        test_rows.append({"ID": f"TEST_{number:05d}", "img_path": f"./test/{name}"})
        test_labels.append({"ID": f"TEST_{number:05d}", "label": CLASS_NAMES[labels[position]],
                            "upscale_img_path": f"./upscale_test/{name}"})
    pd.DataFrame(test_rows, columns=["ID", "img_path"]).to_csv(out_dir / "test.csv", index=False)
    pd.DataFrame(test_labels, columns=["ID", "label", "upscale_img_path"]).to_csv(
        out_dir / "test_labels.csv", index=False)
    write_unlabelled_images(out_dir, (hr_twin(position) for position in transfer))
    return {"labelled": len(rows), "test": len(test_rows), "unlabelled": len(transfer),
            "classes": len(CLASS_NAMES),
            "lr_size": lr_size, "hr_size": hr_size}
