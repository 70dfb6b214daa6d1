"""Classifiers by name (``backbones``), their starting weights, checkpoints and the frozen
teacher."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import backbones
from .backbones import classifier_head
from .cli import ToolError, load_torch, save_torch

# Architectures we test (tests/test_models.py, tests/test_backbones.py); any other
# torchvision classification model name, or timm:<name>, also works.
TESTED_ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large", "efficientnet_b0")
TESTED_TRANSFORMERS = ("vit_b_16", "swin_t", "timm:vit_tiny_patch16_224",
                       "timm:beit_base_patch16_224", "timm:convnext_atto")


def build_model(arch: str, num_classes: int, weights: str = "none",
                input_size: int | None = None, partial: bool = False) -> nn.Module:
    """A torchvision or timm (``timm:<name>``) classifier with a ``num_classes`` head.

    ``weights``: ``imagenet`` (the library's pretrained weights), ``none`` (random
    initialisation) or the path of a state dict / checkpoint to start from (``partial``:
    even if some of the model's tensors are not in it).
    ``input_size``: transformers built for a fixed size (ViT, BEiT) are built for it.
    """
    model = backbones.create(arch, num_classes, weights == "imagenet", input_size)
    if weights not in ("imagenet", "none"):
        _load_partial(model, _read_state_dict(Path(weights)), Path(weights), arch, partial)
        # A fresh head whatever the file held: the measured teacher-initialised runs.
        backbones.replace_head(model, num_classes)
    return model


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise ToolError(f"--weights {path}: file not found (use imagenet, none or a path)")
    loaded = load_torch(path, "--weights")
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ToolError(f"--weights {path}: holds no state dict")
    return state


def _load_partial(model: nn.Module, state: dict, path: Path, arch: str,
                  partial: bool = False) -> None:
    """Load every tensor of the file that fits the model and say how many. The head is
    replaced by a fresh one afterwards, so only the rest must come from the file: a file
    that leaves any other tensor of the model at its random start is refused unless
    ``partial``."""
    own = model.state_dict()
    head = backbones.classifier_head(model)
    head_name = next(name for name, module in model.named_modules() if module is head)
    head_keys = {f"{head_name}.{key}" for key in head.state_dict()}
    fitting = {key: value for key, value in state.items()
               if key in own and own[key].shape == value.shape}
    missing = [key for key in own if key not in fitting and key not in head_keys]
    if missing and not partial:
        raise ToolError(f"--weights {path} does not fit {arch}: {len(missing)} of its "
                        f"{len(own) - len(head_keys)} tensors below the head are missing from "
                        f"the file or shaped otherwise (first: {missing[0]}); pass "
                        f"--partial-weights to start from the {len(fitting)} that fit")
    model.load_state_dict(fitting, strict=False)
    print(f"--weights {path}: loaded {len(fitting)} tensors, "
          f"{len(missing)} left at their random start, {len(state) - len(fitting)} of the "
          f"file's not used; the classification head starts fresh")


@contextmanager
def capture_penultimate(model: nn.Module):
    """Collect the head's inputs (penultimate features) during forwards, by a hook, so no
    model's code changes. Yields the list the (B, D) feature batches are appended to."""
    captured = []
    handle = classifier_head(model).register_forward_pre_hook(
        lambda module, inputs: captured.append(inputs[0].detach().float().flatten(1).cpu()))
    try:
        yield captured
    finally:
        handle.remove()


# --- checkpoints -----------------------------------------------------------------------

def save_checkpoint(path: Path, model: nn.Module, meta: dict) -> None:
    """A stage's model: weights plus what is needed to rebuild and check it."""
    save_torch(path, {"model": model.state_dict(), **meta})


def load_checkpoint(path: Path, classes: list[str] | None = None,
                    arch: str | None = None, what: str = "checkpoint") -> tuple[nn.Module, dict]:
    """Rebuild the model saved at ``path``; check it was trained on ``classes`` and is an
    ``arch`` when those are given. Returns the model (on the CPU, eval mode) and its meta."""
    path = Path(path)
    if not path.is_file():
        hint = ("train the teacher first (train_teacher.py with this --out-dir), or name one "
                "with --teacher-ckpt" if what == "teacher checkpoint" else "train that stage first")
        raise ToolError(f"{what} {path} not found ({hint})")
    checkpoint = load_torch(path, what)
    required = ("model", "arch", "classes")
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in required):
        raise ToolError(f"{what} {path} is not a checkpoint of this tool "
                        f"(needs keys: {', '.join(required)})")
    if arch is not None and checkpoint["arch"] != arch:
        raise ToolError(f"{what} {path} is a {checkpoint['arch']}, not a {arch}")
    if classes is not None and list(checkpoint["classes"]) != list(classes):
        unknown = sorted(set(classes) - set(checkpoint["classes"]))
        detail = (f"labels unknown to it: {', '.join(unknown[:5])}" if unknown
                  else "class lists differ")
        raise ToolError(f"{what} {path} was trained on another class list than the split "
                        f"({detail})")
    model = build_model(checkpoint["arch"], len(checkpoint["classes"]), weights="none",
                        input_size=checkpoint.get("input_size"))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ToolError(f"{what} {path} does not fit a {checkpoint['arch']} ({first})") from None
    model.eval()
    return model, {key: value for key, value in checkpoint.items() if key != "model"}


def checkpoint_stage(path) -> str | None:
    """The stage (teacher, student, kd_student) that saved the checkpoint at ``path``; None
    for anything else (a missing, unreadable or foreign file: load_checkpoint names why)."""
    try:
        checkpoint = load_torch(path, "checkpoint")
    except ToolError:
        return None
    return checkpoint.get("stage") if isinstance(checkpoint, dict) else None


def load_teacher(ckpt: Path, classes: list[str],
                 resolution: str = "hr") -> tuple[nn.Module, dict]:
    """A teacher's checkpoint, trained on ``classes``: what a KD student learns from. An
    HR teacher (train_teacher.py), or with ``resolution`` "lr" a pseudo-teacher (an LR
    student of an earlier round)."""
    what = "teacher checkpoint" if resolution == "hr" else "--pseudo-teacher checkpoint"
    model, meta = load_checkpoint(ckpt, classes=classes, what=what)
    if meta.get("resolution") != resolution:
        raise ToolError(f"{what} {ckpt} was trained on {str(meta.get('resolution')).upper()} "
                        f"images; " + ("the KD teacher must be an HR model (train_teacher.py)"
                                       if resolution == "hr" else "a pseudo-teacher must be an "
                                       "LR model (train_student.py or train_kd_student.py)"))
    return model, meta


class FrozenTeacher(nn.Module):
    """A teacher that cannot learn: no gradients, always in eval mode (``train()`` is a
    no-op), forward under ``no_grad``. Wrapping it here keeps BatchNorm statistics and
    weights fixed however the surrounding module is switched."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)
