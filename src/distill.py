"""Training objectives. Each wraps the model being trained and, given a batch of views and
labels, returns the logits and a dict of named, already-weighted loss terms; the trainer
logs every term and optimises their sum."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models import FrozenTeacher


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Hinton et al. (2015) soft-target loss, ``T^2 * KL(softmax(t/T) || softmax(s/T))``,
    averaged over the batch. The ``T^2`` keeps its gradients on the scale of the hard-label
    loss whatever the temperature."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
    return kl * temperature ** 2


class HardLabels(nn.Module):
    """Cross-entropy on the true labels: the teacher and the baseline student."""

    def __init__(self, model: nn.Module, input_resolution: str):
        super().__init__()
        self.student = model
        self.input_resolution = input_resolution

    def forward(self, views: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = self.student(views[self.input_resolution])
        return logits, {"ce": F.cross_entropy(logits.float(), labels)}

    def predict(self, views: dict) -> torch.Tensor:
        return self.student(views[self.input_resolution])


class VanillaKD(HardLabels):
    """``alpha * CE(student, labels) + beta * T^2 * KL(teacher_T || student_T)``.

    The student sees the LR view, the teacher the HR view of the same sample, crop and flip.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, alpha: float, beta: float,
                 temperature: float):
        super().__init__(student, "lr")
        self.teacher = teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, views: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        student_logits = self.student(views["lr"])
        teacher_logits = self.teacher(views["hr"])
        return student_logits, {
            "ce": self.alpha * F.cross_entropy(student_logits.float(), labels),
            "kd": self.beta * kd_loss(student_logits, teacher_logits, self.temperature),
        }
