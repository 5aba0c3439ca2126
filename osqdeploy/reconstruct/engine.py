"""Granularity-aware reconstruction (AdaRound + QDrop + learned activation steps).

The flow for one calibration:

1. ``initialize`` — observe activation ranges on full-precision data (EMA of per-batch
   MSE-optimal ranges), fold per-channel LayerNorm-output ranges into the network (RepQ-ViT),
   set per-channel weight grids (min-max, or MSE-clipped with ``QuantConfig.weight_init='mse'``),
   and round the 8-bit edge layers to nearest.
2. ``reconstruct`` — walk the plan's groups in order. A group's quantized input is the output of
   the already-quantized network before it; its target is the full-precision output of the
   group on full-precision input. Both are computed once per group and cached (on the compute
   device), then the group's rounding variables and activation steps are optimised, the rounding
   is hardened into integers, and the cached inputs advance by one group.

The engine knows nothing of model families (the adapter does) nor of terminals and files
(callbacks do): the CLI draws progress bars, the run store writes checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import Adapter, State, Unit
from ..adapters.attention import align_attention_keys
from ..config import CalibrationConfig, ConfigError, QuantConfig
from ..distributed import DistContext
from ..plan import Plan
from ..quant.kernels import fused_quantizers, qdrop
from ..quant.layers import act_quantizers, quant_layers
from ..quant.mode import QuantMode, quant_mode, set_mode
from ..quant.reparam import reparameterize_input, reparameterize_norm
from .objective import Objective, PredictionAwareMSE, make_objective
from .output_tuning import OutputTuningResult, tune_outputs
from .step import GroupStep, Schedule, run_steps, warm_compile_workers


class NumericalError(RuntimeError):
    """A reconstruction loss became NaN or infinite."""


@dataclass
class GroupResult:
    index: int
    units: list[str]
    iters: int
    mse_before: float  # group-output MSE with round-to-nearest weights and initial steps
    mse_after: float  # after reconstruction, with the hardened rounding
    seconds: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (iteration, reconstruction loss)
    flipped: float = 0.0  # fraction of weights whose rounding differs from round-to-nearest
    # Where ``seconds`` went, so fixed costs can be told from the iterations: "inputs" (the
    # group's float target and initial MSE), "first_step" (setting up the optimisation and its
    # first iteration, which compiles any quantizer kernel of a new shape), "steps" (the other
    # iterations, graph capture included), "finish" (hardening, the next group's input, the
    # final MSE).
    phases: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loss_curve"] = [list(p) for p in self.loss_curve]
        return d


class Callbacks:
    """Hooks for whoever drives the engine; the defaults do nothing."""

    def on_group_start(self, index: int, units: list[str], iters: int) -> None: ...

    def on_iter(self, index: int, it: int, loss: float | None) -> None: ...

    def on_group_end(self, result: GroupResult) -> None: ...

    def on_stage(self, name: str) -> None:
        """A stage begins (the engine's own: "tune", output-level tuning after the last group)."""

    def on_stage_progress(self, stage: str, done: int, total: int) -> None:
        """``done`` of ``total`` steps of a stage (e.g. "initialize": observer batches; "tune": tuning steps)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available on this machine")
    return dev


def prepare_model(model: nn.Module, qcfg: QuantConfig, adapter_for: Callable[[nn.Module], Adapter]) -> Adapter:
    """Swap fake-quant modules into ``model`` (in place) and return its adapter."""
    qcfg.validate()
    adapter = adapter_for(model)
    adapter.quantize_structure(model, qcfg)
    for layer in quant_layers([model]):
        layer.weight_quantizer.init_method = qcfg.weight_init
    for layer in adapter.edge_layers(model):
        layer.input_quantizer.range_minmax = qcfg.edge_range == "minmax"
    model.eval()
    return adapter


def _slice(state: State, idx: torch.Tensor | slice) -> State:
    return tuple(t[idx] for t in state)


def _to(state: State, device: torch.device) -> State:
    return tuple(t.to(device, non_blocking=True) for t in state)


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions on (reconstruction) or off (evaluation), restored on exit.

    Off means off for cuDNN too, whose default is on: at 4 bits a TF32-rounded patch embedding
    already moves activations across quantization thresholds, so a model evaluated that way is not
    the model that was calibrated or the ONNX file that is deployed.
    """
    mm = torch.backends.cuda.matmul
    saved = (mm.allow_tf32, torch.backends.cudnn.allow_tf32, mm.allow_fp16_reduced_precision_reduction,
             mm.allow_bf16_reduced_precision_reduction)
    mm.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    # half-precision matmuls (autocast) accumulate in fp32 throughout, split-K reductions included
    mm.allow_fp16_reduced_precision_reduction = mm.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        (mm.allow_tf32, torch.backends.cudnn.allow_tf32, mm.allow_fp16_reduced_precision_reduction,
         mm.allow_bf16_reduced_precision_reduction) = saved


class Reconstructor:
    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        plan: Plan,
        ccfg: CalibrationConfig,
        device: torch.device,
        callbacks: Callbacks | None = None,
        objective: Objective | None = None,
        dist: DistContext | None = None,
    ):
        ccfg.validate()
        # several ranks: each holds the whole group and computes its shard of every global batch
        self.dist = dist or DistContext.single(device)
        self.dist.batch_shard(ccfg.batch_size)
        # Reconstruction learns only the rounding variables and activation steps (each set to
        # require gradients while its group is optimised). Frozen, the float parameters cost no
        # backward kernels: timm's LayerNorm affines and Swin's position-bias tables would
        # otherwise have gradients computed and accumulated at every step and never used.
        self.model = model.to(device).requires_grad_(False)
        align_attention_keys(self.model, 8 if ccfg.pad_attention else 1)
        self.adapter = adapter
        self.plan = plan
        self.cfg = ccfg
        self.device = device
        self.callbacks = callbacks or Callbacks()
        self.objective = objective or make_objective(ccfg.loss)
        units = {u.name: u for u in adapter.units(self.model)}
        missing = [n for g in plan.groups for n in g if n not in units]
        if missing:
            raise ValueError(f"plan names units the model does not have: {missing[:5]}")
        self.groups: list[list[Unit]] = [[units[n] for n in g] for g in plan.groups]
        self.output_tuning: OutputTuningResult | None = None  # set by reconstruct when it runs
        warm_compile_workers(ccfg, device)

    # -- batching helpers --------------------------------------------------------------------

    def _batches(self, n: int):
        bs = self.cfg.batch_size
        for i in range(0, n, bs):
            yield slice(i, min(i + bs, n))

    @torch.no_grad()
    def _propagate(self, fn: Callable[[State], State], state: State) -> State:
        outs = [fn(_to(_slice(state, sl), self.device)) for sl in self._batches(state[0].shape[0])]
        return tuple(torch.cat([o[k] for o in outs]) for k in range(len(outs[0])))

    def _run_group(self, group: list[Unit], state: State) -> State:
        for unit in group:
            state = unit(state)
        return state

    # -- stage 1: initialisation --------------------------------------------------------------

    @torch.no_grad()
    def initialize(self, images: torch.Tensor) -> None:
        """Observe ranges on full-precision data, reparameterise, set weight grids."""
        acts = act_quantizers([self.model])
        layers = quant_layers([self.model])
        set_mode(self.model, QuantMode.FLOAT)
        set_mode(acts, QuantMode.OBSERVE)
        n_obs = min(images.shape[0], self.cfg.extra.get("init_samples", 256))
        batches = list(self._batches(n_obs))
        for i, sl in enumerate(batches):
            self.model(images[sl].to(self.device))
            self.callbacks.on_stage_progress("initialize", i + 1, len(batches))
        for q in acts:
            q.finish_observation()
        for site in self.adapter.reparam_sites(self.model):
            reparameterize_norm(site.norm, site.quantizer, site.linears)
        for layer in layers:
            if layer.input_quantizer.affine_shift is not None:
                reparameterize_input(layer)
        for layer in layers:
            layer.weight_quantizer.init_grid(layer.weight)
        for layer in self.adapter.edge_layers(self.model):
            layer.weight_quantizer.finalize(layer.weight)
        set_mode(acts, QuantMode.NEAREST)
        self.dist.broadcast_state([self.model])  # every rank starts from rank 0's grids, bit for bit

    # -- stage 2: reconstruction --------------------------------------------------------------

    def initial_states(self, images: torch.Tensor, done_groups: int = 0) -> tuple[State, State]:
        """Quantized and full-precision inputs of group ``done_groups`` for all images."""
        images = images.to(self.device)
        q_state = self._propagate(lambda s: self.adapter.stem(self.model, s[0]), (images,))
        with quant_mode(self.model, QuantMode.FLOAT):
            fp_state = self._propagate(lambda s: self.adapter.stem(self.model, s[0]), (images,))
        for group in self.groups[:done_groups]:
            q_state = self._propagate(lambda s, g=group: self._run_group(g, s), q_state)
            with quant_mode(self.model, QuantMode.FLOAT):
                fp_state = self._propagate(lambda s, g=group: self._run_group(g, s), fp_state)
        return q_state, fp_state

    def reconstruct(self, images: torch.Tensor, done_groups: int = 0) -> list[GroupResult]:
        q_state, fp_state = self.initial_states(images, done_groups)
        results = []
        for index in range(done_groups, len(self.groups)):
            result, q_state, fp_state = self.reconstruct_group(index, q_state, fp_state)
            results.append(result)
            self.callbacks.on_group_end(result)
        if self.cfg.output_tuning_iters:  # after the last group's checkpoint: a resume tunes again
            self.callbacks.on_stage("tune")
            with tf32(self.cfg.tf32 and self.device.type == "cuda"):
                self.output_tuning = tune_outputs(
                    self.model, images, self.cfg, self.device, dist=self.dist,
                    on_progress=lambda done, total: self.callbacks.on_stage_progress("tune", done, total))
        return results

    def _group_mse(self, group: list[Unit], q_in: State, target: torch.Tensor) -> float:
        out = self._propagate(lambda s: self._run_group(group, s), q_in)[-1]
        return float((out.float() - target.float()).pow(2).mean())

    def reconstruct_group(self, index: int, q_in: State, fp_in: State) -> tuple[GroupResult, State, State]:
        with tf32(self.cfg.tf32 and self.device.type == "cuda"):
            return self._reconstruct_group(index, q_in, fp_in)

    def _reconstruct_group(self, index: int, q_in: State, fp_in: State) -> tuple[GroupResult, State, State]:
        cfg = self.cfg
        group = self.groups[index]
        names = [u.name for u in group]
        roots = [m for u in group for m in u.modules]
        layers = quant_layers(roots)
        acts = act_quantizers(roots)
        t0 = time.perf_counter()
        # Reseeding per group makes a resumed run draw the same batches and drop masks.
        torch.manual_seed(cfg.seed * 100_003 + index + self.dist.rng_offset)  # QDrop draws: per rank
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + index)

        with quant_mode(self.model, QuantMode.FLOAT):
            fp_out = self._propagate(lambda s: self._run_group(group, s), fp_in)
        target = fp_out[-1]
        mse_before = self._group_mse(group, q_in, target)  # its float() waits for the device
        self.callbacks.on_group_start(index, names, cfg.iters)
        phases = {"inputs": time.perf_counter() - t0}

        curve: list[tuple[int, float]] = []
        if cfg.iters > 0:
            t1 = time.perf_counter()
            objective, weight = self._group_objective(index, group, q_in, fp_out)
            curve, first_logged = self._optimize(index, group, layers, acts, q_in, fp_in, target, gen, weight,
                                                 objective)
            t2 = time.perf_counter()  # the last iteration's log waited for the device
            phases["first_step"] = first_logged - t1
            phases["steps"] = t2 - first_logged
        t3 = time.perf_counter()

        nearest = [layer.weight_quantizer.nearest_codes(layer.weight) for layer in layers]
        for layer in layers:
            layer.weight_quantizer.finalize(layer.weight)
        self.dist.require_same_state(roots, f"rounding codes and steps after group {index}")
        flipped = sum(
            int((nr != layer.weight_quantizer.w_int.float()).sum()) for nr, layer in zip(nearest, layers, strict=True)
        )
        total = sum(layer.weight.numel() for layer in layers)
        q_out = self._propagate(lambda s: self._run_group(group, s), q_in)  # the next group's input
        mse_after = float((q_out[-1].float() - target.float()).pow(2).mean())
        if not torch.isfinite(torch.tensor(mse_after)):
            raise NumericalError(f"group {index} ({' + '.join(names)}): output MSE is {mse_after}")
        end = time.perf_counter()
        phases["finish"] = end - t3
        result = GroupResult(
            index=index,
            units=names,
            iters=cfg.iters,
            mse_before=mse_before,
            mse_after=mse_after,
            seconds=end - t0,
            loss_curve=curve,
            flipped=flipped / max(total, 1),
            phases={k: round(v, 3) for k, v in phases.items()},
        )
        return result, q_out, fp_out

    def _group_objective(self, index: int, group: list[Unit], q_in: State,
                         fp_out: State) -> tuple[Objective, torch.Tensor | None]:
        """Group ``index``'s objective and the per-sample tensor it takes (Fisher weights, float logits)."""
        if index >= len(self.groups) - self.cfg.kl_groups:
            return self._prediction_objective(index, group, q_in, fp_out)
        if getattr(self.objective, "needs_weights", False):
            return self.objective, self._output_weights(index, fp_out)
        return self.objective, None

    def _prediction_objective(self, index: int, group: list[Unit], q_in: State,
                              fp_out: State) -> tuple[Objective, torch.Tensor]:
        """PredictionAwareMSE for group ``index``: its head is the rest of the network, its data the float logits."""
        if len(fp_out) != 1:
            raise ConfigError(
                f"kl_groups={self.cfg.kl_groups}: group {index} ends inside a block (its output is {len(fp_out)} "
                "tensors); use a plan whose last groups end at block boundaries, or fewer kl_groups"
            )
        rest = [u for g in self.groups[index + 1 :] for u in g]

        def head(out: torch.Tensor) -> torch.Tensor:
            return self.adapter.tail(self.model, self._run_group(rest, (out,)))

        with quant_mode(self.model, QuantMode.FLOAT):
            fp_logits = self._propagate(lambda s: (head(s[-1]).float(),), fp_out)[0]
        n = min(fp_out[0].shape[0], 256)  # the balance is measured on round-to-nearest, as mse_before
        start = self._propagate(lambda s: self._run_group(group, s), _slice(q_in, slice(0, n)))[-1]
        objective = PredictionAwareMSE(head).balanced(start, fp_out[-1][:n], fp_logits[:n], self.cfg.kl_weight)
        return objective, fp_logits

    def _output_weights(self, index: int, fp_out: State) -> torch.Tensor:
        """Per-element weights of group ``index``'s output for a weighted objective (FisherMSE).

        The float model runs from the group's float output to the logits; the weight is the squared
        gradient, with respect to that output, of the cross-entropy against a label sampled from the
        float prediction (seeded), normalised to mean 1 over the calibration set, plus 1.
        """
        rest = [u for g in self.groups[index + 1 :] for u in g]
        gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + index + 7)
        grads = []
        with quant_mode(self.model, QuantMode.FLOAT), torch.enable_grad():
            for sl in self._batches(fp_out[0].shape[0]):
                state = list(_slice(fp_out, sl))
                state[-1] = state[-1].detach().requires_grad_(True)
                logits = self.adapter.tail(self.model, self._run_group(rest, tuple(state))).float()
                labels = torch.multinomial(logits.detach().softmax(-1).cpu(), 1, generator=gen).squeeze(1)
                loss = F.cross_entropy(logits, labels.to(logits.device), reduction="sum")
                (grad,) = torch.autograd.grad(loss, state[-1])
                grads.append(grad.pow(2))
        g2 = torch.cat(grads)
        return 1.0 + g2 / g2.mean().clamp_min(torch.finfo(g2.dtype).tiny)

    def _optimize(self, index, group, layers, acts, q_in, fp_in, target, gen,
                  weight=None, objective=None) -> tuple[list[tuple[int, float]], float]:
        """The group's optimisation; returns its loss curve and when the first iteration was logged."""
        cfg = self.cfg
        for layer in layers:
            layer.weight_quantizer.init_adaround(layer.weight)
        step_params = [q.scale for q in acts if hasattr(q, "scale") and isinstance(q.scale, nn.Parameter)]
        for p in step_params:
            p.requires_grad_(True)
        schedule = Schedule.build(cfg, q_in[0].shape[0], gen, self.device)
        step = GroupStep(
            lambda s: self._run_group(group, s), layers, step_params, q_in, fp_in, target,
            objective or self.objective, schedule, cfg, self.device, weight=weight, dist=self.dist,
        )
        curve: list[tuple[int, float]] = []
        first_logged = 0.0

        def on_log(it: int) -> None:
            nonlocal first_logged
            value = float(step.rec)  # the only host sync, once per log interval
            if value != value or value in (float("inf"), float("-inf")):
                raise NumericalError(
                    f"group {index} ({' + '.join(u.name for u in group)}): loss became {value} at iteration {it}"
                    + (
                        "; it ran under fp16 autocast, whose largest value is 65504: calibrate with autocast 'bf16' "
                        "or 'off' (osq calibrate --autocast)" if cfg.autocast_on(self.device.type) == "fp16" else ""
                    )
                )
            if not curve:
                first_logged = time.perf_counter()
            curve.append((it, value))
            self.callbacks.on_iter(index, it, value)

        cuda = self.device.type == "cuda"
        fused = cfg.compile and cuda and not cfg.compile_group  # compile_group fuses more
        with qdrop(acts, cfg.drop_prob), fused_quantizers(fused, cfg.fused_rng):
            try:
                run_steps(step, cfg.iters, cfg.cuda_graph and cuda, on_log, log_every=max(1, cfg.iters // 100))
            finally:
                step.release()

        for p in step_params:
            p.requires_grad_(False)
            p.grad = None
        set_mode([layer.weight_quantizer for layer in layers], QuantMode.HARD)
        return curve, first_logged


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    out = [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)
