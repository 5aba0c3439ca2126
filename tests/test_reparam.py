"""RepQ-ViT reparameterisation: float function unchanged, quantized output = per-channel quantization."""

import copy

import torch

from osqdeploy.adapters import adapter_for
from osqdeploy.config import QuantConfig
from osqdeploy.quant import primitives as P
from osqdeploy.quant.layers import act_quantizers
from osqdeploy.quant.mode import QuantMode, set_mode
from osqdeploy.quant.reparam import reparameterize_input, reparameterize_norm
from osqdeploy.reconstruct import prepare_model

from conftest import images, tiny_vit


def _observed(model):
    x = images(32, 32)
    adapter = prepare_model(model, QuantConfig(4, 4), adapter_for)
    set_mode(act_quantizers([model]), QuantMode.OBSERVE)
    with torch.no_grad():
        model(x)
    for q in act_quantizers([model]):
        q.finish_observation()
    return adapter


def test_reparameterisation_keeps_the_float_model():
    model = tiny_vit()
    adapter = _observed(model)
    x = images(8, 32, seed=5)
    with torch.no_grad():
        before = model(x)
        for site in adapter.reparam_sites(model):
            reparameterize_norm(site.norm, site.quantizer, site.linears)
        after = model(x)  # quantizers are still disabled: this is the float network
    assert (after - before).norm() / before.norm() < 1e-5


def test_reparameterised_per_tensor_quantization_equals_per_channel_quantization():
    model = tiny_vit()
    adapter = _observed(model)
    site = adapter.reparam_sites(model)[0]  # norm1 → qkv of block 0
    q = site.quantizer
    delta_c, zp_c = P.qparams_from_range(q.obs_min, q.obs_max, q.bits)
    x = torch.randn(4, 17, 64) * 2
    with torch.no_grad():
        y = site.norm(x)
        per_channel = P.fake_quantize_uniform(y, delta_c, zp_c, q.bits)
        reference = torch.nn.functional.linear(per_channel, site.linears[0].weight, site.linears[0].bias)
        original = copy.deepcopy(site.norm)
        reparameterize_norm(site.norm, q, site.linears)
        y2 = site.norm(x)
        per_tensor = P.fake_quantize_uniform(y2, q.scale, q.zero_point, q.bits)
        got = torch.nn.functional.linear(per_tensor, site.linears[0].weight, site.linears[0].bias)
    assert q.scale.dim() == 0 and q.zero_point.dim() == 0  # deployable as one QuantizeLinear
    # identical integer codes, hence the same function up to float rounding
    codes_a = P.quantize_uniform(y, delta_c, zp_c, q.bits)
    codes_b = P.quantize_uniform(y2, q.scale, q.zero_point, q.bits)
    assert (codes_a != codes_b).float().mean() < 1e-3
    assert (got - reference).norm() / reference.norm() < 1e-3
    assert not torch.allclose(original.weight, site.norm.weight)


def _observed_channel(model):
    """Like ``_observed`` with the post-GELU inputs on per-channel grids."""
    x = images(32, 32)
    prepare_model(model, QuantConfig(4, 4, post_gelu_grid="channel"), adapter_for)
    set_mode(act_quantizers([model]), QuantMode.OBSERVE)
    with torch.no_grad():
        model(x)
    for q in act_quantizers([model]):
        q.finish_observation()


def test_post_gelu_channel_grid_keeps_the_float_model_and_equals_per_channel_quantization():
    model = tiny_vit()
    _observed_channel(model)
    fc2 = model.blocks[0].mlp.fc2
    q = fc2.input_quantizer
    assert q.per_channel_observe and q.obs_min.shape == (fc2.in_features,)
    delta_c, zp_c = P.qparams_from_range(q.obs_min, q.obs_max, q.bits)
    h = torch.randn(4, 17, fc2.in_features) * 2  # pre-GELU activations
    x = images(8, 32, seed=5)
    with torch.no_grad():
        before = model(x)
        g = torch.nn.functional.gelu(h)
        reference = torch.nn.functional.linear(P.fake_quantize_uniform(g, delta_c, zp_c, q.bits), fc2.weight, fc2.bias)
        weight = fc2.weight.clone()
        reparameterize_input(fc2)
        after = model(x)  # quantizers still pass values through: the float network, refolded
        g2 = q(h)  # GELU, then the channel affine the quantizer now carries
        got = torch.nn.functional.linear(P.fake_quantize_uniform(g2, q.scale, q.zero_point, q.bits), fc2.weight,
                                         fc2.bias)
    assert (after - before).norm() / before.norm() < 1e-5
    assert q.scale.dim() == 0 and q.zero_point.dim() == 0  # one QuantizeLinear
    codes_a = P.quantize_uniform(g, delta_c, zp_c, q.bits)
    codes_b = P.quantize_uniform(g2, q.scale, q.zero_point, q.bits)
    assert (codes_a != codes_b).float().mean() < 1e-3
    assert (got - reference).norm() / reference.norm() < 1e-3
    assert not torch.allclose(weight, fc2.weight)  # fc2 took the inverse scales


def test_the_default_keeps_one_post_gelu_grid_and_no_affine():
    model = tiny_vit()
    _observed(model)
    q = model.blocks[0].mlp.fc2.input_quantizer
    assert q.affine_scale is None and q.obs_min.dim() == 0
    assert not any("affine" in k for k in model.state_dict())  # runs saved without the option stay the same


def test_hadamard_is_orthonormal_and_its_blocks_divide_the_width():
    for n in (1, 2, 8, 64):
        h = P.hadamard(n)
        assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-6) and torch.equal(h, h.T)
    assert [P.rotation_block(n) for n in (768, 1536, 96, 6)] == [64, 64, 32, 2]
    for bad in (lambda: P.hadamard(12), lambda: P.rotation_block(7)):
        try:
            bad()
        except ValueError:
            continue
        raise AssertionError("accepted a size it cannot rotate")


def test_a_rotation_spreads_an_outlier_channel_over_a_finer_grid():
    """Why the option exists: one per-tensor 4-bit grid over post-GELU-like data with one large
    channel loses most channels to a coarse step; rotated and centred, the same grid errs far less
    (the rotation is orthonormal, so the error is the same size once rotated back)."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(4096, 64, generator=g))
    x[:, 5] *= 40

    def error(t):
        lo, hi = P.mse_optimal_range(t, 4)
        s, z = P.qparams_from_range(lo[0], hi[0], 4)
        return (P.fake_quantize_uniform(t, s, z, 4) - t).pow(2).sum()

    rotated = P.rotate_blocks(x - x.mean(0), P.hadamard(64))
    assert error(rotated) < error(x) / 2


def test_post_gelu_rotation_keeps_the_float_model_and_centres_the_grid_input():
    reference = tiny_vit()
    model = copy.deepcopy(reference)
    x = images(32, 32)
    probe = images(8, 32, seed=5)
    prepare_model(model, QuantConfig(4, 4, post_gelu_grid="hadamard"), adapter_for)
    fc2 = model.blocks[0].mlp.fc2
    q = fc2.input_quantizer
    assert q.rotation.shape == (64, 64)  # 256 channels in four blocks
    with torch.no_grad():
        before = reference(probe)
        folded = model(probe)  # rotation on, its inverse in fc2: the float network
        set_mode(act_quantizers([model]), QuantMode.OBSERVE)
        model(x)
        for quantizer in act_quantizers([model]):
            quantizer.finish_observation()
        for block in model.blocks:
            reparameterize_input(block.mlp.fc2)
        centred = model(probe)
        seen = []
        handle = fc2.register_forward_pre_hook(lambda _m, args: seen.append(q(args[0])))
        model(x)
        handle.remove()
    for got in (folded, centred):
        assert (got - before).norm() / before.norm() < 1e-5
    grid_input = seen[0].reshape(-1, fc2.in_features)
    assert grid_input.mean(0).abs().max() < 0.05 * grid_input.std()  # centred on the observed images
    assert not q.range_keep_min  # searched at both ends: no longer one-sided
    assert q.scale.dim() == 0 and q.zero_point.dim() == 0  # one QuantizeLinear
    assert "blocks.0.mlp.fc2.input_quantizer.rotation" not in model.state_dict()  # rebuilt, not saved


def test_post_gelu_rotation_keeps_the_float_swin():
    from conftest import tiny_swin

    reference = tiny_swin()
    model = copy.deepcopy(reference)
    x = images(8, 56)
    prepare_model(model, QuantConfig(4, 4, post_gelu_grid="hadamard"), adapter_for)
    with torch.no_grad():
        before = reference(x)
        set_mode(act_quantizers([model]), QuantMode.OBSERVE)
        model(x)
        for quantizer in act_quantizers([model]):
            quantizer.finish_observation()
        rotated = [m for m in model.modules() if getattr(m, "input_quantizer", None) is not None
                   and m.input_quantizer.rotation is not None]
        for layer in rotated:
            reparameterize_input(layer)
        after = model(x)
    assert len(rotated) == 4  # every MLP's fc2 of the two stages
    assert (after - before).norm() / before.norm() < 1e-5
