"""Speed features compute what the plain engine computes (issue 5).

The CUDA graph and TF32 only exist on CUDA; their end-to-end comparison runs where a GPU is
present (the GPU machine; ``benchmarks/calib_speed.py`` prints the same comparison for the
benchmark models). On CPU the schedule the graph relies on and the compiled quantizer kernels
are checked against their eager definitions.
"""

import copy

import pytest
import torch

from osqdeploy.adapters import adapter_for
from osqdeploy.config import CalibrationConfig, QuantConfig
from osqdeploy.plan import build_plan
from osqdeploy.quant import modules as M
from osqdeploy.quant.modules import quant_layers
from osqdeploy.reconstruct import Reconstructor, prepare_model
from osqdeploy.reconstruct.step import Schedule

from conftest import images, tiny_vit


def test_schedule_is_the_eager_loops_batches_and_annealing():
    cfg = CalibrationConfig(iters=50, batch_size=8, warmup=0.2, beta_start=20.0, beta_end=2.0, round_weight=0.1)
    sched = Schedule.build(cfg, 40, torch.Generator().manual_seed(3), torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    for it in range(50):
        assert torch.equal(sched.batches[it], torch.randperm(40, generator=gen)[:8])
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
    rand = torch.rand(x.shape, generator=g)
    probs = torch.softmax(torch.randn(2, 3, 10, 10, generator=g), -1)
    alpha = torch.randn(24, 16, generator=g)
    w_floor = torch.floor(torch.randn(24, 16, generator=g) * 4)
    s, zp = torch.rand(24, 1, generator=g) + 0.1, torch.full((24, 1), 8.0)

    def run():
        xs = x.clone().requires_grad_(True)
        scale = torch.tensor(0.05, requires_grad=True)
        ps = probs.clone().requires_grad_(True)
        a = alpha.clone().requires_grad_(True)
        outs = [
            M._KERNELS["uniform"](xs, scale, torch.tensor(7.0), 4, rand, 0.5),
            M._KERNELS["log"](ps, torch.tensor(1.0), 4, "sqrt2", None, 0.0),
            M._KERNELS["adaround"](w_floor, a, s, zp, 4),
            M._KERNELS["regularizer"](a, torch.tensor(7.5)),
        ]
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
        return outs, torch.autograd.grad(loss, [xs, scale, ps, a])

    eager_out, eager_grad = run()
    with M.fused_quantizers():
        fused_out, fused_grad = run()
    assert M._KERNELS["uniform"] is M._uniform_train  # restored on exit
    for e, f in zip(eager_out[:3], fused_out[:3], strict=True):
        assert torch.equal(e, f)  # same codes: the grid arithmetic is elementwise, no reordering
    assert torch.allclose(eager_out[3], fused_out[3], rtol=1e-5)
    for e, f in zip(eager_grad, fused_grad, strict=True):
        # reductions (the step's gradient, the regulariser sum) may be reordered: float rounding only
        assert torch.allclose(e, f, rtol=1e-4, atol=1e-6)


def _codes(cuda_graph: bool, compile_: bool, tf32: bool = False, device: str = "cuda", plan: str = "blocks:3",
           iters: int = 120, compile_group: bool = False):
    model = tiny_vit(depth=3)
    q = copy.deepcopy(model)
    adapter = prepare_model(q, QuantConfig(4, 4), adapter_for)
    ccfg = CalibrationConfig(samples=64, batch_size=16, iters=iters, device=device, tf32=tf32,
                             cuda_graph=cuda_graph, compile=compile_, compile_group=compile_group)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    rec = Reconstructor(q, adapter, build_plan(plan, adapter.units(q)), ccfg, torch.device(device))
    x = images(64, 32)
    rec.initialize(x)
    results = rec.reconstruct(x)
    codes = torch.cat([m.weight_quantizer.w_int.flatten().cpu() for m in quant_layers([q.blocks])])
    return codes, results[-1]


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
    assert fused.mse_after == pytest.approx(plain.mse_after, rel=0.02)
    assert fused.loss_curve[0][1] == pytest.approx(plain.loss_curve[0][1], rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (run on the GPU machine)")
def test_cuda_graph_replay_computes_exactly_what_the_eager_step_computes():
    plain_codes, plain = _codes(cuda_graph=False, compile_=False)
    graph_codes, graph = _codes(cuda_graph=True, compile_=False)
    assert torch.equal(plain_codes, graph_codes)
    assert plain.loss_curve == graph.loss_curve
    fused_codes, fused = _codes(cuda_graph=True, compile_=True)
    # fused kernels reorder the step-size gradient's reduction: nearly all decisions agree
    assert float((fused_codes == plain_codes).float().mean()) > 0.99
    assert fused.mse_after == pytest.approx(plain.mse_after, rel=0.1)
    group_codes, group = _codes(cuda_graph=True, compile_=True, compile_group=True)
    assert float((group_codes == plain_codes).float().mean()) > 0.99
    assert group.mse_after == pytest.approx(plain.mse_after, rel=0.1)


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
    from osqdeploy.evaluate import TorchRuntime

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


def test_bf16_autocast_reconstructs_close_to_fp32_and_reports_fp32_mse():
    def run(bf16: bool):
        torch.manual_seed(0)
        q = copy.deepcopy(tiny_vit(depth=2))
        adapter = prepare_model(q, QuantConfig(4, 4), adapter_for)
        ccfg = CalibrationConfig(samples=32, batch_size=8, iters=60, device="cpu", bf16=bf16)
        rec = Reconstructor(q, adapter, build_plan("blocks:2", adapter.units(q)), ccfg, torch.device("cpu"))
        x = images(32, 32)
        rec.initialize(x)
        (result,) = rec.reconstruct(x)
        return result

    fp32, bf16 = run(False), run(True)
    assert bf16.mse_after < bf16.mse_before  # reconstruction still works under autocast
    assert bf16.mse_before == fp32.mse_before  # the reported MSE is computed in fp32 either way
    assert bf16.mse_after == pytest.approx(fp32.mse_after, rel=0.15)
