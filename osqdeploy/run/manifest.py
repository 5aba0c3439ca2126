"""The run manifest (``run.json``): one typed record, read and written only here.

Every field read from disk is checked by type and range before anything uses it, so a damaged or
hand-edited manifest is refused with one line naming the field, never a ``KeyError`` deep in
export. Runs of another format version are refused with the version they need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import CalibrationConfig, ConfigError, QuantConfig
from ..plan import Plan

RUN_FORMAT = "osqdeploy-run"
# 2: typed manifest (quant/calibration configs and plan validated on read).
RUN_FORMAT_VERSION = 2
MANIFEST = "run.json"
# Config fields added within this format version, with the value every run recorded before them
# computed with: a record without one reads as that value and is sealed as recorded, without it,
# so older runs stay valid while an edit of any field they did record is still caught.
LATER_FIELDS: dict[str, dict[str, Any]] = {
    "quant": {"attn_grid": "log", "post_gelu_grid": "tensor"},
    "calibration": {"kl_groups": 0, "kl_weight": 1.0, "output_tuning": "steps", "output_tuning_iters": 0,
                    "output_tuning_lr": 1e-3,
                    "overlap_allreduce": False, "shard_rounding": False, "output_tuning_mix": "none",
                    "view_mix": "none", "output_tuning_drop": 0.0,
                    "output_tuning_ema": 0.0, "output_tuning_batch": 0, "output_tuning_crop": 0.0,
                    "pad_attention": False, "output_tuning_class_bias": True,
                    "output_tuning_temperature": 1.0},
}


class RunError(ValueError):
    """A run directory that cannot be used (missing, corrupt, unfinished, other version)."""


class ManifestError(RunError):
    """``run.json`` is missing, unreadable, of another version, or has a field of the wrong type."""


class RunStatus(str, Enum):
    IN_PROGRESS = "in_progress"
    COMPLETE = "complete"


@dataclass
class ModelInfo:
    """The architecture (timm name and kwargs) and where its float weights came from."""

    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    # JSON-able: {"checkpoint": path, "sha256": ...} | {"pretrained": "timm"} | {"demo": path} | {"random_init": True}
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "spec": {"timm_name": self.timm_name, "kwargs": self.kwargs},
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: Any) -> ModelInfo:
        d = _expect(d, dict, "model")
        spec = _expect(d.get("spec"), dict, "model.spec")
        return cls(
            timm_name=_expect(spec.get("timm_name"), str, "model.spec.timm_name"),
            kwargs=_expect(spec.get("kwargs", {}), dict, "model.spec.kwargs"),
            recipe=_expect(d.get("recipe"), (str, type(None)), "model.recipe"),
            source=_expect(d.get("source") or {}, dict, "model.source"),
        )


# The numbers a group record must carry, with the range each may take.
_GROUP_NUMBERS = {
    "index": (0, None),
    "iters": (0, None),
    "mse_before": (0.0, None),
    "mse_after": (0.0, None),
    "seconds": (0.0, None),
}


@dataclass
class Manifest:
    """What a run is: model, settings, plan, results, and the checksum of its state file."""

    status: RunStatus
    model: ModelInfo
    family: str
    quant: QuantConfig
    calibration: CalibrationConfig
    plan: Plan
    device: str
    data: dict[str, Any] = field(default_factory=dict)
    outliers: list[dict[str, Any]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)  # GroupResult.to_dict() per finished group
    output_mse: float | None = None
    output_top1_agreement: float | None = None
    output_tuning: dict[str, Any] | None = None  # OutputTuningResult.summary(), if the method tuned
    seconds: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    resumed_from_group: int = 0
    state_sha256: str | None = None
    osq_version: str = __version__

    @property
    def bits(self) -> tuple[int, int]:
        return self.quant.w_bits, self.quant.a_bits

    @property
    def complete(self) -> bool:
        return self.status is RunStatus.COMPLETE

    def phase_totals(self) -> dict[str, float]:
        """Seconds per reconstruction phase (``GroupResult.phases``) summed over the groups."""
        totals: dict[str, float] = {}
        for group in self.groups:
            for phase, seconds in (group.get("phases") or {}).items():
                totals[phase] = totals.get(phase, 0.0) + float(seconds)
        return totals

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, (ModelInfo, Plan)):
                value = value.to_dict()
            elif isinstance(value, (QuantConfig, CalibrationConfig)):
                value = _config_dict(value)
            d[f.name] = value
        return d

    @classmethod
    def from_dict(cls, d: Any, origin: str = MANIFEST) -> Manifest:
        """Parse and validate; raises ManifestError naming ``origin`` and the bad field."""
        try:
            return cls._parse(d)
        except (ManifestError, ConfigError) as e:
            raise ManifestError(f"{origin}: {e}") from None

    @classmethod
    def _parse(cls, d: Any) -> Manifest:
        d = _expect(d, dict, "manifest")
        if d.get("format") != RUN_FORMAT:
            raise ManifestError("not an osqdeploy run manifest")
        version = d.get("format_version")
        if version != RUN_FORMAT_VERSION:
            raise ManifestError(
                f"run format version {version!r} (osq {d.get('osq_version', '?')}); this osq ({__version__}) reads "
                f"version {RUN_FORMAT_VERSION}: re-run `osq calibrate` to recreate the run"
            )
        try:
            status = RunStatus(d.get("status"))
        except ValueError:
            raise ManifestError(f"status {d.get('status')!r} is not one of {[s.value for s in RunStatus]}") from None
        plan_d = _expect(d.get("plan"), dict, "plan")
        groups_spec = _expect(plan_d.get("groups"), list, "plan.groups")
        if not all(isinstance(g, list) and all(isinstance(u, str) for u in g) for g in groups_spec):
            raise ManifestError("plan.groups must be lists of unit names")
        plan = Plan(
            spec=_expect(plan_d.get("spec"), str, "plan.spec"),
            groups=[list(g) for g in groups_spec],
            cross_stage=_expect(plan_d.get("cross_stage", False), bool, "plan.cross_stage"),
        )
        groups = _expect(d.get("groups", []), list, "groups")
        for i, g in enumerate(groups):
            _expect(g, dict, f"groups[{i}]")
            for key, (lo, _) in _GROUP_NUMBERS.items():
                value = _number(g.get(key), f"groups[{i}].{key}", integer=isinstance(lo, int))
                if value < lo:
                    raise ManifestError(f"groups[{i}].{key} must be ≥ {lo}, got {value}")
        m = cls(
            status=status,
            model=ModelInfo.from_dict(d.get("model")),
            family=_expect(d.get("family"), str, "family"),
            quant=_config(QuantConfig, d.get("quant"), "quant"),
            calibration=_config(CalibrationConfig, d.get("calibration"), "calibration"),
            plan=plan,
            device=_expect(d.get("device"), str, "device"),
            data=_expect(d.get("data") or {}, dict, "data"),
            outliers=_expect(d.get("outliers") or [], list, "outliers"),
            groups=groups,
            output_mse=_optional_number(d.get("output_mse"), "output_mse"),
            output_top1_agreement=_optional_number(d.get("output_top1_agreement"), "output_top1_agreement"),
            output_tuning=_expect(d.get("output_tuning"), (dict, type(None)), "output_tuning"),
            seconds=_optional_number(d.get("seconds"), "seconds"),
            stage_seconds=_expect(d.get("stage_seconds") or {}, dict, "stage_seconds"),
            resumed_from_group=int(_number(d.get("resumed_from_group", 0), "resumed_from_group", integer=True)),
            state_sha256=_expect(d.get("state_sha256"), (str, type(None)), "state_sha256"),
            osq_version=_expect(d.get("osq_version", "?"), str, "osq_version"),
        )
        if len(m.groups) > len(m.plan.groups):
            raise ManifestError(f"{len(m.groups)} group results for a plan of {len(m.plan.groups)} groups")
        if m.complete and (m.state_sha256 is None or len(m.groups) != len(m.plan.groups)):
            raise ManifestError("marked complete but lacks the state checksum or a result for every group")
        problem = _details_problem(m)
        if problem:
            raise ManifestError(problem)
        return m


def read(run_dir: str | Path) -> Manifest:
    """The manifest of ``run_dir``; ManifestError (one line) when it cannot be used."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not run_dir.is_dir():
        raise ManifestError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise ManifestError(f"{run_dir}: not a run directory (no {MANIFEST})")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: unreadable ({e.strerror or e})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"{path}: corrupt manifest ({e})") from None
    return Manifest.from_dict(data, origin=str(path))


# --- validation helpers ------------------------------------------------------------------------------


def _expect(value: Any, types: type | tuple[type, ...], name: str) -> Any:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        wanted = " or ".join(t.__name__ for t in _as_tuple(types))
        raise ManifestError(f"{name} must be {wanted}, got {type(value).__name__}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _number(value: Any, name: str, integer: bool = False) -> float:
    types = (int,) if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, types)
        or value != value
        or value in (float("inf"), -float("inf"))
    ):
        raise ManifestError(f"{name} must be a finite {'integer' if integer else 'number'}, got {value!r}")
    return value


def _optional_number(value: Any, name: str) -> float | None:
    return None if value is None else float(_number(value, name))


def _config_dict(cfg: QuantConfig | CalibrationConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def _config(cls: type, d: Any, name: str) -> Any:
    """A config dataclass from its recorded fields, each checked against the default's type, then validated."""
    d = _expect(d, dict, name)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ManifestError(f"{name} has unknown fields {unknown}")
    default = cls()
    values = {}
    for key, value in d.items():
        expected = type(getattr(default, key))
        ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise ManifestError(f"{name}.{key} must be {expected.__name__}, got {value!r}")
        values[key] = value
    for key, value in LATER_FIELDS.get(name, {}).items():  # absent: what runs did before the field
        values.setdefault(key, value)
    cfg = cls(**values)
    cfg.validate()
    return cfg


# --- the records inside a manifest, field by field ---------------------------------------------------


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_GROUP_FIELDS = {"index", "units", "iters", "mse_before", "mse_after", "seconds", "loss_curve", "flipped", "phases"}


def group_record_problem(group: object, position: int) -> str | None:
    """What is wrong with one group's record (``GroupResult.to_dict``) at ``position``, or None."""
    if not isinstance(group, dict):
        return f"group {position} is not a record"
    unknown = sorted(set(group) - _GROUP_FIELDS, key=str)
    missing = sorted({"index", "units", "iters", "mse_before", "mse_after", "seconds"} - set(group))
    if unknown or missing:
        return f"group {position} record has unknown fields {unknown} or lacks {missing}"
    if type(group["index"]) is not int or group["index"] != position:
        return f"group {position} record says index {group['index']!r}"
    if not isinstance(group["units"], list) or not all(isinstance(u, str) for u in group["units"]):
        return f"group {position} units are not a list of names"
    if type(group["iters"]) is not int or group["iters"] < 0:
        return f"group {position} iterations {group['iters']!r} are not a count"
    if not all(_is_number(group.get(k, 0.0)) for k in ("mse_before", "mse_after", "seconds", "flipped")):
        return f"group {position} losses, seconds or flipped fraction are not numbers"
    curve = group.get("loss_curve", [])
    if not isinstance(curve, list) or not all(
        isinstance(p, list) and len(p) == 2 and type(p[0]) is int and _is_number(p[1]) for p in curve
    ):
        return f"group {position} loss curve is not a list of [iteration, loss]"
    phases = group.get("phases", {})
    if not isinstance(phases, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in phases.items()):
        return f"group {position} phases are not seconds by name"
    return None


def _details_problem(m: Manifest) -> str | None:
    """What is wrong inside the free-form records (groups, timings, outliers, data, weight source), or None.

    Each is read by a report or a later stage: a string where a number is formatted, or a number
    where a path is opened, would end there as a traceback.
    """
    for i, group in enumerate(m.groups):
        problem = group_record_problem(group, i)
        if problem:
            return problem
    if not all(isinstance(k, str) and _is_number(v) for k, v in m.stage_seconds.items()):
        return "stage_seconds must map stage names to seconds"
    for i, s in enumerate(m.outliers):
        if not (
            isinstance(s, dict) and type(s.get("block")) is int
            and isinstance(s.get("channels"), list) and all(type(c) is int for c in s["channels"])
            and isinstance(s.get("max"), list) and all(_is_number(v) for v in s["max"])
            and _is_number(s.get("ratio_to_median"))
        ):
            return f"outliers[{i}] must have a block, channels, max values and a ratio to the median"
    for key in ("calib_dir", "eval_dir"):
        if m.data.get(key) is not None and not isinstance(m.data[key], str):
            return f"data.{key} must be a path"
    source = m.model.source
    for key in ("checkpoint", "demo", "sha256", "pretrained"):
        if key in source and not isinstance(source[key], str):
            return f"model.source.{key} must be a string"
    if "bytes" in source and not (type(source["bytes"]) is int and source["bytes"] >= 0):
        return "model.source.bytes must be a count"
    tuning = m.output_tuning
    if tuning is not None and not all(_is_number(tuning.get(k)) for k in ("iters", "kl_before", "kl_after", "seconds")):
        return "output_tuning must record iters, kl_before, kl_after and seconds as numbers"
    if m.output_mse is not None and m.output_mse < 0:
        return f"output_mse must be ≥ 0, got {m.output_mse}"
    if m.output_top1_agreement is not None and not 0.0 <= m.output_top1_agreement <= 1.0:
        return f"output_top1_agreement must be in [0, 1], got {m.output_top1_agreement}"
    return None
