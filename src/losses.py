"""Distillation losses: small pure functions (and one module, MGD's generator) on tensors.
Each documents its paper and the defaults we use; ``distill.py`` combines them by name.

Logit losses take the student's logits and the teachers' soft targets (probabilities at
temperature T, averaged over teachers). Feature losses take a student and a teacher feature
map of equal spatial size (and, where the loss compares channels, equal channel count);
``distill.py`` aligns them first.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn


def _kl(target_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || q) summed over the last dimension, with 0 log 0 = 0."""
    return (torch.special.xlogy(target_probs, target_probs) - target_probs * log_probs).sum(-1)


def soft_targets(teacher_logits: list[torch.Tensor], weights: list[float],
                 temperature: float) -> torch.Tensor:
    """Weighted average of the teachers' softmax(logits / T); the weights sum to 1."""
    return sum(weight * F.softmax(logits.float() / temperature, dim=1)
               for weight, logits in zip(weights, teacher_logits))


def kd_loss_from_probs(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): ``T^2 * KL(p_teacher || softmax(s/T))``, batch mean."""
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)
    return _kl(teacher_probs, log_probs).mean() * temperature ** 2


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over the batch. The ``T^2``
    keeps its gradients on the scale of the hard-label loss whatever the temperature."""
    return kd_loss_from_probs(student_logits, soft_targets([teacher_logits], [1.0], temperature),
                              temperature)


def dkd_loss_from_probs(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                        labels: torch.Tensor, temperature: float, alpha: float,
                        beta: float) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``, both times T^2.

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
    tckd = _kl(teacher_binary, student_binary.log()).mean()
    # Non-target distributions: the target class removed, the rest renormalised.
    student_rest = F.log_softmax(student_logits.float() / temperature
                                 - 1000.0 * target.float(), dim=1)
    teacher_rest = teacher_probs.masked_fill(target, 0)
    teacher_rest = teacher_rest / teacher_rest.sum(1, keepdim=True).clamp_min(eps)
    nckd = _kl(teacher_rest, student_rest.masked_fill(target, 0)).mean()
    return (alpha * tckd + beta * nckd) * temperature ** 2


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis (2017): mean over channels of the squared activations,
    flattened and L2-normalised: (B, C, H, W) -> (B, H*W)."""
    return F.normalize(features.float().pow(2).mean(1).flatten(1), dim=1)


def at_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Attention transfer: mean squared difference of the two attention maps. Paper's
    implementation weight: 1000. Needs equal spatial size only (channels are summed out)."""
    return (attention_map(student_features) - attention_map(teacher_features)).pow(2).mean()


def cwd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
             tau: float) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021): each channel's activations become
    a distribution over locations (softmax at temperature tau), and the student's matches
    the teacher's by ``tau^2 * KL(teacher || student)``, averaged over channels and images.
    Paper (semantic segmentation): tau 4, weight 3."""
    batch, channels = student_features.shape[:2]
    student = F.log_softmax(student_features.float().reshape(batch, channels, -1) / tau, dim=2)
    teacher = F.softmax(teacher_features.float().reshape(batch, channels, -1) / tau, dim=2)
    return _kl(teacher, student).mean() * tau ** 2


def fitnet_loss(student_features: torch.Tensor,
                teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint (Romero et al., ICLR 2015): mean squared error between the (channel-
    aligned) student map and the teacher's. mdistiller's weight: 100. Across resolutions
    the student's LR features regress the teacher's features of the HR twin."""
    return (student_features.float() - teacher_features.float()).pow(2).mean()


class MGDGenerator(nn.Module):
    """Masked generative distillation (Yang et al., ECCV 2022): random locations of the
    (channel-aligned) student map are zeroed, a 3x3-conv, ReLU, 3x3-conv block generates
    the teacher's full map from what is left, and the loss is the squared error summed over
    the map, per image. Paper (classification): weight 7e-5, mask ratio 0.5."""

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
    """Angular-margin distillation (Jeon et al., Neurocomputing 2023). Attention maps (sum
    of squared activations over channels, L2-normalised over locations) are scored with an
    angular margin; the student's positive, negative and log-probability maps, each
    L2-normalised, match the teacher's in mean squared error. Global map and the mean over
    the four quadrant (local) maps are weighted 8:2. Paper: s 64, m 1.35."""

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

