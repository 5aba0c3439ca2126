"""One optimisation step of a reconstruction group, run eagerly or replayed as a CUDA graph.

Why a graph: a group step of a ViT is thousands of small kernels (each fake-quant is a handful
of elementwise ops, forward and backward) on tensors of a few megabytes. On an H100 the step is
bound by launching them, not by the arithmetic (7 TFLOP/s measured against a 400 TFLOP/s
ceiling). Replaying the whole step — batch gather, QDrop mix, forward, loss, backward,
both Adam updates — as one CUDA graph removes the launches and changes no operation.

To be capturable, the step reads everything that changes between iterations from device tensors
indexed by a device-side counter: the batch indices (drawn up front from the group's seeded
generator, in the order the iterations use them), β, and the regulariser weight (0 during the
warm-up; adding 0·R changes neither the loss nor any gradient). The eager path runs the very
same step, so the two paths issue the same operations in the same order on the same data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import State
from ..config import CalibrationConfig
from ..distributed import DistContext, RowShard
from ..quant.kernels import allow_recompiles, draw_mask, qdrop_mix


@dataclass
class Schedule:
    """Per-iteration inputs of the step, precomputed so the step never asks the host."""

    batches: torch.Tensor  # [iters, batch] int64 indices into the cached group inputs
    beta: torch.Tensor  # [iters] AdaRound's annealed exponent
    reg_weight: torch.Tensor  # [iters] round_weight after the warm-up, 0 before

    @classmethod
    def build(cls, cfg: CalibrationConfig, n: int, gen: torch.Generator, device: torch.device) -> Schedule:
        """Draw every iteration's batch from ``gen`` (a CPU generator: the same batches on any device).

        Each batch is a uniformly random subset of the ``n`` cached inputs in random order, drawn
        independently per iteration as QDrop does (``randperm(n)[:batch]``), here as the top-k of
        seeded uniform noise: one vectorised draw instead of 20,000 small ones (0.3 s per group).
        """
        bs = min(cfg.batch_size, n)
        batches = torch.rand(cfg.iters, n, generator=gen).topk(bs, dim=1).indices
        warmup = int(cfg.warmup * cfg.iters)
        it = torch.arange(cfg.iters, dtype=torch.float64)
        # During the warm-up the weight is 0 and β only has to keep pow tame: β_start.
        progress = (it - warmup).clamp(min=0) / max(1, cfg.iters - warmup)
        beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - progress)
        weight = torch.where(it >= warmup, cfg.round_weight, 0.0)
        return cls(batches.to(device), beta.float().to(device), weight.float().to(device))


class GroupStep:
    """The group's training step over cached inputs; ``rec`` holds the last reconstruction loss."""

    def __init__(
        self,
        run_group: Callable[[State], State],
        layers: list[nn.Module],
        step_params: list[nn.Parameter],
        q_in: State,
        fp_in: State,
        target: torch.Tensor,
        objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        schedule: Schedule,
        cfg: CalibrationConfig,
        device: torch.device,
        weight: torch.Tensor | None = None,
        dist: DistContext | None = None,
    ):
        self.run_group, self.layers, self.step_params = run_group, layers, step_params
        # data parallel: this rank's rows of each global batch; gradients averaged over the ranks
        self.dist = dist or DistContext.single(device)
        self.shard = self.dist.batch_shard(schedule.batches.shape[1])
        self.weight = weight  # per-element output weights of a weighted objective, like ``target``
        self.q_in, self.fp_in, self.target = q_in, fp_in, target
        self.objective, self.schedule, self.drop_prob = objective, schedule, cfg.drop_prob
        # the autocast weight cache must stay off: a captured graph would keep stale casts
        mode = cfg.autocast_on(device.type)
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        self.autocast = torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None,
                                       cache_enabled=False)
        # fp16 gradients of a small MSE sit near the subnormal range: scale the loss by a constant.
        # Adam's update m/(√v + eps) is invariant to it when eps is scaled too, so nothing needs
        # unscaling (and there is no overflow check to synchronise on).
        self.loss_scale = cfg.loss_scale if mode == "fp16" else 1.0
        if cfg.compile_group:
            self.forward = compile_group(run_group, fused_rng=cfg.fused_rng)
        else:
            self.forward = lambda inp: run_group(inp)[-1]
        self.inputs, self.loss = _batch_inputs, _loss
        if cfg.compile and device.type == "cuda":  # gather, QDrop mix and loss: a kernel or two, not a dozen
            options = {"fallback_random": not cfg.fused_rng}
            self.inputs = torch.compile(_batch_inputs, dynamic=False, options=options)
            self.loss = torch.compile(_loss, dynamic=False, options=options)
        # capturable keeps Adam's step count on the device; used on CUDA by both paths so that
        # eager and graphed runs compute the same bias corrections. The fused kernel keeps it
        # there too, and is capturable.
        cuda = device.type == "cuda"
        adam = dict(capturable=cuda, fused=True if cuda and cfg.fused_adam else None, eps=1e-8 * self.loss_scale)
        # data parallel, sharded: each rank trains its rows of V (a layer whose rows do not split
        # over the ranks stays whole, averaged as without sharding)
        quantizers = [layer.weight_quantizer for layer in layers]
        if cfg.shard_rounding:
            for wq in quantizers:
                if RowShard.fits(self.dist, wq.alpha):
                    wq.shard = RowShard(self.dist, wq.alpha)
        round_params = [wq.alpha for wq in quantizers if wq.shard is None]
        sharded = [wq.shard.alpha for wq in quantizers if wq.shard is not None]
        # the optimisers whose gradients are averaged over the ranks; a shard's arrives averaged
        self.optimizers = [torch.optim.Adam(ps, lr=lr, **adam)
                           for ps, lr in ((round_params, cfg.lr_round), (step_params, cfg.lr_act)) if ps]
        # data parallel, overlapped: in the order backward reaches them, the last layer's first.
        # A shard's gradient always arrives this way; whole V's does with overlap_allreduce, else it
        # is averaged with the activation steps' after backward.
        items = [wq.shard if wq.shard is not None else wq.alpha for wq in reversed(quantizers)
                 if wq.shard is not None or cfg.overlap_allreduce]
        self.sync = self.dist.gradient_sync(items) if self.dist.active and items else None
        self.after_backward = step_params if cfg.overlap_allreduce else [*round_params, *step_params]
        self.own = [torch.optim.Adam(sharded, lr=cfg.lr_round, **adam)] if sharded else []
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.rec = torch.zeros((), device=device)

    def zero_grad(self) -> None:
        for opt in self.optimizers + self.own:
            opt.zero_grad(set_to_none=True)

    def body(self) -> None:
        """One iteration, without host synchronisation (so it can be captured)."""
        it = self.counter
        idx = self.schedule.batches.index_select(0, it).squeeze(0)[self.shard]
        masks = tuple(draw_mask((idx.shape[0], *t.shape[1:]), t.device, self.drop_prob) for t in self.q_in)
        inp = self.inputs(self.q_in, self.fp_in, idx, self.drop_prob, masks)
        beta = self.schedule.beta.index_select(0, it).squeeze(0)
        reg_weight = self.schedule.reg_weight.index_select(0, it).squeeze(0)
        quantizers = [layer.weight_quantizer for layer in self.layers]
        sharded = [wq for wq in quantizers if wq.shard is not None]
        for wq in quantizers:  # each soft weight computes its rounding regulariser alongside
            wq.beta, wq.reg = beta, None
        with self.autocast:
            for wq in sharded:  # in forward order, so each gather is done by the time its layer runs
                wq.begin_shard_step()
            out = self.forward(inp)
        if any(wq.reg is None for wq in quantizers) or not all(wq.shard.used for wq in sharded):
            raise RuntimeError("a layer of the group did not take part in its forward pass")
        rec = self.loss(self.objective, out, self.target, idx, self.weight)
        whole = [wq.reg for wq in quantizers if wq.shard is None]
        loss = rec + reg_weight * torch.stack(whole).sum() if whole else rec
        (loss * self.loss_scale).backward()
        if self.sync is None:
            rec = self.dist.average_gradients(self.optimizers, rec)
        else:
            rec = self.sync.finish([p.grad for p in self.after_backward if p.grad is not None], rec)
        if sharded:  # the averaged gradients of the gathered weights, on through h(V) to this rank's V
            ready = [wq.shard for wq in sharded if wq.shard.grad_part is not None]
            own_reg = torch.stack([wq.reg for wq in sharded]).sum() * (reg_weight * self.loss_scale)
            torch.autograd.backward([s.part for s in ready] + [own_reg], [s.grad_part for s in ready] + [None])
        for opt in self.optimizers + self.own:
            opt.step()
        with torch.no_grad():
            if self.step_params:
                torch._foreach_clamp_min_(self.step_params, 1e-8)
            self.counter += 1
            self.rec.copy_(rec.detach())

    def release(self) -> None:
        """Drop the step's hold on the weight quantizers (β, the last regulariser, the shards of V)."""
        for layer in self.layers:
            wq = layer.weight_quantizer
            wq.beta = wq.reg = None
            if wq.shard is not None:
                wq.shard.collect(wq.alpha)
                wq.shard = None
        if self.sync is not None:
            self.sync.close()

    def eager(self) -> None:
        self.zero_grad()
        self.body()


def _batch_inputs(q_in: State, fp_in: State, idx: torch.Tensor, drop_prob: float,
                  masks: tuple[torch.Tensor | None, ...]) -> State:
    """The batch ``idx`` of the cached group inputs, QDrop-mixed elementwise with the float ones."""
    xq = tuple(t.index_select(0, idx) for t in q_in)
    if drop_prob <= 0:
        return xq
    xf = tuple(t.index_select(0, idx) for t in fp_in)
    return tuple(qdrop_mix(b, a, drop_prob, m) for a, b, m in zip(xq, xf, masks, strict=True))


def _loss(objective: Callable[..., torch.Tensor], out: torch.Tensor, target: torch.Tensor, idx: torch.Tensor,
          weight: torch.Tensor | None) -> torch.Tensor:
    """The reconstruction loss of the batch ``idx`` against the cached targets, in fp32."""
    if weight is None:  # a plain objective need not take weights
        return objective(out.float(), target.index_select(0, idx))
    return objective(out.float(), target.index_select(0, idx), weight.index_select(0, idx))


def warm_compile_workers(cfg: CalibrationConfig, device: torch.device) -> None:
    """Start inductor's kernel-compiling worker processes now, if this calibration will compile.

    Inductor starts them at its first compilation, which then waits for them (seconds of a
    calibration's fixed cost, on its critical path); started while the images load and the
    observers run, they are ready when the first group compiles. Idempotent; harmless where the
    private hook does not exist.
    """
    if device.type != "cuda" or not (cfg.compile or cfg.compile_group):
        return
    try:
        from torch._inductor.async_compile import maybe_warm_pool
    except ImportError:
        return
    maybe_warm_pool()


def compile_group(run_group: Callable[[State], State], fused_rng: bool = False) -> Callable[[State], torch.Tensor]:
    """The group's output as one torch.compile'd function (see ``CalibrationConfig.compile_group``).

    The wrapper's code object is the same for every group, so dynamo's cache is shared: a block of
    a shape already compiled costs a guard check, not a compilation (Swin's stages and slice
    kinds each compile once).
    """
    allow_recompiles(64)
    compiled = torch.compile(lambda inp: run_group(inp)[-1], dynamic=False)

    def forward(inp: State) -> torch.Tensor:
        # eager random draws give the same QDrop masks as the uncompiled step, for the same seed;
        # fused_rng draws them inside the generated kernels instead
        with torch._inductor.config.patch(fallback_random=not fused_rng):
            return compiled(inp)

    return forward


def run_steps(step: GroupStep, iters: int, graph: bool, on_log: Callable[[int], None], log_every: int) -> bool:
    """Run ``iters`` iterations; ``on_log(it)`` after logged ones. Returns whether a graph was used.

    With ``graph`` (CUDA only) the first iterations run eagerly on a side stream — they build
    Adam's state and let the allocator settle, as capture requires — and the rest replay one
    captured iteration. The warm-up iterations are real iterations, not discarded ones.
    """

    def log(it: int) -> None:
        if it % log_every == 0 or it == iters - 1:
            on_log(it)

    warm = 3
    if not graph or iters <= warm:
        for it in range(iters):
            step.eager()
            log(it)
        return False
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for it in range(warm):
            step.eager()
            log(it)
    torch.cuda.current_stream().wait_stream(side)
    step.zero_grad()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step.body()
    for it in range(warm, iters):
        g.replay()
        log(it)
    torch.cuda.synchronize()
    del g
    return True
