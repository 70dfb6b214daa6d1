"""What a distillation method is, and the registry that collects them.

A method is a class in a module of its own in this package, decorated with ``@register``.
It says what it reads (the logits, or feature maps: ``LogitMethod``, ``FeatureMethod``),
its flags (``Flag``: default, help, valid range), the one line ``--method``'s help shows,
and computes its loss. From the registry come ``--method``'s choices and help, the flags of
``train_kd_student.py`` and their range checks, what the Distiller builds, and what
``config.json`` records; nothing outside this package names a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class Flag:
    """A method's setting: the flag ``--<name with dashes>``, kept in config.json as ``name``.
    Valid values run from ``low`` to ``high`` (None: no upper bound), each end included
    unless said otherwise."""
    name: str
    default: float
    help: str
    low: float = 0.0
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    type: type = float

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def bounds(self) -> tuple:
        return self.low, self.high, self.low_inclusive, self.high_inclusive


# The softmax temperature of the soft targets, shared by the methods that read them so.
TEMPERATURE = Flag("temperature", 4.0, "softmax temperature T of the soft targets",
                   low_inclusive=False)


class Method:
    """One distillation term of the loss, named ``name`` in ``--method`` and in the
    history's ``loss_<name>`` column. ``settings`` maps flag names to values (a parsed
    command line, or a run's recorded ``args``); a flag it lacks takes its default."""
    name: ClassVar[str]
    summary: ClassVar[str]                 # one line in --method's help
    flags: ClassVar[tuple[Flag, ...]] = ()
    reads: ClassVar[str]                   # "logits" or "features"
    # --alpha's default (the weight of the hard-label cross-entropy) with this method.
    hard_label_weight: ClassVar[float] = 1.0

    def __init__(self, settings: Mapping):
        self.settings = {}
        for flag in self.flags:
            value = settings.get(flag.name)
            self.settings[flag.name] = flag.default if value is None else value

    @property
    def weight(self) -> float:
        """The factor of the term in the loss (its flag ``<name>_weight`` unless the method
        says otherwise)."""
        return self.settings[f"{self.name}_weight"]

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch (schedules such as a warm-up of the weight)."""


class LogitMethod(Method):
    """Compares the student's logits with the teachers'. At most one per ``--method``."""
    reads = "logits"

    def loss(self, student_logits: torch.Tensor,
             teacher_probs: Callable[[float], torch.Tensor],
             labels: torch.Tensor) -> torch.Tensor:
        """``teacher_probs(T)``: the teachers' softmax at temperature T, averaged with their
        weights, per image. ``labels``: each image's label (the larger share of a mixed
        image), -1 for an unlabelled one."""
        raise NotImplementedError


class FeatureMethod(Method):
    """Compares feature maps of a student and a teacher layer, given at equal spatial size
    (the Distiller pools the teacher's) and summed over the layers and teachers."""
    reads = "features"
    # Compares channels one to one: the student's map first goes through a learned 1x1
    # projection to the teacher's channels (shared by all such methods of a run).
    needs_projection: ClassVar[bool] = False
    # Normalises over locations: constant, so silent, on a 1x1 map.
    spatial: ClassVar[bool] = False
    # A learned module per (teacher, layer) pair, kept by the Distiller under this name
    # (its checkpoint keys: ``<name>.<pair>``); None: the method learns nothing of its own.
    pair_modules: ClassVar[str | None] = None

    def pair_module(self, teacher_channels: int) -> nn.Module:
        raise NotImplementedError

    def loss(self, student_features: torch.Tensor, teacher_features: torch.Tensor,
             pair_module: nn.Module | None) -> torch.Tensor:
        """The unweighted loss of one (teacher, layer) pair; the student's map is
        projected to the teacher's channels first when ``needs_projection``."""
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register(method: type[Method]) -> type[Method]:
    """Class decorator: adds a method to ``--method``. Its flags must not clash with
    another method's, unless it is the very same flag (``TEMPERATURE``)."""
    if method.name in METHODS or "+" in method.name:
        raise ValueError(f"method name {method.name!r} taken or holding '+'")
    for flag in method.flags:
        for other in METHODS.values():
            if any(theirs.name == flag.name and theirs != flag for theirs in other.flags):
                raise ValueError(f"{method.name}: flag {flag.option} differs from "
                                 f"{other.name}'s")
    modules = getattr(method, "pair_modules", None)
    if modules and modules in {getattr(other, "pair_modules", None) for other in METHODS.values()}:
        raise ValueError(f"{method.name}: pair_modules {modules!r} taken")
    METHODS[method.name] = method
    return method


# --- building blocks the methods share ------------------------------------------------

def kl_divergence(target_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || q) summed over the last dimension, with 0 log 0 = 0."""
    return (torch.special.xlogy(target_probs, target_probs) - target_probs * log_probs).sum(-1)


def soft_targets(teacher_logits: list[torch.Tensor], weights: list[float],
                 temperature: float) -> torch.Tensor:
    """Weighted average of the teachers' softmax(logits / T); the weights sum to 1."""
    return sum(weight * torch.softmax(logits.float() / temperature, dim=1)
               for weight, logits in zip(weights, teacher_logits))
