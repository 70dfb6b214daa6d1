"""``predict.py``: a competition submission (``ID,label``) for ``test.csv`` from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cli import ToolError, progress_bar
from .data import load_images, make_view, read_test_table
from .models import load_checkpoint


@torch.no_grad()
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
    pixels = load_images(data_dir, table["img_path"].tolist(), cache_dir, "TEST")
    if meta.get("image_size") and pixels.shape[1] != meta["image_size"]:
        raise ToolError(f"test images are {pixels.shape[2]}x{pixels.shape[1]} but {ckpt} was "
                        f"trained on {meta['image_size']}px images")
    model.to(runtime.device).eval()
    size = int(meta["input_size"])
    predictions = []
    for start in progress_bar(range(0, len(table), batch_size), desc="predicting", unit="batch",
                      leave=False):
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
    labels = [classes[index] for index in torch.cat(predictions).tolist()]
    return pd.DataFrame({"ID": table["ID"], "label": labels})
