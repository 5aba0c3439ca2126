"""Outlier statistics of block outputs (Section 3.1, Figure 4): which channels, how extreme."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def block_outlier_stats(model: nn.Module, blocks: list[nn.Module], images: torch.Tensor, top: int = 5) -> list[dict]:
    """Per block: the channels with the largest |activation| and their ratio to the median channel."""
    maxima: list[torch.Tensor | None] = [None] * len(blocks)

    def hook(i):
        def fn(_m, _inp, out):
            a = out.detach().abs().float().reshape(-1, out.shape[-1]).amax(0)
            maxima[i] = a if maxima[i] is None else torch.maximum(maxima[i], a)

        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    stats = []
    for i, m in enumerate(maxima):
        if m is None:
            continue
        median = float(m.median().clamp(min=1e-12))
        values, idx = m.topk(min(top, m.numel()))
        stats.append(
            {
                "block": i,
                "channels": [int(c) for c in idx],
                "max": [round(float(v), 4) for v in values],
                "ratio_to_median": round(float(values[0]) / median, 2),
            }
        )
    return stats
