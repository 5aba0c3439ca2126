"""Attention with both matmul operands quantized, shared by the ViT and Swin adapters.

timm's attention modules fuse the two matmuls (SDPA), leaving no place for quantizers, so the
adapters swap in these modules. They return the attention *context* (before the output
projection): the projection is slice B of the paper and lives in the block wrapper.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig
from ..quant.modules import ActQuantizer, LogQuantizer, QuantLinear


class QuantMatMulAttention(nn.Module):
    """softmax(q̂ k̂ᵀ·scale + bias) quantized on the log grid, times v̂."""

    def __init__(self, cfg: QuantConfig, scale: float):
        super().__init__()
        self.scale = scale
        self.q_quantizer = ActQuantizer(cfg.a_bits)
        self.k_quantizer = ActQuantizer(cfg.a_bits)
        self.v_quantizer = ActQuantizer(cfg.a_bits)
        self.attn_quantizer = LogQuantizer(cfg.a_bits, cfg.attn_log_base)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        attn = (self.q_quantizer(q) @ self.k_quantizer(k).transpose(-2, -1)) * self.scale
        if bias is not None:
            attn = attn + bias
        attn = self.attn_quantizer(attn.softmax(dim=-1))
        return attn @ self.v_quantizer(v)


class QuantAttention(nn.Module):
    """timm ``vision_transformer.Attention`` up to the context (no projection)."""

    def __init__(self, attn: nn.Module, cfg: QuantConfig):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise NotImplementedError("gated attention is not supported")
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.qkv = QuantLinear(attn.qkv, cfg.w_bits, cfg.a_bits, per_channel_observe=cfg.reparam)
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.norm = getattr(attn, "norm", nn.Identity())
        self.core = QuantMatMulAttention(cfg, attn.scale)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None
        if attn_mask is not None:
            bias = attn_mask if attn_mask.dtype != torch.bool else torch.zeros_like(
                attn_mask, dtype=q.dtype
            ).masked_fill(~attn_mask, float("-inf"))
        x = self.core(q, k, v, bias)
        return self.norm(x.transpose(1, 2).reshape(B, N, -1))


class QuantWindowAttention(nn.Module):
    """timm ``swin_transformer.WindowAttention`` up to the context (no projection)."""

    def __init__(self, attn: nn.Module, cfg: QuantConfig):
        super().__init__()
        self.num_heads = attn.num_heads
        self.qkv = QuantLinear(attn.qkv, cfg.w_bits, cfg.a_bits, per_channel_observe=cfg.reparam)
        self.window_area = attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self._rel_pos_bias = attn._get_rel_pos_bias.__func__
        self.core = QuantMatMulAttention(cfg, attn.scale)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self._rel_pos_bias(self)
        if mask is not None:
            num_win = mask.shape[0]
            bias = bias + mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, -1, -1, -1).reshape(
                B_, 1, N, N
            )
        x = self.core(q, k, v, bias)
        return x.transpose(1, 2).reshape(B_, N, -1)
