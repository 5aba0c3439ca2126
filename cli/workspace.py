"""The workspace: ``.osq/`` in the current directory, so that the stages chain without paths.

``osq calibrate`` writes runs under ``.osq/runs/``, ``osq export`` defaults to the newest finished
run and ``osq eval`` to the newest export; for that each command must know what the one before it
produced.  Layout::

    .osq/workspace.json   {"format": "osq-workspace", "format_version": 1,
                           "latest_run": ".osq/runs/demo-w4a4-20250101-120000",
                           "latest_export": "demo.onnx",
                           "runs": [".osq/runs/...", ...],                  (oldest first)
                           "exports": {"demo.onnx": {"run": ".osq/runs/...", "created": "...",
                                                     "bytes": ..., "float_bytes": ..., ...}}}
    .osq/runs/<recipe>-w<W>a<A>-<YYYYmmdd-HHMMSS>/   run directories (osqdeploy.run.store)
    .osq/exports/<run name>.onnx                     exports written without --out

Paths are stored relative to the folder holding ``.osq/`` when they lie inside it (so the folder
can be moved), absolute otherwise.  Every write replaces the file atomically
(``atomic_write_json``): a crash never leaves half a ``workspace.json``.  The run directories
themselves stay the source of truth: which run is finished is read from its own manifest, never
from this index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from osqdeploy.run import store

DIR_NAME = ".osq"
FILE_NAME = "workspace.json"
FORMAT = "osq-workspace"
FORMAT_VERSION = 1


class WorkspaceError(ValueError):
    """``.osq/workspace.json`` is unreadable or from another format version."""


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def _valid_path(value: object) -> bool:
    """A path string the file system can be asked about (no NUL, within the name-length limits)."""
    return (
        isinstance(value, str) and bool(value) and "\0" not in value and len(value.encode(errors="replace")) <= 4096
        and all(len(part.encode(errors="replace")) <= 255 for part in value.split("/"))
    )


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


_EXPORT_FIELDS: dict[str, Any] = {
    "created": lambda v: isinstance(v, str),
    "bytes": _count,
    "float_bytes": lambda v: v is None or _count(v),
    "qdq_pairs": _count,
    "weight_initializers": lambda v: isinstance(v, dict) and all(_count(n) for n in v.values()),
    "w_bits": lambda v: type(v) is int and 2 <= v <= 16,
    "a_bits": lambda v: type(v) is int and 2 <= v <= 16,
    "dynamic_batch": lambda v: isinstance(v, bool),
}


def index_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with the index's fields, by type and range, or None."""
    runs = data.get("runs", [])
    if not isinstance(runs, list) or not all(_valid_path(r) for r in runs):
        return "'runs' is not a list of paths"
    for key in ("latest_run", "latest_export"):
        if data.get(key) is not None and not _valid_path(data[key]):
            return f"'{key}' is not a path"
    exports = data.get("exports", {})
    if not isinstance(exports, dict):
        return "'exports' is not a table"
    for key, record in exports.items():
        if not _valid_path(key) or not isinstance(record, dict) or not _valid_path(record.get("run")):
            return f"export {key!r} has no run path"
        for field_name, ok in _EXPORT_FIELDS.items():
            if field_name in record and not ok(record[field_name]):
                return f"export {key!r} has a bad {field_name!r}"
    return None


@dataclass
class Workspace:
    """The ``.osq/`` folder of one project directory."""

    root: Path

    @classmethod
    def here(cls) -> Workspace:
        """The workspace of the current directory (it need not exist yet)."""
        return cls(Path.cwd() / DIR_NAME)

    @property
    def base(self) -> Path:
        """The directory that holds ``.osq/``; stored relative paths start here."""
        return self.root.parent

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    @property
    def file(self) -> Path:
        return self.root / FILE_NAME

    # -- paths ----------------------------------------------------------------------------------

    def key(self, path: str | Path) -> str:
        """How ``path`` is written in the index: relative to :attr:`base` when inside it."""
        absolute = Path(os.path.abspath(Path(path).expanduser()))
        try:
            return absolute.relative_to(os.path.abspath(self.base)).as_posix()
        except ValueError:
            return str(absolute)

    def path(self, key: str) -> Path:
        """The path an index entry names (inverse of :meth:`key`)."""
        p = Path(key)
        return p if p.is_absolute() else self.base / p

    def display(self, path: str | Path) -> str:
        """A path as short as possible for messages: relative to the current directory if inside."""
        absolute = Path(os.path.abspath(Path(path).expanduser()))
        try:
            return absolute.relative_to(Path.cwd()).as_posix() or "."
        except ValueError:
            return str(absolute)

    # -- the index ------------------------------------------------------------------------------

    def read(self) -> dict[str, Any]:
        """The index, or an empty one when there is none yet."""
        if not self.file.is_file():
            return {"format": FORMAT, "format_version": FORMAT_VERSION, "runs": [], "exports": {}}
        try:
            data = json.loads(self.file.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise WorkspaceError(f"{self.display(self.file)} is corrupt ({e}); delete it (runs are kept)") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise WorkspaceError(f"{self.display(self.file)} is not an osq workspace index; delete it")
        if data.get("format_version") != FORMAT_VERSION:
            raise WorkspaceError(
                f"{self.display(self.file)} has format version {data.get('format_version')!r}; this osq reads "
                f"{FORMAT_VERSION}: delete it (runs are kept)"
            )
        data.setdefault("runs", [])
        data.setdefault("exports", {})
        problem = index_problem(data)
        if problem:
            raise WorkspaceError(f"{self.display(self.file)} is damaged ({problem}); delete it (runs are kept)")
        return data

    def _write(self, data: dict[str, Any]) -> None:
        store.atomic_write_json(self.file, data)

    # -- runs -----------------------------------------------------------------------------------

    def new_run_dir(self, recipe: str, w_bits: int, a_bits: int) -> Path:
        """``.osq/runs/<recipe>-w<W>a<A>-<YYYYmmdd-HHMMSS>``, suffixed if that name is taken."""
        stem = f"{recipe}-w{w_bits}a{a_bits}-{datetime.now():%Y%m%d-%H%M%S}"
        candidate, n = self.runs_dir / stem, 1
        while candidate.exists():
            n += 1
            candidate = self.runs_dir / f"{stem}-{n}"
        return candidate

    def record_run(self, run_dir: Path) -> None:
        """Remember ``run_dir`` as the newest run (called when calibration starts and ends)."""
        data = self.read()
        key = self.key(run_dir)
        data["runs"] = [r for r in data["runs"] if r != key] + [key]
        data["latest_run"] = key
        self._write(data)

    def _run_candidates(self) -> list[Path]:
        data = self.read()
        seen: dict[str, Path] = {}
        for key in data["runs"]:
            path = self.path(key)
            seen[os.path.abspath(path)] = path
        if self.runs_dir.is_dir():
            for path in sorted(self.runs_dir.iterdir()):
                seen.setdefault(os.path.abspath(path), path)
        return [p for p in seen.values() if (p / store.MANIFEST).is_file()]

    def latest_run(self) -> Path | None:
        """The newest run started here, finished or not."""
        key = self.read().get("latest_run")
        return self.path(key) if key and self.path(key).is_dir() else None

    def latest_finished_run(self) -> Path | None:
        """The run whose calibration finished most recently (its manifest is written last)."""
        finished = []
        for path in self._run_candidates():
            try:
                manifest = store.read_manifest(path)
            except store.RunError:
                continue
            if manifest.complete:
                finished.append(((path / store.MANIFEST).stat().st_mtime, path))
        return max(finished, key=lambda t: t[0])[1] if finished else None

    # -- exports --------------------------------------------------------------------------------

    def record_export(self, onnx: Path, run_dir: Path, info: dict[str, Any]) -> None:
        """Remember which run ``onnx`` came from; it becomes the default of ``osq eval``."""
        data = self.read()
        key = self.key(onnx)
        data["exports"].pop(key, None)  # re-insert: dict order is export order
        data["exports"][key] = {"run": self.key(run_dir), "created": _now(), **info}
        data["latest_export"] = key
        self._write(data)

    def export_record(self, onnx: Path) -> dict[str, Any] | None:
        return self.read()["exports"].get(self.key(onnx))

    def latest_export(self) -> Path | None:
        """The newest export that still exists on disk."""
        data = self.read()
        keys = list(data["exports"])
        latest = data.get("latest_export")
        if latest in keys:
            keys.remove(latest)
            keys.append(latest)
        for key in reversed(keys):
            if self.path(key).is_file():
                return self.path(key)
        return None

    def latest_export_of(self, run_dir: Path) -> Path | None:
        """The newest existing export made from ``run_dir``."""
        run_key = self.key(run_dir)
        for key, rec in reversed(list(self.read()["exports"].items())):
            if rec.get("run") == run_key and self.path(key).is_file():
                return self.path(key)
        return None

    def run_of_export(self, onnx: Path, state_sha256: str | None = None) -> Path | None:
        """The run ``onnx`` was exported from: the index says, else a run whose state checksum the
        ONNX metadata carries (an export copied from elsewhere, or an index that was deleted)."""
        rec = self.export_record(onnx)
        if rec and self.path(rec["run"]).is_dir():
            return self.path(rec["run"])
        if state_sha256:
            for path in self._run_candidates():
                try:
                    if store.read_manifest(path).state_sha256 == state_sha256:
                        return path
                except store.RunError:
                    continue
        return None

    # -- what ``osq eval`` reads -----------------------------------------------------------------

    def eval_target(
        self, target: Path | None, onnx_run_sha: Callable[[Path], str | None]
    ) -> tuple[Path | None, Path | None]:
        """(ONNX file, run directory) to evaluate for ``target``; either may be unknown (None)."""
        if target is None:
            onnx = self.latest_export()
            if onnx is not None:
                return onnx, self.run_of_export(onnx, onnx_run_sha(onnx))
            run = self.latest_finished_run()
            if run is None:
                raise WorkspaceError(
                    "nothing to evaluate in this workspace (.osq/): run `osq calibrate` and "
                    "`osq export`, or pass an ONNX file or run directory"
                )
            return None, run
        if target.is_dir():
            return self.latest_export_of(target), target
        if target.is_file():
            return target, self.run_of_export(target, onnx_run_sha(target))
        raise WorkspaceError(f"{target}: no such ONNX file or run directory")

    def sizes(self, onnx_path: Path | None, run_dir: Path | None) -> dict[str, int | None]:
        """Bytes of the ONNX file, of the float export recorded beside it, and of the run's state."""
        rec = self.export_record(onnx_path) if onnx_path is not None else None
        state = run_dir / store.STATE if run_dir is not None else None
        return {
            "onnx_bytes": onnx_path.stat().st_size if onnx_path is not None else None,
            "float_onnx_bytes": (rec or {}).get("float_bytes"),
            "run_state_bytes": state.stat().st_size if state is not None and state.is_file() else None,
        }
