"""Decoupled knowledge distillation (Zhao et al., CVPR 2022): KD split into a target-class
and a non-target-class part, weighted apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import TEMPERATURE, Flag, LogitMethod, kl_divergence, register


def dkd_loss_from_probs(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                        labels: torch.Tensor, temperature: float, alpha: float,
                        beta: float) -> torch.Tensor:
    """``alpha * TCKD + beta * NCKD``, both times T^2.

    TCKD compares the binary (target, all others) probabilities; NCKD the distributions
    over the non-target classes alone. Paper defaults: alpha 1, beta 8, T 4 (CIFAR-100).
    """
    target = F.one_hot(labels, student_logits.shape[1]).bool()
    student_probs = F.softmax(student_logits.float() / temperature, dim=1)
    eps = 1e-8
    student_target = student_probs[target].clamp(eps, 1 - eps)
    teacher_target = teacher_probs[target].clamp(eps, 1 - eps)
    student_binary = torch.stack([student_target, 1 - student_target], 1)
    teacher_binary = torch.stack([teacher_target, 1 - teacher_target], 1)
    tckd = kl_divergence(teacher_binary, student_binary.log()).mean()
    # Non-target distributions: the target class removed, the rest renormalised.
    student_rest = F.log_softmax(student_logits.float() / temperature
                                 - 1000.0 * target.float(), dim=1)
    teacher_rest = teacher_probs.masked_fill(target, 0)
    teacher_rest = teacher_rest / teacher_rest.sum(1, keepdim=True).clamp_min(eps)
    nckd = kl_divergence(teacher_rest, student_rest.masked_fill(target, 0)).mean()
    return (alpha * tckd + beta * nckd) * temperature ** 2


@register
class DKD(LogitMethod):
    name = "dkd"
    summary = "decoupled KD, Zhao 2022: target and non-target class KD weighted apart"
    flags = (TEMPERATURE,
             Flag("dkd_alpha", 1.0, "weight of target-class KD (TCKD)"),
             Flag("dkd_beta", 8.0, "weight of non-target-class KD (NCKD)"),
             Flag("dkd_warmup", 20, "epochs over which its term ramps up linearly (0: none)",
                  type=int))

    def __init__(self, settings):
        super().__init__(settings)
        self.epoch_factor = 1.0

    @property
    def weight(self) -> float:
        return self.epoch_factor

    def start_epoch(self, epoch: int) -> None:
        warmup = self.settings["dkd_warmup"]
        self.epoch_factor = min(epoch / warmup, 1.0) if warmup > 0 else 1.0

    def loss(self, student_logits, teacher_probs, labels):
        temperature = self.settings["temperature"]
        probs = teacher_probs(temperature)
        # An unlabelled row's target class is the teachers' top class.
        labels = torch.where(labels >= 0, labels, probs.argmax(1))
        return dkd_loss_from_probs(student_logits, probs, labels, temperature,
                                   self.settings["dkd_alpha"], self.settings["dkd_beta"])
