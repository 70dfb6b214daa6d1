"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): where the student's map is active
matches where the teacher's is."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import FeatureMethod, Flag, register


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the squared activations, flattened and L2-normalised:
    (B, C, H, W) -> (B, H*W)."""
    return F.normalize(features.float().pow(2).mean(1).flatten(1), dim=1)


def at_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two attention maps. Needs equal spatial size only
    (channels are summed out)."""
    return (attention_map(student_features) - attention_map(teacher_features)).pow(2).mean()


@register
class AttentionTransfer(FeatureMethod):
    name = "at"
    summary = "attention transfer, Zagoruyko 2017"
    # The paper's implementation weight.
    flags = (Flag("at_weight", 1000.0, "weight of the attention-map loss"),)
    spatial = True

    def loss(self, student_features, teacher_features, pair_module):
        return at_loss(student_features, teacher_features)
