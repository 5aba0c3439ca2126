"""What the engine needs to know about an architecture family, and nothing more.

The engine sees a model as ``stem → units → tail``. A *unit* is the smallest piece the paper
reconstructs: a whole block is the three slices A (attention up to the context), B (output
projection and residual) and C (MLP and residual); Swin adds D, the downsampling layer at the
start of a stage. Units pass a *state* (a tuple of tensors): A maps ``(x,)`` to ``(x, ctx)``,
B maps ``(x, ctx)`` to ``(x',)``. The last tensor of a state is what a reconstruction loss
compares. Each family implements this once; the engine never tests model names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import QuantConfig
from ..quant.layers import QuantConv2d, QuantLinear, fold_gelu
from ..quant.quantizers import ActQuantizer
from ..quant.reparam import rotate_input

State = tuple[torch.Tensor, ...]


@dataclass(eq=False)
class Unit:
    name: str  # e.g. "blocks.3.A": block index and part
    block: int  # global block index
    stage: int  # stage index (always 0 without downsampling)
    part: str  # "A" | "B" | "C" | "D"
    modules: list[nn.Module]  # what the unit owns (its quantizers and weights live here)
    fn: Callable[[State], State]

    def __call__(self, state: State) -> State:
        return self.fn(state)


@dataclass(eq=False)
class ReparamSite:
    """A LayerNorm whose output feeds ``quantizer`` and then ``linears`` (channel-wise ops between)."""

    norm: nn.LayerNorm
    quantizer: ActQuantizer
    linears: list[QuantLinear]


class Adapter(ABC):
    """One architecture family: where its blocks, slices and downsampling layers are."""

    family: str = ""

    @staticmethod
    @abstractmethod
    def matches(model: nn.Module) -> bool: ...

    @abstractmethod
    def quantize_structure(self, model: nn.Module, cfg: QuantConfig) -> None:
        """Swap the fake-quant modules into ``model`` in place."""

    @abstractmethod
    def units(self, model: nn.Module) -> list[Unit]: ...

    @abstractmethod
    def reparam_sites(self, model: nn.Module) -> list[ReparamSite]: ...

    @abstractmethod
    def stem(self, model: nn.Module, images: torch.Tensor) -> State: ...

    @abstractmethod
    def tail(self, model: nn.Module, state: State) -> torch.Tensor: ...

    @abstractmethod
    def block_outputs(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose outputs are the block outputs (for outlier statistics)."""

    def has_downsampling(self, model: nn.Module) -> bool:
        return any(u.part == "D" for u in self.units(model))

    def edge_layers(self, model: nn.Module) -> list[nn.Module]:
        """Quantized layers outside the reconstructed units (patch embedding, head)."""
        inside = {id(m) for u in self.units(model) for root in u.modules for m in root.modules()}
        return [
            m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d)) and id(m) not in inside
        ]




def quantize_mlp(mlp: nn.Module, cfg: QuantConfig) -> None:
    """Swap quantized Linears into a timm ``Mlp`` (both families use timm's): fc1's input observed
    per channel for the LayerNorm reparameterisation, fc2's post-GELU input with its GELU folded in."""
    mlp.fc1 = QuantLinear(mlp.fc1, cfg.w_bits, cfg.a_bits, per_channel_observe=cfg.reparam)
    mlp.fc2 = QuantLinear(mlp.fc2, cfg.w_bits, cfg.a_bits)
    mlp.fc2.input_quantizer.range_keep_min = cfg.post_gelu_range == "mse_max"
    fold_gelu(mlp)
    if cfg.post_gelu_grid == "channel":
        mlp.fc2.input_quantizer.enable_channel_affine(mlp.fc2.in_features)
    elif cfg.post_gelu_grid == "hadamard":
        # rotated and centred, the input is no longer one-sided: search both ends of its range
        mlp.fc2.input_quantizer.range_keep_min = False
        rotate_input(mlp.fc2)


def block_units(block: nn.Module, index: int, stage: int, a: list[nn.Module], b: list[nn.Module], c: list[nn.Module]):
    """The A/B/C units of a block wrapper exposing ``part_a``, ``part_b`` and ``part_c``."""
    return [
        Unit(f"blocks.{index}.A", index, stage, "A", a, lambda s: (s[0], block.part_a(s[0]))),
        Unit(f"blocks.{index}.B", index, stage, "B", b, lambda s: (block.part_b(s[0], s[1]),)),
        Unit(f"blocks.{index}.C", index, stage, "C", c, lambda s: (block.part_c(s[0]),)),
    ]
