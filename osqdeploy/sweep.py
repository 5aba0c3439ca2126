"""Sweeps: models × bit-widths × plans × seeds, each an independent calibrate → export → eval job.

A sweep is described by a small TOML file (or the same fields as options)::

    models = ["deit_tiny"]          # recipe, alias or timm names
    bits = ["W4A4", "W6A6"]
    plans = ["recipe", "blocks:1"]  # granularity specs; "recipe" (default): the model recipe's
    seeds = [0, 1, 2]
    method = "output_tuned"         # a named method for every job (default: osq calibrate's)
    data = "calib/"                 # calibration images (default: the demo's)
    eval_data = "val/"              # labelled evaluation images (default: the demo's)
    [calibration]                   # CalibrationConfig fields shared by every job
    iters = 20000
    [eval]
    limit = 500

Jobs run one per rank at a time (one rank per GPU, on every node of a ``torchrun`` job, or in
turn in a single process), each rank taking the next unclaimed job from a counter in the process
group's store, so a long job does not hold up the others' queue. A job is finished when its
``result.json`` exists: a rerun of the sweep skips it and redoes only the others (an interrupted
job resumes its calibration from its checkpoint). Rank 0 writes the comparison table as
``sweep.json`` and ``sweep.csv``; the terminal table is :func:`format_table`.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import re
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field, fields
from itertools import product
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .config import DEFAULT_METHOD, CalibrationConfig, ConfigError, Method, QuantConfig
from .distributed import DistContext
from .run.store import atomic_write_bytes

__all__ = ["Job", "SweepError", "SweepSpec", "format_table", "job_config", "run_sweep", "run_job"]

RESULT = "result.json"
RECIPE_PLAN = "recipe"  # a sweep's plan that means "the model recipe's granularity", as osq calibrate uses it
FAILED = "failed.json"
# the comparison table's columns, in order (JSON keys of a job's result)
COLUMNS = ("job", "model", "bits", "plan", "seed", "top1", "top1_fp32", "kl_to_fp32", "ort_top1_agreement",
           "ort_max_abs_logit_diff", "onnx_mib", "minutes", "status")


class SweepError(ValueError):
    """A sweep description osq cannot run."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def parse_bits(text: str | list | tuple) -> tuple[int, int]:
    """``"W4A4"``, ``"4,4"`` or ``[4, 4]`` → (4, 4)."""
    if isinstance(text, (list, tuple)) and len(text) == 2:
        return int(text[0]), int(text[1])
    m = re.fullmatch(r"\s*[wW]?(\d)\s*[aA,/ ]\s*(\d)\s*", str(text))
    if not m:
        raise SweepError(f"bit-widths must look like W4A4 or 4,4; got {text!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class Job:
    model: str
    w_bits: int
    a_bits: int
    plan: str
    seed: int

    @property
    def name(self) -> str:
        return f"{_slug(self.model)}-w{self.w_bits}a{self.a_bits}-{_slug(self.plan)}-s{self.seed}"


@dataclass
class SweepSpec:
    """What a sweep runs: the product of the four lists, with shared data and settings."""

    models: list[str]
    bits: list[tuple[int, int]] = field(default_factory=lambda: [(4, 4)])
    plans: list[str] = field(default_factory=lambda: [RECIPE_PLAN])
    seeds: list[int] = field(default_factory=lambda: [0])
    data: str | None = None  # calibration images; None: the demo's
    eval_data: str | None = None  # labelled evaluation images; None: the demo's (or ``data``)
    checkpoints: dict[str, str] = field(default_factory=dict)  # model → weights file
    pretrained: bool = True  # False: random weights (speed measurements)
    model_kwargs: dict[str, dict] = field(default_factory=dict)  # model → timm keyword arguments
    method: str | None = None  # a named method (config.Method) for every job; None: DEFAULT_METHOD
    calibration: dict[str, Any] = field(default_factory=dict)  # CalibrationConfig fields for every job
    eval_limit: int | None = 500
    eval_batch_size: int = 64
    provider: str = "cpu"  # ONNX Runtime's execution provider for the parity check

    def __post_init__(self) -> None:
        self.bits = [parse_bits(b) for b in self.bits]
        self.seeds = [int(s) for s in self.seeds]

    def validate(self) -> None:
        from .plan import build_plan

        if not self.models:
            raise SweepError("a sweep needs at least one model")
        for name, values in (("bits", self.bits), ("plans", self.plans), ("seeds", self.seeds)):
            if not values:
                raise SweepError(f"a sweep needs at least one of {name}")
        for w, a in self.bits:
            QuantConfig(w_bits=w, a_bits=a).validate()
        known = {f.name for f in fields(CalibrationConfig)} - {"granularity", "seed", "device"}
        unknown = sorted(set(self.calibration) - known)
        if unknown:
            raise SweepError(f"[calibration] has settings osq does not know: {', '.join(unknown)}")
        CalibrationConfig(**self.calibration).validate()
        named = [m.value for m in Method if m is not Method.CUSTOM]
        if self.method is not None and self.method not in named:
            raise SweepError(f"method must be one of {', '.join(named)}, got {self.method!r}")
        for plan in self.plans:
            if plan != RECIPE_PLAN:
                build_plan(plan, [])  # syntax only
        if self.eval_limit is not None and self.eval_limit < 1:
            raise SweepError(f"eval limit must be ≥ 1, got {self.eval_limit}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepSpec:
        d = dict(d)
        ev = d.pop("eval", {}) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SweepError(f"unknown sweep settings: {', '.join(unknown)}")
        if "limit" in ev:
            d["eval_limit"] = ev["limit"]
        if "batch_size" in ev:
            d["eval_batch_size"] = ev["batch_size"]
        if "provider" in ev:
            d["provider"] = ev["provider"]
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path) -> SweepSpec:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise SweepError(f"sweep file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise SweepError(f"{path}: not valid TOML ({e})") from None
        base = path.parent
        for key in ("data", "eval_data"):  # relative to the file, like a recipe's paths
            if isinstance(data.get(key), str):
                data[key] = str((base / data[key]).expanduser())
        try:
            return cls.from_dict(data)
        except TypeError as e:
            raise SweepError(f"{path}: {e}") from None

    def jobs(self) -> list[Job]:
        return [Job(m, w, a, p, s) for m, (w, a), p, s in product(self.models, self.bits, self.plans, self.seeds)]

    def settings_digest(self) -> str:
        """What every job shares: a finished job counts only for the same data and settings."""
        shared = {k: v for k, v in asdict(self).items() if k not in ("models", "bits", "plans", "seeds")}
        # the method the jobs run, not "the default": a later default must not reuse them
        shared["method"] = self.method or DEFAULT_METHOD.value
        return hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest()[:10]


def job_dir(out: Path, spec: SweepSpec, job: Job) -> Path:
    return out / "jobs" / f"{job.name}-{spec.settings_digest()}"


# -- one job -------------------------------------------------------------------------------------------


def _load(job: Job, spec: SweepSpec):
    from .load.models import load_model

    return load_model(job.model, checkpoint=spec.checkpoints.get(job.model), pretrained=spec.pretrained,
                      model_kwargs=spec.model_kwargs.get(job.model))


def _folders(spec: SweepSpec) -> tuple[Path, Path]:
    if spec.data is not None:
        return Path(spec.data), Path(spec.eval_data or spec.data)
    from .load.demo import ensure_demo_data

    paths = ensure_demo_data()
    return paths.train_dir, Path(spec.eval_data) if spec.eval_data else paths.val_dir


def job_config(job: Job, spec: SweepSpec, device: torch.device | str) -> CalibrationConfig:
    """What `osq calibrate MODEL --method M` would use, then the job's plan and the sweep's settings."""
    from .api import calibration_config

    plan = None if job.plan == RECIPE_PLAN else job.plan
    return calibration_config(job.model, spec.method, **{**spec.calibration, "granularity": plan,
                                                         "seed": job.seed, "device": str(device)})


def run_job(job: Job, spec: SweepSpec, where: Path, device: torch.device) -> dict[str, Any]:
    """Calibrate, export and evaluate one job in ``where``; returns (and writes) its result row."""
    from .api import calibrate, export, load_run, quant_config
    from .evaluation import OnnxRuntime, TorchRuntime, evaluate, kl_divergence, parity
    from .load.data import ImageFiles, calibration_tensor, eval_transform

    t0 = time.perf_counter()
    where.mkdir(parents=True, exist_ok=True)
    loaded = _load(job, spec)
    fp32 = copy.deepcopy(loaded.model)
    calib_dir, eval_dir = _folders(spec)
    transform = eval_transform(loaded.model)
    ccfg = job_config(job, spec, device)
    images = calibration_tensor(ImageFiles(calib_dir, transform=transform), ccfg.samples, job.seed)
    qcfg = quant_config(job.w_bits, job.a_bits, spec.method)
    run_dir = where / "run"
    if not (run_dir / "run.json").is_file() or json.loads((run_dir / "run.json").read_text()).get(
        "status"
    ) != "complete":
        calibrate(loaded, images, qcfg, ccfg, run_dir, resume=True,
                  data_info={"calib_dir": str(calib_dir), "eval_dir": str(eval_dir)})
    t_cal = time.perf_counter()
    run = load_run(run_dir, device)
    onnx_path = where / "model.onnx"
    info = export(run, onnx_path)

    dataset = ImageFiles(eval_dir, transform=transform)
    kw = dict(batch_size=spec.eval_batch_size, progress=False, limit=spec.eval_limit)
    r_fp = evaluate(TorchRuntime(fp32, device, name="torch-fp32"), dataset, **kw)
    r_q = evaluate(TorchRuntime(run.model, device, name="torch-quant"), dataset, **kw)
    ort_rt = OnnxRuntime(onnx_path, provider=spec.provider, name="onnxruntime",
                         intra_op_num_threads=torch.get_num_threads())  # this rank's share of the cores
    r_ort = evaluate(ort_rt, dataset, **kw)
    par = parity(r_q, r_ort)
    row = {
        "job": job.name,
        "model": job.model,
        "bits": f"W{job.w_bits}A{job.a_bits}",
        "plan": job.plan,
        "seed": job.seed,
        "top1": r_ort.top1,
        "top1_torch_quant": r_q.top1,
        "top1_fp32": r_fp.top1,
        "kl_to_fp32": kl_divergence(r_fp.logits, r_ort.logits),
        "ort_top1_agreement": par.top1_agreement,
        "ort_max_abs_logit_diff": par.max_abs_logit_diff,
        "onnx_bytes": info.bytes,
        "onnx_mib": round(info.bytes / 2**20, 3),
        "eval_images": r_ort.n,
        "calibration_minutes": round((t_cal - t0) / 60, 3),
        "minutes": round((time.perf_counter() - t0) / 60, 3),
        "device": str(device),
        "status": "done",
    }
    atomic_write_bytes(where / RESULT, (json.dumps(row, indent=2, allow_nan=False) + "\n").encode())
    (where / FAILED).unlink(missing_ok=True)
    return row


# -- the sweep -----------------------------------------------------------------------------------------


def _claimer(ctx: DistContext, n: int):
    """Yield the indices of jobs this rank runs: the next unclaimed one, from a shared counter.

    The counter lives in the process group's key-value store (a TCP store reachable from every
    node); without one, ranks take every world-th job.
    """
    if not ctx.active:
        yield from range(n)
        return
    key = ctx.broadcast_object(f"osq-sweep-{uuid.uuid4().hex}")
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        kv = _get_default_store()
    except (ImportError, RuntimeError, ValueError):
        yield from range(ctx.rank, n, ctx.world)
        return
    while (i := kv.add(key, 1) - 1) < n:
        yield i


def run_sweep(spec: SweepSpec, out: str | Path, ctx: DistContext | None = None,
              on_job: Any = None) -> dict[str, Any]:
    """Run the sweep's unfinished jobs over the ranks of ``ctx`` and return the table (on every rank).

    ``on_job(row)`` is called on the rank that ran a job, after it. Failed jobs are reported in
    the table (status "failed: ...") and retried by the next run of the sweep.
    """
    ctx = ctx or DistContext.single("cuda" if torch.cuda.is_available() else "cpu")
    spec.validate()
    out = Path(out)
    jobs = spec.jobs()
    ctx.require_same(hashlib.sha256(json.dumps(asdict(spec), sort_keys=True, default=str).encode()).hexdigest(),
                     "sweep description")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "spec.json", (json.dumps(asdict(spec), indent=2, default=str) + "\n").encode())
    # rank 0 decides which jobs are finished, so every rank works from the same list
    finished = ctx.broadcast_object([j.name for j in jobs if (job_dir(out, spec, j) / RESULT).is_file()])
    pending = [j for j in jobs if j.name not in finished]
    ran: list[dict[str, Any]] = []
    for i in _claimer(ctx, len(pending)):
        job = pending[i]
        where = job_dir(out, spec, job)
        try:
            row = run_job(job, spec, where, ctx.device)
        except Exception as e:  # one bad configuration must not end the others
            row = {"job": job.name, "model": job.model, "bits": f"W{job.w_bits}A{job.a_bits}", "plan": job.plan,
                   "seed": job.seed, "status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            where.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(where / FAILED, json.dumps({**row, "traceback": traceback.format_exc()}).encode())
        row["rank"] = ctx.rank
        ran.append(row)
        if on_job is not None:
            on_job(row)
    fresh = {row["job"]: row for rows in ctx.all_gather_object(ran) for row in rows}
    rows = []
    for job in jobs:
        if job.name in fresh:
            rows.append(fresh[job.name])
        else:
            row = json.loads((job_dir(out, spec, job) / RESULT).read_text())
            rows.append({**row, "status": "done earlier"})
    table = {"jobs": rows, "ran": [j.name for j in pending], "skipped": finished, "ranks": ctx.world}
    if ctx.is_main:
        atomic_write_bytes(out / "sweep.json", (json.dumps(table, indent=2, default=str) + "\n").encode())
        atomic_write_bytes(out / "sweep.csv", to_csv(rows).encode())
    ctx.barrier()
    return table


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, *extra], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    return buf.getvalue()


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(table: dict[str, Any], title: str = "Sweep") -> Table:
    """The comparison table for the terminal: one row per job."""
    t = Table(title=title, title_justify="left")
    for col in ("job", "top-1 %", "fp32 %", "KL to fp32", "ORT agree %", "max |Δlogit|", "ONNX MiB", "min",
                "status"):
        t.add_column(col, justify="left" if col in ("job", "status") else "right")
    for r in table["jobs"]:
        t.add_row(r["job"], _fmt(r.get("top1")), _fmt(r.get("top1_fp32")), _fmt(r.get("kl_to_fp32"), 4),
                  _fmt(r.get("ort_top1_agreement")), _fmt(r.get("ort_max_abs_logit_diff"), 3),
                  _fmt(r.get("onnx_mib")), _fmt(r.get("minutes")), r.get("status", ""))
    t.caption = (f"{len(table['ran'])} run on {table['ranks']} rank(s), {len(table['skipped'])} finished earlier "
                 "and skipped; top-1 and KL of the ONNX Runtime model")
    return t


def check_config(spec: SweepSpec) -> None:
    """Validate, turning configuration errors into :class:`SweepError`."""
    try:
        spec.validate()
    except (ConfigError, ValueError) as e:
        raise SweepError(str(e)) from None
