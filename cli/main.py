"""``osq``: calibrate → export → eval, plus ``list`` and ``inspect``.

Each command parses its options, calls :mod:`osqdeploy.api` and prints with rich. The library's
error types become one line on stderr here and only here: bad input exit code 2, a failure of the
work itself 1, an interrupt 130, never a traceback. torch and the exporter are imported inside the
commands, so ``osq --help`` and a mistyped option answer at once. The workspace (``.osq/``,
:mod:`cli.workspace`) supplies the defaults that let the stages chain without repeating paths.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from osqdeploy import __version__

from . import deploy
from . import options as o
from .analyze import analyze
from .distributed import on_gpus, sweep, under_torchrun
from .errors import UsageError, boundary, note
from .options import Device, Provider, RuntimeName
from .ranks import calibrate_rank, eval_rank, source_text
from .report import eval_tables, export_table, inspect_tables, list_tables, sensitivity_table

app = typer.Typer(
    name="osq",
    help="Outlier-aware slicing post-training quantization of vision transformers, exported as QDQ ONNX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs wrap to the terminal
)
out = Console()  # tables and results
err = Console(stderr=True)  # progress, notes and errors


def _workspace():
    from .workspace import Workspace

    return Workspace.here()


@app.command()
def calibrate(
    model: o.ModelArg,
    bits: o.BitsOpt = None,
    data: o.DataOpt = None,
    eval_data: o.EvalDataOpt = None,
    checkpoint: o.CheckpointOpt = None,
    granularity: o.GranularityOpt = None,
    cross_stage: o.CrossStageOpt = False,
    attn_grid: o.AttnGridOpt = o.AttnGrid.log,
    iters: o.ItersOpt = None,
    fast: o.FastOpt = False,
    samples: o.SamplesOpt = None,
    augment: o.AugmentOpt = True,
    batch_size: o.BatchSizeOpt = None,
    device: o.DeviceOpt = Device.auto,
    autocast: o.AutocastOpt = None,
    seed: o.SeedOpt = 0,
    run_dir: o.RunDirOpt = None,
    resume: o.ResumeOpt = True,
    method: o.MethodOpt = None,
    gpus: o.GpusOpt = None,
    global_batch_scale: o.GlobalBatchScaleOpt = 1,
) -> None:
    """Quantize MODEL by outlier-aware, granularity-aware reconstruction and save a run directory."""
    started = time.perf_counter()
    ws = _workspace()
    state = {"hint": "interrupted before calibration started; nothing to resume"}
    with boundary(batch_size or o.DEFAULT_BATCH, interrupted=lambda: state["hint"]):
        from osqdeploy import api, load
        from osqdeploy.config import fast_preset
        from osqdeploy.plan import build_plan
        from osqdeploy.reconstruct import resolve_device, warm_compile_workers
        from osqdeploy.run import store


        recipe = load.resolve_recipe(model)
        w_bits, a_bits = bits if bits is not None else (recipe.w_bits, recipe.a_bits)
        qcfg = api.quant_config(w_bits, a_bits, method.value if method else None, attn_grid=attn_grid.value)
        qcfg.validate()
        ccfg = api.calibration_config(
            recipe.name,
            method.value if method else None,
            granularity=granularity,
            cross_stage=cross_stage or None,
            iters=iters,
            samples=samples,
            batch_size=batch_size,
            seed=seed,
            device=device.value,
            autocast=autocast.value if autocast else None,
        )
        if fast and iters is None:  # the preset shortens a schedule, never lengthens one (the demo's)
            ccfg = fast_preset(ccfg)
        if global_batch_scale > 1:
            from osqdeploy.distributed import scale_global_batch

            ccfg = scale_global_batch(ccfg, global_batch_scale)
        ccfg.validate()
        build_plan(ccfg.granularity, [])  # syntax check now, not after loading the model
        dev = resolve_device(ccfg.device)
        api.check_calibration_inputs(model, data, checkpoint)
        target = run_dir or ws.new_run_dir(recipe.name, w_bits, a_bits)
        api.check_run_dir(target)
        store.check_writable(target)
        warm_compile_workers(ccfg, dev)  # they start while the model and the images load
        shown = ws.display(target)
        state["hint"] = f"interrupted; finished groups are checkpointed in {shown}: resume with the same command" + (
            "" if run_dir is not None else f" plus --run-dir {shown}"
        )
        job = (model, qcfg, ccfg, target, shown, data, eval_data, checkpoint, augment, resume, ws)
        m, n_images = on_gpus(gpus, calibrate_rank, *job) if gpus or under_torchrun() else calibrate_rank(None, *job)
        ws.record_run(target)
    from .progress import summary_table, tuning_line

    out.print(summary_table(m.groups))
    tuned = tuning_line(m.output_tuning)
    if tuned:
        out.print(f"Output tuning: {tuned}", highlight=False)
    out.print(
        f"Output vs fp32 on {min(n_images, 256)} calibration images: MSE {m.output_mse:.4g}, "
        f"top-1 agreement {100 * m.output_top1_agreement:.1f}%",
        highlight=False,
    )
    resumed = f" (resumed after group {m.resumed_from_group - 1})" if m.resumed_from_group else ""
    out.print(
        f"Calibration {m.seconds:.1f} s{resumed}, total wall time {time.perf_counter() - started:.1f} s. "
        f"Run saved to {ws.display(target)}",
        highlight=False,
    )
    out.print("Next: osq export --out model.onnx", highlight=False)


@app.command()
def export(
    run: Annotated[
        Path | None,
        typer.Argument(metavar="[RUN]", help="Run directory. \\[default: the newest finished run in .osq/]"),
    ] = None,
    out_path: Annotated[
        Path | None,
        typer.Option("--out", metavar="FILE.onnx", help="Where to write. \\[default: `.osq/exports/<run>.onnx`]"),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Fix the batch dimension to N. \\[default: dynamic batch]", min=1)
    ] = None,
    format: o.FormatOpt = o.ExportFormat.qdq,
    float_baseline: Annotated[
        bool, typer.Option(help="Also trace a float export of the same architecture, for the size ratio.")
    ] = True,
) -> None:
    """Export a finished run as QDQ ONNX (integer weights, ≤4-bit ones stored as UINT4)."""
    ws = _workspace()
    with boundary(batch_size):
        from osqdeploy import api

        run_dir = run if run is not None else ws.latest_finished_run()
        latest = ws.latest_run()
        if run_dir is None:
            if latest is not None:
                raise UsageError(
                    f"{ws.display(latest)}: calibration did not finish; resume it with `osq calibrate ... "
                    f"--run-dir {ws.display(latest)}` or pass RUN"
                )
            raise UsageError("no finished calibration in this workspace (.osq/): run `osq calibrate` or pass RUN")
        if run is None and latest is not None and os.path.abspath(latest) != os.path.abspath(run_dir):
            note(f"note: the newest run {ws.display(latest)} did not finish; exporting {ws.display(run_dir)}")
        target = out_path or ws.exports_dir / f"{run_dir.name}.onnx"
        if target.is_dir():
            target = target / f"{run_dir.name}.onnx"
        loaded = api.load_run(run_dir)
        t0 = time.perf_counter()
        with _quiet_stdout():
            info = api.export(loaded, target, batch_size=batch_size, format=format.value)
        seconds = time.perf_counter() - t0
        float_bytes = None
        if float_baseline:
            try:
                with _quiet_stdout():
                    float_bytes = api.float_onnx_bytes(loaded)
            except Exception as e:  # an optional size reference never fails the export itself
                note(f"warning: no float export for the size ratio ({type(e).__name__})")
        ws.record_export(
            target,
            run_dir,
            {
                "bytes": info.bytes,
                "float_bytes": float_bytes,
                "qdq_pairs": info.qdq_pairs,
                "weight_initializers": info.weight_initializers,
                "format": format.value,
                "w_bits": info.w_bits,
                "a_bits": info.a_bits,
                "dynamic_batch": info.dynamic_batch,
            },
        )
    out.print(export_table(ws.display(target), ws.display(run_dir), info, float_bytes, batch_size, seconds))
    out.print("Next: osq eval --runtime onnxruntime", highlight=False)


def _quiet_stdout():
    """torch.onnx prints its progress on stdout; keep ``osq``'s output to what osq says."""
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO())


@app.command("eval")
def eval_(
    target: Annotated[
        Path | None,
        typer.Argument(
            metavar="[ONNX-or-RUN]",
            help="An exported .onnx or a run directory. \\[default: the newest export, else the newest run]",
        ),
    ] = None,
    runtime: Annotated[RuntimeName, typer.Option(help="The runtime to measure.")] = RuntimeName.onnxruntime,
    provider: Annotated[Provider, typer.Option(help="ONNX Runtime execution provider.")] = Provider.auto,
    device: Annotated[Device, typer.Option(help="Device of the PyTorch runtimes.")] = Device.auto,
    data: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Labelled images. \\[default: the evaluation folder the run recorded]"),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per runtime call.", min=1)] = 64,
    limit: Annotated[int | None, typer.Option(help="Evaluate N images spread over the folder.", min=1)] = None,
    gpus: o.GpusOpt = None,
    per_layer: o.PerLayerOpt = False,
) -> None:
    """Accuracy, KL to fp32 and speed of a runtime beside its references, and ONNX-vs-PyTorch parity.

    Measures the chosen runtime plus every reference at hand (torch-fp32 when the original weights
    are available, torch-quant from the run, onnxruntime from the export) on the same images and
    writes a JSON report next to the ONNX (or in the run directory).
    """
    ws = _workspace()
    with boundary(batch_size):
        from osqdeploy import api, load

        onnx_path, run_dir = ws.eval_target(target, api.onnx_run_sha)
        if runtime == RuntimeName.onnxruntime and onnx_path is None:
            raise UsageError(
                f"{ws.display(run_dir or '.')} has no ONNX export yet: run `osq export` first, or use "
                "--runtime torch-quant"
            )
        job = (run_dir, onnx_path, data, runtime.value, provider.value, device.value, batch_size, limit)
        report = on_gpus(gpus, eval_rank, *job) if gpus or under_torchrun() else eval_rank(None, *job)
        if report is None:  # a torchrun rank other than the first
            return
        report.extra["sizes"] = ws.sizes(onnx_path, run_dir)
        if per_layer:
            if onnx_path is None or run_dir is None:
                raise UsageError("--per-layer compares an ONNX file with the run it came from; both must be known")
            from .deploy import per_layer_report

            quant = api.load_run(run_dir)
            images = load.ImageFiles(report.data, transform=load.eval_transform(quant.model), max_files=limit or 32)
            report.extra["per_layer"] = per_layer_report(quant.model, onnx_path, images, limit or 32).to_dict()
        report_path = onnx_path.with_name(f"{onnx_path.stem}.eval.json") if onnx_path else run_dir / "eval.json"
        report.write(report_path)
    out.print(f"{report.n} images of {ws.display(report.data)}", highlight=False)
    for renderable in eval_tables(report, runtime.value):
        out.print(renderable)
    out.print(f"Report: {ws.display(report_path)}", highlight=False)


app.command("sweep")(sweep)
app.command("analyze")(analyze)
app.command("convert")(deploy.convert)
app.command("parity")(deploy.parity)
app.command("speed")(deploy.speed)


@app.command("list")
def list_() -> None:
    """Model recipes and granularity options."""
    with boundary():
        from osqdeploy import api, load
        from osqdeploy.config import DEFAULT_METHOD, CalibrationConfig

        tables = list_tables(load.list_recipes(), CalibrationConfig(), api.RECIPE_CALIBRATION, DEFAULT_METHOD.value)
    for t in tables:
        out.print(t)


@app.command()
def inspect(
    run: Annotated[
        Path | None, typer.Argument(metavar="[RUN]", help="Run directory. \\[default: the newest run in .osq/]")
    ] = None,
    sensitivity: Annotated[
        bool,
        typer.Option(
            "--sensitivity",
            help="Also measure which activation quantizers cost accuracy: each kind, and each block's, "
            "switched back to float in turn (needs labelled images; one evaluation per row).",
        ),
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Labelled images for --sensitivity. \\[default: the run's evaluation folder]"),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="--sensitivity on N images spread over the folder.", min=1)] = None,
    device: Annotated[Device, typer.Option(help="Device for --sensitivity.")] = Device.auto,
) -> None:
    """What a run holds: settings, plan, per-group losses, outliers, data, versions."""
    ws = _workspace()
    with boundary():
        from osqdeploy import api, load
        from osqdeploy.evaluation.sensitivity import sensitivity as sensitivity_rows
        from osqdeploy.reconstruct import resolve_device
        from osqdeploy.run import store

        run_dir = run if run is not None else ws.latest_run()
        if run_dir is None:
            raise UsageError("no run in this workspace (.osq/): pass RUN")
        health = store.verify_run(run_dir)
        if not health.ok:
            raise store.RunError(health.reason if str(run_dir) in health.reason else f"{run_dir}: {health.reason}")
        m = health.manifest
        if sensitivity:  # fail on bad input before printing anything
            recorded = m.data.get("eval_dir")
            data_dir = data or (Path(recorded) if recorded else None)
            if data_dir is None:
                raise UsageError("--sensitivity needs labelled images: pass --data DIR (the run recorded none)")
            dev = resolve_device(device.value)
            quant = api.load_run(run_dir, dev)
            dataset = load.ImageFiles(data_dir, transform=load.eval_transform(quant.model), max_files=limit)
            if not dataset.labelled:
                raise UsageError(f"{ws.display(data_dir)} has no labels; --sensitivity needs top-1 and cross-entropy")
        progress = "" if m.complete else api.checkpoint_progress(run_dir, len(m.plan.groups))
    for t in inspect_tables(ws.display(run_dir), m, source_text(m.model.source), progress):
        out.print(t)
    if sensitivity:
        with boundary():
            rows = sensitivity_rows(quant.model, dataset, dev, limit=limit, progress=out.is_terminal)
        out.print(sensitivity_table(rows, ws.display(data_dir)))


def _version(value: bool) -> None:
    if value:
        out.print(f"osq {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Outlier-aware slicing PTQ of vision transformers: calibrate → export → eval.

    State lives in .osq/ of the current directory, so the stages chain without repeating paths.
    """


__all__ = ["app"]
