"""Fake-quant modules: the quantized model is the timm model with these swapped in.

Each module has three lives: *observe* (collect activation ranges on full-precision data),
*reconstruct* (soft AdaRound weights, learned activation steps, QDrop), and *deployed*
(integer weights, fixed steps) — the last is what a saved run holds and what the exporter
writes, through the two custom ops below, as ONNX ``QuantizeLinear``/``DequantizeLinear``.
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


_EXPORTING = False


@contextmanager
def exporting() -> Iterator[None]:
    """Route deployed modules through the custom ops while the ONNX exporter traces them."""
    global _EXPORTING
    previous, _EXPORTING = _EXPORTING, True
    try:
        yield
    finally:
        _EXPORTING = previous


def is_exporting() -> bool:
    return _EXPORTING


def _ema(old: torch.Tensor | None, new: torch.Tensor, decay: float) -> torch.Tensor:
    return new if old is None else decay * old + (1 - decay) * new


# --- training-time arithmetic, optionally compiled ------------------------------------------------
# During reconstruction every quantizer is a chain of small elementwise ops, forward and backward.
# These functions are that chain, written once; ``fused_quantizers()`` swaps in torch.compile'd
# copies so each becomes one generated kernel per direction (issue 5). QDrop's mask is drawn by
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
    # never traced: a Bernoulli draw inside a compiled autograd graph did not reproduce the eager
    # draw under torch 2.11 (tests/test_speed.py caught it on the GPU machine); called eagerly, it is
    # the same kernel on the same generator state whatever the caller. On CPU, bool bernoulli_ is
    # a scalar loop, three times the cost of a vectorised uniform draw and a compare (measured: it
    # made the CPU step 37 % slower), so there the draw is ``rand < p``, the same distribution
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


def _uniform_train(x, scale, zero_point, bits: int, drop_prob: float, out_dtype: torch.dtype | None = None,
                   gelu: str | None = None, mask: torch.Tensor | None = None):
    xf = x.float()
    if gelu is not None:  # the quantizer's own input activation (``ActQuantizer.gelu``), fused with it
        xf = F.gelu(xf, approximate=gelu)
    xq = P.fake_quantize_uniform(xf, scale, zero_point, bits)
    return qdrop_mix(xf, xq, drop_prob, mask).to(out_dtype or x.dtype)


def _log_train(x, delta, bits: int, base: str, drop_prob: float, out_dtype: torch.dtype | None = None,
               mask: torch.Tensor | None = None):
    xf = x.float()
    xq = P.fake_quantize_log(xf, delta, bits, base)
    xq = xf + (xq - xf).detach()  # STE: gradients reach the layers before the softmax
    return qdrop_mix(xf, xq, drop_prob, mask).to(out_dtype or x.dtype)


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
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
_KERNELS = dict(_EAGER)
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
    previous, previous_rng = dict(_KERNELS), _IN_KERNEL_RNG
    _IN_KERNEL_RNG = fused_rng  # for compile_group's kernels too, which are traced inside this context
    if enabled:
        if fused_rng not in _COMPILED:
            # Static shapes: a model has a handful of activation and weight shapes, and static
            # kernels split their reductions (the step-size gradient sums whole activations),
            # which dynamic-shape kernels measured 9x slower at (H100, ViT-S).
            allow_recompiles(64)
            options = {"fallback_random": not fused_rng}
            _COMPILED[fused_rng] = {k: torch.compile(fn, dynamic=False, options=options) for k, fn in _EAGER.items()}
        _KERNELS.update(_COMPILED[fused_rng])
    try:
        yield
    finally:
        _KERNELS.update(previous)
        _IN_KERNEL_RNG = previous_rng


# --- activation quantizers ----------------------------------------------------------------------


class ActQuantizer(nn.Module):
    """Per-tensor uniform activation quantizer with a learned step (QDrop/LSQ style).

    ``per_channel_observe`` marks quantizers behind a LayerNorm: they observe per-channel ranges
    (last dim) that RepQ-ViT reparameterisation later folds into the LayerNorm, after which the
    deployed quantizer is per-tensor like every other.
    """

    ema_decay = 0.9

    def __init__(self, bits: int, per_channel_observe: bool = False):
        super().__init__()
        P.qrange(bits)
        self.bits = bits
        self.per_channel_observe = per_channel_observe
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("zero_point_int", torch.tensor(0, dtype=torch.uint8), persistent=False)
        self.enabled = False
        self.observing = False
        self.drop_prob = 0.0
        self.obs_min: torch.Tensor | None = None
        self.obs_max: torch.Tensor | None = None
        # MSE observer searches the max only (QuantConfig.post_gelu_range='mse_max'); see
        # primitives.mse_optimal_range.
        self.range_keep_min = False
        # Min-max observer instead: the running extremes of all calibration data (no clipping);
        # QuantConfig.edge_range='minmax' for the 8-bit patch-embedding and head inputs.
        self.range_minmax = False
        # A GELU applied to the input before quantizing (its ``approximate`` mode), moved here from
        # the MLP by ``fold_gelu``: fused with the quantizer, the activation costs no pass of its
        # own over the MLP's widest tensor, forward or backward. Every route applies it first.
        self.gelu: str | None = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"

    def observe(self, x: torch.Tensor) -> None:
        if self.range_minmax:
            rows = x.detach().float().reshape(-1, x.shape[-1]) if self.per_channel_observe else x.detach().float()
            lo, hi = (rows.amin(0), rows.amax(0)) if self.per_channel_observe else (rows.amin(), rows.amax())
            self.obs_min = lo if self.obs_min is None else torch.minimum(self.obs_min, lo)
            self.obs_max = hi if self.obs_max is None else torch.maximum(self.obs_max, hi)
            return
        dim = x.dim() - 1 if self.per_channel_observe else None
        lo, hi = P.mse_optimal_range(x, self.bits, channel_dim=dim, keep_min=self.range_keep_min)
        if dim is None:
            lo, hi = lo[0], hi[0]
        self.obs_min = _ema(self.obs_min, lo, self.ema_decay)
        self.obs_max = _ema(self.obs_max, hi, self.ema_decay)

    def set_range(self, xmin: torch.Tensor, xmax: torch.Tensor) -> None:
        scale, zp = P.qparams_from_range(xmin, xmax, self.bits)
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zp)

    def finish_observation(self) -> None:
        """Set the per-tensor grid from the observed range (per-channel ones are set by reparam)."""
        self.observing = False
        if self.obs_min is None:
            raise RuntimeError("activation quantizer saw no data during observation")
        if not self.per_channel_observe:
            self.set_range(self.obs_min, self.obs_max)

    def clip_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        qmin, qmax = P.qrange(self.bits)
        return (qmin - self.zero_point) * self.scale, (qmax - self.zero_point) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and not self.observing and not _EXPORTING:
            drop_prob = active_drop(self)
            return _KERNELS["uniform"](x, self.scale, self.zero_point, self.bits, drop_prob, _matmul_dtype(x),
                                       self.gelu, draw_mask(x.shape, x.device, drop_prob))
        if self.gelu is not None:
            x = F.gelu(x, approximate=self.gelu)
        if self.observing:
            self.observe(x)
            return x
        if not self.enabled:
            return x
        if self.bits not in (4, 8):  # exporting: the ONNX integer type is wider than the grid
            lo, hi = self.clip_bounds()
            x = torch.clamp(x, lo.detach(), hi.detach())
        return torch.ops.osqdeploy.qdq(x, self.scale.detach(), self.zero_point_int)

    def prepare_export(self) -> None:
        self.zero_point_int = self.zero_point.round().to(torch.uint8)


class LogQuantizer(nn.Module):
    """log√2 (RepQ-ViT) or log2 quantizer for post-softmax attention probabilities.

    Its δ is the EMA of the observed maximum and is not learned: softmax outputs live in
    (0, 1] and the grid's resolution near 0 comes from the exponent, not from δ.
    """

    ema_decay = 0.9

    def __init__(self, bits: int, base: str = "sqrt2"):
        super().__init__()
        P.qrange(bits)
        if base not in ("sqrt2", "2"):
            raise ValueError(f"log quantizer base must be 'sqrt2' or '2', got {base!r}")
        self.bits = bits
        self.base = base
        self.register_buffer("delta", torch.tensor(1.0))
        self.enabled = False
        self.observing = False
        self.drop_prob = 0.0
        self.obs_max: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, base={self.base}, enabled={self.enabled}"

    def finish_observation(self) -> None:
        self.observing = False
        if self.obs_max is None:
            raise RuntimeError("log quantizer saw no data during observation")
        self.delta.copy_(torch.clamp(self.obs_max, min=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.obs_max = _ema(self.obs_max, x.detach().amax().float(), self.ema_decay)
            return x
        if not self.enabled:
            return x
        if _EXPORTING:
            return P.fake_quantize_log(x, self.delta, self.bits, self.base)
        drop_prob = active_drop(self)
        return _KERNELS["log"](x, self.delta, self.bits, self.base, drop_prob, _matmul_dtype(x),
                               draw_mask(x.shape, x.device, drop_prob))

    def prepare_export(self) -> None:
        pass


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


# --- weight quantizer ---------------------------------------------------------------------------


class WeightQuantizer(nn.Module):
    """Per-output-channel weight grid (min-max or MSE-clipped) with AdaRound learned rounding.

    Modes: ``fp`` (pass-through), ``nearest`` (round-to-nearest), ``soft`` (h(V) in [0,1],
    during reconstruction), ``hard`` (h(V) thresholded, for evaluation inside reconstruction),
    ``int`` (deployed: integer codes in ``w_int``; the float weight is no longer needed).
    """

    mse_steps = 80  # clipping candidates of init_mse: 100%, 99%, ... of each channel's range

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        P.qrange(bits)
        self.bits = bits
        out = weight.shape[0]
        self.register_buffer("scale", torch.ones(out))
        self.register_buffer("zero_point", torch.zeros(out))
        self.register_buffer("w_int", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("zero_point_int", torch.zeros(out, dtype=torch.uint8), persistent=False)
        self.register_buffer("w_int_export", torch.zeros(0, dtype=torch.uint8), persistent=False)
        self.alpha: nn.Parameter | None = None
        # AdaRound's β of the current reconstruction step, set by the step: with it, a soft
        # forward also computes the rounding regulariser into ``reg`` (one fused kernel).
        self.beta: torch.Tensor | None = None
        self.reg: torch.Tensor | None = None
        # floor(W/s) during reconstruction: constant while only V and the activation steps learn,
        # so it is computed once per group instead of in every forward.
        self.w_floor: torch.Tensor | None = None
        self.mode = "fp"
        self.float_available = True  # False once rebuilt from a saved run (only integers there)
        self._shape = tuple(weight.shape)
        self.init_method = "minmax"  # QuantConfig.weight_init, set by prepare_model

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}"

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (len(self._shape) - 1)))

    def init_minmax(self, weight: torch.Tensor) -> None:
        flat = weight.detach().reshape(weight.shape[0], -1)
        self._set_grid(flat.amin(1), flat.amax(1))

    def init_mse(self, weight: torch.Tensor) -> None:
        """Per channel, the clipped range with the least ||W − Q(W)||² (BRECQ/QDrop ``scale_method='mse'``).

        The unclipped (min-max) range is the first candidate, so no channel ends up with a larger
        round-to-nearest error than :meth:`init_minmax` gives it.
        """
        lo, hi = P.mse_optimal_range(weight.detach(), self.bits, channel_dim=0, steps=self.mse_steps)
        self._set_grid(lo, hi)

    def init_grid(self, weight: torch.Tensor) -> None:
        """Set the grid by ``init_method`` (``QuantConfig.weight_init``): ``minmax`` or ``mse``."""
        if self.init_method == "minmax":
            self.init_minmax(weight)
        elif self.init_method == "mse":
            self.init_mse(weight)
        else:
            raise ValueError(f"unknown weight grid initialisation {self.init_method!r}")

    def _set_grid(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        scale, zp = P.qparams_from_range(lo, hi, self.bits)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self.mode = "nearest"

    def init_adaround(self, weight: torch.Tensor) -> None:
        w_over_s = weight.detach() / self._view(self.scale)
        self.alpha = nn.Parameter(P.adaround_init(w_over_s))
        self.w_floor = torch.floor(w_over_s)
        self.mode = "soft"

    def nearest_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes (float tensor) of round-to-nearest on this grid."""
        return P.quantize_uniform(weight, self._view(self.scale), self._view(self.zero_point), self.bits)

    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes (float tensor) of the current rounding decision."""
        if self.mode in ("soft", "hard"):
            s, zp = self._view(self.scale), self._view(self.zero_point)
            qmin, qmax = P.qrange(self.bits)
            h = (self.alpha >= 0).to(weight.dtype)
            return torch.clamp(torch.floor(weight / s) + h + zp, qmin, qmax)
        return self.nearest_codes(weight)

    def finalize(self, weight: torch.Tensor) -> None:
        """Freeze the rounding into integer codes; drop the rounding variables."""
        with torch.no_grad():
            self.w_int = self.integer_weight(weight.detach()).to(torch.uint8)
        self.alpha = None
        self.w_floor = None
        self.beta = self.reg = None
        self.mode = "int"

    def make_deployable_structure(self) -> None:
        """Shape buffers like a finalized quantizer so a saved state can be loaded into it."""
        self.w_int = torch.zeros(self._shape, dtype=torch.uint8, device=self.scale.device)
        self.alpha = None
        self.mode = "int"
        self.float_available = False

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.mode == "fp":
            return weight
        s, zp = self._view(self.scale), self._view(self.zero_point)
        if self.mode == "int":
            return P.dequantize_uniform(self.w_int.to(s.dtype), s, zp)
        if self.mode == "nearest":
            return P.dequantize_uniform(P.quantize_uniform(weight, s, zp, self.bits), s, zp)
        if self.mode == "soft":  # w_floor is set by init_adaround, the only way into this mode
            # written in the matmul's type: the cast autocast would make, inside the kernel
            dtype = _matmul_dtype(self.w_floor)
            if self.beta is None:
                return _KERNELS["adaround"](self.w_floor, self.alpha, s, zp, self.bits, dtype)
            w, self.reg = _KERNELS["adaround_reg"](self.w_floor, self.alpha, s, zp, self.bits, self.beta, dtype)
            return w
        return P.dequantize_uniform(self.integer_weight(weight), s, zp)  # hard: h(V) thresholded

    def prepare_export(self, transpose: bool) -> None:
        if self.mode != "int":
            raise RuntimeError("export needs finalized (integer) weights")
        self.zero_point_int = self.zero_point.round().to(torch.uint8)
        self.w_int_export = self.w_int.t().contiguous() if transpose else self.w_int


class QuantLinear(nn.Module):
    """nn.Linear with a quantized input and quantized weight (bias stays float, as in deployment)."""

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int, per_channel_observe: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(self.out_features)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.input_quantizer = ActQuantizer(a_bits, per_channel_observe)
        self.weight_quantizer = WeightQuantizer(self.weight, w_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        if _EXPORTING and self.weight_quantizer.mode == "int":
            wq = self.weight_quantizer
            w_t = torch.ops.osqdeploy.dequantize_weight(wq.w_int_export, wq.scale, wq.zero_point_int, 1)
            return torch.matmul(x, w_t) + self.bias
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)

    def prepare_export(self) -> None:
        self.weight_quantizer.prepare_export(transpose=True)


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
        if _EXPORTING and self.weight_quantizer.mode == "int":
            wq = self.weight_quantizer
            w = torch.ops.osqdeploy.dequantize_weight(wq.w_int_export, wq.scale, wq.zero_point_int, 0)
        else:
            w = self.weight_quantizer(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def prepare_export(self) -> None:
        self.weight_quantizer.prepare_export(transpose=False)


QUANT_LAYERS = (QuantLinear, QuantConv2d)
ACT_QUANTIZERS = (ActQuantizer, LogQuantizer)


# --- switching modules between lives ------------------------------------------------------------


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


@contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in full precision (targets of reconstruction), restoring modes after."""
    acts = act_quantizers([model])
    weights = [m.weight_quantizer for m in quant_layers([model])]
    saved = [(q.enabled, q.observing) for q in acts], [w.mode for w in weights]
    for q in acts:
        q.enabled, q.observing = False, False
    for w in weights:
        if w.float_available:
            w.mode = "fp"
    try:
        yield
    finally:
        for q, (enabled, observing) in zip(acts, saved[0], strict=True):
            q.enabled, q.observing = enabled, observing
        for w, mode in zip(weights, saved[1], strict=True):
            w.mode = mode
