"""The Python API: ``calibrate`` → ``Run.save`` → ``export`` → ``evaluate``.

These are the functions the ``osq`` command line calls; everything it checks (run-directory state,
the original weights, which run an ONNX file came from, checkpoint progress) is checked here, so a
script gets the same answers. Stages meet only through artifacts: a run directory (``run.json`` +
``state.safetensors``) and an ONNX file, never the calibration process' memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, adapter_for
from .config import DEFAULT_METHOD, CalibrationConfig, ConfigError, Method, QuantConfig
from .distributed import DistContext
from .evaluation import EvalResult, OnnxRuntime, ParityReport, TorchRuntime, kl_divergence, parity, write_report
from .evaluation import evaluate as evaluate_runtime
from .load.data import (
    DataError,
    ImageFiles,
    calibration_augment,
    calibration_memory,
    calibration_tensor,
    eval_transform,
)
from .load.demo import ensure_demo_data, ensure_demo_model
from .load.models import (
    DEMO_RECIPE,
    CheckpointError,
    LoadedModel,
    ModelSpec,
    UnknownModelError,
    WeightsUnavailableError,
    check_pretrained_available,
    load_model,
    read_state_dict,
    resolve_recipe,
)
from .onnx_export.onnx_qdq import ExportInfo, export_model, float_export
from .onnx_export.onnx_qdq import input_size as onnx_input_size
from .plan import Plan, build_plan
from .plan.outliers import block_outlier_stats
from .reconstruct import Callbacks, GroupResult, Reconstructor, logits, prepare_model, resolve_device
from .reconstruct.mixing import blend_views
from .run import store
from .run.integrity import check_onnx_for_run, check_onnx_input, onnx_info
from .run.manifest import Manifest, ModelInfo, RunStatus

# Calibration images are drawn from at most this many files of a folder (an even spread), so a
# huge folder is not checked file by file before calibration starts.
MAX_SCANNED_PER_SAMPLE = 8
MIN_SCANNED = 2048
# The demo exists to show the whole chain on a laptop CPU in minutes: fewer iterations (its recipe
# has fewer images).
RECIPE_CALIBRATION: dict[str, dict[str, int]] = {DEMO_RECIPE: {"iters": 100, "output_tuning_iters": 100}}
# Tensors quantization never touches: if the original weights still hold them unchanged, they are
# the weights the run was calibrated from.
_UNTOUCHED = ("pos_embed", "cls_token", "reg_token", "absolute_pos_embed", "relative_position_bias_table")


class PlanCallbacks(Callbacks):
    """Callbacks that also hear the plan before reconstruction starts (and, as every Callbacks, each stage)."""

    def on_plan(self, plan: Plan, resumed_groups: int) -> None: ...


# ------------------------------------------------------------------------------------------ run


@dataclass
class Run:
    """A finished calibration: the fake-quant model and the manifest that describes it."""

    model: nn.Module
    adapter: Adapter
    manifest: Manifest
    run_dir: Path

    @property
    def bits(self) -> tuple[int, int]:
        return self.manifest.bits

    def save(self, path: str | Path) -> Path:
        """Copy the run directory (``run.json``, ``state.safetensors``) to ``path``; returns it.

        A directory already holding a run is refused, so a finished calibration is never overwritten.
        """
        path = Path(path)
        if path.resolve() == self.run_dir.resolve():
            return path
        check_run_dir(path)
        store.check_writable(path)
        with store.run_lock(path):
            shutil.copyfile(self.run_dir / store.STATE, path / store.STATE)
            shutil.copyfile(self.run_dir / store.MANIFEST, path / store.MANIFEST)
        self.run_dir = path
        return path


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild the fake-quant model of a finished run, without the original weights file."""
    run_dir = Path(run_dir)
    manifest = store.read_manifest(run_dir)
    if not manifest.complete:
        raise store.RunError(
            f"{run_dir}: calibration did not finish{checkpoint_progress(run_dir, len(manifest.plan.groups))}"
        )
    try:
        model = ModelSpec(manifest.model.timm_name, manifest.model.kwargs).create()
    except (TypeError, ValueError, RuntimeError) as e:
        raise store.RunError(f"{run_dir}: manifest does not describe a model this osq can build ({e})") from None
    adapter = prepare_model(model, manifest.quant, adapter_for)
    store.load_deployed(run_dir, model, manifest)
    return Run(model.to(device).eval(), adapter, manifest, run_dir)


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse a directory holding a finished run, or locked by a live writer, before any work starts."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise store.RunError(f"{run_dir} is a file, not a run directory")
    if (run_dir / store.LOCK).exists():
        with store.run_lock(run_dir):  # raises RunLockedError while a live process holds it
            pass
    if (run_dir / store.MANIFEST).is_file():
        try:
            complete = store.read_manifest(run_dir).complete
        except store.RunError:
            return  # calibrate reports or overwrites it
        if complete:
            raise store.RunError(f"{run_dir} already holds a finished run; choose another run directory")


def checkpoint_progress(run_dir: str | Path, n_groups: int) -> str:
    """How far an unfinished run got, from its checkpoint, as a clause for messages."""
    done = store.checkpointed_groups(Path(run_dir))
    if done is None:
        return " (no checkpoint)"
    return (
        f" ({done} of {n_groups} groups checkpointed; resume it with the same calibration settings and run directory)"
    )


# -------------------------------------------------------------------------------------- calibrate


def calibration_config(recipe: str, method: Method | str | None = None, **overrides: Any) -> CalibrationConfig:
    """The settings ``osq calibrate`` uses for a model: CalibrationConfig's defaults, then the recipe's
    (its plan and views, the demo's short schedule), then ``method``'s preset (``DEFAULT_METHOD``
    when None), then ``overrides``.

    The preset comes after the recipe so that ``method="paper"`` reproduces the paper's plan and
    views on any model; ``None`` overrides are ignored, so options that were not given keep the rest.
    """
    r = resolve_recipe(recipe)
    plan: dict[str, Any] = {"granularity": r.granularity}
    if r.samples is not None:
        plan["samples"] = r.samples
    cfg = replace(CalibrationConfig(), **plan).with_method(method or DEFAULT_METHOD)
    recipe_schedule = dict(RECIPE_CALIBRATION.get(r.name, {}))
    if not cfg.output_tuning_iters:
        recipe_schedule.pop("output_tuning_iters", None)  # a recipe's schedule never turns output tuning on
    schedule = {**recipe_schedule, **{k: v for k, v in overrides.items() if v is not None}}
    if "output_tuning_iters" in schedule:  # its average keeps its share of the stage, unless a decay is given
        cfg = cfg.with_tuning_steps(schedule.pop("output_tuning_iters"))
    return replace(cfg, **schedule)


def quant_config(w_bits: int, a_bits: int, method: Method | str | None = None, **overrides: Any) -> QuantConfig:
    """The quantizer settings ``osq calibrate`` uses: ``w_bits``/``a_bits`` with ``method``'s
    quantizer choices (``DEFAULT_METHOD``'s when None), then ``overrides`` (None ones ignored).

    The pair to :func:`calibration_config`: a method names both halves, so ``method="paper"``
    keeps the paper's grids while the default rotates the post-GELU inputs.
    """
    cfg = QuantConfig(w_bits=w_bits, a_bits=a_bits).with_method(method or DEFAULT_METHOD)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def calibration_images(
    data: str | Path | ImageFiles,
    model: nn.Module | LoadedModel,
    samples: int = 1024,
    seed: int = 0,
    augment: bool = True,
) -> torch.Tensor:
    """``samples`` images of a folder in the model's own preprocessing, ``[N, 3, H, W]``.

    A folder with fewer images is made up to ``samples`` with seeded random crops and flips of them
    (``augment``); the same arguments always give the same tensor.
    """
    model = model.model if isinstance(model, LoadedModel) else model
    files = data if isinstance(data, ImageFiles) else scan_images(data, samples)
    files.transform = eval_transform(model)
    return calibration_tensor(files, samples, seed, augment=calibration_augment(model) if augment else None)


def scan_images(path: str | Path, samples: int) -> ImageFiles:
    """The images of a calibration folder (an even spread of at most ``8 × samples`` files), checked now."""
    return ImageFiles(Path(path), max_files=max(MIN_SCANNED, MAX_SCANNED_PER_SAMPLE * samples))


@dataclass
class CalibrationInputs:
    """What ``calibrate`` needs from a model name and folders: the model, the images, and where they came from."""

    loaded: LoadedModel
    images: torch.Tensor
    data_info: dict[str, Any]  # recorded in the run: folders, layout, image and view counts

    @property
    def augmented_views(self) -> int:
        return int(self.data_info["augmented_views"])


def check_calibration_inputs(
    model: str, data: str | Path | None, checkpoint: str | Path | None, samples: int = 1024
) -> ImageFiles | None:
    """Refuse a calibration that lacks images or weights, naming everything missing at once and where
    weights were looked for, before any model is built; returns the scanned calibration folder."""
    recipe = resolve_recipe(model)
    problems = []
    files = None
    if data is not None:
        try:
            files = scan_images(data, samples)
        except DataError as e:
            problems.append(str(e))
    elif recipe.name != DEMO_RECIPE:
        problems.append("pass --data DIR (calibration images: a flat folder, class sub-folders or ImageNet file names)")
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            problems.append(f"checkpoint not found: {checkpoint}")
    elif recipe.name != DEMO_RECIPE:
        try:
            check_pretrained_available(recipe.timm_name)
        except WeightsUnavailableError as e:
            problems.append(str(e))
    if problems:
        raise DataError(f"{recipe.name} cannot be calibrated yet: " + "; ".join(problems))
    return files


def calibration_inputs(
    model: str,
    ccfg: CalibrationConfig,
    *,
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    checkpoint: str | Path | None = None,
    augment: bool = True,
) -> CalibrationInputs:
    """Load the model by recipe or timm name and draw its calibration images (the demo brings both).

    Folders are scanned before the (possibly slow) model load, so a bad folder fails fast.
    """
    files = check_calibration_inputs(model, data, checkpoint, ccfg.samples)
    is_demo = resolve_recipe(model).name == DEMO_RECIPE
    if eval_data is not None:
        ImageFiles(Path(eval_data), max_files=1)  # exists and holds images
    if is_demo and checkpoint is None:
        loaded = ensure_demo_model(progress=True)
    else:
        loaded = load_model(model, checkpoint=checkpoint)
    calibration_memory(loaded.model, ccfg.samples, ccfg.batch_size, resolve_device(ccfg.device)).check()
    if files is None:  # the demo: its own train/val split
        paths = ensure_demo_data()
        files, eval_data = ImageFiles(paths.train_dir), eval_data or paths.val_dir
    images = calibration_images(files, loaded.model, ccfg.samples, ccfg.seed, augment=augment)
    n = int(images.shape[0])
    return CalibrationInputs(
        loaded,
        images,
        {
            "calib_dir": str(Path(files.root or data or "").resolve()),
            "calib_layout": files.layout,
            "calib_images": n,
            "calib_files": len(files),
            "augmented_views": n - min(len(files), n),
            "eval_dir": str(Path(eval_data).resolve()) if eval_data is not None else None,
        },
    )


def as_loaded(model: LoadedModel | nn.Module) -> LoadedModel:
    """A timm module as a LoadedModel: its architecture must be rebuildable from its timm name alone.

    A run stores the architecture, not the module, so ``load_run`` can rebuild it; for models built
    with extra kwargs use ``load_model(name, model_kwargs=...)``, which records them.
    """
    if isinstance(model, LoadedModel):
        return model
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        raise UnknownModelError(
            f"{type(model).__name__} is not a timm model (no pretrained_cfg): build it with osqdeploy.load_model"
        )
    spec = ModelSpec(arch, {"num_classes": int(getattr(model, "num_classes", 1000))})
    rebuilt = spec.create().state_dict()
    ours = model.state_dict()
    if rebuilt.keys() != ours.keys() or any(rebuilt[k].shape != ours[k].shape for k in ours):
        raise UnknownModelError(
            f"cannot rebuild this {arch} from its timm name (it was built with other kwargs): pass "
            f"osqdeploy.load_model({arch!r}, model_kwargs=...) instead of the module"
        )
    return LoadedModel(model=model, recipe=resolve_recipe(arch), spec=spec, source={"module": type(model).__name__})


def _fingerprint(loaded: LoadedModel, qcfg: QuantConfig, ccfg: CalibrationConfig, images: torch.Tensor) -> str:
    """Identity of a calibration: a checkpoint may only be resumed by the very same one.

    It covers the settings, the architecture, the float weights' contents and the images' contents,
    so a weights file changed in place is refused like a changed setting.
    """
    cfg = ccfg.to_dict()
    cfg.pop("device", None)
    h = hashlib.sha256(json.dumps([loaded.spec.to_dict(), asdict(qcfg), cfg], sort_keys=True, default=str).encode())
    for name, tensor in sorted(loaded.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def _changed_settings(old: dict, qcfg: QuantConfig, ccfg: CalibrationConfig) -> list[str]:
    """The settings of an interrupted run (its raw manifest) that differ from these, as ``part.key old → new``."""
    changes = []
    for part, values in {"quant": asdict(qcfg), "calibration": ccfg.to_dict()}.items():
        before = old.get(part) if isinstance(old.get(part), dict) else {}
        changes += [
            f"{part}.{key} {before[key]!r} → {value!r}"
            for key, value in values.items()
            if key != "device" and key in before and before[key] != value
        ]
    return changes


class _Checkpointer(Callbacks):
    """Saves a checkpoint delta after each group: the state of the modules that group reconstructed."""

    def __init__(
        self,
        inner: Callbacks,
        run_dir: Path,
        model: nn.Module,
        fingerprint: str,
        prior: list[dict],
        adapter: Adapter,
        plan: Plan,
        write: bool = True,
    ):
        self.inner, self.run_dir, self.model, self.fingerprint = inner, run_dir, model, fingerprint
        self.write = write  # of several ranks, only the first writes
        self.groups = list(prior)
        names = {id(m): n for n, m in model.named_modules()}
        units = {u.name: u for u in adapter.units(model)}
        self.changed = [[names[id(m)] for unit in group for m in units[unit].modules] for group in plan.groups]

    def on_group_start(self, index, units, iters):
        self.inner.on_group_start(index, units, iters)

    def on_iter(self, index, it, loss):
        self.inner.on_iter(index, it, loss)

    def on_stage(self, name):
        self.inner.on_stage(name)

    def on_stage_progress(self, stage, done, total):
        self.inner.on_stage_progress(stage, done, total)

    def on_group_end(self, result: GroupResult) -> None:
        self.groups.append(result.to_dict())
        if self.write:
            store.save_checkpoint(
                self.run_dir,
                self.model,
                result.index + 1,
                self.groups,
                self.fingerprint,
                changed=self.changed[result.index],
            )
        self.inner.on_group_end(result)


def calibrate(
    model: LoadedModel | nn.Module,
    images: torch.Tensor | str | Path,
    quant: QuantConfig | None = None,
    calibration: CalibrationConfig | None = None,
    run_dir: str | Path | None = None,
    *,
    callbacks: Callbacks | None = None,
    resume: bool = True,
    data_info: dict | None = None,
    dist: DistContext | None = None,
) -> Run:
    """Quantize ``model`` by granularity-aware reconstruction; returns the saved :class:`Run`.

    ``model`` is a timm ViT/DeiT/Swin (or what :func:`load_model` returns); ``images`` a float
    tensor ``[N, 3, H, W]`` in the model's preprocessing, or a folder (see :func:`calibration_images`).
    ``quant`` and ``calibration`` None are ``QuantConfig()`` and ``CalibrationConfig()``, the
    paper's method; :func:`quant_config` and :func:`calibration_config` give what ``osq calibrate``
    uses (the default method on the model recipe's plan).
    The model is quantized in place. Every finished group is checkpointed in ``run_dir`` (a fresh
    temporary directory when None; :meth:`Run.save` copies it elsewhere), and a later call with the
    same settings, weights and images continues from the first unfinished group.

    With ``dist`` (several ranks, :mod:`osqdeploy.distributed`) each rank takes its share of every
    batch, gradients are averaged, and only the first rank writes the run directory.
    """
    loaded = as_loaded(model)
    qcfg, ccfg = quant or QuantConfig(), calibration or CalibrationConfig()
    qcfg.validate()
    ccfg.validate()
    if not isinstance(images, torch.Tensor):
        images = calibration_images(images, loaded.model, ccfg.samples, ccfg.seed)
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError("calibration needs a non-empty batch of images [N, 3, H, W]")
    callbacks = callbacks or Callbacks()
    device = resolve_device(ccfg.device)
    dist = dist or DistContext.single(device)
    writer = dist.is_main
    if run_dir is None:
        run_dir = tempfile.mkdtemp(prefix="osq-run-") if writer else ""
        if dist.active:
            run_dir = dist.broadcast_object(str(run_dir))
    run_dir = Path(run_dir)
    if writer:
        check_run_dir(run_dir)
        total, largest = store.run_bytes(loaded.model)
        store.check_writable(run_dir, need_bytes=total, largest_file=largest)
    # the manifest (and a resume's identity) records the precision actually run, not "auto"
    ccfg = replace(ccfg, autocast=ccfg.autocast_on(device.type))
    images = images.float().cpu()
    net = loaded.model.eval()
    fingerprint = _fingerprint(loaded, qcfg, ccfg, images)
    dist.require_same(fingerprint, "calibration images, model and settings")
    images = blend_views(images, ccfg.view_mix, ccfg.seed)  # the views every stage below sees
    stage = callbacks.on_stage

    with store.run_lock(run_dir) if writer else contextlib.nullcontext():
        old = store.read_raw_manifest(run_dir)
        if old.get("status") == RunStatus.COMPLETE.value:
            raise store.RunError(f"{run_dir} already holds a finished run; choose another run directory")
        # before anything is computed or the manifest rewritten: a checkpoint of other settings is refused
        ck = store.read_checkpoint(run_dir, fingerprint, _changed_settings(old, qcfg, ccfg)) if resume else None
        dist.require_same(str(ck.done_groups if ck else None), "checkpoint in the run directory")
        t0 = time.perf_counter()
        stages: dict[str, float] = {}
        stage("prepare")
        net.to(device)
        adapter = adapter_for(net)
        outliers = block_outlier_stats(net, adapter.block_outputs(net), images[: min(len(images), 32)].to(device))
        n_check = min(images.shape[0], 256)
        fp_logits = logits(net, images[:n_check], ccfg.batch_size, device)

        adapter = prepare_model(net, qcfg, adapter_for)
        plan = build_plan(ccfg.granularity, adapter.units(net), ccfg.cross_stage)
        manifest = Manifest(
            status=RunStatus.IN_PROGRESS,
            model=ModelInfo(
                loaded.spec.timm_name,
                loaded.spec.to_dict()["kwargs"],
                loaded.recipe.name if loaded.recipe else None,
                dict(loaded.source),
            ),
            family=adapter.family,
            quant=qcfg,
            calibration=ccfg,
            plan=plan,
            device=str(device),
            data=data_info or {},
            outliers=outliers,
        )
        if writer:
            store.write_manifest(run_dir, manifest)

        prior = ck.groups if ck else []
        if isinstance(callbacks, PlanCallbacks):
            callbacks.on_plan(plan, ck.done_groups if ck else 0)
        checkpointer = _Checkpointer(callbacks, run_dir, net, fingerprint, prior, adapter, plan, write=writer)
        rec = Reconstructor(net, adapter, plan, ccfg, device, checkpointer, dist=dist)
        stages["prepare"] = time.perf_counter() - t0  # outlier probe, float logits, quantized structure
        stage("initialize")
        if ck:
            store.load_checkpoint_state(run_dir, net, ck)
            done = ck.done_groups
        else:
            rec.initialize(images)
            if writer:
                store.save_checkpoint(run_dir, net, 0, [], fingerprint)
            done = 0
        stages["initialize"] = time.perf_counter() - t0 - stages["prepare"]  # or reload the checkpoint
        stage("reconstruct")
        t_rec = time.perf_counter()
        rec.reconstruct(images, done)
        stages["reconstruct"] = time.perf_counter() - t_rec
        tuning = rec.output_tuning.summary() if rec.output_tuning is not None else None
        if tuning is not None:
            stages["tune"] = tuning["seconds"]
            stages["reconstruct"] -= tuning["seconds"]

        stage("check")
        t_check = time.perf_counter()
        q_logits = logits(net, images[:n_check], ccfg.batch_size, device)
        stages["check"] = time.perf_counter() - t_check
        manifest = replace(
            manifest,
            status=RunStatus.COMPLETE,
            groups=checkpointer.groups,
            output_mse=float((q_logits - fp_logits).pow(2).mean()),
            output_top1_agreement=float((q_logits.argmax(1) == fp_logits.argmax(1)).float().mean()),
            output_tuning=tuning,
            seconds=round(time.perf_counter() - t0, 3),
            stage_seconds={k: round(v, 3) for k, v in stages.items()},
            resumed_from_group=done,
        )
        # run.json carries the checksum of its meaning-bearing fields (store.write_manifest); the state
        # file does not, so that the same calibration writes the same bytes whatever its timings
        if writer:
            manifest = replace(manifest, state_sha256=store.save_deployed(run_dir, net))
            store.write_manifest(run_dir, manifest)
            store.clear_checkpoint(run_dir)
    dist.barrier()
    return Run(net, adapter, manifest, run_dir)


# ---------------------------------------------------------------------------------------- export


def export(
    run: Run | str | Path,
    path: str | Path,
    *,
    batch_size: int | None = None,
    verify: bool = True,
    format: str = "qdq",
) -> ExportInfo:
    """Write ``run``'s deployed model as QDQ ONNX: ``format`` "qdq" (integer weights, ≤4-bit ones as
    UINT4: the smallest file) or "ort-int8" (the same grids in uint8/int8 QDQ, which ONNX Runtime's CPU
    provider runs as integer kernels).

    The output location is checked before the export starts; the file appears only once ONNX
    Runtime has loaded and run it.
    """
    path = Path(path)
    store.check_writable(path.parent if path.suffix else path)
    if path.is_dir():
        raise store.OutputError(f"{path} is a directory; name the .onnx file to write")
    loaded = run if isinstance(run, Run) else load_run(run)
    return export_model(loaded, path, batch_size, verify=verify, format=format)


# Float exports of models with more parameters than this are skipped by ``float_onnx_bytes``: the
# size ratio is not worth a minute of tracing.
FLOAT_BASELINE_MAX_PARAMS = 30_000_000


def float_onnx_bytes(run: Run) -> int | None:
    """Size of a plain float ONNX export of the run's architecture (None for large models).

    A float export's size depends on the architecture only, so a freshly built model stands in for
    the original weights, which need not be at hand.
    """
    model = ModelSpec(run.manifest.model.timm_name, run.manifest.model.kwargs).create()
    if sum(p.numel() for p in model.parameters()) > FLOAT_BASELINE_MAX_PARAMS:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return float_export(model, Path(tmp) / "float.onnx")


def onnx_run_sha(path: str | Path) -> str | None:
    """The run checksum ``export`` writes into an ONNX file's metadata (None if absent or unreadable)."""
    try:
        return onnx_info(path).run_state_sha256
    except store.RunError:  # not ONNX at all: the runtime reports it properly later
        return None


# -------------------------------------------------------------------------------------- evaluate


def original_model(manifest: Manifest) -> tuple[nn.Module | None, str]:
    """The float model a run was calibrated from, if its weights are still at hand: (model, "") or (None, why not)."""
    info = manifest.model
    spec = ModelSpec(info.timm_name, info.kwargs)
    path = info.source.get("checkpoint") or info.source.get("demo")
    if path:
        if not Path(path).is_file():
            return None, f"original weights {path} are gone"
        model = spec.create()
        try:
            model.load_state_dict(read_state_dict(path), strict=True)
        except (CheckpointError, RuntimeError) as e:
            return None, f"original weights {path} no longer fit the run's model ({' '.join(str(e).split())[:120]})"
        return model.eval(), ""
    if info.source.get("pretrained"):
        try:  # by timm name, which keeps a pretrained tag (".fb_in1k") the recipe name would drop
            return load_model(spec.timm_name, model_kwargs=spec.kwargs).model, ""
        except (WeightsUnavailableError, UnknownModelError, CheckpointError) as e:
            return None, " ".join(str(e).split())
    return None, "the run was calibrated from weights that were not loaded from a file"


def same_origin(fp32: nn.Module, quantized: nn.Module) -> bool:
    """Whether ``fp32`` is the model ``quantized`` was calibrated from, as far as the tensors
    quantization leaves alone tell (True when there are none to compare)."""
    ours, theirs = fp32.state_dict(), quantized.state_dict()
    keys = [k for k in ours if k.split(".")[-1] in _UNTOUCHED and k in theirs]
    return all(ours[k].shape == theirs[k].shape and torch.equal(ours[k].cpu(), theirs[k].cpu()) for k in keys)


@dataclass
class Noise:
    """Is runtime b's top-1 different from runtime a's beyond what float rounding alone produces?

    Two exact implementations round a few values differently at 4 bits, and a changed arg-max is
    as likely to fix an image as to break one; so among the images exactly one runtime gets right
    (McNemar's test), a split further from even than ~2 standard deviations is a real difference.
    """

    a_only: int  # images a gets right and b wrong
    b_only: int
    limit: float  # the |a_only - b_only| that 2 standard deviations of fair coin flips allow

    @property
    def within(self) -> bool:
        return abs(self.a_only - self.b_only) <= self.limit

    def sentence(self, a: str, b: str, n: int) -> str:
        diff = 100 * (self.b_only - self.a_only) / n
        verdict = "within" if self.within else "beyond"
        return (
            f"{b} vs {a}: top-1 {diff:+.1f} points ({self.a_only} images only {a} gets right, {self.b_only} only "
            f"{b}); {verdict} the noise of float rounding (±{100 * self.limit / n:.1f} points on {n} images)"
        )


def noise(a: EvalResult, b: EvalResult) -> Noise | None:
    if a.top1 is None or b.top1 is None:
        return None
    ra, rb = a.logits.argmax(1) == a.labels, b.logits.argmax(1) == b.labels
    a_only, b_only = int((ra & ~rb).sum()), int((rb & ~ra).sum())
    return Noise(a_only, b_only, 2 * math.sqrt(a_only + b_only))


@dataclass
class EvalReport:
    """Each runtime's accuracy and speed on the same images, their KL to fp32, and ONNX-vs-PyTorch parity."""

    results: dict[str, EvalResult]
    parity: ParityReport | None
    kl_to_fp32: dict[str, float]
    noise: Noise | None
    data: Path
    bits: tuple[int, int] | None
    provider: str | None
    fp32_missing: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return next(iter(self.results.values())).n

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": list(self.bits) if self.bits else None,
            "provider": self.provider,
            "data": str(self.data.resolve()),
            "kl_to_fp32": self.kl_to_fp32,
            "within_noise": self.noise.within if self.noise else None,
            "torch_fp32_unavailable": self.fp32_missing or None,
            **self.extra,
            "results": [r.to_dict() for r in self.results.values()],
            "parity": self.parity.to_dict() if self.parity else None,
        }

    def summary(self) -> str:
        """One line per runtime (top-1, KL to fp32, images/s), then parity and the noise verdict."""
        lines = []
        for name, r in self.results.items():
            kl = self.kl_to_fp32.get(name)
            top1 = "-" if r.top1 is None else f"{r.top1:.2f}%"
            lines.append(
                f"{name:12s} top-1 {top1:>7s}  KL to fp32 {'-' if kl is None else f'{kl:.4f}':>7s}  "
                f"{r.images_per_s:,.0f} images/s"
            )
        if self.parity is not None:
            lines.append(
                f"torch-quant vs onnxruntime: top-1 agreement {self.parity.top1_agreement:.2f}%, "
                f"KL {self.parity.kl_divergence:.4f}"
            )
        if self.noise is not None:
            lines.append(self.noise.sentence("torch-quant", "onnxruntime", self.n))
        return "\n".join(lines)

    def write(self, path: str | Path) -> Path:
        """The report as JSON (atomically), without the logits."""
        extra = {k: v for k, v in self.to_dict().items() if k not in ("results", "parity")}
        return write_report(path, list(self.results.values()), self.parity, extra=extra)


def evaluate(
    run: Run | str | Path | None,
    onnx: str | Path | None = None,
    *,
    data: str | Path | None = None,
    runtime: str = "onnxruntime",
    provider: str = "auto",
    device: str | torch.device = "auto",
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = False,
    dist: DistContext | None = None,
) -> EvalReport:
    """Measure ``runtime`` and every reference at hand on the same labelled images.

    References: torch-fp32 when the original weights are still available and unchanged, torch-quant
    from the run, onnxruntime from the ONNX file. An ONNX file exported from another run than ``run``
    is refused before anything runs. ``data`` defaults to the evaluation folder the run recorded.
    With ``dist`` each rank evaluates a contiguous shard and every rank gets the gathered totals.
    """
    if runtime not in ("onnxruntime", "torch-quant", "torch-fp32"):
        raise ConfigError(f"runtime must be onnxruntime, torch-quant or torch-fp32, got {runtime!r}")
    if runtime == "onnxruntime" and onnx is None:
        raise ConfigError("the onnxruntime runtime needs an ONNX file: export the run first, or use torch-quant")
    if run is None and runtime != "onnxruntime":
        raise ConfigError(f"{runtime} needs the run the ONNX file was exported from")
    dev = dist.device if dist is not None and dist.active else resolve_device(str(device))
    quant = (run if isinstance(run, Run) else load_run(run, dev)) if run is not None else None
    if quant is not None and onnx is not None:
        info = check_onnx_for_run(onnx, quant.manifest.state_sha256)
        check_onnx_input(info, onnx_input_size(quant.model))
    ort_rt = OnnxRuntime(Path(onnx), provider=provider, name="onnxruntime",
                         intra_op_num_threads=torch.get_num_threads()) if onnx is not None else None
    recorded = quant.manifest.data.get("eval_dir") if quant is not None else None
    data = data or recorded
    if data is None:
        why = "the run recorded no evaluation folder" if quant is not None else "no run is known for this ONNX file"
        raise ConfigError(f"no evaluation images: pass --data DIR (labelled images; {why})")
    fp32, fp32_missing = (None, "no run is known for this ONNX file")
    if quant is not None:
        quant.model.to(dev)
        fp32, fp32_missing = original_model(quant.manifest)
        if fp32 is not None and not same_origin(fp32, quant.model):
            fp32, fp32_missing = None, "the original weights changed since calibration (retrained or replaced)"
    if runtime == "torch-fp32" and fp32 is None:
        raise ConfigError(f"torch-fp32 is not available: {fp32_missing}")
    reference = quant.model if quant is not None else fp32
    if reference is None:
        raise ConfigError(f"cannot tell the preprocessing of {onnx}: pass the run it was exported from")
    # With a limit only the images to be evaluated are checked, not a whole 50 000-image folder.
    dataset = ImageFiles(Path(data), transform=eval_transform(reference), max_files=limit)

    runtimes: list[Any] = []
    if fp32 is not None:
        runtimes.append(TorchRuntime(fp32, dev, name="torch-fp32"))
    if quant is not None:
        runtimes.append(TorchRuntime(quant.model, dev, name="torch-quant"))
    if ort_rt is not None:
        runtimes.append(ort_rt)
    results = {
        rt.name: evaluate_runtime(rt, dataset, batch_size=batch_size, progress=progress, limit=limit) for rt in runtimes
    }
    kl = {
        name: kl_divergence(results["torch-fp32"].logits, r.logits)
        for name, r in results.items()
        if "torch-fp32" in results and name != "torch-fp32"
    }
    pair = {"torch-quant", "onnxruntime"} <= set(results)
    return EvalReport(
        results=results,
        parity=parity(results["torch-quant"], results["onnxruntime"]) if pair else None,
        kl_to_fp32=kl,
        noise=noise(results["torch-quant"], results["onnxruntime"]) if pair else None,
        data=Path(data),
        bits=quant.bits if quant is not None else None,
        provider=ort_rt.provider if ort_rt is not None else None,
        fp32_missing=fp32_missing if fp32 is None else "",
        extra={
            "runtime": runtime,
            "device": str(dev),
            "limit": limit,
            "onnx": str(Path(onnx).resolve()) if onnx else None,
            "run": str(quant.run_dir.resolve()) if quant is not None else None,
        },
    )


__all__ = [
    "EvalReport",
    "Noise",
    "PlanCallbacks",
    "Run",
    "calibrate",
    "calibration_config",
    "calibration_images",
    "check_run_dir",
    "checkpoint_progress",
    "evaluate",
    "export",
    "float_onnx_bytes",
    "load_run",
    "onnx_run_sha",
    "original_model",
    "quant_config",
    "same_origin",
    "scan_images",
]
