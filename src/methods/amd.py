"""Angular-margin distillation (Jeon et al., Neurocomputing 2023): attention maps scored with
an angular margin, globally and per quadrant."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import FeatureMethod, Flag, register


def _angular_terms(attention: torch.Tensor, scale: float, margin: float) -> list[torch.Tensor]:
    """For an L2-normalised attention map q (B, N): the SphereFace-style positive term
    ``psi = s cos(m arccos q)``, the negative term ``nu = s (1 - q)``, and the positive's
    log-probability ``psi - log(e^psi + e^nu)``."""
    q = attention.clamp(-1 + 1e-7, 1 - 1e-7)
    positive = scale * torch.cos(margin * torch.acos(q))
    negative = scale * (1 - q)
    return [positive - torch.logaddexp(positive, negative), positive, negative]


def _amd_map_loss(student_attention, teacher_attention, scale, margin) -> torch.Tensor:
    pairs = zip(_angular_terms(student_attention, scale, margin),
                _angular_terms(teacher_attention, scale, margin))
    return sum(F.mse_loss(F.normalize(s, dim=1), F.normalize(t, dim=1)) for s, t in pairs) / 3


def amd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
             scale: float = 64.0, margin: float = 1.35,
             global_weight: float = 0.8) -> torch.Tensor:
    """Attention maps (sum of squared activations over channels, L2-normalised over
    locations) are scored with an angular margin; the student's positive, negative and
    log-probability maps, each L2-normalised, match the teacher's in mean squared error.
    Global map and the mean over the four quadrant (local) maps are weighted 8:2. Paper:
    s 64, m 1.35."""

    def attention(features):
        return features.float().pow(2).sum(1, keepdim=True)

    student_map, teacher_map = attention(student_features), attention(teacher_features)

    def normalised(maps):
        return F.normalize(maps.flatten(1), dim=1)

    total = global_weight * _amd_map_loss(normalised(student_map), normalised(teacher_map),
                                          scale, margin)
    height, width = student_map.shape[-2:]
    half_h, half_w = max(height // 2, 1), max(width // 2, 1)
    quadrants = [(slice(0, half_h), slice(0, half_w)), (slice(0, half_h), slice(half_w, None)),
                 (slice(half_h, None), slice(0, half_w)), (slice(half_h, None), slice(half_w, None))]
    local = [
        _amd_map_loss(normalised(student_map[..., rows, cols]),
                      normalised(teacher_map[..., rows, cols]), scale, margin)
        for rows, cols in quadrants if student_map[..., rows, cols].numel() > 0]
    return total + (1 - global_weight) * sum(local) / max(len(local), 1)


@register
class AngularMargin(FeatureMethod):
    name = "amd"
    summary = "angular margin, Jeon 2023; global and local maps 8:2"
    flags = (Flag("amd_weight", 1.0, "weight of the angular-margin loss (the paper's code "
                                     "gives no weight for it; 1 is ours)"),)
    spatial = True

    def loss(self, student_features, teacher_features, pair_module):
        return amd_loss(student_features, teacher_features)
