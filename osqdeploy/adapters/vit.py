"""Plain ViT / DeiT (timm ``VisionTransformer``): a homogeneous stack of blocks, no downsampling."""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig
from ..quant.layers import QuantConv2d, QuantLinear
from .attention import QuantAttention
from .base import Adapter, ReparamSite, State, Unit, block_units, quantize_mlp


class QuantBlock(nn.Module):
    """A timm ``Block`` split into the paper's slices; ``forward`` is their composition."""

    def __init__(self, block: nn.Module, cfg: QuantConfig):
        super().__init__()
        self.norm1, self.ls1, self.drop_path1 = block.norm1, block.ls1, block.drop_path1
        self.attn = QuantAttention(block.attn, cfg)
        self.proj = QuantLinear(block.attn.proj, cfg.w_bits, cfg.a_bits)
        self.norm2, self.ls2, self.drop_path2 = block.norm2, block.ls2, block.drop_path2
        self.mlp = block.mlp
        quantize_mlp(self.mlp, cfg)

    def part_a(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attn(self.norm1(x), attn_mask=attn_mask)

    def part_b(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path1(self.ls1(self.proj(ctx)))

    def part_c(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        return self.part_c(self.part_b(x, self.part_a(x, attn_mask)))


def _head_norm(model: nn.Module) -> nn.Module:
    """The LayerNorm that feeds the head (``fc_norm`` for pooled models, else ``norm``)."""
    return model.fc_norm if isinstance(model.fc_norm, nn.LayerNorm) else model.norm


class ViTAdapter(Adapter):
    family = "vit"

    @staticmethod
    def matches(model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def quantize_structure(self, model: nn.Module, cfg: QuantConfig) -> None:
        model.patch_embed.proj = QuantConv2d(model.patch_embed.proj, cfg.edge_bits, cfg.edge_bits)
        for i, block in enumerate(model.blocks):
            model.blocks[i] = QuantBlock(block, cfg)
        per_channel = cfg.reparam and isinstance(_head_norm(model), nn.LayerNorm)
        model.head = QuantLinear(model.head, cfg.edge_bits, cfg.edge_bits, per_channel_observe=per_channel)

    def units(self, model: nn.Module) -> list[Unit]:
        units = []
        for i, blk in enumerate(model.blocks):
            units += block_units(blk, i, 0, [blk.norm1, blk.attn], [blk.proj], [blk.norm2, blk.mlp])
        return units

    def reparam_sites(self, model: nn.Module) -> list[ReparamSite]:
        sites = []
        for blk in model.blocks:
            sites.append(ReparamSite(blk.norm1, blk.attn.qkv.input_quantizer, [blk.attn.qkv]))
            sites.append(ReparamSite(blk.norm2, blk.mlp.fc1.input_quantizer, [blk.mlp.fc1]))
        if model.head.input_quantizer.per_channel_observe:
            sites.append(ReparamSite(_head_norm(model), model.head.input_quantizer, [model.head]))
        return sites

    def stem(self, model: nn.Module, images: torch.Tensor) -> State:
        x = model.patch_embed(images)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return (model.norm_pre(x),)

    def tail(self, model: nn.Module, state: State) -> torch.Tensor:
        return model.forward_head(model.norm(state[-1]))

    def block_outputs(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)
