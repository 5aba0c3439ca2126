"""Quantizer arithmetic as pure functions.

Every place that quantizes — the fake-quant modules, the observers that initialise them, the
exporter that writes integers into ONNX, and the tests — calls these functions, so there is one
definition of each grid (torchao's ``quantize_affine``/``dequantize_affine`` split).

Conventions: uniform grids are asymmetric with an integer-valued zero point and the unsigned
integer range ``[0, 2**bits - 1]`` (Eq. 1 of the paper). Rounding is round-half-to-even, the mode
of ``torch.round`` and of ONNX ``QuantizeLinear``, so the exported graph lands on the same codes.
"""

from __future__ import annotations

import math

import torch

# AdaRound's rectified sigmoid stretch (Nagel et al., 2020).
ZETA = 1.1
GAMMA = -0.1


def qrange(bits: int) -> tuple[int, int]:
    """Unsigned integer range of a ``bits``-wide asymmetric grid."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bit-width must be in 2..8, got {bits}")
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (Bengio et al., 2013)."""
    return (torch.round(x) - x).detach() + x


def quantize_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``x`` on the grid (float tensor holding integers)."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize_uniform(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q - zero_point) * scale


def fake_quantize_uniform(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """Eq. (1) with STE through the rounding; ``scale`` receives the LSQ-style gradient.

    The zero point is a fixed integer (not learned), as in QDrop's learned-step quantizers.
    """
    qmin, qmax = qrange(bits)
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of the asymmetric grid that spans ``[xmin, xmax]``.

    The range is widened to include 0 so that 0 is exactly representable (padding, residuals).
    """
    qmin, qmax = qrange(bits)
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    scale = torch.clamp((xmax - xmin) / (qmax - qmin), min=eps)
    zero_point = torch.clamp(torch.round(-xmin / scale) + qmin, qmin, qmax)
    return scale, zero_point


def _flatten_channels(x: torch.Tensor, channel_dim: int | None) -> torch.Tensor:
    """View ``x`` as [channels, values] (one row for per-tensor)."""
    if channel_dim is None:
        return x.reshape(1, -1)
    return x.transpose(0, channel_dim).reshape(x.shape[channel_dim], -1)


def mse_optimal_range(
    x: torch.Tensor,
    bits: int,
    channel_dim: int | None = None,
    steps: int = 80,
    max_values: int = 1 << 20,
    keep_min: bool = False,
    chunk_values: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range minimising the quantization MSE of ``x`` (QDrop's MSE observer).

    Candidates shrink the observed min and max together by 1% steps; the best candidate is
    chosen per channel when ``channel_dim`` is given (the first of equals, as a loop over the
    candidates in order would). Large tensors are strided-subsampled to ``max_values`` values per
    channel, which changes the chosen range only marginally. Candidates are evaluated together,
    as many at a time as fit in ``chunk_values`` elements: initialisation calls this for every
    activation quantizer on every batch, and one launch per candidate and operation (some 2,000
    per call) made it thousands of tiny kernels on a GPU. On a CPU a single candidate already
    fills the caches, so the default there keeps chunks to about one candidate's size.

    ``keep_min=True`` shrinks only the max and keeps the observed min. For one-sided,
    long-tailed data (post-GELU: a dense mass in [-0.17, 0] and a sparse positive tail) the joint
    search clips the small negative end to 0; that costs little MSE per element but shifts the
    mean of most elements by the same sign, a bias the next Linear sums over all its inputs.
    """
    rows = _flatten_channels(x.detach().float(), channel_dim)
    if rows.shape[1] > max_values:
        stride = math.ceil(rows.shape[1] / max_values)
        rows = rows[:, ::stride]
    xmin = rows.amin(dim=1)
    xmax = rows.amax(dim=1)
    # the candidates' ratios as the float32 values ``xmax * (1.0 - 0.01 * i)`` multiplies by
    ratios = torch.tensor([1.0 - 0.01 * i for i in range(steps)], dtype=rows.dtype, device=rows.device)
    best_err = torch.full_like(xmin, float("inf"))
    best_min, best_max = xmin.clone(), xmax.clone()
    if chunk_values is None:
        chunk_values = 1 << 25 if rows.is_cuda else 1 << 20
    per_chunk = max(1, min(steps, chunk_values // max(1, rows.numel())))
    for start in range(0, steps, per_chunk):
        r = ratios[start : start + per_chunk, None]  # [k, 1] against [channels]
        cmin, cmax = (xmin.expand(r.shape[0], -1) if keep_min else xmin * r), xmax * r
        scale, zp = qparams_from_range(cmin, cmax, bits)
        xq = dequantize_uniform(quantize_uniform(rows, scale[..., None], zp[..., None], bits), scale[..., None],
                                zp[..., None])
        # a NaN error (inf in the data) never wins, as ``err < best`` would have it
        err = (xq - rows).pow(2).mean(dim=2).nan_to_num(nan=float("inf"))
        chunk_err, pick = err.min(dim=0)  # the first minimal candidate of the chunk, per channel
        better = chunk_err < best_err
        best_err = torch.where(better, chunk_err, best_err)
        best_min = torch.where(better, cmin.gather(0, pick[None])[0], best_min)
        best_max = torch.where(better, cmax.gather(0, pick[None])[0], best_max)
    return best_min, best_max


# --- rotations --------------------------------------------------------------------------------


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order ``n`` (a power of two); symmetric, its own inverse."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def rotation_block(channels: int, largest: int = 64) -> int:
    """The Hadamard order that rotates ``channels`` in equal blocks: the largest power of two up to
    ``largest`` dividing it (64 for every timm ViT, DeiT and Swin MLP width)."""
    block = 1
    while block < largest and channels % (2 * block) == 0:
        block *= 2
    if block < 2:
        raise ValueError(f"{channels} channels cannot be rotated in blocks (odd width)")
    return block


def rotate_blocks(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``x``'s last dimension in blocks of ``rotation``'s order, each block times ``rotation``.

    Always in ``x``'s own precision, outside autocast: the rotated values are what the grid rounds.
    """
    with torch.autocast(x.device.type, enabled=False):
        return (x.unflatten(-1, (-1, rotation.shape[0])) @ rotation.to(x.dtype)).flatten(-2)


# --- log2-family grid for post-softmax attention (RepQ-ViT) -------------------------------------


def log_codes(x: torch.Tensor, delta: torch.Tensor, bits: int, base: str = "sqrt2") -> torch.Tensor:
    """Integer exponent codes of a log2 / log√2 grid; ``2**bits - 1`` is never produced for zeros.

    ``base='sqrt2'`` uses codes ``round(-2·log2(x/δ))`` (RepQ-ViT); ``base='2'`` uses
    ``round(-log2(x/δ))`` (FQ-ViT). Codes at or beyond ``2**bits`` mean "quantize to 0".
    """
    factor = 2.0 if base == "sqrt2" else 1.0
    return torch.round(-factor * torch.log2(x / delta))


def fake_quantize_log(x: torch.Tensor, delta: torch.Tensor, bits: int, base: str = "sqrt2") -> torch.Tensor:
    """Dequantized value of the log grid; exactly what the exported elementwise subgraph computes."""
    levels = 2**bits
    codes = log_codes(x, delta, bits, base)
    underflow = codes >= levels
    q = torch.clamp(codes, 0, levels - 1)
    if base == "sqrt2":
        odd = torch.remainder(q, 2.0)
        value = torch.exp2(-torch.ceil(q / 2)) * (odd * (math.sqrt(2.0) - 1.0) + 1.0) * delta
    else:
        value = torch.exp2(-q) * delta
    return torch.where(underflow, torch.zeros_like(value), value)


# --- AdaRound -----------------------------------------------------------------------------------


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) of AdaRound: a sigmoid stretched to (γ, ζ) and clipped to [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def adaround_init(w_over_s: torch.Tensor) -> torch.Tensor:
    """V such that h(V) equals the fractional part of ``w/s`` (start at the float weight)."""
    rest = w_over_s - torch.floor(w_over_s)
    rest = torch.clamp(rest, 1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def adaround_regularizer(v: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """Σ 1 − |2h(V) − 1|^β: pushes every h(V) to 0 or 1 as β anneals."""
    return rounding_regularizer(rectified_sigmoid(v), beta)


def rounding_regularizer(h: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """:func:`adaround_regularizer` of offsets ``h`` = h(V) already computed."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def adaround_weight(
    w_floor: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """Dequantized weight for rounding offsets ``h`` (soft in [0,1] or hard in {0,1})."""
    qmin, qmax = qrange(bits)
    return (torch.clamp(w_floor + h + zero_point, qmin, qmax) - zero_point) * scale
