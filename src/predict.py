"""``predict.py``: a competition submission (``ID,label``) for ``test.csv`` from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cli import ToolError, progress_bar
from .data import load_images, make_view, read_table, read_test_table
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
    # Every checkpoint is loaded and checked before any image is decoded: a wrong file
    # is named in seconds, not after minutes of decoding.
    members, classes = [], None
    for ckpt in ckpts:
        model, meta = load_checkpoint(ckpt, classes, what="checkpoint")
        if meta["resolution"] != "lr":
            raise ToolError(f"{ckpt} is an HR model; test.csv has only LR images, so predict "
                            f"with a student (student or kd_student)")
        classes = meta["classes"]
        members.append((ckpt, model, meta))
    table = read_test_table(data_dir)
    # Read once: every member of an ensemble sees the same decoded images.
    pixels = load_images(data_dir, table["img_path"].tolist(), cache_dir, "TEST")
    probabilities = 0
    for ckpt, model, meta in members:
        probabilities = probabilities + predict_probabilities(
            model, meta, ckpt, pixels, "TEST", batch_size, runtime, tta) / len(ckpts)
    labels = [classes[index] for index in probabilities.argmax(1).tolist()]
    return pd.DataFrame({"ID": table["ID"], "label": labels})


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
