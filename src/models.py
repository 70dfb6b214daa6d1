"""torchvision classifiers by name, their weights, checkpoints and the frozen teacher."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from torch import nn

from .cli import ToolError, save_torch

# Architectures we test; any other torchvision classification model name also works.
TESTED_ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large", "efficientnet_b0")


def available_archs() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str, num_classes: int, weights: str = "none") -> nn.Module:
    """A torchvision classifier with its head replaced for ``num_classes``.

    ``weights``: ``imagenet`` (torchvision's default weights), ``none`` (random
    initialisation) or the path of a state dict / checkpoint to start from.
    """
    if arch not in available_archs():
        raise ToolError(f"unknown --arch {arch!r} (try one of: {', '.join(TESTED_ARCHS)}; "
                        f"any torchvision classification model name works)")
    model = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        model.load_state_dict(_imagenet_state_dict(arch))
    elif weights != "none":
        _load_partial(model, _read_state_dict(Path(weights)), Path(weights), arch)
    _replace_head(model, num_classes)
    return model


def _imagenet_state_dict(arch: str) -> dict:
    """torchvision's ImageNet weights, from the torch hub cache or downloaded as usual."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    file_name = os.path.basename(weights.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # urllib, SSL, hash or disk errors all mean the same to us
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ToolError(f"ImageNet weights for {arch} unavailable: {file_name} is not in "
                        f"{cached.parent} and could not be downloaded ({reason}); put the file "
                        f"there, or pass --weights none to train from scratch") from None


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise ToolError(f"--weights {path}: file not found (use imagenet, none or a path)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ToolError(f"--weights {path}: not a PyTorch weights file ({error})") from None
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ToolError(f"--weights {path}: holds no state dict")
    return state


def _load_partial(model: nn.Module, state: dict, path: Path, arch: str) -> None:
    """Load every tensor that fits; a classification head of another size is skipped."""
    own = model.state_dict()
    fitting = {key: value for key, value in state.items()
               if key in own and own[key].shape == value.shape}
    if len(fitting) < len(own) // 2:
        raise ToolError(f"--weights {path} does not fit {arch} "
                        f"({len(fitting)} of {len(own)} tensors match)")
    model.load_state_dict(fitting, strict=False)


def classifier_head(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of a torchvision classifier: its head."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ToolError(f"{type(model).__name__} has no linear classification head")
    return linears[-1]


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


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last ``nn.Linear`` (``fc``, ``classifier[-1]``, ``heads.head``...)."""
    last = classifier_head(model)
    name = next(module_name for module_name, module in model.named_modules() if module is last)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, num_classes))


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
        raise ToolError(f"{what} {path} not found (train that stage first)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
        raise ToolError(f"{what} {path} is not a readable checkpoint ({reason})") from None
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
    model = build_model(checkpoint["arch"], len(checkpoint["classes"]), weights="none")
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ToolError(f"{what} {path} does not fit a {checkpoint['arch']} ({first})") from None
    model.eval()
    return model, {key: value for key, value in checkpoint.items() if key != "model"}


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
