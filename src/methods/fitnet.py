"""FitNets hint (Romero et al., ICLR 2015): the student's map regresses the teacher's."""

from __future__ import annotations

import torch

from .base import FeatureMethod, Flag, register


def fitnet_loss(student_features: torch.Tensor,
                teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the (channel-aligned) student map and the teacher's.
    Across resolutions the student's LR features regress the teacher's features of the HR
    twin."""
    return (student_features.float() - teacher_features.float()).pow(2).mean()


@register
class FitNet(FeatureMethod):
    name = "fitnet"
    summary = "FitNets hint, Romero 2015: squared error of the maps"
    flags = (Flag("fitnet_weight", 100.0, "weight of the mean squared error of the maps "
                                          "(mdistiller's)"),)
    needs_projection = True

    def loss(self, student_features, teacher_features, pair_module):
        return fitnet_loss(student_features, teacher_features)
