"""The error boundary of every command: library errors become one line on stderr and an exit code.

Only the types the library documents are caught; anything else is a bug and keeps its traceback.
Library modules are imported when an error is raised, not when the CLI starts.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console

USAGE_ERROR = 2  # bad input: the user can fix the command line or the files it names
FAILURE = 1  # the work itself failed (numerics, exporter, memory, a full disk)
INTERRUPTED = 130

err = Console(stderr=True)


class UsageError(ValueError):
    """A command line that cannot be carried out as given (missing data, nothing to export...)."""


def one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def fail(message: str, code: int) -> typer.Exit:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def note(message: str) -> None:
    err.print(message, markup=False, highlight=False, soft_wrap=True, style="yellow")


def _input_errors() -> tuple[type[BaseException], ...]:
    from osqdeploy.config import ConfigError
    from osqdeploy.evaluation import RuntimeLoadError
    from osqdeploy.load import CheckpointError, DataError, UnknownModelError, WeightsUnavailableError
    from osqdeploy.load.models import RecipeError
    from osqdeploy.plan import PlanError
    from osqdeploy.run.manifest import RunError

    from .workspace import WorkspaceError

    return (
        ConfigError,
        PlanError,
        DataError,
        RunError,
        UnknownModelError,
        CheckpointError,
        WeightsUnavailableError,
        RuntimeLoadError,
        RecipeError,
        WorkspaceError,
        UsageError,
    )


@contextmanager
def boundary(batch_size: int | None = None, interrupted: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn the library's errors into one line and an exit code; ``interrupted`` gives the Ctrl-C message."""
    with _library_warnings_as_notes():
        try:
            yield
        except KeyboardInterrupt:
            raise fail(interrupted() if interrupted else "interrupted", INTERRUPTED) from None
        except Exception as e:
            import torch

            from osqdeploy.onnx_export.onnx_qdq import ExportError
            from osqdeploy.reconstruct import NumericalError
            from osqdeploy.run.store import OutputError

            if isinstance(e, torch.cuda.OutOfMemoryError):
                smaller = max(1, (batch_size or 2) // 2)
                raise fail(
                    f"out of GPU memory at batch size {batch_size}; lower it, e.g. --batch-size {smaller}", FAILURE
                ) from None
            from osqdeploy.load import ResourceError

            if isinstance(e, (OutputError, ResourceError)):
                raise fail(one_line(e), FAILURE) from None
            if isinstance(e, _input_errors()):
                raise fail(one_line(e), USAGE_ERROR) from None
            if isinstance(e, (ExportError, NumericalError)):
                raise fail(one_line(e), FAILURE) from None
            if isinstance(e, OSError) and e.filename:  # a full disk, a read-only file system, a size limit
                raise fail(f"{e.filename}: {e.strerror or e}; earlier files were left as they were", FAILURE) from None
            raise


@contextmanager
def _library_warnings_as_notes() -> Iterator[None]:
    """Data warnings (skipped files, fewer images than asked) as one yellow line each; third-party
    deprecation chatter says nothing a user can act on and is silenced."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: Any) -> None:
        ours = any(f"{os.sep}{package}{os.sep}" in filename for package in ("osqdeploy", "cli"))
        if category.__name__ == "DataWarning" or (ours and issubclass(category, UserWarning)):
            note(f"warning: {message}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield
