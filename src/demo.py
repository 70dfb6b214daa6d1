"""A small synthetic dataset in the DACON layout, for the demo and the tests.

Each image is a "bird": an ellipse on a noisy, shaded background. Its class is a colour
(5 groups) crossed with a fine stripe texture (5 patterns), so 25 classes as in DACON.
The colour survives downsampling; the stripes, 1.75 LR pixels per period, mostly do not: the LR
image is the HR image box-filtered by the scale factor, which averages most of the texture
away. So an HR teacher can tell all 25 classes apart, an LR student mainly the colour
group, and the teacher's soft targets carry what the LR image half-shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .cli import progress_bar
from .lr_render import degrade

COLOURS = {"red": (200, 60, 50), "green": (60, 160, 70), "blue": (60, 90, 200),
           "yellow": (215, 190, 60), "purple": (140, 70, 170)}
TEXTURES = ("horizontal", "vertical", "diagonal", "antidiagonal", "checker")


def class_names() -> list[str]:
    return [f"{colour}_{texture}" for colour in COLOURS for texture in TEXTURES]


def render_hr(rng: np.random.Generator, size: int, colour: str, texture: str,
              scale: int) -> np.ndarray:
    """One HR image (size x size x 3, uint8) of the given class."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    # Background: a random muted colour with a gentle gradient.
    base = rng.uniform(90, 170, 3)
    slope = rng.uniform(-40, 40, (2, 3)) / size
    image = base + x[..., None] * slope[0] + y[..., None] * slope[1]

    # The bird: a rotated ellipse.
    centre = rng.uniform(0.38, 0.62, 2) * size
    axes = rng.uniform(0.22, 0.34, 2) * size
    angle = rng.uniform(0, np.pi)
    dx, dy = x - centre[0], y - centre[1]
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / axes[0]
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / axes[1]
    body = (u ** 2 + v ** 2) <= 1

    # The texture: stripes about 1.75 LR pixels per period (7 HR pixels at scale 4), finer
    # than the LR grid can hold: downsampling leaves blur and aliasing, with only hints.
    period = 1.75 * scale * rng.uniform(0.9, 1.1)
    phase = rng.uniform(0, 2 * np.pi)
    wave = lambda t: np.cos(2 * np.pi * t / period + phase) > 0  # noqa: E731
    pattern = {"horizontal": wave(y), "vertical": wave(x), "diagonal": wave((x + y) / np.sqrt(2)),
               "antidiagonal": wave((x - y) / np.sqrt(2)),
               "checker": wave(x) ^ wave(y)}[texture]
    tone = np.array(COLOURS[colour]) + rng.normal(0, 12, 3)
    bird = tone * np.where(pattern, 1.15, 0.7)[..., None]
    image = np.where(body[..., None], bird, image)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def downsample(hr: np.ndarray, scale: int) -> np.ndarray:
    """An (H, W, 3) HR image box-filtered to LR, as ``--lr-from-hr`` renders LR views."""
    return degrade(hr[None], scale, "box")[0]


def write_unlabelled_images(out_dir: Path, hr_images) -> int:
    """HR images without labels or LR twins: ``unlabelled/UNL_<n>.png`` and
    ``unlabelled.csv`` (``upscale_img_path`` only), a transfer set for ``--unlabelled``.
    Writes nothing for none; returns how many."""
    rows = []
    for number, hr in enumerate(hr_images):
        name = f"UNL_{number:05d}.png"
        (Path(out_dir) / "unlabelled").mkdir(parents=True, exist_ok=True)
        Image.fromarray(hr).save(Path(out_dir) / "unlabelled" / name)
        rows.append({"upscale_img_path": f"./unlabelled/{name}"})
    if rows:
        pd.DataFrame(rows).to_csv(Path(out_dir) / "unlabelled.csv", index=False)
    return len(rows)


def write_demo_dataset(out_dir: Path, per_class: int = 40, test_images: int = 50,
                       lr_size: int = 16, scale: int = 4, seed: int = 0,
                       num_classes: int = 25, progress: bool = True,
                       unlabelled: int = 0) -> Path:
    """Write train.csv, test.csv, train/, upscale_train/, test/ under ``out_dir``, and the
    test images' labels and HR twins (test_labels.csv, upscale_test/: not part of the
    DACON layout, they let compare_recipes.py score on held-out images); with
    ``unlabelled``, that many further HR images of random classes, without labels
    (``write_unlabelled_images``), drawn after the others so those stay the same.

    Deterministic for a seed. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    classes = class_names()[:num_classes]
    rng = np.random.default_rng(seed)
    for folder in ("train", "upscale_train", "test", "upscale_test"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    hr_size = lr_size * scale
    rows = []
    jobs = [(label, index) for index in range(per_class) for label in classes]
    for number, (label, _) in enumerate(progress_bar(jobs, desc="demo train images", leave=False,
                                             disable=None if progress else True)):
        colour, texture = label.split("_")
        hr = render_hr(rng, hr_size, colour, texture, scale)
        name = f"TRAIN_{number:05d}.png"
        Image.fromarray(hr).save(out_dir / "upscale_train" / name)
        Image.fromarray(downsample(hr, scale)).save(out_dir / "train" / name)
        rows.append({"img_path": f"./train/{name}", "upscale_img_path": f"./upscale_train/{name}",
                     "label": label})
    pd.DataFrame(rows).to_csv(out_dir / "train.csv", index=False)

    test_rows, test_labels = [], []
    for number in range(test_images):
        label = classes[rng.integers(len(classes))]
        colour, texture = label.split("_")
        name = f"TEST_{number:05d}.png"
        hr = render_hr(rng, hr_size, colour, texture, scale)
        Image.fromarray(hr).save(out_dir / "upscale_test" / name)
        Image.fromarray(downsample(hr, scale)).save(out_dir / "test" / name)
        test_rows.append({"ID": f"TEST_{number:05d}", "img_path": f"./test/{name}"})
        test_labels.append({"ID": f"TEST_{number:05d}", "label": label,
                            "upscale_img_path": f"./upscale_test/{name}"})
    pd.DataFrame(test_rows).to_csv(out_dir / "test.csv", index=False)
    pd.DataFrame(test_labels).to_csv(out_dir / "test_labels.csv", index=False)

    def unlabelled_hr():
        for _ in range(unlabelled):
            colour, texture = classes[rng.integers(len(classes))].split("_")
            yield render_hr(rng, hr_size, colour, texture, scale)
    write_unlabelled_images(out_dir, unlabelled_hr())
    return out_dir
