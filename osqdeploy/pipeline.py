"""The stages as library calls: ``calibrate`` (load → plan → reconstruct → save run),
``load_run`` (run → fake-quant model). Export and evaluation live in their own packages and take
only a run directory or an ONNX file, never in-memory calibration state.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .adapters import Adapter, adapter_for
from .config import CalibrationConfig, QuantConfig
from .plan import Plan, build_plan
from .plan.outliers import block_outlier_stats
from .reconstruct import Callbacks, GroupResult, Reconstructor, logits, prepare_model, resolve_device
from .run import store

if TYPE_CHECKING:
    from .load.models import LoadedModel


class PlanCallbacks(Callbacks):
    """Callbacks that also hear the plan before reconstruction starts."""

    def on_plan(self, plan: Plan, resumed_groups: int) -> None: ...


def _fingerprint(spec: dict, source: dict, qcfg: QuantConfig, ccfg: CalibrationConfig, images: torch.Tensor) -> str:
    """Identity of a calibration: a checkpoint may only be resumed by the very same one."""
    cfg = ccfg.to_dict()
    cfg.pop("device", None)
    h = hashlib.sha256(json.dumps([spec, source, asdict(qcfg), cfg], sort_keys=True, default=str).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def _changed_settings(old_manifest: dict, qcfg: QuantConfig, ccfg: CalibrationConfig) -> list[str]:
    """The settings of an interrupted run (its manifest) that differ from these, as ``part.key old → new``."""
    changes = []
    for part, values in {"quant": asdict(qcfg), "calibration": ccfg.to_dict()}.items():
        before = old_manifest.get(part) or {}
        changes += [f"{part}.{key} {before[key]!r} → {value!r}" for key, value in values.items()
                    if key != "device" and key in before and before[key] != value]
    return changes


class _Checkpointer(Callbacks):
    """Saves a checkpoint delta after each group: the state of the modules that group reconstructed."""

    def __init__(self, inner: Callbacks, run_dir: Path, model: nn.Module, fingerprint: str, prior: list[dict],
                 adapter: Adapter, plan: Plan):
        self.inner, self.run_dir, self.model, self.fingerprint = inner, run_dir, model, fingerprint
        self.groups = list(prior)
        names = {id(m): n for n, m in model.named_modules()}
        units = {u.name: u for u in adapter.units(model)}
        self.changed = [[names[id(m)] for unit in group for m in units[unit].modules] for group in plan.groups]

    def on_group_start(self, index, units, iters):
        self.inner.on_group_start(index, units, iters)

    def on_iter(self, index, it, loss):
        self.inner.on_iter(index, it, loss)

    def on_group_end(self, result: GroupResult) -> None:
        self.groups.append(result.to_dict())
        store.save_checkpoint(self.run_dir, self.model, result.index + 1, self.groups, self.fingerprint,
                              changed=self.changed[result.index])
        self.inner.on_group_end(result)


def calibrate(
    loaded: LoadedModel,
    images: torch.Tensor,
    qcfg: QuantConfig,
    ccfg: CalibrationConfig,
    run_dir: str | Path,
    callbacks: Callbacks | None = None,
    resume: bool = True,
    data_info: dict | None = None,
) -> dict:
    """Quantize ``loaded.model`` by granularity-aware reconstruction and save a run directory.

    The model is modified in place. Every finished group is checkpointed inside the run, and a
    later call with the same settings and images continues from the first unfinished group.
    Returns the manifest written to ``run.json``.
    """
    qcfg.validate()
    ccfg.validate()
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError("calibration needs a non-empty batch of images [N, 3, H, W]")
    callbacks = callbacks or Callbacks()
    run_dir = Path(run_dir)
    device = resolve_device(ccfg.device)
    # the manifest (and a resume's identity) records the precision actually run, not "auto"
    ccfg = replace(ccfg, autocast=ccfg.autocast_on(device.type))
    images = images.float().cpu()
    model = loaded.model.eval()
    spec, source = loaded.spec.to_dict(), dict(loaded.source)
    fingerprint = _fingerprint(spec, source, qcfg, ccfg, images)

    with store.run_lock(run_dir):
        old: dict = {}
        if (run_dir / store.MANIFEST).is_file():
            try:
                old = json.loads((run_dir / store.MANIFEST).read_text())
            except ValueError:
                old = {}
            if old.get("status") == "complete":
                raise store.RunError(f"{run_dir} already holds a finished run; choose another --run-dir")
        # before anything is computed or the manifest rewritten: a checkpoint of other settings is refused
        ck = store.read_checkpoint(run_dir, fingerprint, _changed_settings(old, qcfg, ccfg)) if resume else None
        t0 = time.perf_counter()
        stages: dict[str, float] = {}
        model.to(device)
        adapter = adapter_for(model)
        n_probe = min(images.shape[0], 32)
        outliers = block_outlier_stats(model, adapter.block_outputs(model), images[:n_probe].to(device))
        n_check = min(images.shape[0], 256)
        fp_logits = logits(model, images[:n_check], ccfg.batch_size, device)

        adapter = prepare_model(model, qcfg, adapter_for)
        plan = build_plan(ccfg.granularity, adapter.units(model), ccfg.cross_stage)
        manifest = store.new_manifest(
            status="in_progress",
            model={"recipe": loaded.recipe.name if loaded.recipe else None, "spec": spec, "source": source},
            family=adapter.family,
            quant=asdict(qcfg),
            calibration=ccfg.to_dict(),
            plan=plan.to_dict(),
            data=data_info or {},
            device=str(device),
            outliers=outliers,
        )
        store.atomic_write_json(run_dir / store.MANIFEST, manifest)

        prior = ck.groups if ck else []
        if isinstance(callbacks, PlanCallbacks):
            callbacks.on_plan(plan, ck.done_groups if ck else 0)
        checkpointer = _Checkpointer(callbacks, run_dir, model, fingerprint, prior, adapter, plan)
        rec = Reconstructor(model, adapter, plan, ccfg, device, checkpointer)
        stages["prepare"] = time.perf_counter() - t0  # outlier probe, float logits, quantized structure
        if ck:
            store.load_checkpoint_state(run_dir, model, ck)
            done = ck.done_groups
        else:
            rec.initialize(images)
            store.save_checkpoint(run_dir, model, 0, [], fingerprint)
            done = 0
        stages["initialize"] = time.perf_counter() - t0 - stages["prepare"]  # or reload the checkpoint
        t_rec = time.perf_counter()
        rec.reconstruct(images, done)
        stages["reconstruct"] = time.perf_counter() - t_rec

        t_check = time.perf_counter()
        q_logits = logits(model, images[:n_check], ccfg.batch_size, device)
        stages["check"] = time.perf_counter() - t_check
        manifest.update(
            status="complete",
            groups=checkpointer.groups,
            output_mse=float((q_logits - fp_logits).pow(2).mean()),
            output_top1_agreement=float((q_logits.argmax(1) == fp_logits.argmax(1)).float().mean()),
            seconds=round(time.perf_counter() - t0, 3),
            stage_seconds={k: round(v, 3) for k, v in stages.items()},
            resumed_from_group=done,
        )
        manifest["state_sha256"] = store.save_deployed(run_dir, model)
        store.atomic_write_json(run_dir / store.MANIFEST, manifest)
        store.clear_checkpoint(run_dir)
    return manifest


@dataclass
class LoadedRun:
    model: nn.Module
    adapter: Adapter
    manifest: dict
    run_dir: Path

    @property
    def bits(self) -> tuple[int, int]:
        return self.manifest["quant"]["w_bits"], self.manifest["quant"]["a_bits"]


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the fake-quant model of a finished run, without the original weights file."""
    run_dir = Path(run_dir)
    manifest = store.read_manifest(run_dir)
    if manifest.get("status") != "complete":
        raise store.RunError(
            f"{run_dir}: calibration did not finish (status {manifest.get('status')!r}); "
            "resume it with `osq calibrate ... --run-dir` on the same directory"
        )
    from .load.models import ModelSpec

    try:
        model = ModelSpec.from_dict(manifest["model"]["spec"]).create()
        qcfg = QuantConfig(**manifest["quant"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise store.RunError(f"{run_dir}: manifest does not describe a model this osq can build ({e})") from None
    adapter = prepare_model(model, qcfg, adapter_for)
    store.load_deployed(run_dir, model, manifest)
    return LoadedRun(model.to(device).eval(), adapter, manifest, run_dir)
