"""Output-level tuning: after block reconstruction, fit the whole quantized model's predictions.

Block reconstruction makes each group's output close to the float one, group by group; what is
measured in the end is the prediction, and errors the groups left behind add up along the
network. This stage runs the finished quantized model end to end on the calibration images and
minimises the KL divergence of its predictions from the float model's, moving only parameters
that are cheap to move and stay what they are in deployment: the activation steps, and with
``CalibrationConfig.output_tuning='steps+affine'`` the LayerNorm gains and biases and the
layers' biases (float in the exported graph), with ``'steps+affine+wscale'`` also the weights'
per-row scales (the exported DequantizeLinear scales). The integer weights are final and untouched.

It runs in fp32 (no autocast: a thousand full-model steps, not 20,000 per group), through the
same ``run_steps`` as the group steps, so on CUDA it replays one captured iteration.

With ``output_tuning_mix`` each step fits a fresh blend of calibration images (mixup or cutmix)
against the float model's prediction on that blend: the stage otherwise fits a thousand fixed
predictions far better than it generalises (docs/results.md, "Accuracy methods"). With
``output_tuning_ema`` it ends on a moving average of the parameters instead of the last step;
with ``output_tuning_crop`` every image is also re-cropped each step, and ``output_tuning_batch``
sets how many images a step fits. ``output_tuning_temperature`` softens both predictions in the
fitted KL (the default's 2), so every logit of an image, not mostly its top ones, is fitted.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ..config import CalibrationConfig
from ..distributed import DistContext
from ..quant.kernels import qdrop
from ..quant.layers import act_quantizers, quant_layers
from ..quant.mode import QuantMode, quant_mode, set_mode
from ..quant.quantizers import ActQuantizer
from .mixing import Crops, Mixing
from .objective import prediction_kl
from .step import Schedule, run_steps


@dataclass
class OutputTuningResult:
    iters: int
    params: str  # CalibrationConfig.output_tuning
    tensors: int  # how many parameter tensors were learned
    kl_before: float  # KL of the predictions from the float model's, on the calibration images
    kl_after: float  # after tuning (the starting values are kept if tuning did not lower it)
    kept: bool  # whether the tuned values were kept
    seconds: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loss_curve"] = [list(p) for p in self.loss_curve]
        return d

    def summary(self) -> dict:
        """The result without its loss curve: what a run's manifest and a benchmark row record."""
        return {k: v for k, v in asdict(self).items() if k != "loss_curve"}


def tuned_parameters(model: nn.Module, which: str, class_bias: bool = True
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(scales, float affine parameters) that output tuning learns for ``which``.

    Scales (activation steps, and weight row scales with ``wscale``) must stay positive; the
    step clamps them. ``class_bias=False`` leaves the classifier's bias (timm's
    ``get_classifier()``) out: it is a prior over classes, which calibration images of a few
    classes could pull toward their own.
    """
    scales = [q.scale for q in act_quantizers([model]) if isinstance(q, ActQuantizer) and q.mode is QuantMode.NEAREST]
    affine: list[torch.Tensor] = []
    if which.startswith("steps+affine"):
        seen: set[int] = set()
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                affine += [p for p in (m.weight, m.bias) if p is not None]
        affine += [layer.bias for layer in quant_layers([model])]
        if not class_bias and hasattr(model, "get_classifier"):
            head = model.get_classifier()
            if getattr(head, "bias", None) is not None:
                seen.add(id(head.bias))
        affine = [p for p in affine if not (id(p) in seen or seen.add(id(p)))]
    if which.endswith("+wscale"):
        # the row scales of finalized integer weights: a buffer, learned like a parameter here
        scales += [layer.weight_quantizer.scale for layer in quant_layers([model])
                   if layer.weight_quantizer.mode is QuantMode.INT]
    return scales, affine


class OutputStep:
    """One Adam step on the KL of a batch of calibration images; host-free, so it can be captured."""

    def __init__(self, model: nn.Module, images: torch.Tensor, fp_logits: torch.Tensor, batches: torch.Tensor,
                 scales: list[torch.Tensor], affine: list[torch.Tensor], cfg: CalibrationConfig,
                 device: torch.device, dist: DistContext, mixing: Mixing | None = None,
                 teacher: nn.Module | None = None, crops: Crops | None = None):
        self.model, self.images, self.fp_logits, self.batches = model, images, fp_logits, batches
        self.mixing, self.crops = mixing, crops
        self.temperature = cfg.output_tuning_temperature
        self.teacher = teacher  # with blends or crops: the float model, run on each step's inputs
        self.dist, self.shard = dist, dist.batch_shard(batches.shape[1])  # data parallel: a shard of each batch
        self.scales = scales  # kept positive after every update
        cuda = device.type == "cuda"
        adam = dict(capturable=cuda, fused=True if cuda and cfg.fused_adam else None)
        # Adam moves a parameter by about its learning rate per step, so each tensor's rate is
        # relative to its own size: activation steps of one model differ by 100x, and one
        # absolute rate would freeze the large ones or throw the small ones about.
        params = scales + affine
        groups = [{"params": [p], "lr": cfg.output_tuning_lr * _size(p)} for p in params]
        self.optimizer = torch.optim.Adam(groups, **adam)
        self.params = [p.detach() for p in params]  # views of the learned tensors, for the average
        self.ema = cfg.output_tuning_ema  # 0: no average kept
        self.average = [p.clone() for p in self.params] if self.ema else []
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.rec = torch.zeros((), device=device)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def body(self) -> None:
        idx = self.batches.index_select(0, self.counter).squeeze(0)[self.shard]
        x = self.images.index_select(0, idx)
        if self.mixing is None and self.crops is None:
            target = self.fp_logits.index_select(0, idx)
        else:
            if self.mixing is not None:
                x = self.mixing.apply(self.images, x, self.counter, self.shard)
            if self.crops is not None:
                x = self.crops.apply(x, self.counter, self.shard)
            with torch.no_grad():
                target = self.teacher(x).float()
        loss = prediction_kl(target, self.model(x), self.temperature)
        loss.backward()
        loss = self.dist.average_gradients([self.optimizer], loss)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_clamp_min_(self.scales, 1e-8)
            if self.average:
                torch._foreach_lerp_(self.average, self.params, 1.0 - self.ema)
            self.counter += 1
            self.rec.copy_(loss.detach())

    def eager(self) -> None:
        self.zero_grad()
        self.body()


def _size(p: torch.Tensor) -> float:
    """A tensor's typical magnitude: its mean absolute value (a tiny floor for an all-zero bias)."""
    return max(float(p.detach().abs().mean()), 1e-6)


@torch.no_grad()
def _kl(model: nn.Module, images: torch.Tensor, fp_logits: torch.Tensor, batch: int) -> float:
    n = images.shape[0]
    total = sum(float(prediction_kl(fp_logits[i : i + batch], model(images[i : i + batch]))) * min(batch, n - i)
                for i in range(0, n, batch))
    return total / n


def tune_outputs(model: nn.Module, images: torch.Tensor, cfg: CalibrationConfig, device: torch.device,
                 reference: nn.Module | None = None, dist: DistContext | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> OutputTuningResult:
    """Run ``cfg.output_tuning_iters`` steps of output-level tuning on ``model`` (finished groups), in place.

    ``reference`` is the float model whose predictions are fitted; by default ``model`` itself with
    quantization disabled, which needs its float weights (a model rebuilt from a saved run has
    integers only: pass the float model). Batches are drawn from a generator seeded by
    ``cfg.seed``, so a calibration repeats exactly on the same device. If the tuned model's KL on
    the calibration images is not below the starting one (or is not finite), the starting values
    are restored: the stage never leaves the model further from the float predictions on the
    data it saw. Every parameter of ``model`` is left frozen (``requires_grad=False``). Under data
    parallelism (``dist``) each rank takes its shard of every batch and the gradients are averaged,
    so all ranks make the same updates, as in the group steps.
    """
    dist = dist or DistContext.single(device)
    t0 = time.perf_counter()
    model.eval().requires_grad_(False)
    images = images.to(device, torch.float32)
    bs = min(cfg.batch_size, images.shape[0])
    with torch.no_grad(), (quant_mode(model, QuantMode.FLOAT) if reference is None else contextlib.nullcontext()):
        ref = model if reference is None else reference.eval().to(device)
        fp_logits = torch.cat([ref(images[i : i + bs]).float() for i in range(0, images.shape[0], bs)])
    scales, affine = tuned_parameters(model, cfg.output_tuning, cfg.output_tuning_class_bias)
    params = scales + affine
    start = [p.detach().clone() for p in params]
    kl_before = _kl(model, images, fp_logits, bs)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + 99_991)
    schedule = replace(cfg, iters=cfg.output_tuning_iters, batch_size=cfg.output_tuning_batch or cfg.batch_size)
    batches = Schedule.build(schedule, images.shape[0], gen, device).batches
    mixing = crops = teacher = None
    if cfg.output_tuning_mix != "none":
        mixing = Mixing.build(cfg.output_tuning_mix, cfg.output_tuning_iters, batches.shape[1], images.shape[0],
                              tuple(images.shape[-2:]), gen, device)
    if cfg.output_tuning_crop:  # drawn after the blends, so adding crops leaves those draws as they were
        crops = Crops.build(cfg.output_tuning_crop, cfg.output_tuning_iters, batches.shape[1], gen, device)
    if mixing is not None or crops is not None:
        # the float model apart from the one being tuned: its LayerNorms and biases move
        teacher = reference if reference is not None else copy.deepcopy(model)
        if reference is None:
            set_mode(teacher, QuantMode.FLOAT)
    for p in params:
        p.requires_grad_(True)
    step = OutputStep(model, images, fp_logits, batches, scales, affine, cfg, device, dist, mixing, teacher, crops)
    curve: list[tuple[int, float]] = []
    iters = cfg.output_tuning_iters

    def on_log(it: int) -> None:  # at logged steps only: reading the loss waits for the device
        curve.append((it, float(step.rec)))
        if on_progress is not None:
            on_progress(it + 1, iters)

    log_every = max(1, iters // 50)
    graph = cfg.cuda_graph and device.type == "cuda"
    # The quantizers run their eager arithmetic, not fused_quantizers' compiled kernels: replayed
    # in a graph, their extra kernels cost microseconds a step, where compiling each quantizer's
    # fp32 variants afresh would cost more seconds than the whole stage.
    try:
        # QDrop for the steps only, none at 0 (the copied teacher runs in float; the KL checks after it, without)
        with qdrop(act_quantizers([model]), cfg.output_tuning_drop):
            try:
                run_steps(step, iters, graph, on_log, log_every)
            except RuntimeError as e:
                if not graph:
                    raise
                # a model whose forward cannot be captured still tunes, eagerly, from where it stopped
                warnings.warn(f"output tuning could not be captured as a CUDA graph ({e}); continuing eagerly",
                              RuntimeWarning, stacklevel=2)
                for it in range(int(step.counter), iters):
                    step.eager()
                    if it % log_every == 0 or it == iters - 1:
                        on_log(it)
    finally:
        step.zero_grad()
        for p in params:
            p.requires_grad_(False)
    if step.average:
        with torch.no_grad():
            torch._foreach_copy_(params, step.average)
    kl_after = _kl(model, images, fp_logits, bs)
    kept = kl_after == kl_after and kl_after < kl_before
    if not kept:
        with torch.no_grad():
            torch._foreach_copy_(params, start)
        kl_after = kl_before
    return OutputTuningResult(
        iters=iters, params=cfg.output_tuning, tensors=len(params), kl_before=kl_before, kl_after=kl_after,
        kept=kept, seconds=round(time.perf_counter() - t0, 3), loss_curve=curve,
    )
