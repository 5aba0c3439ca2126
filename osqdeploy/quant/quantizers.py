"""The quantizers: per-tensor activation grids, the log grid of attention probabilities, and
per-channel weight grids with AdaRound's learned rounding.

Each lives through the modes of :class:`~osqdeploy.quant.mode.QuantMode`: it *observes* ranges
on full-precision data, is *reconstructed* (soft AdaRound weights, learned activation steps,
QDrop), and ends *deployed* (integer weights, fixed steps) — the state a saved run holds and the
exporter writes through the custom ops of :mod:`~osqdeploy.quant.kernels`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from . import primitives as P
from .kernels import KERNELS, active_drop, draw_mask, grid_input, matmul_dtype
from .mode import Quantizer, QuantMode

if TYPE_CHECKING:
    from ..distributed import RowShard


def _ema(old: torch.Tensor | None, new: torch.Tensor, decay: float) -> torch.Tensor:
    return new if old is None else decay * old + (1 - decay) * new


class ActQuantizer(Quantizer):
    """Per-tensor uniform activation quantizer with a learned step (QDrop/LSQ style).

    ``per_channel_observe`` marks quantizers behind a LayerNorm: they observe per-channel ranges
    (last dim) that RepQ-ViT reparameterisation later folds into the LayerNorm, after which the
    deployed quantizer is per-tensor like every other.
    """

    modes = frozenset({QuantMode.FLOAT, QuantMode.OBSERVE, QuantMode.NEAREST, QuantMode.EXPORT})
    ema_decay = 0.9

    def __init__(self, bits: int, per_channel_observe: bool = False):
        super().__init__()
        P.qrange(bits)
        self.bits = bits
        self.per_channel_observe = per_channel_observe
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("zero_point_int", torch.tensor(0, dtype=torch.uint8), persistent=False)
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
        # A per-channel multiply-add after the GELU, before the grid (QuantConfig.post_gelu_grid=
        # 'channel'): the per-channel grid of RepQ-ViT's reparameterisation where no LayerNorm
        # affine precedes the quantizer to absorb it. None unless enable_channel_affine was called.
        self.register_buffer("affine_scale", None)
        self.register_buffer("affine_shift", None)
        # An orthonormal Hadamard rotation of each block of channels after the GELU, before the grid
        # (QuantConfig.post_gelu_grid='hadamard'), with a centring shift in ``affine_shift``; the
        # next Linear holds the inverse. A constant of the structure, so not saved with a run.
        self.register_buffer("rotation", None, persistent=False)
        self.obs_mean: torch.Tensor | None = None  # per channel, of the rotated input

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode.value}"

    def enter_mode(self, mode: QuantMode) -> None:
        """EXPORT keeps a released (FLOAT) quantizer float; a quantizing one exports its integer zero point."""
        if mode is QuantMode.EXPORT:
            if self.mode is QuantMode.FLOAT:
                return
            if self.mode is not QuantMode.NEAREST:
                raise RuntimeError(f"export needs calibrated activation quantizers, not one in {self.mode.value!r}")
            self.zero_point_int = self.zero_point.round().to(torch.uint8)
        super().enter_mode(mode)

    def enable_channel_affine(self, channels: int) -> None:
        """Observe per channel and carry the reparameterised grid as a multiply-add (identity until
        :func:`~osqdeploy.quant.reparam.reparameterize_input` sets it)."""
        self.per_channel_observe = True
        self.affine_scale = torch.ones(channels)
        self.affine_shift = torch.zeros(channels)

    def enable_rotation(self, channels: int, block: int) -> None:
        """Rotate blocks of ``block`` channels before the grid, and observe centred (the shift stays
        zero until :func:`~osqdeploy.quant.reparam.reparameterize_input` sets it from the mean)."""
        self.rotation = P.hadamard(block)
        self.affine_shift = torch.zeros(channels)

    def observe(self, x: torch.Tensor) -> None:
        if self.rotation is not None:
            # the grid will see the input less its mean: observe the range of that
            mean = x.detach().float().reshape(-1, x.shape[-1]).mean(0)
            self.obs_mean = _ema(self.obs_mean, mean, self.ema_decay)
            x = x - mean
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
        """Set the per-tensor grid from the observed range (per-channel ones are set by reparam).

        The quantizer passes values through until switched to ``QuantMode.NEAREST``.
        """
        self.mode = QuantMode.FLOAT
        if self.obs_min is None:
            raise RuntimeError("activation quantizer saw no data during observation")
        if not self.per_channel_observe:
            self.set_range(self.obs_min, self.obs_max)

    def clip_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        qmin, qmax = P.qrange(self.bits)
        return (qmin - self.zero_point) * self.scale, (qmax - self.zero_point) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is QuantMode.NEAREST:
            drop_prob = active_drop(self)
            return KERNELS["uniform"](x, self.scale, self.zero_point, self.bits, drop_prob, matmul_dtype(x),
                                      self.gelu, draw_mask(x.shape, x.device, drop_prob),
                                      self.affine_scale, self.affine_shift, self.rotation)
        x = grid_input(x, self.gelu, self.affine_scale, self.affine_shift, self.rotation)
        if self.mode is QuantMode.OBSERVE:
            self.observe(x)
            return x
        if self.mode is QuantMode.FLOAT:
            return x
        if self.bits not in (4, 8):  # export: the ONNX integer type is wider than the grid
            lo, hi = self.clip_bounds()
            x = torch.clamp(x, lo.detach(), hi.detach())
        return torch.ops.osqdeploy.qdq(x, self.scale.detach(), self.zero_point_int)


class LogQuantizer(Quantizer):
    """log√2 (RepQ-ViT) or log2 quantizer for post-softmax attention probabilities.

    Its δ is the EMA of the observed maximum and is not learned: softmax outputs live in
    (0, 1] and the grid's resolution near 0 comes from the exponent, not from δ.
    """

    modes = ActQuantizer.modes
    ema_decay = 0.9

    def __init__(self, bits: int, base: str = "sqrt2"):
        super().__init__()
        P.qrange(bits)
        if base not in ("sqrt2", "2"):
            raise ValueError(f"log quantizer base must be 'sqrt2' or '2', got {base!r}")
        self.bits = bits
        self.base = base
        self.register_buffer("delta", torch.tensor(1.0))
        self.drop_prob = 0.0
        self.obs_max: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, base={self.base}, mode={self.mode.value}"

    def enter_mode(self, mode: QuantMode) -> None:
        """EXPORT keeps a released (FLOAT) quantizer float; a quantizing one exports as its elementwise graph."""
        if mode is QuantMode.EXPORT and self.mode is QuantMode.FLOAT:
            return
        if mode is QuantMode.EXPORT and self.mode is not QuantMode.NEAREST:
            raise RuntimeError(f"export needs calibrated activation quantizers, not one in {self.mode.value!r}")
        super().enter_mode(mode)

    def finish_observation(self) -> None:
        self.mode = QuantMode.FLOAT
        if self.obs_max is None:
            raise RuntimeError("log quantizer saw no data during observation")
        self.delta.copy_(torch.clamp(self.obs_max, min=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is QuantMode.OBSERVE:
            self.obs_max = _ema(self.obs_max, x.detach().amax().float(), self.ema_decay)
            return x
        if self.mode is QuantMode.FLOAT:
            return x
        if self.mode is QuantMode.EXPORT:
            return P.fake_quantize_log(x, self.delta, self.bits, self.base)
        drop_prob = active_drop(self)
        return KERNELS["log"](x, self.delta, self.bits, self.base, drop_prob, matmul_dtype(x),
                              draw_mask(x.shape, x.device, drop_prob))


class WeightQuantizer(Quantizer):
    """Per-output-channel weight grid (min-max or MSE-clipped) with AdaRound learned rounding.

    Modes: ``FLOAT`` (pass-through), ``NEAREST`` (round-to-nearest), ``SOFT`` (h(V) in [0,1],
    during reconstruction), ``HARD`` (h(V) thresholded, for evaluation inside reconstruction),
    ``INT`` (deployed: integer codes in ``w_int``; the float weight is no longer needed),
    ``EXPORT`` (the integer codes through the dequantize custom op; ``export_transposed`` lays
    them out ``[in, out]`` for a MatMul).
    """

    modes = frozenset(QuantMode) - {QuantMode.OBSERVE}
    mse_steps = 80  # clipping candidates of init_mse: 100%, 99%, ... of each channel's range

    def __init__(self, weight: torch.Tensor, bits: int, export_transposed: bool = False):
        super().__init__()
        P.qrange(bits)
        self.bits = bits
        self.export_transposed = export_transposed
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
        # data-parallel calibration with ``shard_rounding``: this rank trains only these rows of V
        # (a distributed.RowShard, set and removed by the reconstruction step); ``alpha`` is the whole
        self.shard: RowShard | None = None
        self.float_available = True  # False once rebuilt from a saved run (only integers there)
        self._shape = tuple(weight.shape)
        self.init_method = "minmax"  # QuantConfig.weight_init, set by prepare_model

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode.value}"

    def enter_mode(self, mode: QuantMode) -> None:
        """FLOAT keeps the integers of a quantizer rebuilt from a saved run (it holds no float weight)."""
        if mode is QuantMode.FLOAT and not self.float_available:
            return
        if mode in (QuantMode.SOFT, QuantMode.HARD) and self.alpha is None:
            raise RuntimeError(f"weight mode {mode.value!r} needs AdaRound's rounding variables (init_adaround)")
        if mode is QuantMode.INT and self.w_int.numel() == 0:
            raise RuntimeError("weight mode 'int' needs integer codes (finalize)")
        if mode is QuantMode.EXPORT:
            if self.mode is not QuantMode.INT:
                raise RuntimeError("export needs finalized (integer) weights")
            self.zero_point_int = self.zero_point.round().to(torch.uint8)
            self.w_int_export = self.w_int.t().contiguous() if self.export_transposed else self.w_int
        super().enter_mode(mode)

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
        self.mode = QuantMode.NEAREST

    def init_adaround(self, weight: torch.Tensor) -> None:
        w_over_s = weight.detach() / self._view(self.scale)
        self.alpha = nn.Parameter(P.adaround_init(w_over_s))
        self.w_floor = torch.floor(w_over_s)
        self.mode = QuantMode.SOFT

    def nearest_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes (float tensor) of round-to-nearest on this grid."""
        return P.quantize_uniform(weight, self._view(self.scale), self._view(self.zero_point), self.bits)

    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes (float tensor) of the current rounding decision."""
        if self.mode in (QuantMode.SOFT, QuantMode.HARD):
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
        self.mode = QuantMode.INT

    def make_deployable_structure(self) -> None:
        """Shape buffers like a finalized quantizer so a saved state can be loaded into it."""
        self.w_int = torch.zeros(self._shape, dtype=torch.uint8, device=self.scale.device)
        self.alpha = None
        self.mode = QuantMode.INT
        self.float_available = False

    def begin_shard_step(self) -> None:
        """Soft weight and regulariser of this rank's rows of V; the other ranks' rows start gathering.

        Called by the reconstruction step before its forward (under its autocast, which sets the
        soft weight's type), so every layer's gather runs while the layers before it compute.
        """
        s, zp, rows = self._view(self.scale), self._view(self.zero_point), self.shard.rows
        part, self.reg = KERNELS["adaround_reg"](self.w_floor[rows], self.shard.alpha, s[rows], zp[rows],
                                                 self.bits, self.beta, matmul_dtype(self.w_floor))
        self.shard.begin(part)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.mode is QuantMode.FLOAT:
            return weight
        if self.mode is QuantMode.EXPORT:
            axis = 1 if self.export_transposed else 0
            return torch.ops.osqdeploy.dequantize_weight(self.w_int_export, self.scale, self.zero_point_int, axis)
        s, zp = self._view(self.scale), self._view(self.zero_point)
        if self.mode is QuantMode.INT:
            return P.dequantize_uniform(self.w_int.to(s.dtype), s, zp)
        if self.mode is QuantMode.NEAREST:
            return P.dequantize_uniform(P.quantize_uniform(weight, s, zp, self.bits), s, zp)
        if self.mode is QuantMode.SOFT:  # w_floor is set by init_adaround, the only way into this mode
            if self.shard is not None:  # gathered since begin_shard_step: this rank's rows and the others'
                return self.shard.weight()
            # written in the matmul's type: the cast autocast would make, inside the kernel
            dtype = matmul_dtype(self.w_floor)
            if self.beta is None:
                return KERNELS["adaround"](self.w_floor, self.alpha, s, zp, self.bits, dtype)
            w, self.reg = KERNELS["adaround_reg"](self.w_floor, self.alpha, s, zp, self.bits, self.beta, dtype)
            return w
        return P.dequantize_uniform(self.integer_weight(weight), s, zp)  # HARD: h(V) thresholded
