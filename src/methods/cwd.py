"""Channel-wise distillation (Shu et al., ICCV 2021): each channel's activations, as a
distribution over locations, match the teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import FeatureMethod, Flag, kl_divergence, register


def cwd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
             tau: float) -> torch.Tensor:
    """Each channel becomes a distribution over locations (softmax at temperature tau), and
    the student's matches the teacher's by ``tau^2 * KL(teacher || student)``, averaged over
    channels and images. Paper (semantic segmentation): tau 4, weight 3."""
    batch, channels = student_features.shape[:2]
    student = F.log_softmax(student_features.float().reshape(batch, channels, -1) / tau, dim=2)
    teacher = F.softmax(teacher_features.float().reshape(batch, channels, -1) / tau, dim=2)
    return kl_divergence(teacher, student).mean() * tau ** 2


@register
class ChannelWise(FeatureMethod):
    name = "cwd"
    summary = "channel-wise, Shu 2021"
    flags = (Flag("cwd_weight", 3.0, "weight of the channel-wise loss"),
             Flag("cwd_tau", 4.0, "temperature of the per-channel spatial softmax",
                  low_inclusive=False))
    needs_projection = True
    spatial = True

    def loss(self, student_features, teacher_features, pair_module):
        return cwd_loss(student_features, teacher_features, self.settings["cwd_tau"])
