"""Training objectives. Each wraps the model being trained and, given the views of a batch
and the batch itself (``labels``, ``index``), returns the logits and a dict of named,
already-weighted loss terms; the trainer logs every term and optimises their sum.

The Distiller adds to the hard-label cross-entropy the terms of the methods ``--method``
names (``src/methods/``, one module each). Feature methods compare the maps of the layers
``--feature-layers`` names (default: the last convolutional map), summed over layers. With
paired mixup or cutmix (``batch["mix"]``) the cross-entropy weighs both labels of each
mixed image and the teacher sees the mixed HR view itself.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import feature_point
from .cli import ToolError
from .methods import build_methods, hard_label_weight
from .methods.base import soft_targets
from .models import FrozenTeacher


def hard_label_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Cross-entropy with the batch's labels; on a mixed batch, ``lam`` of it with each
    image's own label (``labels``) and ``1 - lam`` with its partner's (``partner_labels``)."""
    # Unlabelled rows of a transfer set (label -1) take no part; the mean is over the rest
    # (none left: zero, not the NaN of an empty mean).
    if not (batch["labels"] >= 0).any():
        return logits.float().sum() * 0
    loss = F.cross_entropy(logits.float(), batch["labels"], ignore_index=-1)
    mix = batch.get("mix")
    if mix is None:
        return loss
    partner_loss = F.cross_entropy(logits.float(), batch["partner_labels"], ignore_index=-1)
    return mix.lam * loss + (1 - mix.lam) * partner_loss


class HardLabels(nn.Module):
    """Cross-entropy on the true labels: the teacher and the baseline student."""

    def __init__(self, model: nn.Module, input_resolution: str):
        super().__init__()
        self.student = model
        self.input_resolution = input_resolution

    def forward(self, views: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.student(views[self.input_resolution])
        return logits, {"ce": hard_label_loss(logits, batch)}

    def predict(self, views: dict) -> torch.Tensor:
        return self.student(views[self.input_resolution])

    def start_epoch(self, epoch: int) -> None:
        """Called by the trainer before each epoch (schedules such as a term's warm-up)."""

    def extra_state(self) -> dict:
        """Trained modules beside the student (alignment layers), saved with it."""
        return {key: value for key, value in self.state_dict().items()
                if not key.startswith(("student.", "teachers."))}


class FeatureTap:
    """Keeps the feature maps of named layers of a model, by forward hooks, as (batch,
    channels, height, width) maps: ``last`` is the last map before pooling (see
    ``backbones.feature_point``: CNNs, Swin, ViT tokens laid out on their grid); any other
    name is a submodule whose output is kept (``layer1`` ... ``layer4`` of a ResNet,
    ``blocks.5`` of a timm ViT, ``encoder.layers.encoder_layer_5`` of torchvision's)."""

    def __init__(self, model: nn.Module, name: str, layers=("last",)):
        self.features = {}
        self.layers = tuple(layers)
        for layer in self.layers:
            point = feature_point(model, layer, name)
            if point.before:
                point.module.register_forward_pre_hook(
                    lambda module, inputs, layer=layer, point=point:
                    self._keep(layer, point.to_map(inputs[0], layer)))
            else:
                point.module.register_forward_hook(
                    lambda module, inputs, output, layer=layer, point=point:
                    self._keep(layer, point.to_map(output, layer)))

    def _keep(self, layer: str, features: torch.Tensor) -> None:
        self.features[layer] = features

    def take(self) -> list[torch.Tensor]:
        """The maps of the last forward, in the order of ``layers``."""
        features, self.features = self.features, {}
        return [features[layer] for layer in self.layers]


def match_spatial(teacher_features: torch.Tensor, size) -> torch.Tensor:
    """Bring the teacher's map to the student's spatial size: average pooling when it is
    larger (the HR teacher's usually is), bilinear interpolation when smaller."""
    if tuple(teacher_features.shape[-2:]) == tuple(size):
        return teacher_features
    if teacher_features.shape[-2] >= size[0] and teacher_features.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(teacher_features, size)
    return F.interpolate(teacher_features, size=size, mode="bilinear", align_corners=False)


class Distiller(HardLabels):
    """The LR student taught by one or more frozen HR teachers.

    ``alpha * CE`` + the logit method's term on the teachers' averaged soft targets + each
    feature method's term, averaged over teachers with their weights. The student sees
    the LR view, every teacher the HR view of the same sample, crop and flip
    (``teacher_resolution`` "lr": LR pseudo-teachers, which see the student's own view).
    With ``cached_teacher_logits`` (N, classes) the soft targets come from logits computed
    once on whole un-augmented images instead (logit methods only). Rows labelled -1 (a
    transfer set) get every distillation term and no cross-entropy.

    ``settings`` maps flag names to values, as a run's ``config.json`` records them
    (``alpha``, ``teacher_weights``, ``feature_layers`` and each method's flags); what it
    lacks takes the flag's default.
    """

    def __init__(self, student: nn.Module, teachers: list[nn.Module], method: str,
                 settings: Mapping | None = None, teacher_input_sizes: list[int] | None = None,
                 cached_teacher_logits: torch.Tensor | None = None, probe_size: int = 64,
                 teacher_resolution: str = "hr"):
        super().__init__(student, "lr")
        settings = dict(settings or {})
        self.teacher_resolution = teacher_resolution
        self.methods = build_methods(method, settings)
        self.logit_methods = [part for part in self.methods if part.reads == "logits"]
        self.feature_methods = [part for part in self.methods if part.reads == "features"]
        self.alpha = settings["alpha"] if settings.get("alpha") is not None \
            else hard_label_weight(method)
        self.feature_layers = feature_layers(settings.get("feature_layers"))
        self.teachers = nn.ModuleList(
            teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)
            for teacher in teachers)
        self.teacher_input_sizes = teacher_input_sizes or [None] * len(self.teachers)
        self.teacher_weights = normalised_teacher_weights(settings.get("teacher_weights"),
                                                          len(self.teachers) or 1)
        if cached_teacher_logits is not None:
            if self.feature_methods:
                raise ToolError("--teacher-cache keeps logits only; feature methods ("
                                + ", ".join(part.name for part in self.feature_methods)
                                + ") need the online teacher")
            # Not persistent: rebuilt from the teacher checkpoint, not resumed.
            self.register_buffer("cached_teacher_logits", cached_teacher_logits,
                                 persistent=False)
        else:
            self.cached_teacher_logits = None
        self.projections = nn.ModuleList()
        for part in self.feature_methods:
            if part.pair_modules:
                self.add_module(part.pair_modules, nn.ModuleList())
        if self.feature_methods:
            self._build_alignment(probe_size)

    def _build_alignment(self, probe_size: int) -> None:
        """Feature taps on every layer named, and per (teacher, layer) pair a 1x1
        projection where a method compares channels and they differ, and each method's own
        module: flat lists, teacher-major, so one layer keeps the keys of older
        checkpoints (``projections.N``, ``generators.N``)."""
        layers = self.feature_layers
        self.student_tap = FeatureTap(self.student, "student", layers)
        self.teacher_taps = [FeatureTap(t.model, f"teacher {i + 1}", layers)
                             for i, t in enumerate(self.teachers)]
        # One probe forward each tells the channel counts (eval mode: BatchNorm untouched).
        probe = torch.zeros(1, 3, probe_size, probe_size)
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            self.student(probe)
        self.student.train(was_training)
        student_maps = self.student_tap.take()
        spatial = [part.name for part in self.feature_methods if part.spatial]
        for layer, student_map in zip(layers, student_maps):
            if spatial and student_map.shape[-2:] == (1, 1):
                print(f"warning: the student's {layer} feature map is 1x1 at {probe_size}px "
                      f"input; {', '.join(spatial)} compare maps over locations "
                      f"and carry nothing there")
        projecting = any(part.needs_projection for part in self.feature_methods)
        for teacher, tap, size in zip(self.teachers, self.teacher_taps,
                                      self.teacher_input_sizes):
            # At the teacher's own size: a ViT refuses any other.
            teacher(torch.zeros(1, 3, size or probe_size, size or probe_size))
            for student_map, teacher_map in zip(student_maps, tap.take()):
                student_channels, teacher_channels = student_map.shape[1], teacher_map.shape[1]
                self.projections.append(
                    nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
                    if projecting and teacher_channels != student_channels else nn.Identity())
                for part in self.feature_methods:
                    if part.pair_modules:
                        getattr(self, part.pair_modules).append(
                            part.pair_module(teacher_channels))

    def start_epoch(self, epoch: int) -> None:
        for part in self.methods:
            part.start_epoch(epoch)

    def _teacher_outputs(self, views: dict, batch: dict):
        if self.cached_teacher_logits is not None:
            return [self.cached_teacher_logits[batch["index"]]], []
        logits, features = [], []
        for number, teacher in enumerate(self.teachers):
            view = views[self.teacher_resolution]
            size = self.teacher_input_sizes[number]
            if size and view.shape[-1] != size:
                # Teachers of other input sizes get the same view, resized: still paired.
                view = F.interpolate(view, size=(size, size), mode="bilinear",
                                     align_corners=False, antialias=True)
            logits.append(teacher(view))
            if self.feature_methods:
                features.append(self.teacher_taps[number].take())
        return logits, features

    def forward(self, views: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        labels = batch["labels"]
        if batch.get("mix") is not None and batch["mix"].lam < 0.5:
            labels = batch["partner_labels"]    # a target class: the larger share
        student_logits = self.student(views["lr"])
        teacher_logits, teacher_features = self._teacher_outputs(views, batch)
        teacher_weights = self.teacher_weights if self.cached_teacher_logits is None else [1.0]
        terms = {"ce": self.alpha * hard_label_loss(student_logits, batch)}
        for part in self.logit_methods:
            teacher_probs = lambda temperature: soft_targets(  # noqa: E731
                teacher_logits, teacher_weights, temperature)
            terms[part.name] = part.weight * part.loss(student_logits, teacher_probs, labels)
        if self.feature_methods:
            student_maps = self.student_tap.take()
            layers = len(student_maps)
            for part in self.feature_methods:
                # Summed over layers (as the feature-method papers do), averaged over
                # teachers with their weights.
                terms[part.name] = part.weight * sum(
                    weight * self._pair_loss(part, number * layers + layer, student_map,
                                             teacher_map)
                    for number, (weight, teacher_maps) in
                    enumerate(zip(teacher_weights, teacher_features))
                    for layer, (student_map, teacher_map) in
                    enumerate(zip(student_maps, teacher_maps)))
        return student_logits, terms

    def _pair_loss(self, part, pair: int, student_features, teacher_features):
        """``pair`` numbers the (teacher, layer) pair: its projection and module."""
        teacher_features = match_spatial(teacher_features.float(), student_features.shape[-2:])
        if part.needs_projection:
            student_features = self.projections[pair](student_features)
        module = getattr(self, part.pair_modules)[pair] if part.pair_modules else None
        return part.loss(student_features, teacher_features, module)


def feature_layers(value) -> tuple[str, ...]:
    """``--feature-layers`` ("layer2,layer4", or a sequence) as layer names; "last" if none."""
    if isinstance(value, str):
        value = value.split(",")
    return tuple(layer.strip() for layer in value or () if layer.strip()) or ("last",)


def normalised_teacher_weights(weights, count: int) -> list[float]:
    """``--teacher-weights`` (default: equal) scaled to sum to 1."""
    weights = list(weights) if weights else [1.0] * count
    if len(weights) != count:
        raise ToolError(f"--teacher-weights gives {len(weights)} weight(s) for {count} "
                        f"teacher(s)")
    if not all(math.isfinite(weight) and weight >= 0 for weight in weights) or sum(weights) <= 0:
        raise ToolError("--teacher-weights must be finite, at least 0 and not all zero")
    return [weight / sum(weights) for weight in weights]
