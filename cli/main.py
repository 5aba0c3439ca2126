"""``osq``: calibrate → export → eval, plus ``list`` and ``inspect``.

Each command parses its arguments, calls ``osqdeploy`` and prints with rich.  The library's
error types are caught here and only here: a bad input is one line on stderr and exit code 2, a
failure of the work itself exit code 1, an interrupt exit code 130 — never a traceback.  The
workspace (``.osq/``, :mod:`cli.workspace`) supplies the defaults that let the three stages chain
without repeating paths.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import nn

from osqdeploy import __version__
from osqdeploy.config import FAST_ITERS, CalibrationConfig, ConfigError, QuantConfig, fast_preset
from osqdeploy.evaluation import EvalResult, OnnxRuntime, RuntimeLoadError, TorchRuntime, evaluate, parity, write_report
from osqdeploy.evaluation.sensitivity import sensitivity as sensitivity_rows
from osqdeploy.onnx_export import onnx_qdq
from osqdeploy.onnx_export.onnx_qdq import ExportError, export_model
from osqdeploy.load import (
    CheckpointError,
    DataError,
    ImageFiles,
    ModelSpec,
    UnknownModelError,
    WeightsUnavailableError,
    calibration_augment,
    calibration_tensor,
    ensure_demo_data,
    ensure_demo_model,
    eval_transform,
    list_recipes,
    load_model,
    resolve_recipe,
)
from osqdeploy.load.data import DataWarning
from osqdeploy.load.models import DEMO_RECIPE, RecipeError, read_state_dict
from osqdeploy.pipeline import calibrate as run_calibration
from osqdeploy.pipeline import load_run
from osqdeploy.plan import SLICINGS, PlanError, build_plan, resolve_spec
from osqdeploy.reconstruct import NumericalError, resolve_device, warm_compile_workers
from osqdeploy.run import store

from .progress import CalibrationProgress, plan_table, summary_table
from .workspace import Workspace, WorkspaceError

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

USAGE_ERROR = 2  # bad input: the user can fix the command line or the files it names
FAILURE = 1  # the work itself failed (numerics, exporter, memory)
INTERRUPTED = 130

# Calibration defaults per recipe, applied over CalibrationConfig's (Appendix F: 1024 images,
# 20 000 iterations per group, hours on a GPU).  The demo exists to show the whole chain on a
# laptop CPU in a few minutes, so it calibrates on fewer images and iterations; the recipe files
# carry no calibration table yet, so the numbers live here.  Explicit options always win.
RECIPE_CALIBRATION: dict[str, dict[str, int]] = {
    DEMO_RECIPE: {"samples": 256, "iters": 100},
}
# Calibration images are drawn from at most this many files of --data (an even spread over
# the folder), so a huge folder is not checked file by file before calibration starts.
MAX_SCANNED_PER_SAMPLE = 8
MIN_SCANNED = 2048
# ONNX files from a model with more parameters than this get no float baseline export by
# default: the size ratio is not worth a minute of tracing.
FLOAT_BASELINE_MAX_PARAMS = 30_000_000


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Autocast(str, Enum):
    auto = "auto"
    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


class Provider(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class RuntimeName(str, Enum):
    onnxruntime = "onnxruntime"
    torch_quant = "torch-quant"
    torch_fp32 = "torch-fp32"


class UsageError(ValueError):
    """A command line that cannot be carried out as given (missing data, nothing to export...)."""


INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    PlanError,
    DataError,
    store.RunError,  # includes RunLockedError
    UnknownModelError,
    CheckpointError,
    WeightsUnavailableError,
    RuntimeLoadError,
    RecipeError,
    WorkspaceError,
    UsageError,
)


# --------------------------------------------------------------------------------- error boundary


def _one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _note(message: str) -> None:
    err.print(message, markup=False, highlight=False, soft_wrap=True, style="yellow")


@contextmanager
def _boundary(batch_size: int | None = None, interrupted: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn the library's errors into one line on stderr and an exit code.

    Only the types the library documents are caught; anything else is a bug and keeps its
    traceback.  ``interrupted`` gives the Ctrl-C message, which may depend on how far the
    command got (a calibration names the run directory to resume).
    """
    with _library_warnings_as_notes():
        try:
            yield
        except KeyboardInterrupt:
            raise _fail(interrupted() if interrupted else "interrupted", INTERRUPTED) from None
        except torch.cuda.OutOfMemoryError:
            smaller = max(1, (batch_size or 2) // 2)
            raise _fail(
                f"out of GPU memory at batch size {batch_size}; lower it, e.g. --batch-size {smaller}", FAILURE
            ) from None
        except WeightsUnavailableError as e:
            raise _fail(f"{_one_line(e)} Or try the embedded model: `osq calibrate demo`.", USAGE_ERROR) from None
        except INPUT_ERRORS as e:
            raise _fail(_one_line(e), USAGE_ERROR) from None
        except (ExportError, NumericalError) as e:
            raise _fail(_one_line(e), FAILURE) from None


@contextmanager
def _library_warnings_as_notes() -> Iterator[None]:
    """Data warnings (skipped files, fewer images than asked) as one yellow line each.

    Third-party deprecation chatter (torch's exporter, timm) says nothing a user can act on
    and is silenced.
    """

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: Any) -> None:
        ours = any(f"{os.sep}{package}{os.sep}" in filename for package in ("osqdeploy", "cli"))
        if issubclass(category, DataWarning) or (ours and issubclass(category, UserWarning)):
            _note(f"warning: {message}")

    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        warnings.showwarning = show
        yield


# ----------------------------------------------------------------------------------- calibrate


def _calibration_config(recipe_name: str, granularity_default: str, **overrides: Any) -> CalibrationConfig:
    """CalibrationConfig defaults, then the recipe's, then the options the user gave."""
    values: dict[str, Any] = {"granularity": granularity_default, **RECIPE_CALIBRATION.get(recipe_name, {})}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return CalibrationConfig.from_dict({**CalibrationConfig().to_dict(), **values})


def _check_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except RuntimeError as e:  # resolve_device's "CUDA is not available"
        raise UsageError(str(e)) from None


def _source_text(source: dict[str, Any]) -> str:
    if "demo" in source:
        acc = source.get("val_top1")
        return "embedded digits demo" + (f" (held-out top-1 {acc:.2f}%)" if isinstance(acc, (int, float)) else "")
    if "checkpoint" in source:
        return f"checkpoint {source['checkpoint']}"
    if "pretrained" in source:
        return "timm pretrained (local cache)"
    return ", ".join(f"{k}={v}" for k, v in source.items()) or "?"


def _check_run_dir(run_dir: Path) -> None:
    """Refuse a finished or locked --run-dir before minutes go into loading and preparing.

    ``calibrate`` checks both again under its lock; this only moves the answer forward.
    """
    if (run_dir / store.LOCK).exists():
        with store.run_lock(run_dir):  # raises RunLockedError while a live process holds it
            pass
    if (run_dir / store.MANIFEST).is_file():
        try:
            status = store.read_manifest(run_dir).get("status")
        except store.RunError:
            return  # calibrate reports or overwrites it
        if status == "complete":
            raise store.RunError(f"{run_dir} already holds a finished run; choose another --run-dir")


def _scan_data(path: Path, samples: int) -> ImageFiles:
    """The calibration folder, checked before the (possibly slow) model load."""
    return ImageFiles(path, max_files=max(MIN_SCANNED, MAX_SCANNED_PER_SAMPLE * samples))


@app.command()
def calibrate(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="Recipe name or alias (see `osq list`), or any timm model name.")
    ],
    bits: Annotated[
        tuple[int, int] | None,
        typer.Option(metavar="W A", help="Weight and activation bit-widths, 2..8. \\[default: the recipe's]"),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Folder of calibration images: class sub-folders, ImageNet files named by WordNet id, or any "
            "flat folder of images. \\[default for demo: its train split]",
        ),
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Labelled folder `osq eval` should report accuracy on (recorded in the run). "
            "\\[default for demo: its held-out split]",
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="Weights file (.pth/.pt/.bin/.safetensors state dict) for the model."),
    ] = None,
    granularity: Annotated[
        str | None,
        typer.Option(
            metavar="SPEC",
            help=f"auto | blocks:N | slices:{'|'.join(SLICINGS)} (see `osq list`). \\[default: the recipe's]",
        ),
    ] = None,
    cross_stage: Annotated[
        bool, typer.Option("--cross-stage", help="Let blocks:N groups span Swin downsampling layers.")
    ] = False,
    iters: Annotated[
        int | None, typer.Option(help="Optimisation steps per group. \\[default: 20000; demo 100]")
    ] = None,
    fast: Annotated[
        bool,
        typer.Option(
            "--fast",
            help=f"Quick preset: {FAST_ITERS} iterations per group instead of 20000, with AdaRound's learning rate "
            "raised in proportion, for quick iterations on a setup. An explicit --iters wins (and drops the preset).",
        ),
    ] = False,
    samples: Annotated[int | None, typer.Option(help="Calibration images. \\[default: 1024; demo 256]")] = None,
    augment: Annotated[
        bool,
        typer.Option(
            help="When the folder has fewer images than --samples, make up the number with seeded random crops "
            "and flips of them (reconstruction overfits a few hundred images; see README).",
        ),
    ] = True,
    batch_size: Annotated[
        int | None, typer.Option(help=f"Images per optimisation step. \\[default: {CalibrationConfig.batch_size}]")
    ] = None,
    device: Annotated[Device, typer.Option(help="Where to calibrate.")] = Device.auto,
    autocast: Annotated[
        Autocast | None,
        typer.Option(
            help="Matmul precision of the reconstruction: off (fp32; TF32 on CUDA), or bf16 / fp16 autocast; auto is "
            "fp16 on CUDA (measured as accurate as TF32 and faster) and off on CPU. Quantizers round in fp32 "
            "either way; evaluation and export always run in fp32. "
            f"\\[default: {CalibrationConfig.autocast}]",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the image draw and of reconstruction.")] = CalibrationConfig.seed,
    run_dir: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Run directory. \\[default: `.osq/runs/<recipe>-w<W>a<A>-<time>`]"),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue an interrupted run in --run-dir from its first unfinished group."),
    ] = True,
) -> None:
    """Quantize MODEL by outlier-aware, granularity-aware reconstruction and save a run directory."""
    started = time.perf_counter()
    ws = Workspace.here()
    state = {"hint": "interrupted before calibration started; nothing to resume"}

    with _boundary(batch_size or CalibrationConfig.batch_size, interrupted=lambda: state["hint"]):
        recipe = resolve_recipe(model)
        w_bits, a_bits = bits if bits is not None else (recipe.w_bits, recipe.a_bits)
        qcfg = QuantConfig(w_bits=w_bits, a_bits=a_bits)
        qcfg.validate()
        ccfg = _calibration_config(
            recipe.name,
            recipe.granularity,
            granularity=granularity,
            cross_stage=cross_stage or None,
            iters=iters,
            samples=samples,
            batch_size=batch_size,
            seed=seed,
            device=device.value,
            autocast=autocast.value if autocast is not None else None,
        )
        if fast and iters is None:  # the preset shortens a schedule, never lengthens one (the demo's)
            ccfg = fast_preset(ccfg)
        ccfg.validate()
        build_plan(ccfg.granularity, [])  # syntax check now, not after loading the model
        dev = _check_device(ccfg.device)
        warm_compile_workers(ccfg, dev)  # they start while the model and the images load

        is_demo = recipe.name == DEMO_RECIPE
        if data is None and not is_demo:
            raise UsageError(
                f"{recipe.name} needs calibration images: pass --data DIR (a folder of images; class sub-folders "
                "or ImageNet file names also give labels) — or try the embedded model: `osq calibrate demo`"
            )
        if run_dir is not None:
            _check_run_dir(run_dir)
        calib = _scan_data(data, ccfg.samples) if data is not None else None
        if eval_data is not None:
            ImageFiles(eval_data, max_files=1)  # exists and holds images

        if is_demo and checkpoint is None:
            loaded = ensure_demo_model(progress=True)
        else:
            try:
                loaded = load_model(model, checkpoint=checkpoint)
            except WeightsUnavailableError:
                raise UsageError(
                    f"pretrained weights for {recipe.timm_name} are not on this machine (not in the local timm/"
                    "Hugging Face cache; osq does not download): pass --checkpoint FILE (a .pth/.safetensors state "
                    "dict), or try the embedded model: `osq calibrate demo`"
                ) from None
        eval_dir = eval_data
        if calib is None:  # the demo: its own train/val split
            paths = ensure_demo_data()
            calib = ImageFiles(paths.train_dir)
            eval_dir = eval_dir or paths.val_dir
        calib.transform = eval_transform(loaded.model)
        images = calibration_tensor(
            calib, ccfg.samples, ccfg.seed, augment=calibration_augment(loaded.model) if augment else None
        )

        target = run_dir or ws.new_run_dir(recipe.name, w_bits, a_bits)
        shown = ws.display(target)
        state["hint"] = f"interrupted; finished groups are checkpointed in {shown} — resume with the same command" + (
            "" if run_dir is not None else f" plus --run-dir {shown}"
        )
        data_info = {
            "calib_dir": str(Path(calib.root or data or "").resolve()),
            "calib_layout": calib.layout,
            "calib_images": int(images.shape[0]),
            "calib_files": len(calib),
            "augmented_views": int(images.shape[0]) - min(len(calib), int(images.shape[0])),
            "eval_dir": str(Path(eval_dir).resolve()) if eval_dir is not None else None,
        }
        out.print(
            f"[bold]osq calibrate[/] {recipe.name} ({loaded.spec.timm_name}) W{w_bits}A{a_bits} — "
            f"weights: {_source_text(loaded.source)}"
        )
        out.print(
            f"  {images.shape[0]} calibration images"
            + (f" ({data_info['augmented_views']} of them augmented views)" if data_info["augmented_views"] else "")
            + f" from {ws.display(data_info['calib_dir'])}; "
            f"{ccfg.iters} iters/group, batch {ccfg.batch_size}, seed {ccfg.seed}, device {dev}; "
            f"run: {shown}",
            highlight=False,
        )
        ws.record_run(target)
        with CalibrationProgress(err, plan_console=out) as callbacks:
            manifest = run_calibration(
                loaded, images, qcfg, ccfg, target, callbacks=callbacks, resume=resume, data_info=data_info
            )
        ws.record_run(target)

    out.print(summary_table(manifest["groups"]))
    n_check = min(int(images.shape[0]), 256)
    out.print(
        f"Output vs fp32 on {n_check} calibration images: MSE {manifest['output_mse']:.4g}, "
        f"top-1 agreement {100 * manifest['output_top1_agreement']:.1f}%",
        highlight=False,
    )
    resumed = manifest.get("resumed_from_group", 0)
    note = f" (resumed after group {resumed - 1})" if resumed else ""
    out.print(
        f"Calibration {manifest['seconds']:.1f} s{note}, total wall time {time.perf_counter() - started:.1f} s. "
        f"Run saved to {ws.display(target)}",
        highlight=False,
    )
    out.print("Next: osq export --out model.onnx", highlight=False)


# -------------------------------------------------------------------------------------- export


def _float_baseline_bytes(manifest: dict[str, Any]) -> int | None:
    """Size of a plain float ONNX export of the same architecture.

    The size of a float export depends on the architecture only, not on the values of its
    weights, so a freshly built model stands in for the original weights, which need not be
    available.  Skipped (None) for models large enough to make the extra trace slow.
    """
    spec = ModelSpec.from_dict(manifest["model"]["spec"])
    model = spec.create()
    if sum(p.numel() for p in model.parameters()) > FLOAT_BASELINE_MAX_PARAMS:
        return None
    with tempfile.TemporaryDirectory() as tmp, _quiet_exporter():
        try:
            return onnx_qdq.float_export(model, Path(tmp) / "float.onnx")
        except Exception as e:  # an optional size reference must never fail the export itself
            _note(f"warning: no float export for the size ratio ({type(e).__name__})")
            return None


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx prints its progress on stdout; keep ``osq``'s output to what osq says."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


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
    float_baseline: Annotated[
        bool,
        typer.Option(help="Also trace a float export of the same architecture, for the size ratio."),
    ] = True,
) -> None:
    """Export a finished run as QDQ ONNX (integer weights, ≤4-bit ones stored as UINT4)."""
    ws = Workspace.here()
    with _boundary(batch_size):
        run_dir = run if run is not None else ws.latest_finished_run()
        if run_dir is None:
            latest = ws.latest_run()
            if latest is not None:
                raise UsageError(
                    f"{ws.display(latest)}: calibration did not finish; resume it with `osq calibrate ... "
                    f"--run-dir {ws.display(latest)}` or pass RUN"
                )
            raise UsageError("no finished calibration in this workspace (.osq/): run `osq calibrate` or pass RUN")
        latest = ws.latest_run()
        if run is None and latest is not None and os.path.abspath(latest) != os.path.abspath(run_dir):
            _note(f"note: the newest run {ws.display(latest)} did not finish; exporting {ws.display(run_dir)}")
        target = out_path or ws.exports_dir / f"{run_dir.name}.onnx"
        if target.is_dir():
            target = target / f"{run_dir.name}.onnx"
        loaded = load_run(run_dir)
        t0 = time.perf_counter()
        with _quiet_exporter():
            info = export_model(loaded, target, batch_size)
        seconds = time.perf_counter() - t0
        float_bytes = _float_baseline_bytes(loaded.manifest) if float_baseline else None
        ws.record_export(
            target,
            run_dir,
            {
                "bytes": info.bytes,
                "float_bytes": float_bytes,
                "qdq_pairs": info.qdq_pairs,
                "weight_initializers": info.weight_initializers,
                "w_bits": info.w_bits,
                "a_bits": info.a_bits,
                "dynamic_batch": info.dynamic_batch,
            },
        )

    table = Table(title=f"Exported {ws.display(target)}", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("from run", ws.display(run_dir))
    table.add_row("bits", f"W{info.w_bits}A{info.a_bits} (opset {info.opset})")
    table.add_row("size", _mib(info.bytes))
    if float_bytes:
        table.add_row("float export", f"{_mib(float_bytes)} ({float_bytes / info.bytes:.2f}× larger)")
    table.add_row(
        "QDQ pairs", f"{info.qdq_pairs} QuantizeLinear→DequantizeLinear ({info.act_quantizers} act. quantizers)"
    )
    inits = ", ".join(f"{n} {k}" for k, n in sorted(info.weight_initializers.items())) or "-"
    table.add_row("weight initializers", inits)
    table.add_row("batch", "dynamic" if info.dynamic_batch else str(batch_size))
    table.add_row("export time", f"{seconds:.1f} s")
    out.print(table)
    out.print("Next: osq eval --runtime onnxruntime", highlight=False)


# ---------------------------------------------------------------------------------------- eval


def original_model(manifest: dict[str, Any]) -> tuple[nn.Module | None, str]:
    """The full-precision model a run was calibrated from, if its weights are still at hand.

    Returns (model, "") or (None, why not). The manifest's ``model.source`` says where the weights
    came from: a checkpoint file, the demo cache, or timm's local cache.
    """
    spec = ModelSpec.from_dict(manifest["model"]["spec"])
    source = manifest["model"].get("source") or {}
    path = source.get("checkpoint") or source.get("demo")
    if path:
        if not Path(path).is_file():
            return None, f"original weights {path} are gone"
        model = spec.create()
        try:
            model.load_state_dict(read_state_dict(path), strict=True)
        except (CheckpointError, RuntimeError) as e:
            return None, f"original weights {path} no longer fit the run's model ({_one_line(e)[:120]})"
        return model.eval(), ""
    if source.get("pretrained"):
        try:  # by timm name, which keeps a pretrained tag (".fb_in1k") the recipe name would drop
            return load_model(spec.timm_name, model_kwargs=spec.kwargs).model, ""
        except (WeightsUnavailableError, UnknownModelError, CheckpointError) as e:
            return None, _one_line(e)
    return None, "the run was calibrated from randomly initialised weights"


# Tensors quantization never touches: if the original weights still hold them unchanged, they are
# the weights the run was calibrated from.
_UNTOUCHED = ("pos_embed", "cls_token", "reg_token", "absolute_pos_embed", "relative_position_bias_table")


def _same_origin(fp32: nn.Module, quantized: nn.Module) -> bool:
    """Whether ``fp32`` is the model ``quantized`` was calibrated from, as far as one can tell
    from the tensors quantization leaves alone (True when there are none to compare)."""
    ours, theirs = fp32.state_dict(), quantized.state_dict()
    keys = [k for k in ours if k.split(".")[-1] in _UNTOUCHED and k in theirs]
    return all(ours[k].shape == theirs[k].shape and torch.equal(ours[k].cpu(), theirs[k].cpu()) for k in keys)


def _eval_target(ws: Workspace, target: Path | None) -> tuple[Path | None, Path | None]:
    """(ONNX file, run directory) to evaluate; either may be unknown (None)."""
    if target is None:
        onnx = ws.latest_export()
        if onnx is not None:
            return onnx, ws.run_of_export(onnx, _onnx_state_sha(onnx))
        run = ws.latest_finished_run()
        if run is None:
            raise UsageError(
                "nothing to evaluate in this workspace (.osq/): run `osq calibrate` and `osq export`, "
                "or pass an ONNX file or run directory"
            )
        return None, run
    if target.is_dir():
        return ws.latest_export_of(target), target
    if target.is_file():
        return target, ws.run_of_export(target, _onnx_state_sha(target))
    raise UsageError(f"{target}: no such ONNX file or run directory")


def _onnx_state_sha(path: Path) -> str | None:
    """The run checksum ``osq export`` writes into the ONNX metadata (None if unreadable)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX at all: OnnxRuntime reports it properly later
        return None
    return next((p.value for p in proto.metadata_props if p.key == "run_state_sha256"), None)


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
) -> None:
    """Accuracy and speed of a runtime beside its references, and ONNX-vs-PyTorch parity.

    Measures the chosen runtime plus every reference at hand (torch-fp32 when the original weights
    are available, torch-quant from the run, onnxruntime from the export) on the same images and
    writes a JSON report next to the ONNX (or in the run directory).
    """
    ws = Workspace.here()
    with _boundary(batch_size):
        onnx_path, run_dir = _eval_target(ws, target)
        ort_rt = OnnxRuntime(onnx_path, provider=provider.value, name="onnxruntime") if onnx_path else None
        if runtime == RuntimeName.onnxruntime and onnx_path is None:
            raise UsageError(
                f"{ws.display(run_dir or '.')} has no ONNX export yet: run `osq export` first, "
                "or use --runtime torch-quant"
            )
        if run_dir is None and runtime != RuntimeName.onnxruntime:
            raise UsageError(f"{runtime.value} needs the run {onnx_path} was exported from; pass the run directory")
        dev = _check_device(device.value)
        manifest = store.read_manifest(run_dir) if run_dir is not None else None
        quant = load_run(run_dir, dev) if run_dir is not None else None
        fp32, fp32_missing = (None, "no run known for this ONNX")
        if manifest is not None and quant is not None:
            fp32, fp32_missing = original_model(manifest)
            if fp32 is not None and not _same_origin(fp32, quant.model):
                fp32, fp32_missing = None, "the original weights changed since calibration (retrained or replaced)"
        if runtime == RuntimeName.torch_fp32 and fp32 is None:
            raise UsageError(f"torch-fp32 is not available: {fp32_missing}")

        data_dir = data or _recorded_eval_dir(manifest)
        if data_dir is None:
            why = "the run recorded no evaluation folder" if manifest else "no run is known for this ONNX"
            raise UsageError(f"no evaluation images: pass --data DIR (labelled images; {why})")
        reference = quant.model if quant is not None else fp32
        if reference is None:
            raise UsageError(f"cannot tell the preprocessing of {onnx_path}: pass the run directory it came from")
        # With --limit only the images to be evaluated are checked, not a whole 50 000-image folder.
        dataset = ImageFiles(data_dir, transform=eval_transform(reference), max_files=limit)
        if not dataset.labelled:
            _note(f"warning: {ws.display(data_dir)} has no labels; top-1/top-5 are not available")

        runtimes: list[Any] = []
        if fp32 is not None:
            runtimes.append(TorchRuntime(fp32, dev, name="torch-fp32"))
        if quant is not None:
            runtimes.append(TorchRuntime(quant.model, dev, name="torch-quant"))
        if ort_rt is not None:
            runtimes.append(ort_rt)
        results: dict[str, EvalResult] = {}
        for rt in runtimes:
            results[rt.name] = evaluate(rt, dataset, batch_size=batch_size, progress=out.is_terminal, limit=limit)
        par = (
            parity(results["torch-quant"], results["onnxruntime"])
            if {"torch-quant", "onnxruntime"} <= set(results)
            else None
        )

        sizes = _sizes(ws, onnx_path, run_dir)
        report_path = (
            onnx_path.with_name(f"{onnx_path.stem}.eval.json") if onnx_path is not None else run_dir / "eval.json"
        )
        bits = quant.bits if quant is not None else None
        write_report(
            report_path,
            list(results.values()),
            par,
            extra={
                "osq_version": __version__,
                "runtime": runtime.value,
                "provider": ort_rt.provider if ort_rt is not None else None,
                "device": str(dev),
                "onnx": str(onnx_path.resolve()) if onnx_path else None,
                "run": str(run_dir.resolve()) if run_dir else None,
                "bits": list(bits) if bits else None,
                "data": str(Path(data_dir).resolve()),
                "limit": limit,
                "torch_fp32_unavailable": fp32_missing or None,
                "sizes": sizes,
            },
        )

    n_images = next(iter(results.values())).n
    out.print(f"{n_images} images of {ws.display(data_dir)}", highlight=False)
    title = "Evaluation" + (f" — W{bits[0]}A{bits[1]}" if bits else "")
    table = Table(title=title, title_justify="left")
    for col in ("runtime", "top-1 %", "top-5 %", "images/s"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for name, r in results.items():
        label = name
        if name == "onnxruntime" and ort_rt is not None:
            label += f" ({ort_rt.provider.removesuffix('ExecutionProvider')})"
        label += " *" if name == runtime.value else ""
        table.add_row(label, _pct(r.top1), _pct(r.top5), f"{r.images_per_s:,.0f}")
    table.caption = "* the runtime asked for"
    out.print(table)
    if fp32 is None:
        out.print(f"No torch-fp32 reference: {fp32_missing}.", highlight=False)
    if par is not None:
        pt = Table(title="Parity: torch-quant → onnxruntime", title_justify="left")
        for col in ("top-1 agreement", "max |Δlogit|", "mean |Δlogit|"):
            pt.add_column(col, justify="right")
        pt.add_row(f"{par.top1_agreement:.2f}%", f"{par.max_abs_logit_diff:.3g}", f"{par.mean_abs_logit_diff:.3g}")
        out.print(pt)
    st = Table(title="Model files", title_justify="left")
    labels = {"onnx_bytes": "QDQ ONNX", "float_onnx_bytes": "float ONNX", "run_state_bytes": "run state"}
    shown = {labels[k]: v for k, v in sizes.items() if v is not None}
    for col in shown:
        st.add_column(col, justify="right")
    st.add_row(*(_mib(v) for v in shown.values()))
    if shown:
        out.print(st)
    out.print(f"Report: {ws.display(report_path)}", highlight=False)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _sizes(ws: Workspace, onnx_path: Path | None, run_dir: Path | None) -> dict[str, int | None]:
    rec = ws.export_record(onnx_path) if onnx_path is not None else None
    state = run_dir / store.STATE if run_dir is not None else None
    return {
        "onnx_bytes": onnx_path.stat().st_size if onnx_path is not None else None,
        "float_onnx_bytes": (rec or {}).get("float_bytes"),
        "run_state_bytes": state.stat().st_size if state is not None and state.is_file() else None,
    }


# ------------------------------------------------------------------------------- list, inspect


GRANULARITY_HELP = [
    ("auto", "Algorithm 1: slices:A-B-C when the model has downsampling layers (Swin), else blocks:3 (ViT/DeiT)"),
    ("blocks:N", "N consecutive whole blocks per reconstruction group"),
    ("slices:A-B-C", "each slice alone: A attention up to the context, B projection + residual, C MLP + residual"),
    ("slices:AB-C", "attention (A+B) together, MLP (C) alone"),
    ("slices:A-BC", "A alone, projection and MLP (B+C) together"),
    ("slices:ABC", "one whole block per group"),
    ("--cross-stage", "let blocks:N groups span Swin stages (default: a group stays within one stage)"),
]


@app.command("list")
def list_() -> None:
    """Model recipes and granularity options."""
    with _boundary():
        recipes = list_recipes()
    table = Table(title="Model recipes (any timm model name also works)", title_justify="left")
    for col in ("name", "aliases", "timm name", "family", "granularity", "bits"):
        table.add_column(col)
    for r in recipes:
        resolved = resolve_spec(r.granularity, r.family == "swin")
        gran = r.granularity if resolved == r.granularity else f"{r.granularity} → {resolved}"
        table.add_row(r.name, ", ".join(r.aliases), r.timm_name, r.family or "-", gran, f"W{r.w_bits}A{r.a_bits}")
    out.print(table)
    d = CalibrationConfig()
    out.print(
        f"Calibration defaults: {d.samples} images, {d.iters} iterations per group, batch {d.batch_size}.",
        highlight=False,
    )
    for name, cal in RECIPE_CALIBRATION.items():
        text = ", ".join(f"{v} {k}" for k, v in cal.items())
        out.print(f"  {name}: {text} (a quick demonstration; options override)", highlight=False)
    gt = Table(title="Granularity (--granularity)", title_justify="left")
    gt.add_column("spec")
    gt.add_column("reconstruction groups")
    for spec, text in GRANULARITY_HELP:
        gt.add_row(spec, text)
    out.print(gt)


def _time_split(manifest: dict) -> str:
    """Calibration time and where it went (stages, and the groups' phases summed), where recorded."""
    text = f"{manifest['seconds']:.1f} s"
    stages = manifest.get("stage_seconds")
    if not stages:
        return text  # runs recorded before session 7
    phases = store.phase_totals(manifest)
    names = {"inputs": "group inputs", "first_step": "first steps incl. compilation", "steps": "iterations",
             "finish": "hardening"}
    inner = ", ".join(f"{names.get(k, k)} {v:.1f}" for k, v in phases.items())
    parts = [f"{k} {v:.1f}" + (f" ({inner})" if k == "reconstruct" and inner else "") for k, v in stages.items()]
    return f"{text}: " + ", ".join(parts)


def _matmul_precision(calibration: dict, device: str) -> str:
    """The arithmetic a run's reconstruction used, from its recorded settings (older manifests too)."""
    cfg = CalibrationConfig.from_dict(calibration)
    kind = torch.device(device).type
    mode = cfg.autocast_on(kind)
    if mode != "off":
        return mode
    return "TF32" if kind == "cuda" and cfg.tf32 else "fp32"


@app.command()
def inspect(
    run: Annotated[
        Path | None,
        typer.Argument(metavar="[RUN]", help="Run directory. \\[default: the newest run in .osq/]"),
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
    ws = Workspace.here()
    with _boundary():
        run_dir = run if run is not None else ws.latest_run()
        if run_dir is None:
            raise UsageError("no run in this workspace (.osq/): pass RUN")
        m = store.read_manifest(run_dir)
        if sensitivity:  # fail on bad input before printing anything
            data_dir = data or _recorded_eval_dir(m)
            if data_dir is None:
                raise UsageError("--sensitivity needs labelled images: pass --data DIR (the run recorded none)")
            dev = _check_device(device.value)
            quant = load_run(run_dir, dev)
            dataset = ImageFiles(data_dir, transform=eval_transform(quant.model), max_files=limit)
            if not dataset.labelled:
                raise UsageError(f"{ws.display(data_dir)} has no labels; --sensitivity needs top-1 and cross-entropy")
    q, c, model = m.get("quant", {}), m.get("calibration", {}), m.get("model", {})
    info = Table(title=f"Run {ws.display(run_dir)}", title_justify="left", show_header=False)
    info.add_column("what")
    info.add_column("value")
    status = m.get("status", "?")
    if status != "complete":
        status += _checkpoint_progress(run_dir, len(m.get("plan", {}).get("groups", [])))
    info.add_row("status", status)
    info.add_row("model", f"{model.get('recipe')} ({model.get('spec', {}).get('timm_name')}), family {m.get('family')}")
    info.add_row("weights", _source_text(model.get("source") or {}))
    info.add_row(
        "bits",
        f"W{q.get('w_bits')}A{q.get('a_bits')}, patch embedding and head {q.get('edge_bits')}-bit, "
        f"softmax on a log{'√2' if q.get('attn_log_base') == 'sqrt2' else '2'} grid",
    )
    info.add_row(
        "calibration",
        f"{c.get('samples')} images, {c.get('iters')} iters/group, batch {c.get('batch_size')}, seed {c.get('seed')}, "
        f"device {m.get('device')}, {_matmul_precision(c, m.get('device') or 'cpu')} matmuls",
    )
    if "seconds" in m:
        info.add_row("calibration time", _time_split(m))
    if "output_mse" in m:
        info.add_row(
            "output vs fp32", f"MSE {m['output_mse']:.4g}, top-1 agreement {100 * m['output_top1_agreement']:.1f}%"
        )
    for k, v in (m.get("data") or {}).items():
        info.add_row(f"data: {k}", str(v))
    info.add_row("format", f"{m.get('format')} v{m.get('format_version')}, osq {m.get('osq_version')}")
    out.print(info)
    plan = m.get("plan", {})
    groups = m.get("groups") or []
    if groups:
        out.print(summary_table(groups))
    elif plan.get("groups"):
        from osqdeploy.plan import Plan

        out.print(plan_table(Plan.from_dict(plan)))
    outliers = m.get("outliers") or []
    if outliers:
        ot = Table(title="Outlier channels of block outputs (calibration images)", title_justify="left")
        ot.add_column("block", justify="right")
        ot.add_column("top channels")
        ot.add_column("max |activation|")
        ot.add_column("top / median", justify="right")
        for s in outliers:
            ot.add_row(
                str(s["block"]),
                ", ".join(map(str, s["channels"])),
                ", ".join(f"{v:.3g}" for v in s["max"]),
                f"{s['ratio_to_median']:.1f}×",
            )
        out.print(ot)
    if sensitivity:
        with _boundary():
            rows = sensitivity_rows(quant.model, dataset, dev, limit=limit, progress=out.is_terminal)
        st = Table(
            title=f"Activation quantizers switched back to float, one set at a time ({rows[0].n} images of "
            f"{ws.display(data_dir)}); CE: cross-entropy, sorted by how much releasing the set lowers it",
            title_justify="left",
        )
        for col in ("in float", "n", "top-1 %", "Δ top-1", "CE", "Δ CE"):
            st.add_column(col, justify="left" if col == "in float" else "right", no_wrap=True)
        for r in rows:
            name = r.released.replace(".input_quantizer", " input").replace("_quantizer", "")
            name = name if r.kind != "baseline" else "(none: the quantized model)"
            st.add_row(
                name, str(r.count), f"{r.top1:.1f}", f"{r.delta_top1:+.1f}",
                f"{r.cross_entropy:.4f}", f"{r.delta_cross_entropy:+.4f}",
            )
        out.print(st)


def _recorded_eval_dir(manifest: dict | None) -> Path | None:
    """The labelled folder a run was told to report accuracy on (``--eval-data``), if any."""
    recorded = ((manifest or {}).get("data") or {}).get("eval_dir")
    return Path(recorded) if recorded else None


def _checkpoint_progress(run_dir: Path, n_groups: int) -> str:
    """How far an unfinished run got, from its checkpoint (empty when there is none)."""
    progress = run_dir / store.CHECKPOINT / "progress.json"
    try:
        done = json.loads(progress.read_text())["done_groups"]
    except (OSError, ValueError, KeyError, TypeError):
        return " (no checkpoint)"
    return f" ({done} of {n_groups} groups checkpointed; resume with `osq calibrate ... --run-dir {run_dir}`)"


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


__all__ = ["app", "original_model"]
