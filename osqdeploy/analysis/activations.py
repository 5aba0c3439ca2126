"""Per-channel activation ranges at the inputs of every block's quantized layers (the paper's
Figures 2-4): where the outlier channels are, and whether they persist from block to block.

Measured by forward hooks on the float model, at the tensors the quantizers will see: the
residual stream entering the block, the two LayerNorm outputs (qkv and fc1 inputs), the GELU
output (fc2 input) and the attention probabilities (per key token, the softmax's channel).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..adapters import adapter_for

# site key → what it is, as the figure labels it
SITES: dict[str, str] = {
    "residual": "residual stream (block input)",
    "post_norm1": "post-LayerNorm 1 (qkv input)",
    "post_norm2": "post-LayerNorm 2 (fc1 input)",
    "post_gelu": "post-GELU (fc2 input)",
    "post_softmax": "post-softmax (per key token)",
}
# A channel is an outlier when its range exceeds this multiple of its block's median channel range:
# RepQ-ViT's post-LayerNorm outliers and the paper's residual-stream ones are tens of times the median.
DEFAULT_THRESHOLD = 5.0


@dataclass
class SiteRanges:
    """One site over all blocks: ``ranges[b][c]`` is max |activation| of channel c at block b."""

    site: str
    label: str
    ranges: list[list[float]] = field(default_factory=list)
    outliers: list[list[int]] = field(default_factory=list)  # per block, the marked channels
    ratio_to_median: list[float | None] = field(default_factory=list)  # per block, largest channel ÷ median

    def persistence(self) -> dict[int, int]:
        """Channel → number of blocks in which it is marked, most persistent first."""
        counts: dict[int, int] = {}
        for marked in self.outliers:
            for c in marked:
                counts[c] = counts.get(c, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class ActivationRanges:
    blocks: list[str]  # module names of the blocks, in order
    sites: dict[str, SiteRanges]
    threshold: float
    n_images: int

    def to_dict(self) -> dict:
        return {
            "blocks": self.blocks,
            "threshold": self.threshold,
            "n_images": self.n_images,
            "range": "max |activation| over images and tokens, per channel",
            "sites": {
                k: {**asdict(s), "persistence": {str(c): n for c, n in s.persistence().items()}}
                for k, s in self.sites.items()
            },
        }


def mark_outliers(ranges: torch.Tensor, threshold: float) -> tuple[list[int], float]:
    """Channels whose range exceeds ``threshold`` × the median channel range, and max ÷ median."""
    median = float(ranges.median().clamp(min=1e-12))
    marked = torch.nonzero(ranges > threshold * median).flatten().tolist()
    return [int(c) for c in marked], float(ranges.max()) / median


@contextmanager
def _unfused_attention(model: nn.Module) -> Iterator[None]:
    """timm's fused attention never materialises the probabilities; the explicit path does (same math)."""
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for m, _ in fused:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, value in fused:
            m.fused_attn = value


def _channel_max(t: torch.Tensor) -> torch.Tensor:
    return t.detach().abs().float().reshape(-1, t.shape[-1]).amax(0).cpu()


@torch.no_grad()
def activation_ranges(
    model: nn.Module,
    images: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> ActivationRanges:
    """Per block and site, every channel's max |activation| over ``images``, outliers marked.

    ``model`` is a float timm model of a family osq has an adapter for; it is left as found.
    """
    adapter = adapter_for(model)
    blocks = adapter.block_outputs(model)
    names = {id(m): n for n, m in model.named_modules()}
    acc: dict[str, list[torch.Tensor | None]] = {k: [None] * len(blocks) for k in SITES}

    def record(site: str, b: int, t: torch.Tensor) -> None:
        m = _channel_max(t)
        prev = acc[site][b]
        acc[site][b] = m if prev is None else torch.maximum(prev, m)

    handles = []
    for b, blk in enumerate(blocks):
        handles += [
            blk.register_forward_pre_hook(lambda _m, args, b=b: record("residual", b, args[0])),
            blk.norm1.register_forward_hook(lambda _m, _i, out, b=b: record("post_norm1", b, out)),
            blk.norm2.register_forward_hook(lambda _m, _i, out, b=b: record("post_norm2", b, out)),
            blk.mlp.fc2.register_forward_pre_hook(lambda _m, args, b=b: record("post_gelu", b, args[0])),
            blk.attn.attn_drop.register_forward_hook(lambda _m, _i, out, b=b: record("post_softmax", b, out)),
        ]
    was_training = model.training
    model.eval()
    try:
        with _unfused_attention(model):
            for i in range(0, images.shape[0], batch_size):
                model(images[i : i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    sites = {}
    for key, label in SITES.items():
        s = SiteRanges(key, label)
        for m in acc[key]:
            if m is None:  # a block whose site never ran (not expected for timm ViT/Swin)
                s.ranges.append([])
                s.outliers.append([])
                s.ratio_to_median.append(None)
                continue
            marked, ratio = mark_outliers(m, threshold)
            s.ranges.append([float(v) for v in m])
            s.outliers.append(marked)
            s.ratio_to_median.append(ratio)
        sites[key] = s
    return ActivationRanges([names[id(b)] for b in blocks], sites, threshold, int(images.shape[0]))
