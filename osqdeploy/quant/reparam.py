"""RepQ-ViT scale reparameterisation of post-LayerNorm activations (Li et al., 2023).

LayerNorm outputs have a few channels with far larger ranges than the rest (the outliers the
paper attacks). Quantizing them per channel is accurate but not deployable as one
``QuantizeLinear``; RepQ-ViT shows the per-channel grid can be folded into the LayerNorm affine
and the next Linear so that a per-tensor grid produces *exactly* the same codes:

    y' = y / r − b          (LayerNorm: γ' = γ/r, β' = β/r − b)
    W' = W · diag(r),  c' = c + W (r ⊙ b)

with r = Δ_c / mean(Δ) and b = min_c / r − target_min. The float network is unchanged up to
rounding, and the quantized network equals the per-channel-quantized one. Post-GELU activations
(``QuantConfig.post_gelu_grid='channel'``) get the same grid with the LayerNorm's part played by a
multiply-add the quantizer carries.

Post-GELU activations can instead be rotated (``QuantConfig.post_gelu_grid='hadamard'``): an
orthonormal Hadamard matrix H mixes each block of channels, so a few large channels spread over
the block and one per-tensor grid fits them all (QuaRot's idea, on the one activation that
``osq inspect --sensitivity`` ranks costliest at W4A4). The next Linear takes W' = W·H, blockwise,
which leaves the float network unchanged; the rotated input is centred by a shift the Linear's
bias absorbs.
"""

from __future__ import annotations

import torch
from torch import nn

from . import primitives as P
from .layers import QuantLinear
from .quantizers import ActQuantizer


def _per_tensor_targets(quantizer: ActQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, b) that map the observed per-channel grids onto one per-tensor grid; sets that grid."""
    if quantizer.obs_min is None or quantizer.obs_min.dim() != 1:
        raise RuntimeError("reparameterisation needs per-channel observed ranges")
    delta_c, zp_c = P.qparams_from_range(quantizer.obs_min, quantizer.obs_max, quantizer.bits)
    target_delta = delta_c.mean()
    target_zp = zp_c.mean().round()
    act_min = -zp_c * delta_c
    target_min = -target_zp * target_delta
    r = delta_c / target_delta
    quantizer.scale.copy_(target_delta)
    quantizer.zero_point.copy_(target_zp)
    return r, act_min / r - target_min


def _fold_into_linears(linears: list[QuantLinear], r: torch.Tensor, b: torch.Tensor) -> None:
    for lin in linears:
        lin.bias.add_(lin.weight @ (r * b))
        lin.weight.mul_(r)


@torch.no_grad()
def reparameterize_norm(norm: nn.LayerNorm, quantizer: ActQuantizer, linears: list[QuantLinear]) -> None:
    """Fold the per-channel ranges observed by ``quantizer`` into ``norm`` and ``linears``."""
    if norm.weight is None or norm.bias is None:
        raise ValueError("reparameterisation needs a LayerNorm with an affine transform")
    r, b = _per_tensor_targets(quantizer)
    norm.weight.copy_(norm.weight / r)
    norm.bias.copy_(norm.bias / r - b)
    _fold_into_linears(linears, r, b)


@torch.no_grad()
def rotate_input(layer: QuantLinear) -> None:
    """Rotate ``layer``'s input in Hadamard blocks and fold the inverse into its weight.

    Done when the structure is built, before anything is observed: from then on the quantizer
    outputs x·H and the layer computes with W·H, the same function in every mode.
    """
    quantizer = layer.input_quantizer
    quantizer.enable_rotation(layer.in_features, P.rotation_block(layer.in_features))
    # the model may already be on its device; the quantizer's buffers follow it with the model
    layer.weight.copy_(P.rotate_blocks(layer.weight, quantizer.rotation.to(layer.weight.device)))


@torch.no_grad()
def reparameterize_input(layer: QuantLinear) -> None:
    """The same for an input with no affine before it (post-GELU): the quantizer's own channel
    affine takes the LayerNorm's part, so the exported graph gains one Mul and one Add.

    A rotated input is centred instead: the quantizer subtracts the observed mean, the bias adds
    it back through the weight (one Add in the exported graph)."""
    quantizer = layer.input_quantizer
    if quantizer.rotation is not None:
        if quantizer.obs_mean is None:
            raise RuntimeError("centring a rotated input needs its observed mean")
        quantizer.affine_shift.copy_(-quantizer.obs_mean)
        layer.bias.add_(layer.weight @ quantizer.obs_mean)
        return
    if quantizer.affine_scale is None:
        raise RuntimeError("reparameterize_input needs a quantizer with a channel affine (enable_channel_affine)")
    r, b = _per_tensor_targets(quantizer)
    quantizer.affine_scale.copy_(1 / r)
    quantizer.affine_shift.copy_(-b)
    _fold_into_linears([layer], r, b)
