"""``osq analyze``: the paper's evidence for a model or its runs, as PNG figures and a JSON of their numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import UsageError, boundary, note

out = Console()
err = Console(stderr=True)
DEFAULT_THRESHOLD = 5.0  # osqdeploy.analysis.DEFAULT_THRESHOLD, repeated so that help needs no torch import


def analyze(
    targets: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[MODEL|RUN...]",
            help="A model (recipe, alias or timm name) for its activation ranges, or one or more run directories "
            "of one model (several runs: the granularity comparison). \\[default: the newest finished run in .osq/]",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Images to measure on; labelled ones (class sub-folders or ImageNet file names) also give the "
            "sensitivity ranking and top-1. \\[default: the run's evaluation folder; demo: its held-out split]",
        ),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", metavar="DIR", help="Where the PNG figures and analysis.json go.")
    ] = Path("analysis"),
    checkpoint: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Float weights of the model (when not recorded in the run).")
    ] = None,
    images: Annotated[int, typer.Option(help="Images for the activation ranges.", min=1)] = 32,
    limit: Annotated[int, typer.Option(help="Images for sensitivity and granularity metrics.", min=1)] = 256,
    threshold: Annotated[
        float, typer.Option(help="Mark a channel whose range exceeds this multiple of its block's median.", min=1.0)
    ] = DEFAULT_THRESHOLD,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
) -> None:
    """Figures of the paper's evidence for your model: outlier channels per block, reconstruction loss per
    group, sensitivity ranking, and granularity across runs, with the numbers in analysis.json."""
    with boundary():
        from osqdeploy.analysis import JSON_NAME, AnalysisError
        from osqdeploy.analysis import analyze as run_analysis
        from osqdeploy.reconstruct import resolve_device

        from .workspace import Workspace

        if not targets:
            latest = Workspace.here().latest_finished_run()
            if latest is None:
                raise UsageError("no finished run in this workspace (.osq/): pass a MODEL or RUN")
            targets = [str(latest)]
        try:
            result = run_analysis(targets, out_dir, data=data, checkpoint=checkpoint, images=images, limit=limit,
                                  threshold=threshold, device=resolve_device(device), progress=err.is_terminal)
        except AnalysisError as e:
            raise UsageError(str(e)) from None

    table = Table(title=f"osq analyze → {out_dir}", title_justify="left")
    table.add_column("figure")
    table.add_column("file")
    for key, path in result.figures.items():
        table.add_row(key, str(path))
    table.add_row("numbers", str(out_dir / JSON_NAME))
    out.print(table)
    for text in result.notes:
        note(f"note: {text}")
