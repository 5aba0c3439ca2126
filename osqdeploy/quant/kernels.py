"""The quantizers' arithmetic as kernels: the deployed custom ops and the training-time functions.

Two custom ops carry the deployed arithmetic through the ONNX exporter, which translates them to
``QuantizeLinear``/``DequantizeLinear``. The training-time functions are each quantizer's chain
of small elementwise ops during reconstruction, written once; ``fused_quantizers()`` swaps in
torch.compile'd copies. QDrop's masks are drawn here too, so eager and compiled kernels see the
same draws.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from . import primitives as P

# --- custom ops: the deployed arithmetic, recognisable by the ONNX exporter ---------------------


@torch.library.custom_op("osqdeploy::qdq", mutates_args=())
def qdq_op(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """QuantizeLinear→DequantizeLinear with the integer type's own saturation (uint8 here)."""
    zp = zero_point.float()
    return (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale


@qdq_op.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x)


@torch.library.custom_op("osqdeploy::dequantize_weight", mutates_args=())
def dequantize_weight_op(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-channel DequantizeLinear of integer weights along ``axis``."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return (q.float() - zero_point.float().view(shape)) * scale.view(shape)


@dequantize_weight_op.register_fake
def _(q, scale, zero_point, axis):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


# --- training-time arithmetic, optionally compiled ------------------------------------------------
# During reconstruction every quantizer is a chain of small elementwise ops, forward and backward.
# These functions are that chain, written once; ``fused_quantizers()`` swaps in torch.compile'd
# copies so each becomes one generated kernel per direction: a step is bound by launching these
# small kernels, not by its matmuls. QDrop's mask is drawn by
# the caller, eagerly, and handed to the kernel (``draw_mask``), so the eager and the compiled
# versions see the same draws; with ``fused_rng`` the kernel draws it itself, inside the fused
# kernel (see ``CalibrationConfig.fused_rng``).
#
# Under autocast an activation arrives in bf16/fp16: the grid arithmetic (x/s, round, clamp,
# (q−z)·s) still runs in fp32 — in half precision x/s alone is off by up to 0.06 of a step at
# 4 bits (bf16), which moves rounding decisions and distorts the grid away from the deployed one.
# The result is written in ``out_dtype``, under autocast the type the consuming matmul would cast
# it to anyway (every activation quantizer feeds a matmul or the patch convolution), so that cast
# happens inside the fused kernel instead of in a pass of its own. For fp32 the casts are no-ops.


_IN_KERNEL_RNG = False  # set by fused_quantizers(fused_rng=True); read when a kernel is traced


@torch.compiler.disable
def _bernoulli(shape: torch.Size, device: torch.device, drop_prob: float) -> torch.Tensor:
    # never traced: a Bernoulli draw inside a compiled autograd graph does not reproduce the eager
    # draw (torch 2.11, CUDA); called eagerly, it is the same kernel on the same generator state
    # whatever the caller. On CPU bool bernoulli_ is a scalar loop, slower than ``rand < p``, the
    # same distribution, so the CPU draws that way
    if device.type != "cuda":
        return torch.rand(shape, device=device) < drop_prob
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(drop_prob)


def qdrop_mask(shape: torch.Size, device: torch.device, drop_prob: float) -> torch.Tensor:
    """QDrop's draw: True (keep the float value) with probability ``drop_prob``, per element.

    On the GPU a bool Bernoulli draw writes one byte per element where ``rand < p`` writes a float
    of four and reads it back, forward and backward, for every quantizer of every step. It is drawn in the
    logical (contiguous) order of ``shape``, whatever layout the tensor it masks has. Under
    ``fused_rng`` the draw is ``rand < p``, which inductor generates inside its kernels.
    """
    if _IN_KERNEL_RNG:
        return torch.rand(shape, device=device) < drop_prob
    return _bernoulli(shape, device, drop_prob)


def active_drop(quantizer: nn.Module) -> float:
    """The QDrop probability a quantizer applies now: its ``drop_prob`` in training mode, else 0."""
    return quantizer.drop_prob if quantizer.training else 0.0


@contextmanager
def qdrop(quantizers: Iterable[nn.Module], drop_prob: float) -> Iterator[None]:
    """QDrop on ``quantizers`` inside the block (training mode, each element kept float with
    ``drop_prob``); after it, off again: evaluation mode, probability 0, as every later stage expects."""
    quantizers = list(quantizers)
    for q in quantizers:
        q.drop_prob = drop_prob
        q.train()
    try:
        yield
    finally:
        for q in quantizers:
            q.drop_prob = 0.0
            q.eval()


def draw_mask(shape: torch.Size | tuple[int, ...], device: torch.device, drop_prob: float) -> torch.Tensor | None:
    """The mask a caller hands a training kernel: drawn here, eagerly, before the kernel runs.

    None where nothing is dropped, or under ``fused_rng``, where the kernel draws its own.
    """
    if drop_prob <= 0 or _IN_KERNEL_RNG:
        return None
    return qdrop_mask(torch.Size(shape), device, drop_prob)


def qdrop_mix(xf: torch.Tensor, xq: torch.Tensor, drop_prob: float, mask: torch.Tensor | None) -> torch.Tensor:
    """QDrop: each element the float value where ``mask`` holds (drawn here if None), else the quantized one."""
    if drop_prob <= 0:
        return xq
    keep = mask if mask is not None else qdrop_mask(xf.shape, xf.device, drop_prob)
    return torch.where(keep, xf, xq)


def grid_input(x: torch.Tensor, gelu: str | None, affine_scale: torch.Tensor | None,
               affine_shift: torch.Tensor | None, rotation: torch.Tensor | None = None) -> torch.Tensor:
    """What a uniform grid sees: its input after the quantizer's own GELU (``ActQuantizer.gelu``),
    block rotation (``ActQuantizer.rotation``) and per-channel multiply-add (``affine_scale``,
    ``affine_shift``; either may be None), on every route."""
    if gelu is not None:
        x = F.gelu(x, approximate=gelu)
    if rotation is not None:
        x = P.rotate_blocks(x, rotation)
    if affine_scale is not None:
        x = x * affine_scale
    if affine_shift is not None:
        x = x + affine_shift
    return x


def _uniform_train(x, scale, zero_point, bits: int, drop_prob: float, out_dtype: torch.dtype | None = None,
                   gelu: str | None = None, mask: torch.Tensor | None = None,
                   affine_scale: torch.Tensor | None = None, affine_shift: torch.Tensor | None = None,
                   rotation: torch.Tensor | None = None):
    xf = grid_input(x.float(), gelu, affine_scale, affine_shift, rotation)
    xq = P.fake_quantize_uniform(xf, scale, zero_point, bits)
    return qdrop_mix(xf, xq, drop_prob, mask).to(out_dtype or x.dtype)


def _log_train(x, delta, bits: int, base: str, drop_prob: float, out_dtype: torch.dtype | None = None,
               mask: torch.Tensor | None = None):
    xf = x.float()
    xq = P.fake_quantize_log(xf, delta, bits, base)
    xq = xf + (xq - xf).detach()  # STE: gradients reach the layers before the softmax
    return qdrop_mix(xf, xq, drop_prob, mask).to(out_dtype or x.dtype)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The type a matmul will compute ``x`` in: autocast's, where it is on, else ``x``'s own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _qkv_train(qkv, scale, zero_point, bits: int, drop_prob: float, out_dtype: torch.dtype | None = None,
              mask: torch.Tensor | None = None):
    """q̂, k̂, v̂ from the ``[B, N, 3, H, D]`` projection, each ``[B, H, N, D]`` and contiguous.

    The three quantizers in one pass: ``scale``/``zero_point`` hold q's, k's and v's grid (shape
    ``[3]``), so every element meets the same arithmetic as in its own quantizer. Writing the
    attention layout directly spares the three strided copies the matmuls would otherwise make
    of quantizer outputs laid out like the permuted projection, and their gradients' stack.
    One QDrop draw covers all three.
    """
    x = qkv.float()
    xq = P.fake_quantize_uniform(x, scale.view(3, 1, 1), zero_point.view(3, 1, 1), bits)
    out = qdrop_mix(x, xq, drop_prob, mask)
    return out.to(out_dtype or qkv.dtype).permute(2, 0, 3, 1, 4).contiguous().unbind(0)


def _attn_probs_train(scores, scale: float, bias, groups: int, delta, bits: int, base: str, drop_prob: float,
                      out_dtype: torch.dtype | None = None, mask: torch.Tensor | None = None):
    """softmax(scores·scale + bias) on the log grid (with QDrop), in fp32 whatever ``scores``' type.

    ``groups`` > 0: ``bias`` is ``[groups, H, N, N]`` and row-block ``b`` of the scores takes
    ``bias[b % groups]`` (Swin's per-window masks), so the bias is never expanded to the batch.
    Fused, the scale, bias, softmax and quantizer are one kernel each way instead of five.
    """
    a = scores.float() * scale
    if bias is not None:
        a = (a.view(-1, groups, *a.shape[1:]) + bias).view(a.shape) if groups else a + bias
    return _log_train(a.softmax(-1), delta, bits, base, drop_prob, out_dtype, mask)


def _adaround_soft(w_floor, alpha, scale, zero_point, bits: int, out_dtype: torch.dtype | None = None):
    weight = P.adaround_weight(w_floor, P.rectified_sigmoid(alpha), scale, zero_point, bits)
    return weight.to(out_dtype or w_floor.dtype)


def _adaround_reg(w_floor, alpha, scale, zero_point, bits: int, beta, out_dtype: torch.dtype | None = None):
    """The soft weight and AdaRound's regulariser of the same h(V), in one kernel each way.

    Computed apart they are four kernels per layer and step (weight, regulariser, two backwards)
    and a fifth adding their gradients to V; together, h(V) is computed once and V's gradient
    written once.
    """
    h = P.rectified_sigmoid(alpha)
    weight = P.adaround_weight(w_floor, h, scale, zero_point, bits).to(out_dtype or w_floor.dtype)
    return weight, P.rounding_regularizer(h, beta)


_EAGER = {"uniform": _uniform_train, "log": _log_train, "adaround": _adaround_soft,
          "adaround_reg": _adaround_reg, "qkv": _qkv_train,
          "attn_probs": _attn_probs_train}
KERNELS = dict(_EAGER)
_COMPILED: dict[bool, dict[str, object]] = {}  # fused_rng -> compiled copies of _EAGER


def allow_recompiles(n: int) -> None:
    """Let dynamo keep ``n`` compiled versions per function (one per shape); past the limit it runs eager."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), n))


@contextmanager
def fused_quantizers(enabled: bool = True, fused_rng: bool = False) -> Iterator[None]:
    """Run the training-time quantizer arithmetic through torch.compile'd kernels inside the block.

    ``fused_rng`` generates QDrop's random numbers inside the kernels (inductor's own Philox
    stream) instead of calling eager ``bernoulli_``: the same Bernoulli(p) masks in distribution,
    not the same draws.
    """
    global _IN_KERNEL_RNG
    previous, previous_rng = dict(KERNELS), _IN_KERNEL_RNG
    _IN_KERNEL_RNG = fused_rng  # for compile_group's kernels too, which are traced inside this context
    if enabled:
        if fused_rng not in _COMPILED:
            # Static shapes: a model has a handful of activation and weight shapes, and static
            # kernels split their reductions (the step-size gradient sums whole activations),
            # which dynamic-shape kernels measured 9x slower at (H100, ViT-S).
            allow_recompiles(64)
            options = {"fallback_random": not fused_rng}
            _COMPILED[fused_rng] = {k: torch.compile(fn, dynamic=False, options=options) for k, fn in _EAGER.items()}
        KERNELS.update(_COMPILED[fused_rng])
    try:
        yield
    finally:
        KERNELS.update(previous)
        _IN_KERNEL_RNG = previous_rng
