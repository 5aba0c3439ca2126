"""Deployment commands: convert a QDQ file to the fast CPU format, per-layer parity, ONNX Runtime speed.

Plain Typer functions over ``osqdeploy.onnx_export.ort_int8``, ``osqdeploy.evaluation.per_layer``
and ``osqdeploy.evaluation.throughput``; ``cli.main`` registers them as ``osq convert``,
``osq parity`` and ``osq speed``, and ``osq eval --per-layer`` calls :func:`per_layer_report`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import onnx
import typer
from rich.console import Console

from osqdeploy.onnx_export.ort_int8 import ExportFormat

if TYPE_CHECKING:
    from osqdeploy.evaluation.per_layer import PerLayerReport

out = Console()
err = Console(stderr=True)

USAGE_ERROR = 2
FAILURE = 1


class SpeedProvider(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


@contextmanager
def _boundary() -> Iterator[None]:
    """The library's documented errors as one line on stderr: bad input exits 2, failed work 1."""
    from osqdeploy.evaluation.runtimes import RuntimeLoadError
    from osqdeploy.load.data import DataError
    from osqdeploy.onnx_export.ort_int8 import FormatError
    from osqdeploy.run.store import RunError

    try:
        yield
    except (FormatError, DataError, RunError, RuntimeLoadError, FileNotFoundError, ValueError) as e:
        err.print(f"error: {' '.join(str(e).split())}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(USAGE_ERROR) from None
    except (onnx.checker.ValidationError, RuntimeError) as e:
        err.print(f"error: {' '.join(str(e).split())}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(FAILURE) from None


def _load_onnx(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf raises its own types for a file that is not ONNX
        raise ValueError(f"{path} is not an ONNX file ({type(e).__name__})") from None


def convert(
    source: Annotated[Path, typer.Argument(metavar="FILE.onnx", help="An ONNX file `osq export` wrote.")],
    out_path: Annotated[
        Path | None, typer.Option("--out", metavar="FILE.onnx", help="Where to write. \\[default: FILE.<format>.onnx]")
    ] = None,
    format: Annotated[
        ExportFormat, typer.Option("--format", help="ort-int8: every grid in uint8/int8, fused on ONNX Runtime's CPU.")
    ] = ExportFormat.ort_int8,
) -> None:
    """Rewrite an exported QDQ file in another format; the grids and their values stay the same."""
    from osqdeploy.onnx_export.ort_int8 import file_format, to_ort_int8
    from osqdeploy.run.store import atomic_write_bytes

    with _boundary():
        proto = _load_onnx(source)
        if format is ExportFormat.qdq:
            if file_format(proto) != ExportFormat.qdq.value:
                raise ValueError(f"{source} is {file_format(proto)}; re-export the run with --format qdq")
            converted = proto
        else:
            converted = to_ort_int8(proto)
        target = out_path or source.with_name(f"{source.stem}.{format.value}.onnx")
        atomic_write_bytes(target, converted.SerializeToString())
    out.print(f"{source} ({file_format(proto)}) → {target} ({format.value}, {target.stat().st_size / 2**20:.2f} MiB)",
              highlight=False)


def per_layer_report(model, onnx_path: Path, dataset, limit: int | None, batch_size: int = 16,
                     threshold: float = 0.01, provider: str = "cpu") -> PerLayerReport:
    """For ``osq eval --per-layer``: the report (its ``to_dict()`` goes into the JSON report as
    ``"per_layer"``) after printing its table; ``model`` is the run's fake-quant model."""
    from osqdeploy.evaluation.per_layer import per_layer_parity, per_layer_table

    report = per_layer_parity(model, onnx_path, dataset, batch_size=batch_size, limit=limit, threshold=threshold,
                              provider=provider)
    out.print(per_layer_table(report))
    return report


def parity(
    onnx_path: Annotated[Path, typer.Argument(metavar="FILE.onnx", help="The exported ONNX file.")],
    run: Annotated[Path, typer.Argument(metavar="RUN", help="The run directory it was exported from.")],
    data: Annotated[Path, typer.Option(metavar="DIR", help="Images (labels not needed).")],
    limit: Annotated[int, typer.Option(help="Compare on N images spread over the folder.", min=1)] = 32,
    batch_size: Annotated[int, typer.Option(help="Images per runtime call.", min=1)] = 16,
    threshold: Annotated[
        float, typer.Option(help="Fraction of values on another grid step that counts as diverging.", min=0, max=1)
    ] = 0.01,
    report: Annotated[
        Path | None, typer.Option(metavar="FILE.json", help="Also write the rows as JSON.")
    ] = None,
) -> None:
    """Per-layer parity: every activation quantizer of the ONNX file against the PyTorch fake-quant model.

    Per quantizer: the fraction of values on a different grid step, the mean difference in steps,
    and whether the quantizer itself differs (its own scale / zero point / rounding); the first
    block where the two diverge is marked.
    """
    from osqdeploy.api import load_run
    from osqdeploy.load.data import ImageFiles, eval_transform
    from osqdeploy.run.store import atomic_write_bytes

    with _boundary():
        loaded = load_run(run)
        dataset = ImageFiles(data, transform=eval_transform(loaded.model), max_files=limit)
        result = per_layer_report(loaded.model, onnx_path, dataset, limit, batch_size, threshold)
        if report is not None:
            atomic_write_bytes(report, (json.dumps(result.to_dict(), indent=2) + "\n").encode())
    if report is not None:
        out.print(f"Report: {report}", highlight=False)


def speed(
    files: Annotated[list[Path], typer.Argument(metavar="FILE.onnx...", help="ONNX files to time side by side.")],
    batch: Annotated[list[int], typer.Option(help="Batch sizes (repeat the option for several).")] = [1, 32],  # noqa: B006
    provider: Annotated[SpeedProvider, typer.Option(help="ONNX Runtime execution provider.")] = SpeedProvider.cpu,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads. \\[default: one per core]", min=1)] = None,
    seconds: Annotated[float, typer.Option(help="Timed seconds per file and batch size.", min=0)] = 3.0,
    report: Annotated[Path | None, typer.Option(metavar="FILE.json", help="Also write the rows as JSON.")] = None,
) -> None:
    """Images/s of ONNX files in ONNX Runtime, taking turns on the same processor, with the kernels ORT ran.

    The first file is the baseline of the speed-up column; the census columns count the graph
    ONNX Runtime executes after optimization (integer kernels, QuantizeLinear, DequantizeLinear).
    """
    from osqdeploy.evaluation.throughput import compare_speed, speed_table
    from osqdeploy.run.store import atomic_write_bytes

    with _boundary():
        labelled: dict[str, Path] = {}
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: no such ONNX file")
            labelled[f.name if f.name not in labelled else str(f)] = f
        rows = compare_speed(labelled, tuple(batch), provider.value, threads, seconds)
        if report is not None:
            atomic_write_bytes(report, (json.dumps([r.to_dict() for r in rows], indent=2) + "\n").encode())
    out.print(speed_table(rows, baseline=next(iter(labelled))))
