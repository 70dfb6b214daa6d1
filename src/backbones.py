"""What differs between model families: building a classifier by name from torchvision or
from timm (``timm:<name>``) at an input size, where a feature map is read and how tokens
become a map, and how deep each parameter sits for layer-wise learning-rate decay.

timm is imported only when a ``timm:`` model is asked for, so the torchvision path neither
needs nor waits for it.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
import torchvision
from torch import nn

from .cli import ToolError

TIMM_PREFIX = "timm:"


def library_of(arch: str) -> str:
    return "timm" if arch.startswith(TIMM_PREFIX) else "torchvision"


def library_version(arch: str) -> str:
    return _timm().__version__ if library_of(arch) == "timm" else torchvision.__version__


def _timm():
    try:
        import timm
    except ImportError:
        raise ToolError("timm models (--arch timm:<name>) need the timm package: "
                        "pip install -r requirements.txt") from None
    return timm


def check_arch(arch: str) -> None:
    """A one-line error for a name neither library knows."""
    if library_of(arch) == "timm":
        name = arch[len(TIMM_PREFIX):]
        if not _timm().is_model(name):
            raise ToolError(f"unknown --arch {arch!r}: timm has no model {name!r} "
                            f"(python -c \"import timm; print(timm.list_models('vit*'))\" "
                            f"lists them)")
    elif arch not in torchvision.models.list_models(module=torchvision.models):
        raise ToolError(f"unknown --arch {arch!r} (a torchvision classification model such "
                        f"as resnet18, vit_b_16, swin_t, or timm:<name> such as "
                        f"timm:vit_small_patch16_224)")


def create(arch: str, num_classes: int, imagenet: bool, input_size: int | None) -> nn.Module:
    """The model with a ``num_classes`` head; ImageNet weights by the library's own
    mechanism and cache when ``imagenet``. Transformers built for a fixed input size are
    built for ``input_size`` (their position embeddings resized by the library)."""
    check_arch(arch)
    if library_of(arch) == "timm":
        return _create_timm(arch[len(TIMM_PREFIX):], num_classes, imagenet, input_size)
    return _create_torchvision(arch, num_classes, imagenet, input_size)


def _create_timm(name: str, num_classes: int, imagenet: bool, input_size: int | None):
    timm = _timm()
    cfg = timm.get_pretrained_cfg(name)
    kwargs = {"num_classes": num_classes}
    if input_size and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = input_size
    try:
        model = timm.create_model(name, pretrained=imagenet, **kwargs)
    except Exception as error:  # hub, network, disk or format errors all mean the same here
        if not imagenet:
            raise
        from huggingface_hub import constants
        if cfg is not None and cfg.hf_hub_id:
            what, where = f"{cfg.hf_hub_id} (Hugging Face Hub)", constants.HF_HUB_CACHE
        else:
            what = os.path.basename(cfg.url) if cfg is not None and cfg.url else "the weights"
            where = Path(torch.hub.get_dir()) / "checkpoints"
        raise ToolError(f"ImageNet weights for {TIMM_PREFIX}{name} unavailable: {what} is not "
                        f"in {where} and could not be downloaded ({_first_line(error)}); put "
                        f"them there, or pass --weights none to train from scratch") from None
    return _check_patches(model, f"{TIMM_PREFIX}{name}", input_size)


def _create_torchvision(arch: str, num_classes: int, imagenet: bool,
                        input_size: int | None) -> nn.Module:
    kwargs = {}
    if arch.startswith("vit_") and input_size:
        # Checked before building: torchvision asserts it inside the constructor.
        patch = int(re.search(r"_(\d+)$", arch).group(1))
        _check_patch_multiple(arch, input_size, patch)
        kwargs["image_size"] = input_size
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    if imagenet:
        state = _torchvision_imagenet_state(arch)
        if "image_size" in kwargs:
            # torchvision's own resizing of the position embeddings (bicubic); a no-op
            # at the size the weights were made for.
            state = torchvision.models.vision_transformer.interpolate_embeddings(
                input_size, model.patch_size, state)
        model.load_state_dict(state)
    replace_head(model, num_classes)
    return model


def _torchvision_imagenet_state(arch: str) -> dict:
    """torchvision's ImageNet weights, from the torch hub cache or downloaded as usual."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    file_name = os.path.basename(weights.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # urllib, SSL, hash or disk errors all mean the same to us
        raise ToolError(f"ImageNet weights for {arch} unavailable: {file_name} is not in "
                        f"{cached.parent} and could not be downloaded ({_first_line(error)}); "
                        f"put the file there, or pass --weights none to train from "
                        f"scratch") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_patches(model: nn.Module, arch: str, input_size: int | None) -> nn.Module:
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if input_size and patch is not None:
        _check_patch_multiple(arch, input_size, int(patch[0] if isinstance(patch, (tuple, list))
                                                    else patch))
    return model


def _check_patch_multiple(arch: str, input_size: int, patch: int) -> None:
    if input_size % patch:
        raise ToolError(f"--input-size {input_size}: {arch} cuts images into {patch} px "
                        f"patches; use a multiple of {patch}")


def classifier_head(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of a classifier (``fc``, ``classifier[-1]``, ``heads.head``,
    timm's ``head`` or ``head.fc``): its head."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ToolError(f"{type(model).__name__} has no linear classification head")
    return linears[-1]


def replace_head(model: nn.Module, num_classes: int) -> None:
    last = classifier_head(model)
    name = next(module_name for module_name, module in model.named_modules() if module is last)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, num_classes))


# --- feature maps ----------------------------------------------------------------------

class FeaturePoint:
    """Where a layer's map is read (``module``; its input when ``before``) and how the
    tensor found there becomes a (batch, channels, height, width) map: token sequences lose
    their ``prefix_tokens`` (class, register tokens) and are laid out on their square grid;
    channels-last maps (Swin) are permuted."""

    def __init__(self, module: nn.Module, before: bool, prefix_tokens: int,
                 channels_last: bool, description: str):
        self.module, self.before = module, before
        self.prefix_tokens, self.channels_last = prefix_tokens, channels_last
        self.description = description

    def to_map(self, features, layer: str) -> torch.Tensor:
        if isinstance(features, torch.Tensor) and features.dim() == 3:
            tokens = features[:, self.prefix_tokens:]
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1] or side == 0:
                raise ToolError(f"--feature-layers {layer}: {features.shape[1]} tokens less "
                                f"{self.prefix_tokens} class/register token(s) do not form a "
                                f"square grid")
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
        if isinstance(features, torch.Tensor) and features.dim() == 4:
            return features.permute(0, 3, 1, 2) if self.channels_last else features
        raise ToolError(f"--feature-layers {layer}: its output is neither a (batch, channels, "
                        f"height, width) map nor a (batch, tokens, channels) sequence")


def feature_point(model: nn.Module, layer: str, name: str) -> FeaturePoint:
    """``last``: the last feature map before pooling (torchvision CNNs and Swin: the input
    of ``avgpool``; torchvision ViT: the encoder's output tokens; timm: the output of the
    last module of its ``feature_info``). Any other name: that submodule's output."""
    prefix = _prefix_tokens(model)
    channels_last = _channels_last_stages(model)
    if layer != "last":
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            children = ", ".join(child for child, _ in model.named_children())
            raise ToolError(f"--feature-layers {layer}: the {name} ({type(model).__name__}) "
                            f"has no such layer (its top-level layers: {children})") from None
        return FeaturePoint(module, False, prefix, channels_last, f"output of {layer}")
    if isinstance(model, torchvision.models.VisionTransformer):
        return FeaturePoint(model.encoder, False, prefix, False, "encoder output tokens")
    feature_info = getattr(model, "feature_info", None)
    if isinstance(feature_info, list) and feature_info and "module" in feature_info[-1]:
        module_name = feature_info[-1]["module"]
        return FeaturePoint(model.get_submodule(module_name), False, prefix, channels_last,
                            f"output of {module_name}")
    if isinstance(getattr(model, "avgpool", None), nn.Module):
        return FeaturePoint(model.avgpool, True, 0, False, "input of avgpool")
    raise ToolError(f"feature distillation at 'last': the {name} ({type(model).__name__}) "
                    f"has no layer this tool knows to read (avgpool, a ViT encoder, timm's "
                    f"feature_info); name layers with --feature-layers")


def _prefix_tokens(model: nn.Module) -> int:
    if isinstance(model, torchvision.models.VisionTransformer):
        return 1
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


def _channels_last_stages(model: nn.Module) -> bool:
    """Swin keeps its stages' maps as (batch, height, width, channels)."""
    return isinstance(model, torchvision.models.SwinTransformer) \
        or str(getattr(model, "output_fmt", "")) == "NHWC"


# --- layer-wise learning-rate decay ----------------------------------------------------

def is_transformer(model: nn.Module) -> bool:
    return any(isinstance(module, nn.MultiheadAttention)
               or type(module).__name__.endswith("Attention") for module in model.modules())


def layer_depths(model: nn.Module) -> dict[str, int]:
    """Each parameter's depth, 0 at the input, the largest at the head. timm's own grouping
    (``group_matcher``) where it has one; otherwise every block (a module inside a
    Sequential or ModuleList that is not itself one: a ResNet block, a ViT encoder layer,
    a Swin block) is one step, and every other module holding parameters one more, in the
    order the model registers them."""
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters
        depths = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        top = max(depths.values(), default=0)
        return {name: depths.get(name, top) for name, _ in model.named_parameters()}
    containers = (nn.Sequential, nn.ModuleList)
    modules = dict(model.named_modules())
    head = {id(parameter) for parameter in classifier_head(model).parameters()}
    groups: dict[str, int] = {}
    depths = {}
    for name, parameter in model.named_parameters():
        if id(parameter) in head:
            continue
        parts = name.split(".")
        group = ".".join(parts[:-1]) or name
        for end in range(1, len(parts)):
            prefix = ".".join(parts[:end])
            parent = ".".join(parts[:end - 1])
            if isinstance(modules.get(parent), containers) \
                    and not isinstance(modules[prefix], containers):
                group = prefix
                break
        depths[name] = groups.setdefault(group, len(groups))
    depths.update({name: len(groups) for name, parameter in model.named_parameters()
                   if id(parameter) in head})
    return depths


def layer_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """The learning-rate factor of each parameter: ``decay ** (head depth - depth)``."""
    depths = layer_depths(model)
    top = max(depths.values(), default=0)
    return {name: decay ** (top - depth) for name, depth in depths.items()}
