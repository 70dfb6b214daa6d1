"""Training objectives. Each wraps the model being trained and, given the views of a batch
and the batch itself (``labels``, ``index``), returns the logits and a dict of named,
already-weighted loss terms; the trainer logs every term and optimises their sum."""

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

    def forward(self, views: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.student(views[self.input_resolution])
        return logits, {"ce": F.cross_entropy(logits.float(), batch["labels"])}

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

    def forward(self, views: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        student_logits = self.student(views["lr"])
        return student_logits, self.losses(student_logits, self.teacher(views["hr"]),
                                           batch["labels"])

    def losses(self, student_logits, teacher_logits, labels) -> dict:
        return {
            "ce": self.alpha * F.cross_entropy(student_logits.float(), labels),
            "kd": self.beta * kd_loss(student_logits, teacher_logits, self.temperature),
        }


class CachedTeacherKD(VanillaKD):
    """Vanilla KD from teacher logits computed once, on the whole un-augmented HR image.

    No teacher forward per step and no HR images in memory, but the soft targets describe
    the whole image, not the student's crop and flip: exact only with ``--no-hflip
    --crop-scale 1``; otherwise an approximation (the online teacher is the default).
    """

    def __init__(self, student: nn.Module, teacher_logits: torch.Tensor, alpha: float,
                 beta: float, temperature: float):
        HardLabels.__init__(self, student, "lr")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        # Not persistent: the logits are rebuilt from the teacher checkpoint, not resumed.
        self.register_buffer("cached_teacher_logits", teacher_logits, persistent=False)

    def forward(self, views: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        student_logits = self.student(views["lr"])
        teacher_logits = self.cached_teacher_logits[batch["index"]]
        return student_logits, self.losses(student_logits, teacher_logits, batch["labels"])
