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
