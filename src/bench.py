"""``benchmark.py``: images per second of our input pipeline and training step against a
reference-style loader (per-image PIL decode and transforms in DataLoader workers, every
epoch), on generated data at the DACON sizes and counts, all measured in one run.

For each stage (teacher, baseline student, KD student) it measures:
    pipeline   batches of ready network inputs, no training       (ours / reference-style)
    floor      training steps on one batch already on the device  (the compute floor)
    full       training steps fed by the pipeline                  (ours / reference-style)
Both "full" variants run the same training step (``trainer.train_step``), so their ratio
is the loader's doing alone.

``benchmark.py --processes 1 2``: seconds per epoch of a train script with 1 and 2
processes under torchrun (``time_processes``).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from .cli import ToolError, keep_freed_memory, progress_bar
from .data import IMAGENET_MEAN, IMAGENET_STD, ImageSet, batch_indices, epoch_generator, \
    iterate_batches, load_or_create_split, make_views, sample_view_params, \
    view_grid
from .distill import Distiller, HardLabels
from .methods import DEFAULT_METHOD
from .models import FrozenTeacher, build_model
from .seeds import run_script
from .trainer import Runtime, train_step

DACON_IMAGES = 15_834
STAGE_RESOLUTIONS = {"teacher": ("hr",), "student": ("lr",), "kd_student": ("lr", "hr")}


@dataclass
class BenchSettings:
    images: int = DACON_IMAGES
    arch: str = "resnet18"
    input_size: int = 224
    batch_size: int = 32
    steps: int = 8               # timed training steps per floor / full measurement
    pipeline_batches: int = 50   # timed batches per input-pipeline measurement
    pipeline_rounds: int = 5     # ours and reference-style alternate; the median is kept
    reference_workers: int = 2


# --- data ------------------------------------------------------------------------------

def write_benchmark_dataset(out_dir: Path, images: int, lr_size: int = 64, scale: int = 4,
                            image_format: str = "jpg", classes: int = 25,
                            seed: int = 0) -> Path:
    """``images`` LR/HR pairs in the DACON layout; smooth random content, so the files
    compress and decode like photos rather than like noise. Reused when already there."""
    out_dir = Path(out_dir)
    if (out_dir / "train.csv").exists() and len(pd.read_csv(out_dir / "train.csv")) == images:
        return out_dir
    for folder in ("train", "upscale_train"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    hr_size = lr_size * scale

    def write(number: int) -> None:
        rng = np.random.default_rng(seed * 1_000_003 + number)
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        hr = np.asarray(coarse.resize((hr_size, hr_size), Image.BICUBIC), dtype=np.int16)
        hr = np.clip(hr + rng.integers(-8, 9, hr.shape), 0, 255).astype(np.uint8)
        name = f"TRAIN_{number:05d}.{image_format}"
        hr_image = Image.fromarray(hr)
        hr_image.save(out_dir / "upscale_train" / name, quality=95)
        hr_image.reduce(scale).save(out_dir / "train" / name, quality=95)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(progress_bar(pool.map(write, range(images)), total=images, desc="writing benchmark data",
                  unit="pair", leave=False))
    names = [f"TRAIN_{n:05d}.{image_format}" for n in range(images)]
    pd.DataFrame({"img_path": [f"./train/{n}" for n in names],
                  "upscale_img_path": [f"./upscale_train/{n}" for n in names],
                  "label": [f"species_{n % classes:02d}" for n in range(images)]}
                 ).to_csv(out_dir / "train.csv", index=False)
    return out_dir


class ReferenceStyleDataset(Dataset):
    """What the public reference does for every image of every epoch: open and decode with
    PIL, resize, flip (the student's input only), convert and normalise."""

    def __init__(self, data_dir: Path, frame: pd.DataFrame, labels: np.ndarray,
                 sizes: dict[str, int], flip: dict[str, bool]):
        self.paths = {"lr": [Path(data_dir) / p for p in frame["img_path"]],
                      "hr": [Path(data_dir) / p for p in frame["upscale_img_path"]]}
        self.labels, self.sizes = labels, sizes
        self.transforms = {
            resolution: transforms.Compose(
                [transforms.Resize((size, size))]
                + ([transforms.RandomHorizontalFlip()] if flip[resolution] else [])
                + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
            for resolution, size in sizes.items()}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        item = {resolution: self.transforms[resolution](
            Image.open(self.paths[resolution][index]).convert("RGB"))
            for resolution in self.sizes}
        item["labels"] = int(self.labels[index])
        item["index"] = index
        return item


# --- timing ----------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_second(batches, work, device: torch.device, warmup: int = 1) -> float:
    """Run ``work`` on each batch of the iterable; time all but the first ``warmup``."""
    iterator = iter(batches)
    for _ in range(warmup):
        work(next(iterator))
    _sync(device)
    start, count = time.perf_counter(), 0
    for batch in iterator:
        work(batch)
        count += len(batch["labels"])
    _sync(device)
    return count / (time.perf_counter() - start)


def benchmark_stage(stage: str, images: ImageSet, data_dir: Path, settings: BenchSettings,
                    runtime: Runtime) -> dict:
    device, batch_size = runtime.device, settings.batch_size
    resolutions = STAGE_RESOLUTIONS[stage]
    sizes = {resolution: settings.input_size for resolution in resolutions}
    split = images.split
    train_idx = split.indices("train")
    generator = epoch_generator(0, 1)
    order = batch_indices(train_idx, batch_size, generator, drop_last=True)
    needed = max(settings.pipeline_batches, settings.steps) + 1
    if len(order) < needed:
        raise ToolError(f"{settings.images} images give {len(order)} training batches of "
                        f"{batch_size}, the benchmark needs {needed}: raise --images or lower "
                        f"--pipeline-batches / --steps")
    classes = len(split.classes)

    torch.manual_seed(0)
    model = build_model(settings.arch, classes, input_size=settings.input_size)
    if stage == "kd_student":
        teacher = build_model(settings.arch, classes, input_size=settings.input_size)
        objective = Distiller(model, [FrozenTeacher(teacher)], DEFAULT_METHOD)
    else:
        objective = HardLabels(model, resolutions[0])
    objective.to(device).train()
    if runtime.channels_last:
        objective.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad],
                                  lr=1e-4)

    def our_views(batch):
        params = sample_view_params(len(batch["labels"]), generator, True, 0.75,
                                    view_grid(batch, sizes))
        with torch.no_grad():
            return runtime.prepare(make_views(batch, sizes, params))

    def reference_loader(count: int):
        dataset = ReferenceStyleDataset(data_dir, split.frame, images.labels, sizes,
                                        flip={"lr": True, "hr": stage != "kd_student"})
        loader = DataLoader(torch.utils.data.Subset(dataset, train_idx), batch_size=batch_size,
                            shuffle=True, num_workers=settings.reference_workers,
                            drop_last=True,
                            pin_memory=device.type == "cuda", persistent_workers=False)
        for batch in islice(loader, count):
            yield {key: value.to(device, non_blocking=True) for key, value in batch.items()}

    def our_batches(count: int):
        return iterate_batches(images, order[:count], resolutions, device)

    def step_on(views_of):
        return lambda batch: train_step(objective, views_of(batch), batch, optimizer, runtime)

    # The two pipelines alternate, so that a slow spell of a shared machine hits both.
    rounds = {"ours": [], "reference": []}
    for _ in range(settings.pipeline_rounds):
        rounds["ours"].append(_images_per_second(
            our_batches(settings.pipeline_batches + 1), our_views, device))
        rounds["reference"].append(_images_per_second(
            reference_loader(settings.pipeline_batches + 1), lambda batch: None, device))
    result = {"pipeline_ours": statistics.median(rounds["ours"]),
              "pipeline_reference": statistics.median(rounds["reference"]),
              "pipeline_rounds": rounds}
    fixed = next(iter(our_batches(1)))
    fixed_views = our_views(fixed)
    result["floor"] = _images_per_second(
        [fixed] * (settings.steps + 1), step_on(lambda batch: fixed_views), device)
    result["full_ours"] = _images_per_second(our_batches(settings.steps + 1),
                                             step_on(our_views), device)
    result["full_reference"] = _images_per_second(
        reference_loader(settings.steps + 1),
        step_on(lambda batch: runtime.prepare({r: batch[r] for r in resolutions})), device)
    result["full_over_floor"] = result["full_ours"] / result["floor"]
    result["pipeline_ours_over_reference"] = result["pipeline_ours"] / result["pipeline_reference"]
    result["full_ours_over_reference"] = result["full_ours"] / result["full_reference"]
    return result


def machine_description(device: torch.device) -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def run_benchmark(data_dir: Path, out_dir: Path, settings: BenchSettings, runtime: Runtime,
                  stages) -> dict:
    data_dir = write_benchmark_dataset(data_dir, settings.images)
    split = load_or_create_split(data_dir, out_dir, seed=0, quiet=True)
    cache_dir = Path(out_dir) / "cache"
    caches_before = set(cache_dir.glob("*.npy"))
    start = time.perf_counter()
    image_set = ImageSet.load(split, data_dir, ["lr", "hr"], cache_dir)
    decode_seconds = time.perf_counter() - start
    fresh = set(cache_dir.glob("*.npy")) != caches_before
    report = {
        "machine": machine_description(runtime.device),
        "settings": {**asdict(settings), "amp_bf16": runtime.amp,
                     "channels_last": runtime.channels_last,
                     "host_allocator": keep_freed_memory()},
        "decode_once_seconds": round(decode_seconds, 2),
        "decode_once_from": "image files" if fresh else "the disk cache",
        "stages": {},
    }
    for stage in stages:
        report["stages"][stage] = benchmark_stage(stage, image_set, data_dir, settings, runtime)
    return report


def print_report(report: dict) -> None:
    machine, settings = report["machine"], report["settings"]
    print(f"machine: {machine['device']} ({machine['cpu']}, {machine['cpu_cores']} cores), "
          f"torch {machine['torch']}")
    print(f"{settings['arch']} at {settings['input_size']} px, batch {settings['batch_size']}, "
          f"{settings['images']} image pairs; one-time decode {report['decode_once_seconds']}s "
          f"(from {report['decode_once_from']})")
    print(f"host memory: {settings['host_allocator']}")
    header = (f"{'stage':<12}{'pipe ours':>11}{'pipe ref':>10}{'floor':>9}{'full ours':>11}"
              f"{'full ref':>10}{'full/floor':>12}{'pipe o/r':>10}{'full o/r':>10}")
    print("images per second:")
    print(header)
    for stage, r in report["stages"].items():
        print(f"{stage:<12}{r['pipeline_ours']:>11.1f}{r['pipeline_reference']:>10.1f}"
              f"{r['floor']:>9.1f}{r['full_ours']:>11.1f}{r['full_reference']:>10.1f}"
              f"{r['full_over_floor']:>12.2f}{r['pipeline_ours_over_reference']:>10.2f}"
              f"{r['full_ours_over_reference']:>10.2f}")


# --- processes under torchrun ----------------------------------------------------------

def time_processes(data_dir: Path, out_dir: Path, process_counts: list[int],
                   train_args: list[str]) -> dict:
    """Seconds per epoch of ``train_teacher.py train_args`` on ``data_dir`` with each
    number of processes (torchrun on this node; the same global batch, split and cache).
    Epoch 1 carries one-off costs (threads, allocator); later epochs are the steady state."""
    report = {"machine": machine_description(torch.device("cpu")), "train_args": train_args,
              "runs": {}}
    for count in process_counts:
        run_dir = Path(out_dir) / f"processes{count}"
        start = time.perf_counter()
        run_script("train_teacher.py", "--data-dir", str(data_dir), "--out-dir", str(run_dir),
                   "--cache-dir", str(Path(out_dir) / "cache"), "--overwrite", *train_args,
                   processes=count)
        history = pd.read_csv(run_dir / "teacher" / "history.csv")
        report["runs"][count] = {"epoch_seconds": [round(s, 2) for s in history["seconds"]],
                                 "wall_seconds": round(time.perf_counter() - start, 1)}
    return report


def print_processes_report(report: dict) -> None:
    machine = report["machine"]
    print(f"machine: {machine['cpu']}, {machine['cpu_cores']} cores, torch {machine['torch']}")
    print(f"train_teacher.py {' '.join(report['train_args'])}")
    print(f"{'processes':>9}  {'epoch 1 s':>9}  {'later epochs s':>14}  {'wall s':>7}")
    for count, run in report["runs"].items():
        later = run["epoch_seconds"][1:]
        steady = f"{statistics.mean(later):.2f}" if later else "-"
        print(f"{count:>9}  {run['epoch_seconds'][0]:>9.2f}  {steady:>14}  "
              f"{run['wall_seconds']:>7.1f}")
