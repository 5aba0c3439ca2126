"""Attention with both matmul operands quantized, shared by the ViT and Swin adapters.

timm's attention modules fuse the two matmuls (SDPA), leaving no place for quantizers, so the
adapters swap in these modules. They return the attention *context* (before the output
projection): the projection is slice B of the paper and lives in the block wrapper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantConfig
from ..quant.kernels import KERNELS, active_drop, draw_mask, matmul_dtype
from ..quant.layers import QuantLinear
from ..quant.mode import QuantMode
from ..quant.quantizers import ActQuantizer, LogQuantizer


class QuantMatMulAttention(nn.Module):
    """softmax(q̂ k̂ᵀ·scale + bias) quantized on the log grid (or a uniform one), times v̂.

    Two routes compute the same function. ``forward`` applies each quantizer module in turn: it
    is what observation (each quantizer sees its own tensor), full precision and ONNX export
    trace. ``fused_forward`` — taken whenever all four quantizers are simply quantizing, as in
    reconstruction and evaluation — quantizes q, k and v in one kernel from the projection's own
    layout and the probabilities in one kernel with their softmax (the element arithmetic of each
    quantizer unchanged): a training step is bound by such elementwise passes, not by its matmuls.
    """

    def __init__(self, cfg: QuantConfig, scale: float):
        super().__init__()
        self.scale = scale
        # ``fused_forward`` pads the keys to a multiple of this (see CalibrationConfig.pad_attention)
        self.key_align = 1
        self.q_quantizer = ActQuantizer(cfg.a_bits)
        self.k_quantizer = ActQuantizer(cfg.a_bits)
        self.v_quantizer = ActQuantizer(cfg.a_bits)
        self.attn_quantizer = (LogQuantizer(cfg.a_bits, cfg.attn_log_base) if cfg.attn_grid == "log"
                               else ActQuantizer(cfg.a_bits))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        attn = (self.q_quantizer(q) @ self.k_quantizer(k).transpose(-2, -1)) * self.scale
        if bias is not None:
            attn = attn + bias
        attn = self.attn_quantizer(attn.softmax(dim=-1))
        return attn @ self.v_quantizer(v)

    def fusable(self) -> bool:
        qkv = (self.q_quantizer, self.k_quantizer, self.v_quantizer)
        quantizing = all(q.mode is QuantMode.NEAREST for q in (*qkv, self.attn_quantizer))
        # the fused probabilities kernel computes the log grid only; a uniform grid takes ``forward``
        log_grid = isinstance(self.attn_quantizer, LogQuantizer)
        return quantizing and log_grid and len({(q.bits, active_drop(q)) for q in qkv}) == 1

    def fused_forward(self, qkv: torch.Tensor, bias: torch.Tensor | None = None, groups: int = 0) -> torch.Tensor:
        """The context ``[B, H, N, D]`` from the projection viewed ``[B, N, 3, H, D]`` (see ``fusable``).

        ``groups`` > 0: ``bias`` is ``[groups, H, N, N]``, cycling over the batch (Swin's windows).
        """
        qs = (self.q_quantizer, self.k_quantizer, self.v_quantizer)
        scale = torch.stack([q.scale for q in qs])
        zero_point = torch.stack([q.zero_point for q in qs])
        drop = active_drop(qs[0])
        q, k, v = KERNELS["qkv"](qkv, scale, zero_point, qs[0].bits, drop, matmul_dtype(qkv),
                                 draw_mask(qkv.shape, qkv.device, drop))
        a, a_drop = self.attn_quantizer, active_drop(self.attn_quantizer)
        n = k.shape[-2]
        mask = draw_mask((*q.shape[:-1], n), q.device, a_drop)  # at the keys' own count: the same draws padded
        pad = -n % self.key_align
        if pad:
            k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
            bias = _mask_padded_keys(bias, n, pad, q.device)
            if mask is not None:
                mask = torch.cat([mask, mask.new_zeros((*mask.shape[:-1], pad))], dim=-1)
        scores = q @ k.transpose(-2, -1)
        probs = KERNELS["attn_probs"](scores, self.scale, bias, groups, a.delta, a.bits, a.base, a_drop,
                                      matmul_dtype(v), mask)
        return probs @ v


def _mask_padded_keys(bias: torch.Tensor | None, n: int, pad: int, device: torch.device) -> torch.Tensor:
    """``bias`` over ``n + pad`` keys, -inf on the ``pad`` padded ones (their softmax weight exactly 0)."""
    return F.pad(torch.zeros(n, device=device) if bias is None else bias, (0, pad), value=float("-inf"))


def align_attention_keys(model: nn.Module, multiple: int) -> None:
    """Pad every fused attention's keys to a multiple of ``multiple`` tokens (1: no padding)."""
    for m in model.modules():
        if isinstance(m, QuantMatMulAttention):
            m.key_align = multiple


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
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        bias = None
        if attn_mask is not None:
            bias = attn_mask if attn_mask.dtype != torch.bool else torch.zeros_like(
                attn_mask, dtype=torch.float32
            ).masked_fill(~attn_mask, float("-inf"))
        if isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity) and self.core.fusable():
            x = self.core.fused_forward(qkv, bias)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            x = self.core(self.q_norm(q), self.k_norm(k), v, bias)
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
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1)
        bias = self._rel_pos_bias(self)  # [1, H, N, N]
        if self.core.fusable():  # the per-window masks broadcast inside the kernel
            groups = 1 if mask is None else mask.shape[0]
            if mask is not None:
                bias = bias + mask.unsqueeze(1)
            x = self.core.fused_forward(qkv, bias, groups)
            return x.transpose(1, 2).reshape(B_, N, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if mask is not None:
            num_win = mask.shape[0]
            bias = bias + mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, -1, -1, -1).reshape(
                B_, 1, N, N
            )
        x = self.core(q, k, v, bias)
        return x.transpose(1, 2).reshape(B_, N, -1)
