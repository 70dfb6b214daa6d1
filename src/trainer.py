"""``fit``: AdamW with one of two schedules, the best (or last) checkpoint, per-epoch
history, and ``--resume`` that restores everything (model, optimizer, scheduler,
early-stopping state, history, random-number states).

Schedules:
    plateau   ReduceLROnPlateau on validation loss, early stopping on ``monitor`` (the
              reference setup; the budget depends on when it stops)
    cosine    linear warm-up, then cosine decay to ``min_lr``, stepped every batch, for
              exactly ``epochs`` epochs (a fixed budget, the same for every model)

Files in a stage folder:
    best.pt             the best model so far (what the test scripts evaluate)
    last.pt             everything needed to resume; rewritten after every epoch
    history.csv         one row per epoch
    train_summary.json  written when the stage finished (early stop or last epoch)
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import distributed
from .backbones import layer_scales
from .cli import ToolError, load_torch, progress_bar, save_torch, write_csv, write_json
from .data import ImageSet, batch_indices, epoch_generator, iterate_batches, make_views, \
    sample_view_params, view_grid
from .lr_render import render_lr_from_hr
from .metrics import classification_metrics
from .mixing import mix_views, sample_mix_params
from .models import capture_penultimate, save_checkpoint
from .transfer import UNLABELLED, unlabelled_batches


@dataclass
class FitConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    lr_factor: float
    lr_patience: int
    min_lr: float
    patience: int
    monitor: str              # "val_loss" (lower is better), "val_acc", "val_macro_f1", "last"
    hflip: bool
    crop_scale: float         # smallest crop area fraction; 1 disables cropping
    seed: int
    amp: bool                 # bf16 autocast (CUDA)
    channels_last: bool
    view_sizes: dict          # resolution -> network input size, e.g. {"lr": 224}
    schedule: str = "plateau"     # "plateau" or "cosine"
    warmup_epochs: float = 0.0    # cosine: linear warm-up length
    mixup: float = 0.0            # Beta concentration; 0 = off
    cutmix: float = 0.0           # Beta concentration; 0 = off
    sync_bn: bool = False         # under torchrun on CUDA: SyncBatchNorm in the student
    layer_decay: float = 1.0      # layer-wise learning-rate decay of the student; 1 = off
    lr_from_hr: int = 0           # HR/LR factor: LR views rendered from HR twins; 0 = off
    unlabelled_ratio: float = 0.0  # unlabelled rows per labelled row in a batch; 0 = none


@dataclass
class Runtime:
    device: torch.device
    amp: bool
    channels_last: bool

    def autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def prepare(self, views: dict) -> dict:
        if self.channels_last:
            return {key: view.contiguous(memory_format=torch.channels_last)
                    for key, view in views.items()}
        return views


def train_one_epoch(objective, images: ImageSet, batches, view_sizes: dict, cfg: FitConfig,
                    generator: torch.Generator, optimizer, runtime: Runtime,
                    description: str, scheduler=None, trainer=None,
                    labelled_counts: list[int] | None = None) -> dict:
    """One pass over the global ``batches``; returns mean loss terms, raw cross-entropy
    and accuracy (over every process, on labelled rows). ``scheduler`` (if any) is stepped
    after every batch. ``trainer`` is the module whose forward trains (the DDP wrapper
    under torchrun, else ``objective``): each process draws the views and mixing of the
    whole global batch, so they do not depend on the number of processes, and trains on
    its share. ``labelled_counts``: per batch, how many of its first rows are labelled; the
    rest are unlabelled (label -1), mixed among themselves and shared out as a group."""
    trainer = trainer or objective
    objective.train()
    sums = defaultdict(lambda: torch.zeros((), device=runtime.device))
    seen = 0
    world_size = distributed.current().world_size
    progress = progress_bar(iterate_batches(images, batches, view_sizes, runtime.device),
                    total=len(batches), desc=description, unit="batch", leave=False)
    for step, batch in enumerate(progress):
        labels = batch["labels"]
        if cfg.lr_from_hr:
            batch["lr"], batch["hr"] = render_lr_from_hr(batch["hr"], cfg.lr_from_hr, generator)
        grid = view_grid(batch, view_sizes)
        groups = (len(labels),) if labelled_counts is None or labelled_counts[step] == len(
            labels) else (labelled_counts[step], len(labels) - labelled_counts[step])
        params = sample_view_params(len(labels), generator, cfg.hflip, cfg.crop_scale, grid)
        mix = sample_mix_params(len(labels), generator, cfg.mixup, cfg.cutmix, grid, groups)
        with torch.no_grad():
            views = runtime.prepare(mix_views(make_views(batch, view_sizes, params), mix))
        rows = distributed.share_groups(groups)
        share_views = {key: view[rows] for key, view in views.items()}
        targets = {"labels": labels[rows], "index": batch["index"][rows]}
        if mix is not None:
            targets["mix"] = mix
            targets["partner_labels"] = labels[mix.partner.to(labels.device)][rows]
        # Accuracy on a mixed batch counts the label of the larger share.
        counted = targets["partner_labels"] if mix is not None and mix.lam < 0.5 \
            else targets["labels"]
        # DDP averages the processes' gradients; weighting each share's mean loss by its
        # size makes that average the gradient of the global batch's mean loss.
        loss_scale = world_size * len(counted) / len(labels)
        logits, terms, loss = train_step(trainer, share_views, targets, optimizer, runtime,
                                         loss_scale)
        if scheduler is not None:
            scheduler.step()

        with torch.no_grad():
            # Unlabelled rows (label -1) count in the loss but not in accuracy or CE.
            labelled = counted >= 0
            count = int(labelled.sum())
            seen += count
            sums["loss"] += loss.detach() * count
            for name, term in terms.items():
                sums[f"loss_{name}"] += term.detach() * count
            if count:
                sums["ce"] += F.cross_entropy(logits.detach().float()[labelled],
                                              counted[labelled]) * count
            sums["correct"] += (logits.argmax(1)[labelled] == counted[labelled]).sum()
        if step % 20 == 0 or step == len(batches) - 1:
            # Reading the loss back synchronises the device, so only every 20 steps.
            running = sums["loss"].item() / max(seen, 1)
            _check_finite(running, description, step)
            progress.set_postfix(loss=f"{running:.4f}")
    names = sorted(sums)
    seen_images = torch.tensor(float(seen), device=runtime.device)
    totals = distributed.all_reduce_sum(
        torch.stack([sums[name].float() for name in names] + [seen_images]))
    totals = dict(zip([*names, "seen"], totals.tolist()))
    means = {name: totals[name] / totals["seen"] for name in names if name != "correct"}
    means["acc"] = totals["correct"] / totals["seen"]
    return means


def train_step(trainer, views: dict, batch: dict, optimizer, runtime: Runtime,
               loss_scale: float = 1.0):
    """One optimisation step on ready views; returns logits, loss terms and their sum."""
    with runtime.autocast():
        logits, terms = trainer(views, batch)
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    (loss * loss_scale).backward()
    optimizer.step()
    return logits, terms, loss


def _check_finite(value: float, description: str, step: int) -> None:
    if not math.isfinite(value):
        raise ToolError(f"training loss became {value} in {description} (step {step}); stopped, "
                        f"the last good checkpoint is kept; try a lower --lr")


@torch.no_grad()
def evaluate(objective, images: ImageSet, indices: np.ndarray, view_sizes: dict,
             batch_size: int, runtime: Runtime, description: str = "evaluating",
             features: bool = False, shared: bool = False) -> dict:
    """Cross-entropy, accuracy and macro-F1 on ``indices`` (whole images, no augmentation).

    Also returns ``logits`` (N, classes) and ``labels``, and with ``features`` the
    student's penultimate features (N, D). ``shared``: under torchrun every process
    evaluates its share of ``indices`` and all get every row's result, so decisions made
    on it agree.
    """
    objective.eval()
    if shared:
        indices = indices[distributed.share(len(indices))]
    all_logits, all_labels = [], []
    batches = batch_indices(indices, batch_size, generator=None)
    with capture_penultimate(objective.student) if features else nullcontext() as captured:
        for batch in progress_bar(iterate_batches(images, batches, view_sizes, runtime.device),
                          total=len(batches), desc=description, unit="batch", leave=False):
            views = runtime.prepare(make_views(batch, view_sizes, params=None))
            with runtime.autocast():
                logits = objective.predict(views)
            all_logits.append(logits.float().cpu())
            all_labels.append(batch["labels"].cpu())
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    if shared:
        logits = distributed.all_gather_rows(logits, runtime.device)
        labels = distributed.all_gather_rows(labels, runtime.device)
    # Scores count labelled rows only (cached teacher logits also cover unlabelled ones).
    known = labels >= 0
    result = classification_metrics(labels[known].numpy(), logits[known].argmax(1).numpy())
    result["loss"] = F.cross_entropy(logits[known], labels[known]).item()
    result["logits"], result["labels"] = logits, labels
    if features:
        result["features"] = torch.cat(captured)
        if shared:
            result["features"] = distributed.all_gather_rows(result["features"], runtime.device)
    return result


def fit(objective, images: ImageSet, cfg: FitConfig, stage_dir: Path, runtime: Runtime,
        checkpoint_meta: dict, resume: bool, on_epoch=None) -> dict:
    """Train ``objective.student`` on the split's train rows, select on the val rows;
    ``on_epoch(row)`` is called with each epoch's history.csv row once it is saved.

    Returns the summary that is also written to ``train_summary.json``. Under torchrun
    every process runs this; rank 0 alone writes the files.
    """
    stage_dir = Path(stage_dir)
    context = distributed.current()
    train_idx, val_idx = images.split.indices("train"), images.split.indices("val")
    if 0 < len(val_idx) < context.world_size:
        raise ToolError(f"{len(val_idx)} validation images cannot be shared among "
                        f"{context.world_size} processes; use fewer processes")
    # Unlabelled rows (a transfer set) join every training batch; see transfer.py.
    unlabelled_idx = images.split.indices(UNLABELLED) if cfg.unlabelled_ratio > 0 \
        else np.empty(0, dtype=np.int64)
    trainer = distributed.wrap_for_training(objective, runtime.device, cfg.sync_bn)
    optimizer = torch.optim.AdamW(parameter_groups(objective, cfg.lr, cfg.layer_decay),
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    # A share of one image would break BatchNorm; dropping a last batch too short to give
    # every process two images avoids that.
    drop_last = 0 < len(train_idx) % cfg.batch_size < 2 * context.world_size
    steps_per_epoch = len(batch_indices(train_idx, cfg.batch_size, None, drop_last=drop_last))
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    state = _resumed_state(stage_dir, objective, optimizer, scheduler, context) if resume \
        else {"epoch": 0, "best_score": None, "best_epoch": 0, "bad_epochs": 0,
              "history": [], "train_seconds": 0.0, "world_size": context.world_size}

    stopped_early = False
    if cfg.monitor == "last":
        print("(the last epoch's weights are the model: best.pt)")
    else:
        print(f"(* marks the best epoch so far by {cfg.monitor}: its weights are best.pt; "
              f"lr is the rate at the epoch's end)")
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        start = time.perf_counter()
        generator = epoch_generator(cfg.seed, epoch)
        objective.start_epoch(epoch)
        batches, labelled_counts = _epoch_batches(train_idx, unlabelled_idx, cfg, generator,
                                                  drop_last, epoch)
        lr = max(group["lr"] for group in optimizer.param_groups)
        train = train_one_epoch(objective, images, batches, cfg.view_sizes, cfg, generator,
                                optimizer, runtime, f"epoch {epoch}/{cfg.epochs} train",
                                scheduler if cfg.schedule == "cosine" else None, trainer,
                                labelled_counts)
        distributed.broadcast_buffers(objective)
        # A final fit (--final-fit) has no validation rows: its figures are NaN.
        val = evaluate(objective, images, val_idx, cfg.view_sizes, cfg.batch_size, runtime,
                       f"epoch {epoch}/{cfg.epochs} val", shared=True) if len(val_idx) \
            else {"loss": float("nan"), "accuracy": float("nan"), "macro_f1": float("nan")}
        if cfg.schedule == "plateau":
            scheduler.step(val["loss"])
        lr_end = max(group["lr"] for group in optimizer.param_groups)
        row = {"epoch": epoch, "train_loss": train.pop("loss"), "train_ce": train.pop("ce"),
               "train_acc": train.pop("acc"), **train, "val_loss": val["loss"],
               "val_acc": val["accuracy"], "val_macro_f1": val["macro_f1"], "lr": lr,
               "lr_end": lr_end, "seconds": time.perf_counter() - start}
        improved, stopped_early = _select(state, row, cfg)
        if context.is_main:
            _save_epoch(stage_dir, objective, optimizer, scheduler, state, checkpoint_meta,
                        improved, finished=stopped_early or epoch == cfg.epochs)
        if on_epoch is not None:
            on_epoch(row)
        print(f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
              f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
              f" f1 {row['val_macro_f1']:.4f}  lr {lr_end:.2e}  {row['seconds']:.1f}s"
              + ("  *" if improved and cfg.monitor != "last" else ""))
        if stopped_early:
            print(f"early stop: no {cfg.monitor} improvement for {cfg.patience} epochs")
            break

    summary = {"finished": True, "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
               **({} if cfg.monitor == "last" else {f"best_{cfg.monitor}": state["best_score"]}),
               "stopped_early": stopped_early,
               "train_seconds": round(state["train_seconds"], 2),
               "processes": context.world_size,
               "config": {key: value for key, value in asdict(cfg).items()}}
    if context.is_main:
        write_json(stage_dir / "train_summary.json", summary)
    return summary


def _resumed_state(stage_dir: Path, objective, optimizer, scheduler, context) -> dict:
    state = _restore(stage_dir / "last.pt", objective, optimizer, scheduler)
    print(f"resuming after epoch {state['epoch']} (best so far: epoch {state['best_epoch']})")
    saved_world = state.get("world_size", 1)
    if saved_world != context.world_size:
        # The global batches, their order and augmentation do not depend on the number of
        # processes, so the run goes on as it would have.
        print(f"note: the run was trained by {saved_world} process(es), resumes with "
              f"{context.world_size}; the global batch is unchanged")
        state["world_size"] = context.world_size
    return state


def _epoch_batches(train_idx, unlabelled_idx, cfg: FitConfig, generator, drop_last: bool,
                   epoch: int) -> tuple[list, list | None]:
    """The epoch's batches of row positions and, with a transfer set, how many of each
    batch's rows are labelled (they come first)."""
    batches = batch_indices(train_idx, cfg.batch_size, generator, drop_last=drop_last)
    if not len(unlabelled_idx):
        return batches, None
    extra = unlabelled_batches(unlabelled_idx, batches, cfg.unlabelled_ratio, cfg.seed, epoch)
    labelled_counts = [len(batch) for batch in batches]
    return [np.concatenate([batch, more]) for batch, more in zip(batches, extra)], \
        labelled_counts


def _select(state: dict, row: dict, cfg: FitConfig) -> tuple[bool, bool]:
    """Add the epoch to ``state``: whether it is the best so far by ``cfg.monitor``, and
    whether early stopping ends the run here."""
    state["history"].append(row)
    state["train_seconds"] += row["seconds"]
    score = row["epoch"] if cfg.monitor == "last" else row[cfg.monitor]
    best = state["best_score"]
    improved = best is None or (score < best if cfg.monitor == "val_loss" else score > best)
    if improved:
        state.update(best_score=score, best_epoch=row["epoch"], bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    state["epoch"] = row["epoch"]
    # A fixed budget (cosine) or the last epoch as the model: no early stop.
    stopped_early = (cfg.schedule == "plateau" and cfg.monitor != "last"
                     and state["bad_epochs"] >= cfg.patience)
    return improved, stopped_early


def _save_epoch(stage_dir: Path, objective, optimizer, scheduler, state: dict,
                checkpoint_meta: dict, improved: bool, finished: bool) -> None:
    row = state["history"][-1]
    if improved:
        save_checkpoint(stage_dir / "best.pt", objective.student,
                        {**checkpoint_meta, "epoch": row["epoch"], "val_loss": row["val_loss"],
                         "val_acc": row["val_acc"], "val_macro_f1": row["val_macro_f1"],
                         "distill_modules": objective.extra_state()})
    write_csv(stage_dir / "history.csv", pd.DataFrame(state["history"]))
    # last.pt is written last: it is the commit point a resume starts from.
    _save_last(stage_dir / "last.pt", objective, optimizer, scheduler, state, finished)


def parameter_groups(objective, lr: float, layer_decay: float) -> list[dict]:
    """The trainable parameters; with ``layer_decay`` < 1, one group per learning-rate
    scale of the student's layers (``backbones.layer_scales``), the alignment layers of a
    distiller at the full rate. Both schedules scale every group's rate alike."""
    trainable = [(name, parameter) for name, parameter in objective.named_parameters()
                 if parameter.requires_grad]
    if layer_decay == 1.0:
        return [{"params": [parameter for _, parameter in trainable]}]
    scales = {f"student.{name}": scale
              for name, scale in layer_scales(objective.student, layer_decay).items()}
    groups: dict[float, list] = defaultdict(list)
    for name, parameter in trainable:
        groups[scales.get(name, 1.0)].append(parameter)
    return [{"params": params, "lr": lr * scale} for scale, params in sorted(groups.items())]


def make_scheduler(optimizer, cfg: FitConfig, steps_per_epoch: int):
    """ReduceLROnPlateau (stepped on validation loss once an epoch), or linear warm-up then
    cosine decay from ``lr`` to ``min_lr`` (stepped every batch)."""
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience,
            min_lr=cfg.min_lr)
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        # ``step`` batches are done; this is the factor for the next one.
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


FROZEN_PREFIXES = ("teachers.",)


def _trainable_state(objective) -> dict:
    """The objective's state without the frozen teachers (they have their own checkpoints)."""
    return {key: value for key, value in objective.state_dict().items()
            if not key.startswith(FROZEN_PREFIXES)}


def _save_last(path: Path, objective, optimizer, scheduler, state: dict, finished: bool) -> None:
    save_torch(path, {
        "objective": _trainable_state(objective),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": state,
        "finished": finished,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    })


def _restore(path: Path, objective, optimizer, scheduler) -> dict:
    saved = load_torch(path, "cannot resume: checkpoint")
    try:
        # The frozen teachers are not in last.pt (they have their own checkpoints).
        loaded = objective.load_state_dict(saved["objective"], strict=False)
        missing = [key for key in loaded.missing_keys if not key.startswith(FROZEN_PREFIXES)]
        if missing or loaded.unexpected_keys:
            raise KeyError(f"model keys do not match: {(missing + loaded.unexpected_keys)[:3]}")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ToolError(f"cannot resume from {path} ({first}); use --overwrite to start "
                        f"again") from None
    torch.set_rng_state(saved["rng"]["torch"])
    if saved["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return saved["state"]


def run_status(stage_dir: Path) -> str:
    """``none``, ``unfinished`` or ``finished``: what a stage folder holds."""
    last = Path(stage_dir) / "last.pt"
    if not last.exists():
        return "none"
    if (Path(stage_dir) / "train_summary.json").exists():
        return "finished"
    try:
        saved = load_torch(last, "last.pt")
    except ToolError:
        return "unfinished"     # a resume names the problem, in one line
    return "finished" if isinstance(saved, dict) and saved.get("finished") else "unfinished"
