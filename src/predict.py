"""``predict.py``: a competition submission (``ID,label``) for ``test.csv`` from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cli import ToolError, progress_bar
from .data import load_images, make_view, read_table, read_test_table
from .metrics import classification_metrics
from .models import load_checkpoint


def predict_test_set(data_dir: Path, ckpt: Path, cache_dir: Path | None, batch_size: int,
                     runtime, tta: bool) -> pd.DataFrame:
    """Predicted label names for every row of ``test.csv``, in its order.

    With ``tta`` the class probabilities of each image and its mirror image are averaged.
    """
    table = read_test_table(data_dir)
    model, meta = load_checkpoint(ckpt, what="checkpoint")
    if meta["resolution"] != "lr":
        raise ToolError(f"{ckpt} is an HR model; test.csv has only LR images, so predict "
                        f"with a student (student or kd_student)")
    labels = predict_images(model, meta, ckpt, data_dir, table["img_path"].tolist(), cache_dir,
                            "TEST", batch_size, runtime, tta)
    return pd.DataFrame({"ID": table["ID"], "label": labels})


@torch.no_grad()
def predict_images(model, meta: dict, ckpt: Path, data_dir: Path, relative_paths: list[str],
                   cache_dir: Path | None, description: str, batch_size: int, runtime,
                   tta: bool) -> list[str]:
    """Label names a checkpoint's model predicts for images (whole images, resized)."""
    pixels = load_images(data_dir, relative_paths, cache_dir, description)
    if meta.get("image_size") and pixels.shape[1] != meta["image_size"]:
        raise ToolError(f"{description.lower()} images are {pixels.shape[2]}x{pixels.shape[1]} "
                        f"but {ckpt} was trained on {meta['image_size']}px images")
    model.to(runtime.device).eval()
    size = int(meta["input_size"])
    predictions = []
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
        predictions.append(probabilities.argmax(1).cpu())
    classes = meta["classes"]
    return [classes[index] for index in torch.cat(predictions).tolist()]


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


def score_teacher_holdout(data_dir: Path, ckpt: Path, cache_dir: Path | None,
                          batch_size: int, runtime, labels: pd.DataFrame) -> dict | None:
    """The HR teacher's accuracy and macro-F1 on the held-out images' HR twins (None when
    ``test_labels.csv`` names none)."""
    if "upscale_img_path" not in labels.columns:
        return None
    model, meta = load_checkpoint(ckpt, what="teacher checkpoint")
    predicted = predict_images(model, meta, ckpt, data_dir, labels["upscale_img_path"].tolist(),
                               cache_dir, "TEST-HR", batch_size, runtime, tta=False)
    return classification_metrics(labels["label"].to_numpy(), np.asarray(predicted))
