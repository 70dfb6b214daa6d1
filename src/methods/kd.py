"""Knowledge distillation (Hinton, Vinyals & Dean, 2015): the student's softened
predictions match the teachers' in KL divergence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import TEMPERATURE, Flag, LogitMethod, kl_divergence, register, soft_targets


def kd_loss_from_probs(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_teacher || softmax(s/T))``, batch mean. The ``T^2`` keeps its gradients
    on the scale of the hard-label loss whatever the temperature."""
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)
    return kl_divergence(teacher_probs, log_probs).mean() * temperature ** 2


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over the batch, one teacher."""
    return kd_loss_from_probs(student_logits, soft_targets([teacher_logits], [1.0], temperature),
                              temperature)


@register
class KD(LogitMethod):
    name = "kd"
    summary = "Hinton 2015: beta * T^2 * KL(teacher_T || student_T)"
    flags = (TEMPERATURE, Flag("beta", 0.3, "weight of T^2 * KL(teacher_T || student_T)"))
    # The public reference's alpha 0.7 and beta 0.3.
    hard_label_weight = 0.7

    @property
    def weight(self) -> float:
        return self.settings["beta"]

    def loss(self, student_logits, teacher_probs, labels):
        temperature = self.settings["temperature"]
        return kd_loss_from_probs(student_logits, teacher_probs(temperature), temperature)
