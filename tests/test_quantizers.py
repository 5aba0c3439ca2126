"""Quantizer arithmetic against its formulas (Eq. 1, RepQ-ViT's log√2 grid, AdaRound)."""

import math

import pytest
import torch

from osqdeploy.quant import primitives as P
from osqdeploy.quant.mode import QuantMode, set_mode
from osqdeploy.quant.quantizers import ActQuantizer, LogQuantizer, WeightQuantizer


def test_uniform_fake_quant_matches_eq1():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * 3
    scale, zp, bits = torch.tensor(0.17), torch.tensor(7.0), 4
    expected = (torch.clamp(torch.round(x / scale) + zp, 0, 15) - zp) * scale
    assert torch.equal(P.fake_quantize_uniform(x, scale, zp, bits), expected)
    # every output is on the grid and inside its range
    q = P.quantize_uniform(x, scale, zp, bits)
    assert q.min() >= 0 and q.max() <= 15 and torch.equal(q, q.round())


def test_fake_quant_gradients_are_straight_through_inside_the_range():
    x = torch.tensor([0.3, 0.5, 100.0], requires_grad=True)
    scale = torch.tensor(0.2, requires_grad=True)
    P.fake_quantize_uniform(x, scale, torch.tensor(0.0), 4).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # clipped value gets no gradient
    assert scale.grad is not None and scale.grad != 0  # LSQ-style step gradient


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_qparams_span_the_range_and_represent_zero(bits):
    lo, hi = torch.tensor(-1.3), torch.tensor(4.2)
    scale, zp = P.qparams_from_range(lo, hi, bits)
    assert torch.allclose(scale, (hi - lo) / (2**bits - 1))
    assert zp == zp.round() and 0 <= zp <= 2**bits - 1
    zero = P.fake_quantize_uniform(torch.tensor(0.0), scale, zp, bits)
    assert zero == 0


def test_bits_out_of_range_are_refused():
    with pytest.raises(ValueError, match="2..8"):
        P.qrange(1)
    with pytest.raises(ValueError, match="2..8"):
        ActQuantizer(9)


def test_mse_range_beats_minmax_on_outlier_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    x[:5] = 40.0  # a few outliers
    lo, hi = P.mse_optimal_range(x, 4)
    def err(a, b):
        s, z = P.qparams_from_range(a, b, 4)
        return (P.fake_quantize_uniform(x, s, z, 4) - x).pow(2).mean()
    assert err(lo[0], hi[0]) < err(x.min(), x.max())


def _mse_range_one_candidate_at_a_time(x, bits, channel_dim=None, steps=80, keep_min=False):
    """The observer as first written: a loop over the candidates, strictly better ones replacing."""
    rows = P._flatten_channels(x.float(), channel_dim)
    xmin, xmax = rows.amin(dim=1), rows.amax(dim=1)
    best_err = torch.full_like(xmin, float("inf"))
    best_min, best_max = xmin.clone(), xmax.clone()
    for i in range(steps):
        ratio = 1.0 - 0.01 * i
        cmin, cmax = (xmin if keep_min else xmin * ratio), xmax * ratio
        scale, zp = P.qparams_from_range(cmin, cmax, bits)
        xq = P.dequantize_uniform(P.quantize_uniform(rows, scale[:, None], zp[:, None], bits), scale[:, None],
                                  zp[:, None])
        err = (xq - rows).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_min = torch.where(better, cmin, best_min)
        best_max = torch.where(better, cmax, best_max)
    return best_min, best_max


@pytest.mark.parametrize("chunk_values", [1, 3 * 4096, 1 << 25])  # one, a few, all candidates per chunk
def test_batched_mse_range_search_chooses_exactly_what_the_candidate_loop_chooses(chunk_values):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 512, 8, generator=g) * torch.logspace(-2, 1, 8)
    x[0, :3, 5] = 60.0  # outliers in one channel
    x[..., 2] = 0.0  # a constant channel: every candidate ties, the first (the full range) wins
    x[..., 6] = x[..., 6].abs()  # one-sided
    for kwargs in ({}, {"channel_dim": 2}, {"channel_dim": 2, "keep_min": True}, {"keep_min": True}, {"bits": 8}):
        kwargs = {"bits": 4, **kwargs}
        got = P.mse_optimal_range(x, chunk_values=chunk_values, **kwargs)
        want = _mse_range_one_candidate_at_a_time(x, **kwargs)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), kwargs


def test_per_channel_mse_range_is_per_channel():
    x = torch.randn(64, 8)
    x[:, 3] *= 10
    lo, hi = P.mse_optimal_range(x, 4, channel_dim=1)
    assert lo.shape == (8,) and hi[3] > 3 * hi[[0, 1, 2, 4]].max()


def test_log_sqrt2_quantizer_formula():
    # RepQ-ViT: code c = round(-2 log2(x/δ)); value = 2^(-ceil(c/2)) · (√2 if c odd... ) δ
    delta = torch.tensor(1.0)
    x = torch.tensor([1.0, 2**-0.5, 0.5, 2**-1.5, 0.25, 1e-9])
    got = P.fake_quantize_log(x, delta, bits=4, base="sqrt2")
    expected = torch.tensor([1.0, 2**-1 * math.sqrt(2), 0.5, 2**-2 * math.sqrt(2), 0.25, 0.0])
    assert torch.allclose(got, expected)
    assert P.fake_quantize_log(torch.tensor([0.0]), delta, 4)[0] == 0  # zero stays zero


def test_log2_quantizer_formula():
    x = torch.tensor([0.9, 0.3, 0.1])
    got = P.fake_quantize_log(x, torch.tensor(1.0), bits=3, base="2")
    assert torch.allclose(got, 2.0 ** -torch.round(-torch.log2(x)))


def test_log_quantizer_module_passes_gradient():
    lq = LogQuantizer(4)
    set_mode(lq, QuantMode.NEAREST)
    x = torch.rand(10, requires_grad=True)
    lq(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(10))


def test_adaround_init_reproduces_float_weight_and_hardens_to_floor_or_ceil():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    wq = WeightQuantizer(w, bits=4)
    wq.init_minmax(w)
    wq.init_adaround(w)
    soft = wq(w)
    # h(V) equals the fractional part, so the soft weight is the float weight wherever the
    # integer zero point does not push it off the grid's ends
    s = wq.scale.view(-1, 1)
    codes = torch.floor(w / s) + wq.zero_point.view(-1, 1)
    inside = (codes >= 0) & (codes <= 14)
    assert inside.float().mean() > 0.9
    assert torch.allclose(soft[inside], w[inside], atol=1e-3 * w.abs().max())
    set_mode(wq, QuantMode.HARD)
    hard_codes = wq.integer_weight(w)
    floor = torch.floor(w / s) + wq.zero_point.view(-1, 1)
    assert torch.all((hard_codes == floor.clamp(0, 15)) | (hard_codes == (floor + 1).clamp(0, 15)))
    wq.finalize(w)
    assert wq.w_int.dtype == torch.uint8 and wq.alpha is None
    assert torch.equal(wq(w), (wq.w_int.float() - wq.zero_point.view(-1, 1)) * s)


def test_adaround_regularizer_vanishes_at_binary_h_and_peaks_at_half():
    big = torch.full((4,), 50.0)
    assert P.adaround_regularizer(big, beta=2.0) < 1e-6
    assert P.adaround_regularizer(-big, beta=2.0) < 1e-6
    mid = torch.full((4,), math.log((0.5 - P.GAMMA) / (P.ZETA - 0.5)))  # h(V) = 0.5
    assert torch.allclose(P.rectified_sigmoid(mid), torch.full((4,), 0.5), atol=1e-6)
    assert torch.isclose(P.adaround_regularizer(mid, beta=2.0), torch.tensor(4.0))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mse_weight_init_never_has_more_rounding_error_than_minmax(bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=g)
    w[::7, 3] *= 8  # heavy-tailed channels, where clipping pays
    w[5] = 0.01 * torch.rand(96, generator=g)  # an all-positive channel (grid widened to include 0)
    err = {}
    for method in ("minmax", "mse"):
        wq = WeightQuantizer(w, bits)
        wq.init_method = method
        wq.init_grid(w)
        err[method] = (wq(w) - w).pow(2).sum(dim=1)  # per output channel
    assert (err["mse"] <= err["minmax"]).all()
    if bits <= 4:  # at low bit-widths clipping is a real gain, not a tie
        assert err["mse"].sum() < 0.95 * err["minmax"].sum()


def test_weight_init_reaches_the_quantizers_and_is_validated():
    from osqdeploy.adapters import adapter_for
    from osqdeploy.config import ConfigError, QuantConfig
    from osqdeploy.quant.layers import quant_layers
    from osqdeploy.reconstruct import prepare_model

    with pytest.raises(ConfigError, match="weight_init"):
        QuantConfig(weight_init="percentile").validate()
    import timm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, num_classes=10)
    prepare_model(model, QuantConfig(weight_init="mse"), adapter_for)
    assert {layer.weight_quantizer.init_method for layer in quant_layers([model])} == {"mse"}


def test_keep_min_range_keeps_gelus_negative_lobe_and_its_mean():
    # post-GELU-like data: a dense mass in [-0.17, 0] plus a sparse long positive tail
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(200_000, generator=g) - 1.0)
    x[:100] = x[:100].abs() * 6 + 3

    def mean_shift(lo, hi):
        s, z = P.qparams_from_range(lo[0], hi[0], 4)
        return (P.fake_quantize_uniform(x, s, z, 4) - x).mean().abs()

    joint = P.mse_optimal_range(x, 4)
    kept = P.mse_optimal_range(x, 4, keep_min=True)
    assert kept[0][0] == x.min() and kept[1][0] <= x.max()
    assert joint[0][0] > 0.5 * x.min()  # the joint search clips most of the negative lobe ...
    assert mean_shift(*kept) < 0.25 * mean_shift(*joint)  # ... which shifts the mean; keeping it does not


def test_post_gelu_range_reaches_only_the_fc2_input_quantizers():
    from osqdeploy.adapters import adapter_for
    from osqdeploy.config import ConfigError, QuantConfig
    from osqdeploy.quant.layers import act_quantizers
    from osqdeploy.reconstruct import prepare_model

    with pytest.raises(ConfigError, match="post_gelu_range"):
        QuantConfig(post_gelu_range="percentile").validate()
    import timm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=10)
    prepare_model(model, QuantConfig(post_gelu_range="mse_max"), adapter_for)
    kept = [q for q in act_quantizers([model]) if getattr(q, "range_keep_min", False)]
    assert kept == [blk.mlp.fc2.input_quantizer for blk in model.blocks]


@pytest.mark.parametrize("per_channel", [False, True])
def test_minmax_observer_keeps_the_running_extremes_of_all_batches(per_channel):
    q = ActQuantizer(8, per_channel_observe=per_channel)
    q.range_minmax = True
    set_mode(q, QuantMode.OBSERVE)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 5, 6, generator=g) * (i + 1) for i in range(3)]
    for b in batches:
        q(b)
    every = torch.cat([b.reshape(-1, 6) for b in batches])
    lo, hi = (every.amin(0), every.amax(0)) if per_channel else (every.min(), every.max())
    assert torch.equal(q.obs_min, lo) and torch.equal(q.obs_max, hi)


def test_edge_range_reaches_only_the_edge_layers_and_is_validated():
    from osqdeploy.adapters import adapter_for
    from osqdeploy.config import ConfigError, QuantConfig
    from osqdeploy.quant.layers import act_quantizers
    from osqdeploy.reconstruct import prepare_model

    with pytest.raises(ConfigError, match="edge_range"):
        QuantConfig(edge_range="percentile").validate()
    import timm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=10)
    prepare_model(model, QuantConfig(edge_range="minmax"), adapter_for)  # opt-in
    minmax = [q for q in act_quantizers([model]) if getattr(q, "range_minmax", False)]
    assert minmax == [model.patch_embed.proj.input_quantizer, model.head.input_quantizer]


def test_quant_mode_switches_every_quantizer_and_restores_each_ones_own_mode():
    from osqdeploy.quant.layers import QuantLinear
    from osqdeploy.quant.mode import quant_mode

    torch.manual_seed(0)
    layer = QuantLinear(torch.nn.Linear(16, 8), w_bits=4, a_bits=4)
    x = torch.randn(3, 16)
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    wq.init_grid(layer.weight)
    aq.set_range(x.min(), x.max())
    set_mode(aq, QuantMode.NEAREST)
    assert (wq.mode, aq.mode) == (QuantMode.NEAREST, QuantMode.NEAREST)
    quantized = layer(x)
    with quant_mode(layer, QuantMode.FLOAT):
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert (wq.mode, aq.mode) == (QuantMode.NEAREST, QuantMode.NEAREST)
    assert torch.equal(layer(x), quantized)
    with pytest.raises(ValueError, match="no mode 'hard'"):
        set_mode(aq, QuantMode.HARD)  # rounding modes belong to weights
    with pytest.raises(RuntimeError, match="init_adaround"):
        set_mode(wq, QuantMode.SOFT)
    with pytest.raises(RuntimeError, match="finalized"), quant_mode(layer, QuantMode.EXPORT):
        pass
    assert (wq.mode, aq.mode) == (QuantMode.NEAREST, QuantMode.NEAREST)  # restored after the failure too


def test_export_mode_computes_the_deployed_layer_through_the_custom_ops():
    from osqdeploy.quant.layers import QuantConv2d, QuantLinear
    from osqdeploy.quant.mode import quant_mode

    torch.manual_seed(0)
    released = ActQuantizer(4)  # a quantizer left float exports as float
    for layer, x in ((QuantLinear(torch.nn.Linear(16, 8), 4, 4), torch.randn(3, 16)),
                     (QuantConv2d(torch.nn.Conv2d(3, 8, 4, stride=4), 4, 8), torch.randn(2, 3, 8, 8))):
        layer.weight_quantizer.init_grid(layer.weight)
        layer.weight_quantizer.finalize(layer.weight)
        layer.input_quantizer.set_range(x.min(), x.max())
        set_mode(layer.input_quantizer, QuantMode.NEAREST)
        deployed = layer(x)
        with quant_mode([layer, released], QuantMode.EXPORT):
            assert layer.weight_quantizer.mode is QuantMode.EXPORT and released.mode is QuantMode.FLOAT
            assert torch.allclose(layer(x), deployed, atol=1e-5)
        assert layer.weight_quantizer.mode is QuantMode.INT
    # a quantizer rebuilt from a saved run has no float weight: FLOAT keeps its integers
    layer.weight_quantizer.make_deployable_structure()
    with quant_mode(layer, QuantMode.FLOAT):
        assert layer.weight_quantizer.mode is QuantMode.INT and layer.input_quantizer.mode is QuantMode.FLOAT
