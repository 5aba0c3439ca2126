"""Speed features compute what the plain engine computes.

The CUDA graph and TF32 only exist on CUDA; their end-to-end comparison runs where a GPU is
present (``benchmarks/calib_speed.py`` prints the same comparison for the benchmark models). On
CPU the schedule the graph relies on and the compiled quantizer kernels are checked against
their eager definitions.
"""

import copy
from dataclasses import replace

import pytest
import torch

from osqdeploy.adapters import adapter_for
from osqdeploy.config import CalibrationConfig, ConfigError, QuantConfig
from osqdeploy.plan import build_plan
from osqdeploy.quant import kernels as M
from osqdeploy.quant import primitives as P
from osqdeploy.quant.layers import quant_layers
from osqdeploy.quant.mode import QuantMode, set_mode
from osqdeploy.quant.quantizers import ActQuantizer
from osqdeploy.reconstruct import Reconstructor, prepare_model
from osqdeploy.reconstruct.step import Schedule

from conftest import images, tiny_vit


def test_schedule_draws_seeded_uniform_batches_of_distinct_inputs_and_anneals():
    cfg = CalibrationConfig(iters=50, batch_size=8, warmup=0.2, beta_start=20.0, beta_end=2.0, round_weight=0.1)
    sched = Schedule.build(cfg, 40, torch.Generator().manual_seed(3), torch.device("cpu"))
    again = Schedule.build(cfg, 40, torch.Generator().manual_seed(3), torch.device("cpu"))
    other = Schedule.build(cfg, 40, torch.Generator().manual_seed(4), torch.device("cpu"))
    assert sched.batches.shape == (50, 8) and torch.equal(sched.batches, again.batches)
    assert not torch.equal(sched.batches, other.batches)
    assert all(len(set(row.tolist())) == 8 for row in sched.batches)  # a batch never repeats an input
    assert int(sched.batches.min()) >= 0 and int(sched.batches.max()) < 40
    # every input equally likely: over 2,000 draws of 8 from 40 each is used 400 ± 3.5σ times
    counts = torch.bincount(Schedule.build(CalibrationConfig(iters=2000, batch_size=8), 40,
                                           torch.Generator().manual_seed(5), torch.device("cpu")).batches.flatten())
    sigma = (2000 * 0.2 * 0.8) ** 0.5
    assert int(counts.min()) > 400 - 3.5 * sigma and int(counts.max()) < 400 + 3.5 * sigma
    # fewer inputs than the batch size: the batch is every input
    small = Schedule.build(cfg, 5, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert small.batches.shape == (50, 5) and all(sorted(r.tolist()) == list(range(5)) for r in small.batches)
    warm = 10
    assert torch.all(sched.reg_weight[:warm] == 0)
    assert torch.allclose(sched.reg_weight[warm:], torch.tensor(0.1))
    for it in (10, 30, 49):
        expected = 2.0 + 18.0 * (1 - (it - warm) / (50 - warm))
        assert float(sched.beta[it]) == pytest.approx(expected, rel=1e-6)
    assert float(sched.beta[warm]) == pytest.approx(20.0)


def test_compiled_quantizer_kernels_match_their_eager_definitions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 24, generator=g)
    probs = torch.softmax(torch.randn(2, 3, 10, 10, generator=g), -1)
    qkv = torch.randn(2, 10, 3, 3, 8, generator=g)
    scores = torch.randn(4, 3, 10, 10, generator=g) * 3
    bias = torch.randn(2, 3, 10, 10, generator=g)  # two windows' masks
    alpha = torch.randn(24, 16, generator=g)
    w_floor = torch.floor(torch.randn(24, 16, generator=g) * 4)
    s, zp = torch.rand(24, 1, generator=g) + 0.1, torch.full((24, 1), 8.0)

    # QDrop's masks, drawn by the callers before the kernels (as the modules do)
    mx, mp, mq, ms = (torch.rand(t.shape, generator=g) < 0.5 for t in (x, probs, qkv, scores))
    rot, shift = P.hadamard(8), torch.randn(24, generator=g) * 0.1

    def run():
        xs, ps, qs, ss = (t.clone().requires_grad_(True) for t in (x, probs, qkv, scores))
        scale = torch.tensor(0.05, requires_grad=True)
        qkv_scale = torch.tensor([0.2, 0.3, 0.25], requires_grad=True)
        a = alpha.clone().requires_grad_(True)
        weight, reg = M.KERNELS["adaround_reg"](w_floor, a, s, zp, 4, torch.tensor(7.5))
        outs = [
            M.KERNELS["uniform"](xs, scale, torch.tensor(7.0), 4, 0.5, None, None, mx),
            M.KERNELS["uniform"](xs, scale, torch.tensor(7.0), 4, 0.5, None, "none", mx),  # GELU first
            M.KERNELS["log"](ps, torch.tensor(1.0), 4, "sqrt2", 0.5, None, mp),
            M.KERNELS["adaround"](w_floor, a, s, zp, 4),
            weight,
            *M.KERNELS["qkv"](qs, qkv_scale, torch.tensor([7.0, 8.0, 6.0]), 4, 0.5, None, mq),
            M.KERNELS["attn_probs"](ss, 0.5, bias, 2, torch.tensor(1.0), 4, "sqrt2", 0.5, None, ms),
            reg,
            # GELU, a Hadamard rotation of each 8 channels and a centring shift before the grid
            M.KERNELS["uniform"](xs, scale, torch.tensor(7.0), 4, 0.5, None, "none", mx, None, shift, rot),
        ]
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
        return outs, torch.autograd.grad(loss, [xs, scale, ps, a, qs, qkv_scale, ss])

    eager_out, eager_grad = run()
    with M.fused_quantizers():
        fused_out, fused_grad = run()
    assert M.KERNELS["uniform"] is M._uniform_train  # restored on exit
    for i in (0, 2, 3, 4, 5, 6, 7):
        assert torch.equal(eager_out[i], fused_out[i])  # same codes: the grid arithmetic is elementwise
    # GELU's erf and the softmax's sum are computed by other code once fused: kept (dropped-out)
    # float values differ in the last bit, and a code only where that crosses a grid threshold
    for i in (1, 8, 10):
        close = torch.isclose(eager_out[i], fused_out[i], rtol=1e-6, atol=1e-6)
        assert float(close.float().mean()) > 0.995
    assert torch.allclose(eager_out[9], fused_out[9], rtol=1e-5)
    for e, f in zip(eager_grad, fused_grad, strict=True):
        # reductions (the step's gradient, the regulariser sum, the softmax) may be reordered: float rounding only
        assert torch.allclose(e, f, rtol=1e-4, atol=1e-5)


def test_fused_training_kernels_compute_what_the_separate_quantizers_compute():
    """q/k/v in one kernel, softmax + log quantizer in one, weight + regulariser in one: same numbers."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 7, 3, 4, 5, generator=g).requires_grad_(True)
    scale = torch.tensor([0.11, 0.2, 0.07], requires_grad=True)
    zp = torch.tensor([8.0, 7.0, 9.0])
    fused = M._qkv_train(qkv, scale, zp, 4, 0.0)
    views = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    alone = [P.fake_quantize_uniform(v, scale[i], zp[i], 4) for i, v in enumerate(views)]
    for f, a in zip(fused, alone, strict=True):
        assert f.shape == (2, 4, 7, 5) and f.is_contiguous() and torch.equal(f, a)
    w = torch.randn(3, 2, 4, 7, 5, generator=g)
    grads_f = torch.autograd.grad(sum((f * w[i]).sum() for i, f in enumerate(fused)), [qkv, scale])
    grads_a = torch.autograd.grad(sum((a * w[i]).sum() for i, a in enumerate(alone)), [qkv, scale])
    assert torch.equal(grads_f[0], grads_a[0]) and torch.allclose(grads_f[1], grads_a[1], rtol=1e-5)

    scores = torch.randn(6, 4, 9, 9, generator=g) * 4
    rel = torch.randn(1, 4, 9, 9, generator=g)
    mask = torch.where(torch.rand(3, 9, 9, generator=g) < 0.3, -100.0, 0.0)
    delta = torch.tensor(0.9)
    # timm's way: the window masks expanded over the batch (windows cycle within an image)
    expanded = rel + mask.view(1, 3, 1, 9, 9).expand(2, -1, -1, -1, -1).reshape(6, 1, 9, 9)
    reference = P.fake_quantize_log((scores * 0.125 + expanded).softmax(-1), delta, 4)
    probs = M._attn_probs_train(scores, 0.125, rel + mask.unsqueeze(1), 3, delta, 4, "sqrt2", 0.0)
    assert torch.equal(probs, reference)

    alpha = torch.randn(6, 5, generator=g).requires_grad_(True)
    w_floor, s, z = torch.floor(torch.randn(6, 5, generator=g) * 3), torch.rand(6, 1, generator=g) + 0.1, torch.full(
        (6, 1), 8.0)
    weight, reg = M._adaround_reg(w_floor, alpha, s, z, 4, torch.tensor(3.0))
    assert torch.equal(weight, P.adaround_weight(w_floor, P.rectified_sigmoid(alpha), s, z, 4))
    assert torch.equal(reg, P.adaround_regularizer(alpha, torch.tensor(3.0)))


def test_fused_rng_draws_bernoulli_masks_inside_the_kernel():
    """``fused_rng``: QDrop's mask comes from inductor's generator, not the eager ``bernoulli_``.

    Every element is still either the float input (gradient 1 to it) or its quantized value;
    about ``drop_prob`` of them are the former, and two calls draw different masks.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 64, generator=g)
    scale, zp = torch.tensor(0.05), torch.tensor(7.0)
    xq = P.fake_quantize_uniform(x, scale, zp, 4)
    with M.fused_quantizers(fused_rng=True):
        xs = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        out = M.KERNELS["uniform"](xs, scale, zp, 4, 0.5)
        again = M.KERNELS["uniform"](xs, scale, zp, 4, 0.5)
        (grad,) = torch.autograd.grad(out.sum(), xs)
    kept, quantized = out == x, out == xq
    assert bool((kept | quantized).all())
    only_kept = kept & ~quantized
    assert abs(float(kept.float().mean()) - 0.5) < 0.02 and bool((grad[only_kept] == 1).all())
    assert 0.4 < float((out != again).float().mean()) < 0.6  # independent masks: differ where either drops
    torch.manual_seed(1)
    assert not torch.equal(out, torch.where(M.qdrop_mask(x.shape, x.device, 0.5), x, xq))  # not the eager draw


def test_qdrop_mask_is_a_seeded_one_byte_bernoulli_draw():
    shape, cpu = (200, 500), torch.device("cpu")
    torch.manual_seed(3)
    mask = M.draw_mask(shape, cpu, 0.3)
    torch.manual_seed(3)
    assert mask.dtype == torch.bool and torch.equal(mask, M.draw_mask(shape, cpu, 0.3))
    sigma = (0.3 * 0.7 / mask.numel()) ** 0.5
    assert abs(float(mask.float().mean()) - 0.3) < 4 * sigma
    assert M.draw_mask(shape, cpu, 0.0) is None  # nothing dropped: no draw
    x, xq = torch.randn(shape), torch.zeros(shape)
    assert torch.equal(M.qdrop_mix(x, xq, 0.3, mask), torch.where(mask, x, xq))  # True keeps the float value
    with M.fused_quantizers(enabled=False, fused_rng=True):
        assert M.draw_mask(shape, cpu, 0.3) is None  # the kernels draw their own


def _codes(cuda_graph: bool, compile_: bool, tf32: bool = False, device: str = "cuda", plan: str = "blocks:3",
           iters: int = 120, compile_group: bool = False, **speed):
    model = tiny_vit(depth=3)
    q = copy.deepcopy(model)
    adapter = prepare_model(q, QuantConfig(4, 4), adapter_for)
    speed.setdefault("autocast", "off")  # the exactness legs compare fp32 paths; fp16 is the CUDA default
    ccfg = CalibrationConfig(samples=64, batch_size=16, iters=iters, device=device, tf32=tf32,
                             cuda_graph=cuda_graph, compile=compile_, compile_group=compile_group, **speed)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    rec = Reconstructor(q, adapter, build_plan(plan, adapter.units(q)), ccfg, torch.device(device))
    x = images(64, 32)
    rec.initialize(x)
    results = rec.reconstruct(x)
    codes = torch.cat([m.weight_quantizer.w_int.flatten().cpu() for m in quant_layers([q.blocks])])
    return codes, results  # codes of all groups, and each group's result


def test_compiled_group_step_makes_the_eager_steps_rounding_decisions():
    """compile_group fuses the whole forward/backward; it must not change what is optimised.

    The same QDrop masks are drawn (eager random), so only float reassociation in fused kernels
    separates the two: nearly every rounding decision of all three 1-block groups (which share
    one compiled graph) agrees, and the output error is the same.
    """
    plain_codes, plain = _codes(cuda_graph=False, compile_=False, device="cpu", plan="blocks:1", iters=40)
    torch._dynamo.reset()
    fused_codes, fused = _codes(cuda_graph=False, compile_=False, device="cpu", plan="blocks:1", iters=40,
                                compile_group=True)
    assert float((fused_codes == plain_codes).float().mean()) > 0.995
    # the first group (the same inputs and masks) and the end result; a middle group's input also
    # carries the rounding decisions reassociation moved in the groups before it, so it is not compared
    for i in (0, -1):
        assert fused[i].mse_after == pytest.approx(plain[i].mse_after, rel=0.02)
    # the first step: equal up to 4-bit activations that reassociation moved across a threshold
    assert fused[0].loss_curve[0][1] == pytest.approx(plain[0].loss_curve[0][1], rel=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replay_computes_exactly_what_the_eager_step_computes():
    plain_codes, plain = _codes(cuda_graph=False, compile_=False)
    graph_codes, graph = _codes(cuda_graph=True, compile_=False)
    assert torch.equal(plain_codes, graph_codes)
    assert plain[-1].loss_curve == graph[-1].loss_curve
    fused_codes, fused = _codes(cuda_graph=True, compile_=True)
    # fused kernels reorder the step-size gradient's reduction: nearly all decisions agree
    assert float((fused_codes == plain_codes).float().mean()) > 0.99
    assert fused[-1].mse_after == pytest.approx(plain[-1].mse_after, rel=0.1)
    group_codes, group = _codes(cuda_graph=True, compile_=True, compile_group=True)
    assert float((group_codes == plain_codes).float().mean()) > 0.99
    assert group[-1].mse_after == pytest.approx(plain[-1].mse_after, rel=0.1)
    # foreach Adam (the plain engine's) against the fused kernel: the same update, reordered
    foreach_codes, foreach = _codes(cuda_graph=False, compile_=False, fused_adam=False)
    assert float((foreach_codes == plain_codes).float().mean()) > 0.99
    assert foreach[-1].mse_after == pytest.approx(plain[-1].mse_after, rel=0.1)
    # the default engine (fp16 autocast, TF32 elsewhere): operands rounded to fp16 move a few
    # decisions, as TF32's do
    default_codes, default = _codes(cuda_graph=True, compile_=True, tf32=True, autocast="auto")
    assert float((default_codes == plain_codes).float().mean()) > 0.98
    assert default[-1].mse_after == pytest.approx(plain[-1].mse_after, rel=0.15)
    # other QDrop draws (fused_rng): a different sample of the same optimisation, not the same one
    for group_ in (False, True):
        rng_codes, rng = _codes(cuda_graph=True, compile_=True, compile_group=group_, fused_rng=True)
        assert float((rng_codes == plain_codes).float().mean()) > 0.9
        assert rng[-1].mse_after == pytest.approx(plain[-1].mse_after, rel=0.25)


def test_tf32_is_switched_on_for_reconstruction_only():
    from osqdeploy.reconstruct.engine import tf32

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with tf32(True):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32  # evaluation afterwards is full fp32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_torch_runtime_evaluates_in_full_fp32_even_where_cudnn_defaults_to_tf32():
    from osqdeploy.evaluation import TorchRuntime

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return x.flatten(1)

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        TorchRuntime(Probe())(torch.zeros(1, 3, 2, 2))
        assert seen == [(False, False)]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("half", ["bf16", "fp16"])
def test_autocast_reconstructs_close_to_fp32_and_reports_fp32_mse(half):
    def run(autocast: str):
        torch.manual_seed(0)
        q = copy.deepcopy(tiny_vit(depth=2))
        adapter = prepare_model(q, QuantConfig(4, 4), adapter_for)
        ccfg = CalibrationConfig(samples=32, batch_size=8, iters=60, device="cpu", autocast=autocast)
        rec = Reconstructor(q, adapter, build_plan("blocks:2", adapter.units(q)), ccfg, torch.device("cpu"))
        x = images(32, 32)
        rec.initialize(x)
        (result,) = rec.reconstruct(x)
        return result

    fp32, low = run("off"), run(half)
    assert low.mse_after < low.mse_before  # reconstruction still works under autocast
    assert low.mse_before == fp32.mse_before  # the reported MSE is computed in fp32 either way
    assert low.mse_after == pytest.approx(fp32.mse_after, rel=0.15)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_quantizers_round_in_fp32_whatever_the_autocast_type(half):
    """A half-precision input is quantized exactly as its fp32 value is, and stays half."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 50, 64, generator=g) * 3).to(half)
    scale, zp = torch.tensor(0.37), torch.tensor(7.0)
    out = M._uniform_train(x, scale, zp, 4, 0.0)
    assert out.dtype == half
    assert torch.equal(out, P.fake_quantize_uniform(x.float(), scale, zp, 4).to(half))
    naive = P.fake_quantize_uniform(x, scale.to(half), zp.to(half), 4)  # the grid in half arithmetic
    assert not torch.equal(out, naive)  # which is what the fp32 upcast avoids
    probs = torch.softmax(torch.randn(2, 3, 10, 10, generator=g), -1).to(half)
    out = M._log_train(probs, torch.tensor(1.0), 4, "sqrt2", 0.0)
    assert out.dtype == half and torch.equal(out, P.fake_quantize_log(probs.float(), torch.tensor(1.0), 4).to(half))


def test_under_autocast_an_activation_quantizer_hands_its_matmul_the_half_type():
    """The cast autocast would apply before the matmul happens in the quantizer's own kernel."""
    q = ActQuantizer(4)
    set_mode(q, QuantMode.NEAREST)
    with torch.no_grad():
        q.scale.fill_(0.37)
        q.zero_point.fill_(7.0)
    x = torch.randn(4, 50, 64, generator=torch.Generator().manual_seed(0)) * 3  # fp32, as LayerNorm gives
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, P.fake_quantize_uniform(x, q.scale.detach(), q.zero_point, 4).to(torch.bfloat16))
    assert q(x).dtype == torch.float32  # no autocast, no cast


def test_a_constant_loss_scale_with_scaled_eps_leaves_adam_unchanged():
    """fp16 reconstruction scales its loss and Adam's eps by the same constant and never unscales."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(100, generator=g) * 1e-6 for _ in range(5)]

    def run(scale: float) -> torch.Tensor:
        p = torch.nn.Parameter(torch.zeros(100))
        opt = torch.optim.Adam([p], lr=1e-3, eps=1e-8 * scale)
        for grad in grads:
            p.grad = grad * scale
            opt.step()
        return p.detach()

    assert torch.allclose(run(1024.0), run(1.0), rtol=1e-5, atol=1e-9)
    assert not torch.allclose(run(1.0), torch.zeros(100))


def test_auto_autocast_is_fp16_on_cuda_only_and_explicit_modes_hold_everywhere():
    auto = CalibrationConfig()
    assert auto.autocast == "auto"
    assert (auto.autocast_on("cuda"), auto.autocast_on("cpu")) == ("fp16", "off")
    for mode in ("off", "bf16", "fp16"):
        assert {CalibrationConfig(autocast=mode).autocast_on(d) for d in ("cuda", "cpu")} == {mode}


def test_prediction_method_reconstructs_in_bf16_on_cuda_unless_told_otherwise():
    prediction = CalibrationConfig().with_method("prediction")
    assert (prediction.autocast_on("cuda"), prediction.autocast_on("cpu")) == ("bf16", "off")
    assert replace(prediction, autocast="fp16").autocast_on("cuda") == "fp16"


def test_unknown_autocast_is_refused():
    with pytest.raises(ConfigError, match="autocast must be one of"):
        CalibrationConfig(autocast="fp8").validate()


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_fused_attention_route_computes_what_the_quantizer_modules_compute(kind, monkeypatch):
    """Reconstruction and evaluation take the fused q/k/v and probability kernels; observation and
    export take the per-quantizer modules. On a quantized model (Swin: shifted windows with their
    masks) both routes give the same logits."""
    from osqdeploy.adapters.attention import QuantMatMulAttention
    from osqdeploy.reconstruct import logits

    from conftest import tiny_swin

    model, size = (tiny_vit(depth=2), 32) if kind == "vit" else (tiny_swin(), 56)
    adapter = prepare_model(model, QuantConfig(4, 4), adapter_for)
    rec = Reconstructor(model, adapter, build_plan("auto", adapter.units(model)),
                        CalibrationConfig(samples=16, batch_size=8, iters=0), torch.device("cpu"))
    x = images(16, size)
    rec.initialize(x)
    cores = [m for m in model.modules() if isinstance(m, QuantMatMulAttention)]
    assert cores and all(c.fusable() for c in cores)
    # and every MLP's GELU is applied by its fc2 input quantizer
    mlps = [m for m in model.modules() if hasattr(m, "fc2") and hasattr(m, "act")]
    assert mlps and all(isinstance(m.act, torch.nn.Identity) and m.fc2.input_quantizer.gelu == "none" for m in mlps)
    fused = logits(model, x, 8, torch.device("cpu"))
    monkeypatch.setattr(QuantMatMulAttention, "fusable", lambda self: False)
    separate = logits(model, x, 8, torch.device("cpu"))
    assert torch.allclose(fused, separate, rtol=1e-5, atol=1e-5)


def test_compile_workers_are_started_early_only_for_a_compiling_cuda_calibration(monkeypatch):
    import torch._inductor.async_compile as async_compile

    from osqdeploy.reconstruct import warm_compile_workers

    calls = []
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: calls.append(1))
    warm_compile_workers(CalibrationConfig(), torch.device("cpu"))
    warm_compile_workers(CalibrationConfig(compile=False), torch.device("cuda"))
    assert calls == []
    warm_compile_workers(CalibrationConfig(), torch.device("cuda"))
    assert calls == [1]


def test_a_gelu_folded_into_the_fc2_quantizer_computes_the_unfolded_mlp():
    """Observation, full precision, fake quantization and QDrop training all see GELU(x)."""
    from osqdeploy.quant.layers import fold_gelu

    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 9, 16, generator=g) * 2
    mlp = torch.nn.Sequential()  # a timm Mlp's attribute layout
    mlp.act, mlp.drop1, mlp.norm = torch.nn.GELU(), torch.nn.Dropout(0.0), torch.nn.Identity()
    mlp.fc2 = torch.nn.Module()
    mlp.fc2.input_quantizer = ActQuantizer(4)
    fold_gelu(mlp)
    q = mlp.fc2.input_quantizer
    assert isinstance(mlp.act, torch.nn.Identity) and q.gelu == "none"
    reference = ActQuantizer(4)
    for quantizer, inp in ((q, x), (reference, torch.nn.functional.gelu(x))):
        set_mode(quantizer, QuantMode.OBSERVE)
        assert torch.equal(quantizer(inp), torch.nn.functional.gelu(x))  # observation passes GELU(x) on
        quantizer.finish_observation()
        set_mode(quantizer, QuantMode.NEAREST)
    assert torch.equal(q.scale, reference.scale)  # observed the activated values
    assert torch.equal(q(x), reference(torch.nn.functional.gelu(x)))
    set_mode(q, QuantMode.FLOAT)
    assert torch.equal(q(x), torch.nn.functional.gelu(x))
    # a dropout that is live, or another activation, stays where it was
    live = torch.nn.Sequential()
    live.act, live.drop1 = torch.nn.GELU(), torch.nn.Dropout(0.1)
    live.fc2 = torch.nn.Module()
    live.fc2.input_quantizer = ActQuantizer(4)
    fold_gelu(live)
    assert isinstance(live.act, torch.nn.GELU) and live.fc2.input_quantizer.gelu is None


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_padded_attention_keys_compute_the_unpadded_attention_and_its_gradients(kind, monkeypatch):
    """``pad_attention`` pads the fused attention's keys to a multiple of 8 and masks them out of
    the softmax: the same context, the same QDrop draws and the same gradients (ViT's 17 tokens,
    Swin's 49-token windows with their shift masks)."""
    from osqdeploy.adapters.attention import QuantMatMulAttention
    from osqdeploy.quant.kernels import qdrop
    from osqdeploy.quant.layers import act_quantizers
    from osqdeploy.reconstruct import logits

    from conftest import tiny_swin

    model, size = (tiny_vit(depth=2), 32) if kind == "vit" else (tiny_swin(), 56)
    adapter = prepare_model(model, QuantConfig(4, 4), adapter_for)
    rec = Reconstructor(model, adapter, build_plan("auto", adapter.units(model)),
                        CalibrationConfig(samples=8, batch_size=8, iters=0, pad_attention=True), torch.device("cpu"))
    cores = [m for m in model.modules() if isinstance(m, QuantMatMulAttention)]
    assert cores and all(c.key_align == 8 for c in cores)
    x = images(8, size)
    rec.initialize(x)
    keys_seen: set[int] = set()  # the key counts the probabilities kernel was handed
    probs_kernel = M.KERNELS["attn_probs"]

    def recording(scores, *args):
        keys_seen.add(scores.shape[-1])
        return probs_kernel(scores, *args)

    monkeypatch.setitem(M.KERNELS, "attn_probs", recording)
    steps = [q.scale for q in act_quantizers([model]) if isinstance(q, ActQuantizer)]

    def run(align: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        for c in cores:
            c.key_align = align
        for s in steps:
            s.requires_grad_(True)
            s.grad = None
        torch.manual_seed(0)
        with qdrop(act_quantizers([model]), 0.5):  # the probabilities' QDrop draws among them
            out = model(x)
        out.square().mean().backward()
        for s in steps:
            s.requires_grad_(False)
        return out.detach(), [s.grad.clone() for s in steps], logits(model, x, 8, torch.device("cpu"))

    padded, padded_grads, padded_logits = run(8)
    assert keys_seen == ({24} if kind == "vit" else {56})  # 17 and 49 tokens, padded
    keys_seen.clear()
    plain, plain_grads, plain_logits = run(1)
    assert keys_seen == ({17} if kind == "vit" else {49})
    assert torch.allclose(padded, plain, rtol=1e-5, atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(padded_grads, plain_grads, strict=True))
    assert torch.allclose(padded_logits, plain_logits, rtol=1e-5, atol=1e-5)  # evaluation: no QDrop
