"""Optional experiment trackers: ``--tensorboard`` and ``--wandb``.

A train stage logs every figure of its ``history.csv`` row (each loss term of the
Distiller, accuracies, macro-F1, learning rate, seconds) once per epoch, with the epoch as
the step; a test stage logs its test metrics and the figures it wrote, as images. Both
trackers are imported only when asked for (neither is a requirement of training, the demo
or a model's test), and under torchrun only rank 0 logs.

    --tensorboard   event files in <stage folder>/tensorboard/ (tensorboard --logdir runs)
    --wandb         a Weights & Biases run whose files go to <stage folder>/wandb/;
                    WANDB_MODE=offline keeps it on this machine (wandb sync uploads it later)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from .cli import ToolError

INSTALL = "pip install -r requirements-trackers.txt"
WANDB_PROJECT = "lowres-kd"


def add_tracker_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("experiment tracking (optional)")
    group.add_argument("--tensorboard", action="store_true",
                       help="also write TensorBoard event files to <stage folder>/tensorboard/ "
                            f"(needs the tensorboard package: {INSTALL})")
    group.add_argument("--wandb", action="store_true",
                       help="also log to Weights & Biases, files in <stage folder>/wandb/; "
                            "WANDB_MODE=offline logs on this machine only (needs the wandb "
                            f"package: {INSTALL})")
    group.add_argument("--wandb-project", default=WANDB_PROJECT,
                       help="the W&B project of --wandb's runs (default: %(default)s)")


def require_trackers(args) -> None:
    """Import the trackers asked for, before any work: a missing one is one line."""
    for flag, module in (("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")):
        if getattr(args, flag, False):
            try:
                __import__(module)
            except ImportError as error:
                raise ToolError(f"--{flag} needs the {flag} package, which is not installed "
                                f"({error}): {INSTALL}") from None


class Trackers:
    """The trackers of one stage folder (none: every call does nothing)."""

    def __init__(self, args, stage_dir: Path, name: str, config: dict, job: str,
                 enabled: bool = True):
        self.writer, self.run = None, None
        if not enabled:
            return
        if getattr(args, "tensorboard", False):
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(stage_dir) / "tensorboard"))
        if getattr(args, "wandb", False):
            import wandb
            try:
                self.run = wandb.init(project=args.wandb_project, name=name, job_type=job,
                                      dir=str(stage_dir), config=config, reinit=True)
            except Exception as error:     # wandb's own errors: no login, no network
                self.close()
                raise ToolError(f"--wandb could not start a run ({type(error).__name__}: "
                                f"{error}); log in with `wandb login`, or set "
                                f"WANDB_MODE=offline to log on this machine only") from None

    def log_scalars(self, values: dict, step: int) -> None:
        numbers = {key: float(value) for key, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.run is not None:
            self.run.log(numbers, step=step)

    def log_epoch(self, row: dict) -> None:
        """One history.csv row: every column but the epoch, at that epoch."""
        self.log_scalars({key: value for key, value in row.items() if key != "epoch"},
                         int(row["epoch"]))

    def log_images(self, paths: list[Path], step: int = 0) -> None:
        for path in paths:
            tag = f"figures/{Path(path).stem}"
            if self.writer is not None:
                pixels = np.asarray(Image.open(path).convert("RGB"))
                self.writer.add_image(tag, pixels, step, dataformats="HWC")
                self.writer.flush()
            if self.run is not None:
                import wandb
                self.run.log({tag: wandb.Image(str(path))})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.run is not None:
            self.run.finish()
            self.run = None
