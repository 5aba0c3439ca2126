"""Fake-quant layers: the quantized model is the timm model with these swapped in.

``QuantLinear`` and ``QuantConv2d`` quantize their input and their weight; under
``QuantMode.EXPORT`` they compute with the weight quantizer's integer codes through the
dequantize custom op (a Linear as a MatMul on ``[in, out]`` codes). Also here: listing a model's
quantizers and layers, and moving an MLP's GELU into the quantizer that follows it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .mode import QuantMode
from .quantizers import ActQuantizer, LogQuantizer, WeightQuantizer


class QuantLinear(nn.Module):
    """nn.Linear with a quantized input and quantized weight (bias stays float, as in deployment)."""

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int, per_channel_observe: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(self.out_features)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.input_quantizer = ActQuantizer(a_bits, per_channel_observe)
        self.weight_quantizer = WeightQuantizer(self.weight, w_bits, export_transposed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        if self.weight_quantizer.mode is QuantMode.EXPORT:  # the [in, out] codes of a DequantizeLinear → MatMul
            return torch.matmul(x, self.weight_quantizer(self.weight)) + self.bias
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Module):
    """Patch-embedding convolution with quantized input and per-output-channel weights."""

    def __init__(self, conv: nn.Conv2d, w_bits: int, a_bits: int):
        super().__init__()
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.input_quantizer = ActQuantizer(a_bits)
        self.weight_quantizer = WeightQuantizer(self.weight, w_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        w = self.weight_quantizer(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


QUANT_LAYERS = (QuantLinear, QuantConv2d)
ACT_QUANTIZERS = (ActQuantizer, LogQuantizer)


def fold_gelu(mlp: nn.Module) -> None:
    """Move a timm ``Mlp``'s GELU into its ``fc2`` input quantizer, where nothing else lies between.

    Same function (the quantizer applies it first, on every route: observation, full precision,
    reconstruction, export); MLPs with other activations, a norm or a live dropout are left as
    they are.
    """
    between = (getattr(mlp, "drop1", nn.Identity()), getattr(mlp, "norm", nn.Identity()))
    inert = all(isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0) for m in between)
    quantizer = getattr(mlp.fc2, "input_quantizer", None)
    if isinstance(mlp.act, nn.GELU) and inert and isinstance(quantizer, ActQuantizer):
        quantizer.gelu = mlp.act.approximate
        mlp.act = nn.Identity()


def _unique(modules: Iterable[nn.Module], types: tuple[type, ...]) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for root in modules:
        for m in root.modules():
            if isinstance(m, types):
                seen.setdefault(id(m), m)
    return list(seen.values())


def act_quantizers(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """Unique activation quantizers inside ``modules`` (in module order)."""
    return _unique(modules, ACT_QUANTIZERS)


def quant_layers(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """Unique quantized Linear/Conv layers inside ``modules`` (in module order)."""
    return _unique(modules, QUANT_LAYERS)
