"""`osq sweep` and the `--gpus` option that `osq calibrate` and `osq eval` share.

Thin wiring: the sweep is :mod:`osqdeploy.sweep`, the processes are :mod:`osqdeploy.distributed`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .options import GpusOpt as GpusOption
from .options import Method

out = Console()
err = Console(stderr=True)



def _exit(message: str, code: int) -> typer.Exit:
    err.print(message, highlight=False, markup=False, soft_wrap=True)
    return typer.Exit(code)


def under_torchrun() -> bool:
    """Whether torchrun started this process as one rank of several (its environment says so)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))  # as osqdeploy.distributed reads it


def device_type_for(gpus: int | None) -> str:
    """``cuda`` when GPUs are asked for or present, else ``cpu`` (ranks then run on gloo)."""
    import torch

    from osqdeploy.distributed import check_gpus

    if gpus is not None and gpus > 1:
        check_gpus(gpus)
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"


def on_gpus(gpus: int | None, fn: Callable[..., Any], *args: Any, timeout: datetime.timedelta | None = None) -> Any:
    """Run ``fn(ctx, *args)`` on ``gpus`` ranks (or on torchrun's) and return rank 0's result.

    ``fn`` must be a module-level function (it is pickled into the spawned processes); it builds
    everything it needs itself, from paths and settings, in each process. A GPU count this machine
    does not have exits 2; a rank that fails or dies exits 1, with one line each.
    """
    from osqdeploy.distributed import DEFAULT_TIMEOUT, DistributedError, launch

    try:
        device_type = device_type_for(gpus)
        return launch(fn, *args, processes=gpus or 1, device_type=device_type, timeout=timeout or DEFAULT_TIMEOUT)
    except DistributedError as e:
        raise _exit(f"error: {e}", 2 if "GPUs but this machine has" in str(e) else 1) from None


def _report(row: dict[str, Any]) -> None:
    status = row.get("status", "")
    line = f"  rank {row.get('rank', 0)}: {row['job']} — {status}"
    if status == "done":
        line += f", top-1 {row['top1']}, {row['minutes']:.1f} min"
    print(line, flush=True)


def _sweep_rank(ctx: Any, spec: Any, out_dir: str) -> dict[str, Any]:
    from osqdeploy.sweep import run_sweep

    table = run_sweep(spec, out_dir, ctx, on_job=_report)
    return table if ctx.is_main else None


def sweep(
    spec_file: Annotated[
        Path | None, typer.Argument(metavar="[SWEEP.toml]", help="Sweep file; options below add to or replace it.")
    ] = None,
    model: Annotated[list[str] | None, typer.Option("--model", help="A model (repeat for several).")] = None,
    bits: Annotated[list[str] | None, typer.Option("--bits", help="Bit-widths like W4A4 (repeatable).")] = None,
    plan: Annotated[list[str] | None, typer.Option(
        "--plan", help="Granularity spec (repeatable); recipe: the model recipe's (the default).")] = None,
    seed: Annotated[list[int] | None, typer.Option("--seed", help="Seed (repeatable).")] = None,
    data: Annotated[Path | None, typer.Option(metavar="DIR", help="Calibration images.")] = None,
    eval_data: Annotated[Path | None, typer.Option(metavar="DIR", help="Labelled evaluation images.")] = None,
    iters: Annotated[int | None, typer.Option(help="Optimisation steps per group, every job.", min=0)] = None,
    method: Annotated[Method | None, typer.Option(help="Accuracy method of every job (default: osq calibrate's).",
                                                  show_default=False)] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluation images per job.", min=1)] = None,
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Where jobs and tables go.")] = Path(
        ".osq/sweep"
    ),
    gpus: GpusOption = None,
) -> None:
    """Calibrate, export and evaluate every combination of models, bit-widths, plans and seeds.

    One job per GPU at a time; a rerun skips finished jobs. Writes sweep.json and sweep.csv in --out.
    """
    from osqdeploy.config import ConfigError
    from osqdeploy.distributed import SWEEP_TIMEOUT
    from osqdeploy.load.data import DataError
    from osqdeploy.sweep import SweepError, SweepSpec, check_config, format_table

    try:
        spec = SweepSpec.from_toml(spec_file) if spec_file is not None else None
        if spec is None and not model:
            raise SweepError("name a sweep file or at least one --model")
        spec = spec or SweepSpec(models=list(model or []))
        for name, value in (("models", model), ("bits", bits), ("plans", plan), ("seeds", seed)):
            if value:
                setattr(spec, name, list(value))
        spec = SweepSpec.from_dict({**spec.__dict__})  # re-parse bit-widths given as options
        if data is not None:
            spec.data = str(data)
        if eval_data is not None:
            spec.eval_data = str(eval_data)
        if iters is not None:
            spec.calibration["iters"] = iters
        if method is not None:
            spec.method = method.value
        if limit is not None:
            spec.eval_limit = limit
        check_config(spec)
    except (SweepError, ConfigError, DataError, ValueError) as e:
        raise _exit(f"error: {e}", 2) from None
    n_jobs = len(spec.jobs())
    out.print(f"[bold]osq sweep[/] {n_jobs} jobs → {out_dir}", highlight=False)
    table = on_gpus(gpus, _sweep_rank, spec, str(out_dir), timeout=SWEEP_TIMEOUT)
    if table is None:  # a torchrun rank other than 0
        return
    out.print(format_table(table))
    out.print(f"Tables: {out_dir / 'sweep.json'}, {out_dir / 'sweep.csv'}", highlight=False)
    failed = [r for r in table["jobs"] if str(r.get("status", "")).startswith("failed")]
    if failed:
        raise _exit(f"error: {len(failed)} of {n_jobs} jobs failed (details in their failed.json)", 1)
