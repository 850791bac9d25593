"""Training losses of the stages that have their own (AMN; IRN later)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amnseg import distributed

IGNORE_INDEX = 255


def smoothed_targets(
    seeds: torch.Tensor, num_channels: int, eps: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(B, h, w) seeds -> (B, C + 1, h, w) label-smoothed targets.

    1 - eps on the seed class and eps / C on each of the other C channels; pixels whose seed is
    255 get the target of class 0 (they are masked out of the loss anyway).
    """
    index = torch.where(seeds == IGNORE_INDEX, torch.zeros_like(seeds), seeds)
    targets = torch.full(
        (seeds.shape[0], num_channels, *seeds.shape[1:]),
        eps / (num_channels - 1),
        dtype=dtype,
        device=seeds.device,
    )
    return targets.scatter_(1, index[:, None], 1.0 - eps)


def amn_loss(logits: torch.Tensor, seeds: torch.Tensor, eps: float = 0.4) -> torch.Tensor:
    """Balanced, label-smoothed per-pixel classification loss (METHOD.md section 4).

    ``logits`` (B, C + 1, h, w); ``seeds`` (B, h, w) int64 at the logit size, 0 = background,
    1..C classes, 255 = unsure (ignored). The per-pixel cross-entropy against the smoothed
    targets is averaged separately over background and foreground seed pixels of the whole
    batch; loss = (L_bg + L_fg) / 2. A term with no pixels counts as 0 (the reference divides
    0 by 0 there and gets NaN).
    """
    targets = smoothed_targets(seeds, logits.shape[1], eps, logits.dtype)
    per_pixel = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)
    background = seeds == 0
    foreground = (seeds != 0) & (seeds != IGNORE_INDEX)
    loss_bg = _mean_over(per_pixel, background)
    loss_fg = _mean_over(per_pixel, foreground)
    return (loss_bg + loss_fg) / 2


def _mean_over(values: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``pixels`` of the global batch (all ranks' under torchrun; see
    ``distributed.loss_scale``); 0 when there are none."""
    count = distributed.global_count(pixels.sum()).to(values.dtype)
    return (values * pixels).sum() * distributed.loss_scale() / count.clamp(min=1)


def irn_affinity_loss(
    affinity: torch.Tensor,
    bg_positive: torch.Tensor,
    fg_positive: torch.Tensor,
    negative: torch.Tensor,
) -> torch.Tensor:
    """IRN's class-boundary loss (METHOD.md section 5), all inputs (B, D, h, w).

    pos = -log(aff + 1e-5), neg = -log(1 + 1e-5 - aff); each term averaged over its pairs in the
    batch (sum / (count + 1e-5), as the reference; all ranks' batch under torchrun);
    L = ((L_pos_bg + L_pos_fg) / 2 + L_neg) / 2.
    """
    positive_loss = -torch.log(affinity + 1e-5)
    negative_loss = -torch.log(1.0 + 1e-5 - affinity)

    def mean_over(pairs: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        count = distributed.global_count(pairs.sum()).to(loss.dtype)
        return (pairs * loss).sum() * distributed.loss_scale() / (count + 1e-5)

    positive = (mean_over(bg_positive, positive_loss) + mean_over(fg_positive, positive_loss)) / 2
    return (positive + mean_over(negative, negative_loss)) / 2
