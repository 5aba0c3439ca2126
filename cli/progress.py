"""What ``osq calibrate`` shows while it works: the plan, a bar per group, and the summary.

The engine reports through :class:`osqdeploy.api.PlanCallbacks` and knows nothing of terminals;
everything rich lives here, so the library stays quiet when it is used as a library.
"""

from __future__ import annotations

import re
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from osqdeploy.api import PlanCallbacks
from osqdeploy.plan import Plan
from osqdeploy.reconstruct import GroupResult

_UNIT = re.compile(r"blocks\.(\d+)\.([ABC])")


def describe_group(units: list[str]) -> str:
    """Unit names in a form one can read in a table cell.

    ``blocks.0.A … blocks.2.C`` becomes ``blocks 0-2``; partial blocks keep their slices
    (``block 3 B+C``); other units (Swin's downsampling) are named as they are.
    """
    parts: dict[int, list[str]] = {}
    other: list[str] = []
    for name in units:
        m = _UNIT.fullmatch(name)
        if m:
            parts.setdefault(int(m.group(1)), []).append(m.group(2))
        else:
            other.append(name.removesuffix(".D"))
    blocks = sorted(parts)
    whole = all(parts[b] == ["A", "B", "C"] for b in blocks)
    consecutive = blocks == list(range(blocks[0], blocks[-1] + 1)) if blocks else False
    if blocks and whole and consecutive:
        text = f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}"
    else:
        text = ", ".join(f"block {b} {'+'.join(parts[b])}" for b in blocks)
    return " + ".join([*other, text] if text else other)


def plan_table(plan: Plan, resumed_groups: int = 0) -> Table:
    """The groups reconstruction will walk through, in order."""
    title = f"Plan: {plan.spec}" + (" (cross-stage)" if plan.cross_stage else "")
    table = Table(title=title, title_justify="left")
    table.add_column("group", justify="right")
    table.add_column("units")
    table.add_column("count", justify="right")
    table.add_column("status")
    for i, group in enumerate(plan.groups):
        status = "done (checkpoint)" if i < resumed_groups else ""
        table.add_row(str(i), describe_group(group), str(len(group)), status)
    return table


def summary_table(groups: list[dict]) -> Table:
    """Per-group reconstruction results as saved in the run manifest."""
    table = Table(title="Reconstruction", title_justify="left")
    table.add_column("group", justify="right")
    table.add_column("units")
    table.add_column("iters", justify="right")
    table.add_column("MSE before", justify="right")
    table.add_column("MSE after", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("flipped", justify="right")
    for g in groups:
        table.add_row(
            str(g["index"]),
            describe_group(g["units"]),
            str(g["iters"]),
            f"{g['mse_before']:.4g}",
            f"{g['mse_after']:.4g}",
            f"{g['seconds']:.1f}",
            f"{100 * g.get('flipped', 0.0):.1f}%",
        )
    return table


STAGES = {
    "prepare": "preparing (outlier probe, float reference, quantized structure)",
    "initialize": "initialising (activation ranges, RepQ-ViT reparameterisation, weight grids)",
    "reconstruct": "reconstructing",
    "tune": "tuning the outputs (activation steps, LayerNorms, biases) towards fp32's predictions",
    "check": "checking the quantized output against fp32",
}


class CalibrationProgress(PlanCallbacks):
    """Prints the plan when it is known, then a bar per stage and per group (live loss, ETA) under an
    overall bar for the whole reconstruction.

    Use as a context manager around ``osqdeploy.api.calibrate``: the bars are drawn on
    ``console`` (stderr in the CLI, so that stdout holds only the tables).  When that is not a
    terminal (a log file, CI) there are no bars, only one line per finished group: a redrawn bar
    in a log is noise.
    """

    def __init__(self, console: Console, plan_console: Console | None = None, iters_per_group: int = 0) -> None:
        self.console = console
        self.iters_per_group = iters_per_group
        self.overall: TaskID | None = None
        self.stage_task: TaskID | None = None
        self.plan_console = plan_console or console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self.tasks: dict[int, tuple[TaskID, int]] = {}
        self.finished: set[int] = set()
        self.plan: Plan | None = None

    def __enter__(self) -> CalibrationProgress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()

    def on_plan(self, plan: Plan, resumed_groups: int) -> None:
        self.plan = plan
        self.plan_console.print(plan_table(plan, resumed_groups))
        if resumed_groups:
            self.plan_console.print(
                f"Resuming: {resumed_groups} of {len(plan.groups)} groups restored from the run's checkpoint."
            )
        remaining = len(plan.groups) - resumed_groups
        if remaining and self.iters_per_group:
            self.overall = self.progress.add_task(
                "[bold]calibration", total=remaining * self.iters_per_group, loss=f"{remaining} groups"
            )

    def on_stage(self, name: str) -> None:
        if self.stage_task is not None:
            self.progress.remove_task(self.stage_task)
            self.stage_task = None
        if name == "reconstruct":
            return
        if self.progress.disable:
            self.console.print(STAGES.get(name, name), highlight=False)
            return
        self.progress.start()
        self.stage_task = self.progress.add_task(STAGES.get(name, name), total=None, loss="")

    def on_stage_progress(self, stage: str, done: int, total: int) -> None:
        if self.stage_task is not None:
            self.progress.update(self.stage_task, completed=done, total=total)

    def _label(self, index: int, units: list[str]) -> str:
        n = len(self.plan.groups) if self.plan else "?"
        return f"group {index + 1}/{n} {describe_group(units)}"

    def on_group_start(self, index: int, units: list[str], iters: int) -> None:
        description = self._label(index, units)
        total = max(iters, 1)
        self.tasks[index] = (self.progress.add_task(description, total=total, loss="loss -"), total)

    def on_iter(self, index: int, it: int, loss: float | None) -> None:
        if index in self.tasks:
            text = "loss -" if loss is None else f"loss {loss:.4g}"
            self.progress.update(self.tasks[index][0], completed=it + 1, loss=text)
            if self.overall is not None:
                done = len(self.finished) * self.iters_per_group + it + 1
                self.progress.update(self.overall, completed=done)

    def on_group_end(self, result: GroupResult) -> None:
        self.finished.add(result.index)
        if self.progress.disable:
            self.console.print(
                f"{self._label(result.index, result.units)}: {result.iters} iters, "
                f"MSE {result.mse_before:.3g} → {result.mse_after:.3g}, {result.seconds:.1f} s",
                highlight=False,
            )
        elif result.index in self.tasks:
            task, total = self.tasks[result.index]
            self.progress.update(task, completed=total, loss=f"MSE {result.mse_before:.3g} → {result.mse_after:.3g}")


def tuning_line(tuning: dict | None) -> str | None:
    """One line on a run's output tuning (``Manifest.output_tuning``), or None when the method did not tune."""
    if not tuning:
        return None
    text = (f"{tuning['iters']} steps, KL to fp32 on the calibration images {tuning['kl_before']:.4g} → "
            f"{tuning['kl_after']:.4g}, {tuning['seconds']:.1f} s")
    return text if tuning.get("kept", True) else text + " (not kept: it did not lower the KL)"
