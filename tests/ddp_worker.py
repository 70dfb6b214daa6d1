"""One train stage as its script runs it, under torchrun or alone, recording what each
process did; tests/test_distributed.py launches it. Not a test module itself.

    torchrun --nproc_per_node=2 -m tests.ddp_worker teacher --data-dir ... --out-dir ...

Environment:
    DDP_RECORD      folder for rank<k>.json (files written, rows trained on per epoch,
                    epochs run, best epoch, early stop, what was in force in the first
                    step: logits' dtype, channels-last input, graphs torch.compile made)
                    and weights-rank<k>.pt (the student's final state)
    DDP_TINY_MODEL  1: a small CNN without BatchNorm instead of --arch, so a sharded run
                    can match a single-process one to float rounding
    DDP_KILL        RANK:EPOCH:STEP: that rank kills itself (SIGKILL) at that step
    DDP_STOP        RANK:EPOCH:STEP: that rank stops itself (SIGSTOP) there, until SIGCONT
                    (the tests interrupt a run at a chosen step, not after a wait that a
                    busy machine can stretch)
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

from src import data, models, stages, trainer
from src.cli import run_main

RANK = int(os.environ.get("RANK", "0"))
RECORD = Path(os.environ["DDP_RECORD"])
written: list[str] = []
rows_by_epoch: dict[int, list[int]] = {}
current_epoch, steps = [0], [0]
decisions: dict = {}
in_force: dict = {}


def recording(write):
    def record_then_write(path, *args, **kwargs):
        written.append(str(path))
        return write(path, *args, **kwargs)
    return record_then_write


for module in (stages, trainer, models, data):
    for name in ("save_torch", "write_csv", "write_json"):
        if hasattr(module, name):
            setattr(module, name, recording(getattr(module, name)))


def tiny_model(arch: str, num_classes: int, weights: str = "none",
               input_size: int | None = None, partial: bool = False) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))


if os.environ.get("DDP_TINY_MODEL") == "1":
    # Also where checkpoints are rebuilt, so a KD student can load a tiny teacher.
    stages.build_model = models.build_model = tiny_model

# The signal each rank sends itself, and the step (rank, epoch, step) it sends it at.
SIGNAL_AT = {signal.SIGKILL: os.environ.get("DDP_KILL"),
             signal.SIGSTOP: os.environ.get("DDP_STOP")}
original_epoch, original_step, original_fit = trainer.train_one_epoch, trainer.train_step, \
    stages.fit


def train_one_epoch(*args, **kwargs):
    current_epoch[0] += 1
    steps[0] = 0
    return original_epoch(*args, **kwargs)


def train_step(trainer_module, views, batch, *args, **kwargs):
    for signal_number, at in SIGNAL_AT.items():
        if at and [RANK, current_epoch[0], steps[0]] == [int(part) for part in at.split(":")]:
            os.kill(os.getpid(), signal_number)
    steps[0] += 1
    rows_by_epoch.setdefault(current_epoch[0], []).extend(batch["index"].tolist())
    result = original_step(trainer_module, views, batch, *args, **kwargs)
    if not in_force:
        # Observed, not echoed: autocast shows in the logits' dtype, the memory format in
        # the strides of the images the model was given.
        images = next(view for view in views.values() if view.dim() == 4)
        in_force.update(logits_dtype=str(result[0].dtype),
                        channels_last=images.is_contiguous(memory_format=torch.channels_last)
                        and not images.is_contiguous())
    return result


def fit(objective, images, cfg, stage_dir, runtime, meta, resume, **options):
    # A resumed run counts its epochs from where it starts.
    current_epoch[0] = torch.load(Path(stage_dir) / "last.pt", weights_only=True)[
        "state"]["epoch"] if resume else 0
    summary = original_fit(objective, images, cfg, stage_dir, runtime, meta, resume, **options)
    decisions.update({key: summary[key] for key in ("epochs_run", "best_epoch", "stopped_early")})
    in_force["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch.save(objective.student.state_dict(), RECORD / f"weights-rank{RANK}.pt")
    return summary


trainer.train_one_epoch, trainer.train_step, stages.fit = train_one_epoch, train_step, fit


def main() -> int:
    stage, argv = sys.argv[1], sys.argv[2:]
    try:
        return stages.train_main(stage, argv)
    finally:
        (RECORD / f"rank{RANK}.json").write_text(json.dumps(
            {"written": written, "rows": rows_by_epoch, "decisions": decisions,
             "in_force": in_force}))


if __name__ == "__main__":
    run_main(main)
