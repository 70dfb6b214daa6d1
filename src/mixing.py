"""Paired mixup and cutmix: one draw per batch mixes the LR view and its HR twin alike, so
the teacher sees the HR version of exactly the mixed image the student sees."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class MixParams:
    """One mixup or cutmix draw for a batch: every sample is mixed with ``partner`` (a
    permutation of the batch), keeping the share ``lam`` of its own image. Cutmix pastes
    the partner's ``box`` (top, left, height, width in cells of the batch's crop ``grid``)
    instead of blending; ``lam`` is then the share of the view outside the box. The same
    draw mixes the LR view and its HR twin, so the teacher sees the HR version of exactly
    the mixed image the student sees."""

    partner: torch.Tensor          # (B,) int64
    lam: float
    box: tuple | None = None       # cutmix only
    grid: int = 1


def sample_mix_params(batch_size: int, generator: torch.Generator, mixup: float,
                      cutmix: float, grid: int, groups: tuple = ()) -> MixParams | None:
    """Mixup (Zhang 2018) with ``lam ~ Beta(mixup, mixup)`` or cutmix (Yun 2019) with a box
    of area ``1 - lam``, ``lam ~ Beta(cutmix, cutmix)``; with both on, each batch takes one
    of the two at even odds; None when both are 0. ``groups`` (sizes of consecutive blocks
    of the batch, e.g. labelled then unlabelled rows) keeps every partner in its own block,
    so a labelled image is mixed with a labelled one and its two labels stay known."""
    if mixup <= 0 and cutmix <= 0:
        return None
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand((), generator=generator) < 0.5)
    concentration = cutmix if use_cutmix else mixup
    # Beta(a, a) from two Gamma draws, on the epoch generator so runs repeat exactly.
    gammas = torch._standard_gamma(torch.full((2,), float(concentration)), generator=generator)
    lam = float(gammas[0] / gammas.sum())
    if len(groups) > 1:
        starts = [sum(groups[:number]) for number in range(len(groups))]
        partner = torch.cat([start + torch.randperm(size, generator=generator)
                             for start, size in zip(starts, groups)])
    else:
        partner = torch.randperm(batch_size, generator=generator)
    if not use_cutmix:
        return MixParams(partner, lam)
    side = min(grid, max(1, round(math.sqrt(1 - lam) * grid)))
    top, left = (int(torch.randint(grid - side + 1, (), generator=generator)) for _ in range(2))
    return MixParams(partner, 1 - side * side / (grid * grid), (top, left, side, side), grid)


def mix_views(views: dict, mix: MixParams | None) -> dict:
    """Apply one mixing draw to every view (LR and HR alike). Cutmix boxes are whole cells
    of the crop grid, so in views whose side is a multiple of the grid they cover exactly
    the same part of the image at every resolution."""
    if mix is None:
        return views
    partner = mix.partner.to(next(iter(views.values())).device)
    mixed = {}
    for key, view in views.items():
        if mix.box is None:
            mixed[key] = view.mul(mix.lam).add_(view[partner], alpha=1 - mix.lam)
            continue
        side = view.shape[-1]
        top, left, height, width = (round(cell * side / mix.grid) for cell in mix.box)
        pasted = view.clone()
        pasted[..., top:top + height, left:left + width] = \
            view[partner][..., top:top + height, left:left + width]
        mixed[key] = pasted
    return mixed
