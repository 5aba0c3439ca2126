"""``analyze``: the paper's evidence for one model or a set of its runs, as PNG figures plus
``analysis.json`` holding every plotted number.

Which figures appear depends on what is given: a model (or a run whose float weights can be
found) and images give the activation ranges; a run gives its reconstruction curves; one run and
labelled images give the sensitivity ranking; several runs of one model give the granularity
comparison. What cannot be drawn is said in ``notes``, never silently dropped.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..api import load_run
from ..evaluation import TorchRuntime, evaluate, kl_divergence
from ..evaluation.sensitivity import SensitivityRow, sensitivity
from ..load import ImageFiles, eval_transform, load_model
from ..load.data import spread_indices
from ..load.models import (
    DEMO_RECIPE,
    CheckpointError,
    ModelSpec,
    WeightsUnavailableError,
    read_state_dict,
    resolve_recipe,
)
from ..run import store
from . import figures
from .activations import DEFAULT_THRESHOLD, activation_ranges

JSON_NAME = "analysis.json"


class AnalysisError(ValueError):
    """Targets or data that cannot be analysed as given."""


@dataclass
class AnalysisResult:
    out_dir: Path
    json_path: Path
    figures: dict[str, Path] = field(default_factory=dict)  # figure key → PNG
    notes: list[str] = field(default_factory=list)  # what was skipped, and why
    numbers: dict = field(default_factory=dict)  # what analysis.json holds


# ----------------------------------------------------------------------------------- the numbers


def _group_label(units: list[str]) -> str:
    return units[0] if len(units) == 1 else f"{units[0]} … {units[-1]}"


def reconstruction_data(manifest: dict) -> dict:
    """Per group: the loss trace ``[[iteration, loss], ...]`` and the output MSE before/after."""
    groups = []
    for g in manifest.get("groups") or []:
        trace = g.get("loss_curve") or g.get("loss_trace") or []
        # a trace of bare losses (no iteration numbers) is spread evenly over the group's iterations
        if trace and not isinstance(trace[0], (list, tuple)):
            step = max(g.get("iters", len(trace)), 1) / len(trace)
            trace = [[round((i + 1) * step), v] for i, v in enumerate(trace)]
        groups.append({
            "index": g["index"], "units": g["units"], "label": _group_label(g["units"]), "iters": g.get("iters"),
            "loss_curve": [[int(it), float(v)] for it, v in trace],
            "mse_before": float(g["mse_before"]), "mse_after": float(g["mse_after"]),
        })
    return {"plan": (manifest.get("plan") or {}).get("spec"), "groups": groups}


def sensitivity_data(rows: list[SensitivityRow]) -> dict:
    return {"baseline": asdict(rows[0]), "rows": [asdict(r) for r in rows[1:]]}


def granularity_data(runs: list[dict], fp32_top1: float | None) -> dict:
    """Runs (``{"run", "plan", "seed", "output_mse", "kl", "top1"}``) grouped by plan, in first-seen order."""
    plans: dict[str, dict] = {}
    for r in runs:
        p = plans.setdefault(r["plan"], {"plan": r["plan"], "runs": [], "output_mse": [], "kl": [], "top1": []})
        p["runs"].append(r["run"])
        for key in ("output_mse", "kl", "top1"):
            if r.get(key) is not None:
                p[key].append(r[key])
    for p in plans.values():
        for key in ("output_mse", "kl", "top1"):
            vals = p[key]
            p[f"{key}_mean"] = statistics.fmean(vals) if vals else None
            p[f"{key}_spread"] = (max(vals) - min(vals)) / 2 if vals else None  # half the min..max range
    return {"fp32_top1": fp32_top1, "runs": runs, "plans": list(plans.values())}


# ------------------------------------------------------------------------------------- the inputs


def _is_run(target: str | Path) -> bool:
    return (Path(target) / store.MANIFEST).is_file()


def _model_name(manifest: dict) -> str:
    model = manifest.get("model") or {}
    timm_name = (model.get("spec") or {}).get("timm_name")
    recipe = model.get("recipe")
    if recipe == DEMO_RECIPE and "demo" not in (model.get("source") or {}):
        return timm_name or recipe  # the demo's architecture name, but not the trained demo
    return recipe or timm_name or "model"


def _bits(manifest: dict) -> str:
    q = manifest.get("quant") or {}
    return f"W{q.get('w_bits')}A{q.get('a_bits')}"


def float_model_of(manifest: dict, checkpoint: str | Path | None = None) -> tuple[nn.Module | None, str | None]:
    """The float model a run was calibrated from, or None and the reason it cannot be rebuilt."""
    model_info = manifest.get("model") or {}
    source = model_info.get("source") or {}
    try:
        spec = ModelSpec.from_dict(model_info.get("spec"))
    except ValueError as e:
        return None, f"the run does not describe its model ({e})"
    path = checkpoint or source.get("checkpoint")
    if path is not None:
        if not Path(path).is_file():
            return None, f"the float weights {path} are not on this machine (pass --checkpoint FILE)"
        model = spec.create()
        try:
            model.load_state_dict(read_state_dict(path), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not fit {spec.timm_name}: {str(e).splitlines()[0]}") from None
        return model.eval(), None
    if "demo" in source:
        from ..load.demo import ensure_demo_model

        return ensure_demo_model(progress=False).model, None
    if "pretrained" in source:
        try:
            return load_model(model_info.get("recipe") or spec.timm_name, model_kwargs=spec.kwargs).model, None
        except WeightsUnavailableError as e:
            return None, str(e)
    return None, "the run's float weights were randomly initialised and not saved (pass --checkpoint FILE)"


def _image_batch(dataset: ImageFiles, n: int) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in spread_indices(len(dataset), n)]).float()


def _default_data(manifests: list[dict], model_name: str | None, checkpoint: str | Path | None) -> Path | None:
    """The run's evaluation folder, else its calibration folder; the held-out digits for the demo model."""
    for m in manifests:
        d = m.get("data") or {}
        for key in ("eval_dir", "calib_dir"):
            if d.get(key) and Path(d[key]).is_dir():
                return Path(d[key])
    if manifests:
        demo = any("demo" in ((m.get("model") or {}).get("source") or {}) for m in manifests)
    else:  # load_model gives the trained demo for its recipe's name when no weights file is named
        demo = model_name is not None and checkpoint is None and resolve_recipe(model_name).name == DEMO_RECIPE
    if demo:
        from ..load.demo import ensure_demo_data

        return ensure_demo_data().val_dir
    return None


# ---------------------------------------------------------------------------------------- analyze


def analyze(
    targets: Sequence[str | Path],
    out_dir: str | Path,
    data: str | Path | None = None,
    checkpoint: str | Path | None = None,
    float_model: nn.Module | None = None,
    images: int = 32,
    limit: int = 256,
    threshold: float = DEFAULT_THRESHOLD,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> AnalysisResult:
    """Write the figures that ``targets`` (one model name, or one or more run directories of one
    model) and ``data`` allow into ``out_dir``, and ``analysis.json`` with their numbers.

    ``images`` images of ``data`` (spread over the folder) feed the activation ranges; ``limit``
    bounds the images evaluated for sensitivity and granularity. ``float_model`` overrides the
    float model found from the model name or the runs (KL and top-1 are measured against it).
    """
    if not targets:
        raise AnalysisError("nothing to analyse: give a model name or one or more run directories")
    runs = [Path(t) for t in targets if _is_run(t)]
    names = [str(t) for t in targets if not _is_run(t)]
    if names and runs:
        raise AnalysisError(f"give either one model or run directories, not both ({names[0]!r} is not a run)")
    if len(names) > 1:
        raise AnalysisError(f"one model at a time, got {', '.join(names)}")
    manifests = [store.read_manifest(r).to_dict() for r in runs]
    specs = {str((m.get("model") or {}).get("spec")) for m in manifests}
    if len(specs) > 1:
        raise AnalysisError("the runs are of different models; a granularity comparison needs runs of one model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = AnalysisResult(out, out / JSON_NAME)
    device = torch.device(device)

    model_name = names[0] if names else _model_name(manifests[0])
    if float_model is None:
        if names:
            float_model = load_model(names[0], checkpoint=checkpoint).model
        else:
            float_model, why = float_model_of(manifests[0], checkpoint)
            if why:
                result.notes.append(f"no float model: {why}; activation ranges, KL and fp32 top-1 skipped")
    if float_model is not None:
        float_model = float_model.eval()
    bits = " / ".join(sorted({_bits(m) for m in manifests})) if manifests else "float"

    data_dir = Path(data) if data is not None else _default_data(manifests, names[0] if names else None, checkpoint)
    dataset = None
    if data_dir is None:
        result.notes.append("no images: pass --data DIR for activation ranges, sensitivity and granularity metrics")
    else:
        shaper = float_model if float_model is not None else load_run(runs[0]).model
        dataset = ImageFiles(data_dir, transform=eval_transform(shaper), max_files=max(limit, images))
    numbers: dict = {"model": model_name, "bits": bits, "runs": [str(r) for r in runs],
                     "data": str(data_dir) if data_dir else None}

    # 1. activation ranges of the float model
    if float_model is not None and dataset is not None:
        x = _image_batch(dataset, images)
        ar = activation_ranges(float_model.to(device), x, threshold=threshold, device=device).to_dict()
        numbers["activation_ranges"] = ar
        result.figures["activation_ranges"] = figures.plot_activation_ranges(
            ar, out / "activation_ranges.png",
            f"{model_name} ({bits}{' runs' if manifests else ''}) — per-channel range of block inputs, "
            f"float model, {ar['n_images']} images",
        )

    # 2. reconstruction per run
    if manifests:
        numbers["reconstruction"] = {}
    for run, m in zip(runs, manifests, strict=True):
        rd = reconstruction_data(m)
        numbers["reconstruction"][str(run)] = rd
        if not rd["groups"]:
            result.notes.append(f"{run}: no finished group recorded; reconstruction figure skipped")
            continue
        key = "reconstruction" if len(runs) == 1 else f"reconstruction-{run.name}"
        iters = {g["iters"] for g in rd["groups"]}
        result.figures[key] = figures.plot_reconstruction(
            rd, out / f"{key}.png",
            f"{model_name} {_bits(m)} — plan {rd['plan']}, {'/'.join(map(str, sorted(iters)))} iterations per group",
        )

    labelled = dataset is not None and dataset.labelled
    # 3. sensitivity of one run
    if len(runs) == 1 and labelled:
        quant = load_run(runs[0], device)
        rows = sensitivity(quant.model, dataset, device, limit=limit, progress=progress)
        sd = sensitivity_data(rows)
        numbers["sensitivity"] = sd
        result.figures["sensitivity"] = figures.plot_sensitivity(
            sd, out / "sensitivity.png",
            f"{model_name} {_bits(manifests[0])} — which activation quantizers cost accuracy",
        )
    elif len(runs) == 1:
        result.notes.append("sensitivity skipped: it needs labelled images (class sub-folders or ImageNet file names)")
    elif not runs:
        result.notes.append("reconstruction and sensitivity need a run directory (osq calibrate writes one)")

    # 4. granularity across runs
    if len(runs) >= 2:
        fp_res = None
        if float_model is not None and dataset is not None:
            fp_res = evaluate(TorchRuntime(float_model, device, "torch-fp32"), dataset, limit=limit, progress=progress)
        elif dataset is None or float_model is None:
            result.notes.append("granularity: KL and top-1 need the float model and images; output MSE only")
        rows = []
        for run, m in zip(runs, manifests, strict=True):
            row = {"run": str(run), "plan": (m.get("plan") or {}).get("spec"), "bits": _bits(m),
                   "seed": (m.get("calibration") or {}).get("seed"), "output_mse": m.get("output_mse"),
                   "kl": None, "top1": None}
            if fp_res is not None:
                q = load_run(run, device)
                q_res = evaluate(TorchRuntime(q.model, device, "torch-quant"), dataset, limit=limit, progress=progress)
                row["kl"] = kl_divergence(fp_res.logits, q_res.logits)
                row["top1"] = q_res.top1
            rows.append(row)
        gd = granularity_data(rows, fp_res.top1 if fp_res is not None else None)
        gd["n_images"] = fp_res.n if fp_res is not None else 0
        numbers["granularity"] = gd
        result.figures["granularity"] = figures.plot_granularity(
            gd, out / "granularity.png",
            f"{model_name} {bits} — reconstruction granularity, {len(runs)} runs"
            + (f", {gd['n_images']} evaluation images" if gd["n_images"] else ""),
        )
    elif len(runs) == 1:
        result.notes.append("granularity comparison needs two or more runs of the model")

    numbers["figures"] = {k: p.name for k, p in result.figures.items()}
    numbers["notes"] = result.notes
    store.atomic_write_json(result.json_path, numbers)
    result.numbers = numbers
    return result


__all__ = [
    "AnalysisError",
    "AnalysisResult",
    "analyze",
    "float_model_of",
    "granularity_data",
    "reconstruction_data",
    "sensitivity_data",
]
