"""Training objectives. Each wraps the model being trained and, given the views of a batch
and the batch itself (``labels``, ``index``), returns the logits and a dict of named,
already-weighted loss terms; the trainer logs every term and optimises their sum.

``--method`` names the terms beside the hard-label cross-entropy: at most one logit method
(``kd``, ``dkd``) and any feature methods (``at``, ``cwd``, ``mgd``, ``amd``, ``fitnet``),
joined by ``+`` (``kd+at``). Feature methods compare the maps of the layers ``--feature-layers``
names (default: the last convolutional map), summed over layers. With paired mixup or
cutmix (``batch["mix"]``) the cross-entropy weighs both labels of each mixed image and
the teacher sees the mixed HR view itself. The losses themselves live in ``losses.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import feature_point
from .cli import ToolError
from .losses import MGDGenerator, amd_loss, at_loss, cwd_loss, dkd_loss_from_probs, \
    fitnet_loss, kd_loss_from_probs, soft_targets
from .models import FrozenTeacher

LOGIT_METHODS = ("kd", "dkd")
FEATURE_METHODS = ("at", "cwd", "mgd", "amd", "fitnet")
# Feature methods that compare channels one to one need a student-to-teacher projection.
NEEDS_PROJECTION = ("cwd", "mgd", "fitnet")
# Feature methods that normalise over locations: constant, so silent, on a 1x1 map.
SPATIAL_METHODS = ("at", "cwd", "amd")


def parse_method(method: str) -> list[str]:
    parts = [part.strip() for part in method.lower().split("+") if part.strip()]
    unknown = [part for part in parts if part not in LOGIT_METHODS + FEATURE_METHODS]
    if not parts or unknown:
        raise ToolError(f"--method {method!r}: unknown part(s) {', '.join(unknown) or '(empty)'};"
                        f" use {', '.join(LOGIT_METHODS + FEATURE_METHODS)} joined by +")
    if len(set(parts)) != len(parts) or sum(part in LOGIT_METHODS for part in parts) > 1:
        raise ToolError(f"--method {method!r}: each part once, and at most one of kd, dkd")
    return parts


@dataclass
class LossWeights:
    """Weights and settings of every term; defaults are the papers' (see ``losses.py``)."""
    alpha: float = 0.7            # hard-label cross-entropy
    beta: float = 0.3             # kd
    temperature: float = 4.0      # kd and dkd
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup: int = 20          # epochs over which the dkd term ramps up linearly
    at: float = 1000.0
    cwd: float = 3.0
    cwd_tau: float = 4.0
    mgd: float = 7e-5
    mgd_mask: float = 0.5
    amd: float = 1.0
    fitnet: float = 100.0
    teacher_weights: list = field(default_factory=lambda: [1.0])
    feature_layers: tuple = ("last",)


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
        """Called by the trainer before each epoch (schedules such as DKD's warm-up)."""

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

    ``alpha * CE`` + the logit term (``kd``: ``beta * T^2 * KL``; ``dkd``) on the teachers'
    averaged soft targets + each feature term, averaged over teachers with their weights.
    The student sees the LR view, every teacher the HR view of the same sample, crop and
    flip (``teacher_resolution`` "lr": LR pseudo-teachers, which see the student's own
    view). With ``cached_teacher_logits`` (N, classes) the soft targets come from logits
    computed once on whole un-augmented images instead (logit methods only). Rows labelled
    -1 (a transfer set) get every distillation term and no cross-entropy.
    """

    def __init__(self, student: nn.Module, teachers: list[nn.Module], method: str,
                 weights: LossWeights, teacher_input_sizes: list[int] | None = None,
                 cached_teacher_logits: torch.Tensor | None = None, probe_size: int = 64,
                 teacher_resolution: str = "hr"):
        super().__init__(student, "lr")
        self.teacher_resolution = teacher_resolution
        self.parts = parse_method(method)
        self.weights = weights
        self.feature_parts = [part for part in self.parts if part in FEATURE_METHODS]
        self.teachers = nn.ModuleList(
            teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)
            for teacher in teachers)
        self.teacher_input_sizes = teacher_input_sizes or [None] * len(self.teachers)
        self.teacher_weights = normalised_teacher_weights(weights.teacher_weights,
                                                          len(self.teachers) or 1)
        self.epoch_factor = 1.0
        if cached_teacher_logits is not None:
            if self.feature_parts:
                raise ToolError("--teacher-cache keeps logits only; feature methods "
                                f"({', '.join(self.feature_parts)}) need the online teacher")
            # Not persistent: rebuilt from the teacher checkpoint, not resumed.
            self.register_buffer("cached_teacher_logits", cached_teacher_logits,
                                 persistent=False)
        else:
            self.cached_teacher_logits = None
        self.projections = nn.ModuleList()
        self.generators = nn.ModuleList()
        if self.feature_parts:
            self._build_alignment(probe_size)

    def _build_alignment(self, probe_size: int) -> None:
        """Feature taps on every layer named, and per (teacher, layer) pair a 1x1
        projection where channels differ (cwd, mgd) and an MGD generator: flat lists,
        teacher-major, so one layer keeps the keys of older checkpoints."""
        layers = self.weights.feature_layers
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
        spatial = [part for part in self.feature_parts if part in SPATIAL_METHODS]
        for layer, student_map in zip(layers, student_maps):
            if spatial and student_map.shape[-2:] == (1, 1):
                print(f"warning: the student's {layer} feature map is 1x1 at {probe_size}px "
                      f"input; {', '.join(spatial)} compare maps over locations "
                      f"and carry nothing there")
        for teacher, tap, size in zip(self.teachers, self.teacher_taps,
                                      self.teacher_input_sizes):
            # At the teacher's own size: a ViT refuses any other.
            teacher(torch.zeros(1, 3, size or probe_size, size or probe_size))
            for student_map, teacher_map in zip(student_maps, tap.take()):
                student_channels, teacher_channels = student_map.shape[1], teacher_map.shape[1]
                if any(part in NEEDS_PROJECTION for part in self.feature_parts) \
                        and teacher_channels != student_channels:
                    self.projections.append(nn.Conv2d(student_channels, teacher_channels, 1,
                                                      bias=False))
                else:
                    self.projections.append(nn.Identity())
                if "mgd" in self.feature_parts:
                    self.generators.append(MGDGenerator(teacher_channels,
                                                        self.weights.mgd_mask))

    def start_epoch(self, epoch: int) -> None:
        self.epoch_factor = min(epoch / self.weights.dkd_warmup, 1.0) \
            if self.weights.dkd_warmup > 0 else 1.0

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
            if self.feature_parts:
                features.append(self.teacher_taps[number].take())
        return logits, features

    def forward(self, views: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        w = self.weights
        labels = batch["labels"]
        if batch.get("mix") is not None and batch["mix"].lam < 0.5:
            labels = batch["partner_labels"]    # dkd's target class: the larger share
        student_logits = self.student(views["lr"])
        teacher_logits, teacher_features = self._teacher_outputs(views, batch)
        teacher_weights = self.teacher_weights if self.cached_teacher_logits is None else [1.0]
        terms = {"ce": w.alpha * hard_label_loss(student_logits, batch)}
        if "kd" in self.parts or "dkd" in self.parts:
            probs = soft_targets(teacher_logits, teacher_weights, w.temperature)
            if "kd" in self.parts:
                terms["kd"] = w.beta * kd_loss_from_probs(student_logits, probs, w.temperature)
            else:
                # An unlabelled row's target class is the teachers' top class.
                labels = torch.where(labels >= 0, labels, probs.argmax(1))
                terms["dkd"] = self.epoch_factor * dkd_loss_from_probs(
                    student_logits, probs, labels, w.temperature, w.dkd_alpha, w.dkd_beta)
        if self.feature_parts:
            student_maps = self.student_tap.take()
            layers = len(student_maps)
            for part in self.feature_parts:
                # Summed over layers (as attention transfer's paper does), averaged over
                # teachers with their weights.
                terms[part] = getattr(w, part) * sum(
                    weight * self._feature_loss(part, number * layers + layer, student_map,
                                                teacher_map)
                    for number, (weight, teacher_maps) in
                    enumerate(zip(teacher_weights, teacher_features))
                    for layer, (student_map, teacher_map) in
                    enumerate(zip(student_maps, teacher_maps)))
        return student_logits, terms

    def _feature_loss(self, part: str, pair: int, student_features, teacher_features):
        """``pair`` numbers the (teacher, layer) pair: its projection and generator."""
        teacher_features = match_spatial(teacher_features.float(), student_features.shape[-2:])
        if part == "at":
            return at_loss(student_features, teacher_features)
        if part == "amd":
            return amd_loss(student_features, teacher_features)
        aligned = self.projections[pair](student_features)
        if part == "cwd":
            return cwd_loss(aligned, teacher_features, self.weights.cwd_tau)
        if part == "fitnet":
            return fitnet_loss(aligned, teacher_features)
        return self.generators[pair](aligned, teacher_features)


def normalised_teacher_weights(weights, count: int) -> list[float]:
    """``--teacher-weights`` (default: equal) scaled to sum to 1."""
    weights = list(weights) if weights else [1.0] * count
    if len(weights) != count:
        raise ToolError(f"--teacher-weights gives {len(weights)} weight(s) for {count} "
                        f"teacher(s)")
    if not all(math.isfinite(weight) and weight >= 0 for weight in weights) or sum(weights) <= 0:
        raise ToolError("--teacher-weights must be finite, at least 0 and not all zero")
    return [weight / sum(weights) for weight in weights]
