"""Several processes, one job: process groups, ranks, and the few collectives osq needs.

torch.distributed does the work (NCCL between GPUs, gloo between CPU processes), started either
by ``torchrun`` (its environment variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or
by :func:`launch`, which spawns one process per GPU of this host for ``--gpus N``. A
:class:`DistContext` is what the engine, the evaluator and sweeps are handed; a single process
is the context of world size 1, for which every collective here is a no-op.

What the collectives are for:

* data-parallel calibration: each step's global batch is split into equal contiguous shards, one
  per rank. Each rank trains its own rows of every layer's rounding variables
  (``CalibrationConfig.shard_rounding``, :class:`RowShard`): the soft weights are all-gathered under
  the forward and their gradients reduce-scattered, averaged, under the backward
  (:class:`GradientSync`). The activation steps' gradients and the logged loss are averaged in one
  flat all-reduce after backward (:meth:`DistContext.average_`); a layer whose rows do not split
  over the ranks keeps V whole and all-reduces its gradient as backward produces it
  (``CalibrationConfig.overlap_allreduce``). NCCL runs all of it inside a captured CUDA graph.
  Every rank applies the same averaged gradients with the same optimisers, so all ranks hold the
  same rounding codes and steps; :meth:`DistContext.require_same_state` checks it at the end of
  every group.
* different data on different ranks is caught before any work: each rank hashes what it is about
  to calibrate on and :meth:`DistContext.require_same` compares the hashes.
* sharded evaluation: whole batches go to each rank (:meth:`DistContext.shard`), so every batch
  is the one a single process would run, and logits are gathered back in image order
  (:meth:`DistContext.gather_rows`).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pickle
import socket
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistContext",
    "DistributedError",
    "GradientSync",
    "RowShard",
    "launch",
    "scale_global_batch",
    "state_digest",
    "tensor_digest",
]

# the single-tensor collectives by their newer names where torch has them (the older ones warn there)
_ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
# a rank that stops answering (killed, hung) fails the others' next collective after this long
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
# sweeps: a rank whose queue ran dry waits at the final exchange for the longest job of the others
SWEEP_TIMEOUT = datetime.timedelta(days=2)
# QDrop masks of rank r are drawn from the group's seed plus r times this: independent draws per rank
RANK_SEED_STRIDE = 1_000_003


class DistributedError(RuntimeError):
    """A multi-process run cannot start or cannot go on; the message is one line for the user."""


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


@dataclass(frozen=True)
class DistContext:
    """This process' place among the processes of one job (world size 1: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    # -- who am I -------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether there are other ranks to talk to."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes runs, checkpoints, reports and tables."""
        return self.rank == 0

    @property
    def rng_offset(self) -> int:
        return self.rank * RANK_SEED_STRIDE

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> DistContext:
        return cls(device=torch.device(device))

    @classmethod
    def current(cls, device: str | torch.device | None = None) -> DistContext:
        """The context of the default process group, or a single process if none is initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls.single(device or "cpu")
        backend = dist.get_backend()
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), local, torch.device(device), backend)

    # -- checks ---------------------------------------------------------------------------------

    def _collective(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except DistributedError:
            raise
        except RuntimeError as e:  # gloo/NCCL: a peer closed its connection or timed out
            raise DistributedError(
                f"rank {self.rank}: lost contact with the other ranks during {what} (did a rank die?): "
                f"{_first_line(e)}"
            ) from e

    def barrier(self) -> None:
        if self.active:
            self._collective("a barrier", dist.barrier)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        self._collective("an exchange", lambda: dist.all_gather_object(out, obj))
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.active:
            return obj
        box = [obj]
        self._collective("a broadcast", lambda: dist.broadcast_object_list(box, src=src))
        return box[0]

    def require_same(self, digest: str, what: str) -> None:
        """Raise on every rank unless all ranks passed the same ``digest`` (e.g. of their data)."""
        digests = self.all_gather_object(digest)
        if len(set(digests)) > 1:
            groups: dict[str, list[int]] = {}
            for r, d in enumerate(digests):
                groups.setdefault(d, []).append(r)
            parts = "; ".join(f"ranks {','.join(map(str, rs))}: {d[:12]}" for d, rs in groups.items())
            raise DistributedError(
                f"the ranks do not have the same {what} ({parts}); every rank must read the same files with "
                "the same settings (on several nodes: the same data, at the same path)"
            )

    def require_same_state(self, modules: Iterable[nn.Module], what: str) -> None:
        """Raise unless every rank holds bit-identical parameters and buffers in ``modules``."""
        if self.active:
            self.require_same(state_digest(modules), what)

    # -- data-parallel arithmetic ---------------------------------------------------------------

    def batch_shard(self, batch: int) -> slice:
        """This rank's rows of a global batch of ``batch`` (which must split evenly)."""
        if batch % self.world:
            raise DistributedError(
                f"a batch of {batch} images does not split evenly over {self.world} ranks; "
                f"use a batch size divisible by {self.world}"
            )
        size = batch // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    @property
    def _mean_op(self) -> dist.ReduceOp:
        """NCCL averages itself; gloo has no AVG reduction, so there it sums and :meth:`mean_done` divides."""
        return dist.ReduceOp.AVG if self.backend == "nccl" else dist.ReduceOp.SUM

    def mean_all_reduce(self, t: torch.Tensor, async_op: bool = False) -> Any:
        """All-reduce ``t`` towards the ranks' mean; :meth:`mean_done` completes it once it has run."""
        return dist.all_reduce(t, op=self._mean_op, async_op=async_op)

    def mean_done(self, t: torch.Tensor) -> None:
        if self.backend != "nccl":
            t.mul_(1.0 / self.world)

    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in one all-reduce of a flat buffer.

        Host-synchronisation free (NCCL can run it inside a captured CUDA graph).
        """
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        self.mean_all_reduce(flat)
        self.mean_done(flat)
        parts = flat.split([t.numel() for t in tensors])
        torch._foreach_copy_(list(tensors), [p.view_as(t) for p, t in zip(parts, tensors, strict=True)])

    def average_gradients(self, optimizers: Sequence[torch.optim.Optimizer], loss: torch.Tensor) -> torch.Tensor:
        """Average the gradients of every parameter of ``optimizers`` over the ranks, and ``loss`` with them.

        Each rank's loss is the mean over its equal shard, so the mean of the ranks' gradients is the
        gradient of the global batch's mean loss. Returns the global batch's loss (detached).
        """
        if not self.active:
            return loss
        grads = [p.grad for opt in optimizers for g in opt.param_groups for p in g["params"] if p.grad is not None]
        logged = loss.detach().float().reshape(1).clone()
        self.average_(grads + [logged])
        return logged[0]

    def gradient_sync(self, items: Iterable[nn.Parameter | RowShard]) -> GradientSync:
        """Averaging of ``items``' gradients that starts while backward still runs (see :class:`GradientSync`)."""
        return GradientSync(self, items)

    def broadcast_state(self, modules: Iterable[nn.Module], src: int = 0) -> None:
        """Overwrite the parameters and buffers of ``modules`` with rank ``src``'s."""
        if not self.active:
            return

        def send() -> None:
            with torch.no_grad():
                for m in modules:
                    for t in [*m.parameters(), *m.buffers()]:
                        dist.broadcast(t.data, src=src)

        self._collective("sharing the initial grids", send)

    # -- sharded evaluation ---------------------------------------------------------------------

    def shard(self, n: int, align: int = 1) -> range:
        """A contiguous part of ``range(n)``, cut only at multiples of ``align``, balanced over ranks.

        With ``align`` the batch size, each rank runs exactly the batches a single process would
        run, so per-image results do not depend on the number of ranks.
        """
        blocks = -(-n // align)
        per, extra = divmod(blocks, self.world)
        start = self.rank * per + min(self.rank, extra)
        stop = start + per + (1 if self.rank < extra else 0)
        return range(min(start * align, n), min(stop * align, n))

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` (any number of rows each) in rank order, on every rank."""
        if not self.active:
            return t
        shapes = [tuple(s) for s in self.all_gather_object(tuple(t.shape))]
        rows = [s[0] for s in shapes]
        tail = next((s[1:] for s in shapes if s[0]), shapes[0][1:])  # an empty shard's columns are unknown
        t = t.reshape(0, *tail) if t.shape[0] == 0 else t
        wire = self.device if self.backend == "nccl" else torch.device("cpu")
        padded = torch.zeros((max(rows), *t.shape[1:]), dtype=t.dtype, device=wire)
        padded[: t.shape[0]] = t.to(wire)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self._collective("gathering results", lambda: dist.all_gather(parts, padded))
        return torch.cat([p[:r].to(t.device) for p, r in zip(parts, rows, strict=True)])

    def max_float(self, value: float) -> float:
        return max(float(v) for v in self.all_gather_object(float(value)))


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def state_digest(modules: Iterable[nn.Module]) -> str:
    """sha256 of the parameters and buffers of ``modules``, names and bytes."""
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            h.update(f"{i}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
    return h.hexdigest()


# -- a larger global batch ------------------------------------------------------------------------


def scale_global_batch(ccfg: Any, factor: int) -> Any:
    """The schedule with a ``factor``× larger batch and ``factor``× fewer iterations per group.

    The paper's batch of 32 splits into shards of 16 over 2 GPUs, too small to keep a GPU busy;
    the same images seen in fewer, larger steps scale instead. Learning-rate policy, that of
    ``fast_preset``: AdaRound's rate is raised by the factor so that ``lr·iters`` (how far Adam
    can move each rounding variable) is kept; the activation steps' rate is kept, their Adam
    moves stay as they were measured. Recorded in ``extra["global_batch_scale"]``.
    """
    from dataclasses import replace

    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"global batch scale must be an integer ≥ 1, got {factor!r}")
    if factor == 1:
        return ccfg
    return replace(
        ccfg,
        batch_size=ccfg.batch_size * factor,
        iters=-(-ccfg.iters // factor),
        lr_round=ccfg.lr_round * factor,
        extra={**ccfg.extra, "global_batch_scale": factor},
    )


class GradientSync:
    """Averages gradients over the ranks while backward is still running.

    ``DistContext.average_gradients`` waits for the whole backward pass and then all-reduces every
    gradient at once; here each item's collective starts as soon as autograd has accumulated its
    gradient (a post-accumulate hook), so communication overlaps the backward pass through the
    group's earlier layers. An item is a parameter (its gradient all-reduced in place, the same
    sums element for element) or a :class:`RowShard` (the gathered soft weight's gradient
    reduce-scattered to this rank's rows). Collectives must be issued in one order on every rank,
    so they start in the order of ``items`` (pass them in the order backward reaches them): a
    gradient ready before its predecessors waits for them. Inside a captured CUDA graph the hooks
    run once, at capture, and every replay repeats the collectives they launched; ``finish`` makes
    the step wait for them before the optimiser.
    """

    def __init__(self, ctx: DistContext, items: Iterable[nn.Parameter | RowShard]):
        self.ctx, self.items = ctx, list(items)
        self.started_in_backward = 0  # of the last step: how many collectives backward itself started
        self._ready: set[int] = set()
        self._next = 0
        self._works: list[tuple[Any, torch.Tensor]] = []
        self._hooks = []
        for i, item in enumerate(self.items):
            if isinstance(item, RowShard):  # its gradient's tensor is new every step: the shard hooks it
                item.on_grad = lambda i=i: self._on_ready(i)
            else:
                self._hooks.append(item.register_post_accumulate_grad_hook(lambda _p, i=i: self._on_ready(i)))

    def _on_ready(self, index: int) -> None:
        self._ready.add(index)
        while self._next in self._ready:
            self._start(self.items[self._next])
            self._next += 1

    def _start(self, item: nn.Parameter | RowShard) -> None:
        if isinstance(item, RowShard):
            started = item.start_reduce()
            if started is not None:
                self._works.append(started)
            return
        if item.grad is None:  # not used by this group's forward: on no rank
            return
        grad = item.grad
        work = self.ctx._collective("averaging gradients", lambda: self.ctx.mean_all_reduce(grad, async_op=True))
        self._works.append((work, grad))

    def finish(self, others: Sequence[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Wait for every started collective; average ``others`` and ``loss`` in one more. Returns the loss."""
        self.started_in_backward = len(self._works)
        for i in range(self._next, len(self.items)):  # any whose predecessor never became ready
            self._start(self.items[i])
        self._ready.clear()
        self._next = 0
        logged = loss.detach().float().reshape(1).clone()
        self.ctx.average_([*others, logged])
        for work, grad in self._works:
            self.ctx._collective("averaging gradients", work.wait)
            self.ctx.mean_done(grad)
        self._works.clear()
        return logged[0]

    def close(self) -> None:
        """Remove the hooks (the group is done)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for item in self.items:
            if isinstance(item, RowShard):
                item.on_grad = None


class RowShard:
    """This rank's rows of one layer's rounding variables V, trained here and nowhere else.

    Data parallelism repeats the weight-side work of a step on every rank: the soft weight and
    the rounding regulariser from all of V, their backward, and Adam over all of V (on 2× H200,
    DeiT-B, about 0.6 ms of a 3.7 ms step at batch 32). Sharded, each rank computes the soft
    weight of its own rows and the ranks all-gather the rest; the gathered weight is a leaf of the
    step's autograd graph, whose gradient is reduce-scattered back, averaged over the ranks, to the
    rows this rank owns (:class:`GradientSync`), and only then carried through h(V) to V. So the
    gathers of every layer start before the forward and run under it, and the reduce-scatters run
    under the backward, as an unsharded all-reduce does: no more traffic than V's all-reduce (half
    of it under fp16 autocast, the soft weights travelling in the matmuls' type), and a ``1/world``
    share of the weight-side work. The regulariser covers each rank's rows once, so the ranks together
    compute the same loss. At the end of the group :meth:`collect` gives every rank all of V again.
    """

    def __init__(self, ctx: DistContext, alpha: torch.Tensor):
        if not self.fits(ctx, alpha):
            raise ValueError(f"{alpha.shape[0]} rows cannot be shared out over {ctx.world} rank(s)")
        self.ctx = ctx
        self.rows = ctx.batch_shard(alpha.shape[0])
        self.alpha = nn.Parameter(alpha.detach()[self.rows].clone())
        self.on_grad: Callable[[], None] | None = None  # set by the GradientSync that averages this shard
        # of the current step: this rank's rows of the soft weight (in autograd), the gathered whole,
        # the gather in flight, and the averaged gradient of this rank's rows once reduce-scattered
        self.part: torch.Tensor | None = None
        self.full: torch.Tensor | None = None
        self.grad_part: torch.Tensor | None = None
        self._gather: Any = None

    @staticmethod
    def fits(ctx: DistContext, alpha: torch.Tensor) -> bool:
        return ctx.active and alpha.shape[0] % ctx.world == 0

    def begin(self, part: torch.Tensor) -> None:
        """Start gathering the whole soft weight from this rank's rows ``part`` (asynchronously)."""
        self.part, self.grad_part = part, None
        self.full = part.new_empty((part.shape[0] * self.ctx.world, *part.shape[1:]))
        own = part.detach().contiguous()
        self._gather = self.ctx._collective("gathering the soft weights",
                                            lambda: _ALL_GATHER(self.full, own, async_op=True))

    @torch.compiler.disable
    def weight(self) -> torch.Tensor:
        """The gathered soft weight: waits for its gather; backward hands its gradient to :meth:`start_reduce`."""
        if self._gather is not None:
            self.ctx._collective("gathering the soft weights", self._gather.wait)
            self._gather = None
            self.full.requires_grad_(True)
            self.full.register_post_accumulate_grad_hook(lambda _t: self.on_grad and self.on_grad())
        return self.full

    @property
    def used(self) -> bool:
        """Whether this step's forward took the gathered weight (see :meth:`begin`)."""
        return self._gather is None

    def start_reduce(self) -> tuple[Any, torch.Tensor] | None:
        """Start reduce-scattering the gathered weight's gradient to this rank's rows: (work, their gradient)."""
        if self.full is None or self.full.grad is None:
            return None
        self.grad_part = torch.empty_like(self.part)
        grad, out = self.full.grad.contiguous(), self.grad_part
        work = self.ctx._collective("averaging gradients",
                                    lambda: _REDUCE_SCATTER(out, grad, op=self.ctx._mean_op, async_op=True))
        return work, out

    @torch.no_grad()
    def collect(self, alpha: torch.Tensor) -> None:
        """Write every rank's trained rows into the full ``alpha``, on every rank."""
        self.part = self.full = self.grad_part = self._gather = None
        self.ctx._collective("gathering the rounding variables",
                             lambda: _ALL_GATHER(alpha, self.alpha.detach().contiguous()))


# -- starting processes -----------------------------------------------------------------------------


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def _device_for(local_rank: int, device_type: str) -> torch.device:
    if device_type != "cuda":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1))
        raise DistributedError(
            f"{per_node} processes per node need {per_node} GPUs but this node has {count}; "
            f"start at most {count} (torchrun --nproc-per-node {count}, or --gpus {count})"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_process_group(rank: int, world: int, local_rank: int, device_type: str, init_method: str | None = None,
                       timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> DistContext:
    """Join the job's process group (NCCL for CUDA, gloo for CPU) and return this rank's context."""
    device = _device_for(local_rank, device_type)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout,
                                **({"device_id": device} if backend == "nccl" else {}))
        if backend == "nccl":  # NCCL connects lazily: fail here, with a clear line, not in the first group
            dist.barrier()
    except Exception as e:
        where = init_method or f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise DistributedError(
            f"rank {rank} of {world} could not start the {backend} process group at {where}: {_first_line(e)}"
        ) from e
    return DistContext(rank, world, local_rank, device, backend)


def from_environment(device_type: str = "auto", timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> DistContext:
    """This process' context under ``torchrun`` (joining the group), or a single process otherwise."""
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if dist.is_available() and dist.is_initialized():
        return DistContext.current()
    if not _under_torchrun():
        return DistContext.single("cuda" if device_type == "cuda" else "cpu")
    return init_process_group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                              int(os.environ.get("LOCAL_RANK", 0)), device_type, init_method="env://",
                              timeout=timeout)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, fn: Callable[..., Any], args: tuple, world: int, device_type: str, port: int,
            result_path: str, timeout: datetime.timedelta) -> None:
    import torch._inductor.config as inductor_config

    # the ranks share this host's cores (torchrun does the same through OMP_NUM_THREADS): each
    # taking all of them oversubscribes the CPU stages (data, export, ONNX Runtime) N times over
    share = max(1, len(os.sched_getaffinity(0)) // world)
    torch.set_num_threads(share)
    inductor_config.compile_threads = share  # its kernel-compiling workers too
    ctx = init_process_group(local_rank, world, local_rank, device_type, init_method=f"tcp://127.0.0.1:{port}",
                             timeout=timeout)
    try:
        result = fn(ctx, *args)
        if ctx.is_main:
            Path(result_path).write_bytes(pickle.dumps(result))
    finally:
        shutdown()


def check_gpus(gpus: int) -> None:
    """Raise unless this host has ``gpus`` CUDA devices."""
    if gpus < 1:
        raise DistributedError(f"--gpus must be ≥ 1, got {gpus}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > count:
        raise DistributedError(
            f"--gpus {gpus} asks for {gpus} GPUs but this machine has {count}"
            + ("" if count else " (no CUDA device is visible)")
        )


def launch(fn: Callable[..., Any], *args: Any, processes: int = 1, device_type: str = "cuda",
           timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Any:
    """Run ``fn(ctx, *args)`` on ``processes`` ranks of this host and return rank 0's result.

    Under ``torchrun`` the ranks already exist: ``fn`` runs in this process with its context
    (``processes`` is ignored; torchrun's --nproc-per-node decides). With one process ``fn``
    runs here. Otherwise one process per rank is spawned (NCCL on ``cuda`` devices 0..N-1, gloo
    on ``cpu``); if one of them dies or raises, the others are stopped and a
    :class:`DistributedError` names the rank. ``timeout``: how long a collective waits for the
    slowest rank before it fails.
    """
    if _under_torchrun():
        ctx = from_environment(device_type, timeout)
        try:
            return fn(ctx, *args)
        finally:
            shutdown()
    if processes <= 1:
        return fn(DistContext.single(torch.device("cuda", 0) if device_type == "cuda" else "cpu"), *args)
    if device_type == "cuda":
        check_gpus(processes)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="osq-launch-") as tmp:
        result_path = str(Path(tmp) / "result.pkl")
        try:
            mp.spawn(_worker, args=(fn, args, processes, device_type, _free_port(), result_path, timeout),
                     nprocs=processes, join=True)
        except mp.ProcessRaisedException as e:
            raise DistributedError(f"rank {e.error_index} failed: {_child_error(e.msg)}") from None
        except mp.ProcessExitedException as e:
            how = f"signal {e.signal_name}" if e.signal_name else f"exit code {e.exit_code}"
            raise DistributedError(
                f"rank {e.error_index} died ({how}); the other ranks were stopped. A calibration is resumable: "
                "run the same command again"
            ) from None
        return pickle.loads(Path(result_path).read_bytes())


def _child_error(traceback_text: str) -> str:
    """The last line of a child's traceback: the exception type and its message."""
    lines = [ln for ln in traceback_text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "an unknown error"
