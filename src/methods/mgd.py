"""Masked generative distillation (Yang et al., ECCV 2022): the teacher's map is generated
from a randomly masked student map."""

from __future__ import annotations

import torch
from torch import nn

from .base import FeatureMethod, Flag, register


class MGDGenerator(nn.Module):
    """Random locations of the (channel-aligned) student map are zeroed, a 3x3-conv, ReLU,
    3x3-conv block generates the teacher's full map from what is left, and the loss is the
    squared error summed over the map, per image. Paper (classification): weight 7e-5, mask
    ratio 0.5."""

    def __init__(self, channels: int, mask_ratio: float):
        super().__init__()
        self.mask_ratio = mask_ratio
        self.generate = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep`` (B, 1, H, W) of 0/1 overrides the random mask (tests)."""
        if keep is None:
            batch, _, height, width = student_features.shape
            keep = (torch.rand(batch, 1, height, width, device=student_features.device)
                    >= self.mask_ratio).float()
        generated = self.generate(student_features * keep)
        return (generated.float() - teacher_features.float()).pow(2).sum() / len(generated)


@register
class MaskedGenerative(FeatureMethod):
    name = "mgd"
    summary = "masked generative, Yang 2022"
    flags = (Flag("mgd_weight", 7e-5, "weight of the generation loss (summed squared error)"),
             Flag("mgd_mask", 0.5, "share of student feature locations masked",
                  high=1.0, high_inclusive=False))
    needs_projection = True
    # The name older checkpoints keep the generators under.
    pair_modules = "generators"

    def pair_module(self, teacher_channels: int) -> nn.Module:
        return MGDGenerator(teacher_channels, self.settings["mgd_mask"])

    def loss(self, student_features, teacher_features, pair_module):
        return pair_module(student_features, teacher_features)
