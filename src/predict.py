"""``predict.py``: a competition submission (``ID,label``) for ``test.csv`` from a checkpoint,
or the predictions for any LR images (``--images``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from PIL import Image

from .cli import ToolError, progress_bar
from .data import decode_image, load_images, make_view, normalize_path, read_table, \
    read_test_table
from .metrics import classification_metrics
from .distill import normalised_teacher_weights
from .models import load_checkpoint, load_teacher


def predict_test_set(data_dir: Path, ckpts: list[Path], cache_dir: Path | None,
                     batch_size: int, runtime, tta: bool) -> pd.DataFrame:
    """Predicted label names for every row of ``test.csv``, in its order: the class with
    the highest probability averaged over ``ckpts`` (an ensemble: seeds, students, a final
    fit), each LR checkpoint trained on the same class list.

    With ``tta`` the class probabilities of each image and its mirror image are averaged.
    """
    members = load_students(ckpts)
    table = read_test_table(data_dir)
    pixels = load_images(data_dir, table["img_path"].tolist(), cache_dir, "TEST")
    probabilities = ensemble_probabilities(members, pixels, "TEST", batch_size, runtime, tta)
    classes = members[0][2]["classes"]
    labels = [classes[index] for index in probabilities.argmax(1).tolist()]
    return pd.DataFrame({"ID": table["ID"], "label": labels})


def load_students(ckpts: list[Path]) -> list[tuple]:
    """``(ckpt, model, meta)`` for each LR checkpoint, all on one class list. Every
    checkpoint is loaded and checked before any image is decoded: a wrong file is named in
    seconds, not after minutes of decoding."""
    members, classes = [], None
    for ckpt in ckpts:
        model, meta = load_checkpoint(ckpt, classes, what="checkpoint")
        if meta["resolution"] != "lr":
            raise ToolError(f"{ckpt} is an HR model; predict with a student (student or "
                            f"kd_student): the images to classify are LR")
        classes = meta["classes"]
        members.append((ckpt, model, meta))
    return members


def ensemble_probabilities(members: list[tuple], pixels: np.ndarray, description: str,
                           batch_size: int, runtime, tta: bool) -> torch.Tensor:
    """The members' class probabilities averaged; every member sees the same decoded
    images, read once."""
    probabilities = 0
    for ckpt, model, meta in members:
        probabilities = probabilities + predict_probabilities(
            model, meta, ckpt, pixels, description, batch_size, runtime, tta) / len(members)
    return probabilities


# What --images takes from a folder (by suffix, any case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_paths(source: Path) -> list[Path]:
    """The images ``--images`` names: a folder's image files (its subfolders too, sorted by
    path), one image file, or a CSV's ``img_path`` column (relative to the CSV's folder,
    as in the competition's CSVs)."""
    if source.is_dir():
        paths = sorted(path for path in source.rglob("*")
                       if path.suffix.lower() in IMAGE_SUFFIXES and not path.is_dir())
        if not paths:
            raise ToolError(f"--images {source}: no image files in the folder (looked for "
                            f"{', '.join(IMAGE_SUFFIXES)})")
        return paths
    if not source.exists():
        raise ToolError(f"--images {source}: no such file or folder")
    if source.suffix.lower() == ".csv":
        table = read_table(source, ("img_path",))
        if table.empty:
            raise ToolError(f"--images {source}: the CSV has no rows")
        return [source.parent / normalize_path(path) for path in table["img_path"]]
    return [source]


def lr_size(meta: dict) -> int:
    """The side of the LR images a checkpoint was trained on (its input size where the
    checkpoint does not record them)."""
    return int(meta.get("image_size") or meta["input_size"])


def read_images_at(paths: list[Path], size: int) -> tuple[np.ndarray, list[Path], list[str],
                                                            int]:
    """Decode ``paths`` for a model trained on ``size`` x ``size`` LR images. Returns the
    pixels (N, size, size, 3) of the readable ones, those paths, one line per unreadable
    file, and how many were resized. An image of another size is resized to ``size`` x
    ``size`` (its aspect ratio is not kept) with PIL's box filter when it shrinks, the
    area average the demo data's LR images are made with, and bicubic when it grows."""
    kept, pixels, unreadable, resized = [], [], [], 0
    for path in progress_bar(paths, desc="reading images", unit="image", leave=False):
        try:
            image = decode_image(path)
        except ToolError as error:
            unreadable.append(str(error))
            continue
        if image.shape[:2] != (size, size):
            shrinks = image.shape[0] * image.shape[1] >= size * size
            image = np.asarray(Image.fromarray(image).resize(
                (size, size), Image.Resampling.BOX if shrinks else Image.Resampling.BICUBIC))
            resized += 1
        kept.append(path)
        pixels.append(image)
    stacked = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
    return stacked, kept, unreadable, resized


def predict_images(members: list[tuple], paths: list[Path], batch_size: int, runtime,
                   tta: bool, top_k: int, with_probabilities: bool
                   ) -> tuple[pd.DataFrame, list[str], int]:
    """Predictions for any LR images: ``path`` and ``label`` (the most probable class),
    with ``top_k`` > 1 ``label_2, probability_2, ...`` up to K (``probability_1`` beside
    ``label``), and with ``with_probabilities`` one column per class. Also returns the
    unreadable files' lines and the count of resized images."""
    meta = members[0][2]
    pixels, kept, unreadable, resized = read_images_at(paths, lr_size(meta))
    classes = meta["classes"]
    columns = {"path": [str(path) for path in kept]}
    if len(kept):
        probabilities = ensemble_probabilities(members, pixels, "--images", batch_size,
                                               runtime, tta)
    else:
        probabilities = torch.zeros((0, len(classes)))
    best = probabilities.topk(top_k, dim=1)
    for rank in range(top_k):
        label = "label" if rank == 0 else f"label_{rank + 1}"
        columns[label] = [classes[index] for index in best.indices[:, rank].tolist()]
        if top_k > 1:
            columns[f"probability_{rank + 1}"] = best.values[:, rank].tolist()
    if with_probabilities:
        for index, name in enumerate(classes):
            columns[f"p_{name}"] = probabilities[:, index].tolist()
    return pd.DataFrame(columns), unreadable, resized


@torch.no_grad()
def predict_probabilities(model, meta: dict, ckpt: Path, pixels: np.ndarray,
                          description: str, batch_size: int, runtime,
                          tta: bool) -> torch.Tensor:
    """Class probabilities (N, classes) of a checkpoint's model on whole images (``pixels``:
    N x H x W x 3, as ``load_images`` returns them), resized to its input size; with
    ``tta`` averaged with those of the mirror images."""
    if meta.get("image_size") and pixels.shape[1] != meta["image_size"]:
        raise ToolError(f"{description.lower()} images are {pixels.shape[2]}x{pixels.shape[1]} "
                        f"but {ckpt} was trained on {meta['image_size']}px images")
    model.to(runtime.device).eval()
    size = int(meta["input_size"])
    chunks = []
    for start in progress_bar(range(0, len(pixels), batch_size), desc="predicting",
                              unit="batch", leave=False):
        batch = torch.from_numpy(np.ascontiguousarray(pixels[start:start + batch_size]))
        batch = batch.permute(0, 3, 1, 2).to(runtime.device)
        views = [batch, batch.flip(-1)] if tta else [batch]
        probabilities = 0
        for view in views:
            with runtime.autocast():
                logits = model(runtime.prepare({"x": make_view(view, size, None)})["x"])
            probabilities = probabilities + logits.float().softmax(1)
        chunks.append(probabilities.cpu() / len(views))
    return torch.cat(chunks)


def score_teachers(ckpts: list[Path], weights: list[float] | None, classes: list[str],
                   data_dir: Path, hr_paths: list[str], labels, cache_dir: Path | None,
                   description: str, batch_size: int, runtime) -> dict:
    """Accuracy and macro-F1 of the HR teachers on ``hr_paths``: with several, of their
    probabilities averaged with ``weights``, the soft targets a KD student learns from."""
    pixels = load_images(data_dir, hr_paths, cache_dir, description)
    probabilities = 0
    for ckpt, weight in zip(ckpts, normalised_teacher_weights(weights, len(ckpts))):
        model, meta = load_teacher(ckpt, classes)
        probabilities = probabilities + weight * predict_probabilities(
            model, meta, ckpt, pixels, description, batch_size, runtime, tta=False)
    predicted = np.asarray(classes)[probabilities.argmax(1).numpy()]
    return classification_metrics(np.asarray(labels), predicted)


HOLDOUT_LABELS = "test_labels.csv"


def read_holdout_labels(data_dir: Path) -> pd.DataFrame | None:
    """``<data-dir>/test_labels.csv`` (ID, label, and optionally upscale_img_path: the HR
    twins), the labels of ``test.csv`` that ``make_demo_data.py --fashion-mnist`` writes
    (the DACON data has none), in test.csv's order; None when there is no such file."""
    path = Path(data_dir) / HOLDOUT_LABELS
    if not path.exists():
        return None
    optional = ("upscale_img_path",) \
        if "upscale_img_path" in pd.read_csv(path, nrows=0).columns else ()
    labels = read_table(path, ("ID", "label", *optional))
    table = read_test_table(data_dir)
    if sorted(labels["ID"]) != sorted(table["ID"]):
        raise ToolError(f"{path} does not label exactly the IDs of test.csv")
    return table[["ID"]].merge(labels, on="ID", how="left")


def holdout_scores(predicted: pd.DataFrame, holdout: pd.DataFrame, source: Path) -> dict:
    """Accuracy, macro-F1 and per-image correctness (``correct``) of predicted labels
    (``ID,label`` rows from ``source``) against ``read_holdout_labels``."""
    if not predicted["ID"].equals(holdout["ID"]):
        raise ToolError(f"{source} does not follow the IDs of test.csv; delete it and "
                        f"predict again")
    truth, guess = holdout["label"].to_numpy(), predicted["label"].to_numpy()
    return {**classification_metrics(truth, guess), "correct": truth == guess}
