"""DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"):
the student's predictions match the teacher's up to scale and shift, by Pearson
correlation, both across the classes of each image (inter-class relation) and across the
images of the batch for each class (intra-class relation). Exact matching, as KL asks, is
needlessly hard when the teacher is far stronger; DIST asks only for the same ranking and
relative confidences."""

from __future__ import annotations

import torch

from .base import Flag, LogitMethod, register


def _mean_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``, averaged."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


def dist_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, tau: float,
              beta: float, gamma: float) -> torch.Tensor:
    """``tau^2 * (beta * (1 - inter) + gamma * (1 - intra))`` on the probabilities at
    temperature tau: inter correlates each image's class distribution (rows), intra each
    class's column over the batch. Paper and reference code (ImageNet): tau 1, beta 1,
    gamma 1, cross-entropy weight 1."""
    student_probs = torch.softmax(student_logits.float() / tau, dim=1)
    inter = 1 - _mean_correlation(student_probs, teacher_probs)
    intra = 1 - _mean_correlation(student_probs.t(), teacher_probs.t())
    return tau ** 2 * (beta * inter + gamma * intra)


@register
class DIST(LogitMethod):
    name = "dist"
    summary = "Huang 2022: Pearson correlation of the predictions, inter- and intra-class"
    flags = (Flag("dist_beta", 1.0, "weight of the inter-class relation (per image, across "
                                    "classes)"),
             Flag("dist_gamma", 1.0, "weight of the intra-class relation (per class, across "
                                     "the batch)"),
             Flag("dist_tau", 1.0, "softmax temperature of both predictions",
                  low_inclusive=False))

    @property
    def weight(self) -> float:
        return 1.0         # beta and gamma weigh its two relations

    def loss(self, student_logits, teacher_probs, labels):
        tau = self.settings["dist_tau"]
        return dist_loss(student_logits, teacher_probs(tau), tau,
                         self.settings["dist_beta"], self.settings["dist_gamma"])
