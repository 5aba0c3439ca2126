"""Swin (timm ``SwinTransformer``): stages of window-attention blocks with patch merging between.

The downsampling layers break the paper's transformer-like topological homogeneity, which is
why Algorithm 1 gives Swin the finest slicing.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig
from ..quant.layers import QuantConv2d, QuantLinear
from .attention import QuantWindowAttention
from .base import Adapter, ReparamSite, State, Unit, block_units, quantize_mlp


class QuantSwinBlock(nn.Module):
    """A timm ``SwinTransformerBlock`` split into slices.

    Slice A reuses timm's own shift/partition/merge code (``block._attn``) around an attention
    that stops at the context; the output projection is token-wise, so applying it after the
    windows are merged back (slice B) computes the same function.
    """

    def __init__(self, block: nn.Module, cfg: QuantConfig):
        super().__init__()
        self.proj = QuantLinear(block.attn.proj, cfg.w_bits, cfg.a_bits)
        block.attn = QuantWindowAttention(block.attn, cfg)
        quantize_mlp(block.mlp, cfg)
        self.block = block

    def part_a(self, x: torch.Tensor) -> torch.Tensor:
        return self.block._attn(self.block.norm1(x))

    def part_b(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return x + self.block.drop_path1(self.proj(ctx))

    def part_c(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.reshape(B, -1, C)
        x = x + self.block.drop_path2(self.block.mlp(self.block.norm2(x)))
        return x.reshape(B, H, W, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.part_c(self.part_b(x, self.part_a(x)))


class SwinAdapter(Adapter):
    family = "swin"

    @staticmethod
    def matches(model: nn.Module) -> bool:
        from timm.models.swin_transformer import SwinTransformer

        return isinstance(model, SwinTransformer)

    def quantize_structure(self, model: nn.Module, cfg: QuantConfig) -> None:
        model.patch_embed.proj = QuantConv2d(model.patch_embed.proj, cfg.edge_bits, cfg.edge_bits)
        for stage in model.layers:
            if not isinstance(stage.downsample, nn.Identity):
                ds = stage.downsample
                ds.reduction = QuantLinear(ds.reduction, cfg.w_bits, cfg.a_bits, per_channel_observe=cfg.reparam)
            for i, block in enumerate(stage.blocks):
                stage.blocks[i] = QuantSwinBlock(block, cfg)
        model.head.fc = QuantLinear(model.head.fc, cfg.edge_bits, cfg.edge_bits, per_channel_observe=cfg.reparam)

    def units(self, model: nn.Module) -> list[Unit]:
        units, index = [], 0
        for s, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                ds = stage.downsample
                units.append(Unit(f"layers.{s}.downsample.D", index, s, "D", [ds], lambda st, m=ds: (m(st[-1]),)))
            for blk in stage.blocks:
                b = blk.block
                units += block_units(blk, index, s, [b.norm1, b.attn], [blk.proj], [b.norm2, b.mlp])
                index += 1
        return units

    def reparam_sites(self, model: nn.Module) -> list[ReparamSite]:
        sites = []
        for stage in model.layers:
            if not isinstance(stage.downsample, nn.Identity):
                ds = stage.downsample
                sites.append(ReparamSite(ds.norm, ds.reduction.input_quantizer, [ds.reduction]))
            for blk in stage.blocks:
                b = blk.block
                sites.append(ReparamSite(b.norm1, b.attn.qkv.input_quantizer, [b.attn.qkv]))
                sites.append(ReparamSite(b.norm2, b.mlp.fc1.input_quantizer, [b.mlp.fc1]))
        if model.head.fc.input_quantizer.per_channel_observe:
            sites.append(ReparamSite(model.norm, model.head.fc.input_quantizer, [model.head.fc]))
        return sites

    def stem(self, model: nn.Module, images: torch.Tensor) -> State:
        return (model.patch_embed(images),)

    def tail(self, model: nn.Module, state: State) -> torch.Tensor:
        return model.forward_head(model.norm(state[-1]))

    def block_outputs(self, model: nn.Module) -> list[nn.Module]:
        return [blk for stage in model.layers for blk in stage.blocks]
