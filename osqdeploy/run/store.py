"""The run directory: the artifact that joins calibration to export and evaluation.

Layout (format version ``RUN_FORMAT_VERSION``)::

    <run>/run.json             manifest: versions, model spec and weight source, quant and
                               calibration configs, plan, seed, per-group losses, outlier
                               statistics, status, sha256 of the state file
    <run>/state.safetensors    deployed quantized state: integer weights (uint8 codes), their
                               per-channel scales and zero points, activation steps and zero
                               points, log-quantizer deltas, and every float tensor the model
                               keeps (LayerNorms after reparameterisation, biases, embeddings)
    <run>/checkpoint/          while calibrating: full state after initialisation, one delta per
                               finished group (the state of the modules it changed)
    <run>/.lock                while a process writes the run

``run.json`` is written last, atomically; a run is complete only when it says so and the state's
checksum matches. Tensors are stored with safetensors, so loading a run never executes code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ..io import os_reason
from ..quant.layers import QUANT_LAYERS, act_quantizers
from ..quant.mode import QuantMode, set_mode
from . import manifest as manifest_io
from .manifest import MANIFEST, RUN_FORMAT, RUN_FORMAT_VERSION, Manifest, RunError, group_record_problem

__all__ = [
    "MANIFEST", "RUN_FORMAT", "RUN_FORMAT_VERSION", "Manifest", "OutputError", "RunError", "RunHealth",
    "RunLockedError", "atomic_output", "atomic_write_bytes", "atomic_write_json", "check_writable", "file_mode",
    "run_bytes", "verify_run",
]

STATE = "state.safetensors"
CHECKPOINT = "checkpoint"
LOCK = ".lock"


class RunLockedError(RunError):
    """Another live process is writing this run."""


# --- errors of the file system -----------------------------------------------------------------


class OutputError(RunError):
    """A file osq writes could not be written (permissions, full disk, size limit, read-only).

    Writes go to a temporary name and are renamed into place, so the message can promise that
    nothing was lost: the file it names keeps its previous content, if it had any.
    """


def output_error(path: str | Path, e: OSError) -> OutputError:
    return OutputError(
        f"cannot write {path}: {os_reason(e)}; nothing was lost (its previous content, if any, is unchanged)"
    )


def read_error(path: str | Path, e: OSError) -> RunError:
    return RunError(f"cannot read {path}: {os_reason(e)}")


# --- atomic file writes -------------------------------------------------------------------------

# Temporary files of atomic writes: ``.<name>.osq-<random>.tmp`` beside the target, so that an
# interrupted write's leftovers are recognisable and removed when the run is next written.
TMP_INFIX = ".osq-"
TMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed onto ``path`` when the block succeeds.

    The file gets the mode a plain ``open`` would give (0666 less the umask; ``mkstemp`` alone
    makes it 0600). Any OSError, from creating the folder to the rename, becomes an
    :class:`OutputError` naming ``path``; on any failure the temporary file is removed.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # mkdir's word for a file standing where a folder should be
            raise OSError(errno.ENOTDIR, "not a folder") from None
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_INFIX}", suffix=TMP_SUFFIX)
        tmp = Path(name)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
        yield tmp
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise output_error(path, e) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def file_mode() -> int:
    """The mode ``open()`` would give a new file (0644 under the usual umask): temporary files are
    created 0600, and a run or an ONNX file must stay readable by a serving process of another user."""
    return 0o666 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the new one."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def remove_orphans(folder: Path) -> list[Path]:
    """Delete the temporary files interrupted atomic writes left in ``folder``; returns them.

    Only for folders osq alone writes, under the run's lock: a temporary file there then belongs
    to no live write. Names of the older ``mkstemp`` pattern (``.<name>.<random>.tmp``) of the run's
    own files count too; other hidden files are left alone.
    """
    ours = (f".{MANIFEST}.", f".{STATE}.", ".progress.json.", ".delta-")
    removed = []
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if p.is_file() and (TMP_INFIX in p.name or p.name.startswith(ours)):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _existing_ancestor(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(path.anchor or ".")


def check_writable(path: str | Path, folder: bool = True, need_bytes: int = 0, largest_file: int = 0) -> None:
    """Refuse an output location osq could not write, before any long work starts.

    ``folder``: ``path`` is a folder to create or fill (a run directory); False: a file to create or
    replace (an ONNX export). The check writes and removes a small probe file where the output
    would go (the one test that holds for read-only mounts, ACLs and root alike), and compares
    ``need_bytes`` with the free space there and ``largest_file`` (default ``need_bytes``) with the
    process's file-size limit (``ulimit -f``, which applies to each file).
    """
    largest_file = largest_file or need_bytes
    path = Path(path).expanduser().absolute()
    try:
        if folder and path.exists() and not path.is_dir():
            raise OSError(errno.ENOTDIR, "not a folder")
        if not folder and path.is_dir():
            raise OSError(errno.EISDIR, "is a folder")
        where = _existing_ancestor(path if folder else path.parent)
        if not where.is_dir():
            raise OSError(errno.ENOTDIR, "not a folder")
        fd, probe = tempfile.mkstemp(dir=where, prefix=f".osq-probe{TMP_INFIX}", suffix=TMP_SUFFIX)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        free = shutil.disk_usage(where).free
        limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {os_reason(e)}; nothing was written") from None
    if need_bytes > free:
        raise OutputError(
            f"cannot write {path}: it needs about {_mib(need_bytes)} and {where} has {_mib(free)} free; "
            "nothing was written"
        )
    if limit != resource.RLIM_INFINITY and largest_file > limit:
        raise OutputError(
            f"cannot write {path}: it needs files of about {_mib(largest_file)} and the file-size limit "
            f"(ulimit -f) is {_mib(limit)}; nothing was written"
        )


def run_bytes(model: nn.Module) -> tuple[int, int]:
    """(total, largest file) a calibration of the float ``model`` writes to its run directory, estimated.

    The checkpoint's full state holds every float weight and a rounding variable of the same size
    for each (the largest file); its deltas add about as much again, and the deployed state less.
    """
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 5 * weights, 2 * weights


def _printable(value: object) -> str:
    """``value`` for a one-line message: as it is when printable text, else its repr."""
    return value if isinstance(value, str) and value.isprintable() else repr(value)


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes; an unreadable file is a :class:`RunError` naming it."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise read_error(path, e) from None
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Atomically write a safetensors file; returns its sha256."""
    data = safetensors.torch.save(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata or {}
    )
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with open(path, "rb"):  # an unreadable file is unreadable, not damaged
            pass
        return safetensors.torch.load_file(str(path))
    except OSError as e:
        raise read_error(path, e) from None
    except Exception as e:  # safetensors raises several types for damaged files
        raise RunError(f"{path}: cannot read tensors ({type(e).__name__}: {e})") from None


# --- lock ----------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive writer lock; a lock left by a dead process on this host is taken over."""
    run_dir = Path(run_dir)
    lock = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError, RecursionError):
                holder = {}
            pid, host = (holder.get("pid"), holder.get("host")) if isinstance(holder, dict) else (None, None)
            if type(pid) is int and 0 < pid < 2**31 and host == me["host"] and not _pid_alive(pid):
                lock.unlink(missing_ok=True)
                continue
            raise RunLockedError(
                f"{run_dir} is being written by process {pid!r} on {_printable(host)}; wait for it or remove {lock} "
                "if that process is gone"
            ) from None
        except OSError as e:
            raise output_error(lock, e) from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except OSError as e:
            lock.unlink(missing_ok=True)
            raise output_error(lock, e) from None
        break
    try:
        # holding the lock, no other write is live: temporary files here are an interrupted one's
        for folder in (run_dir, run_dir / CHECKPOINT):
            remove_orphans(folder)
        yield
    finally:
        lock.unlink(missing_ok=True)


# --- manifest ----------------------------------------------------------------------------------


def read_manifest(run_dir: Path) -> Manifest:
    return manifest_io.read(run_dir)


def read_raw_manifest(run_dir: Path) -> dict:
    """The manifest of an interrupted run as plain JSON (to name the settings that changed); {} if unreadable."""
    try:
        data = json.loads((Path(run_dir) / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def write_manifest(run_dir: Path, manifest: Manifest) -> None:
    """Write ``run.json``; a finished run's carries the checksum of its sealed fields (see SEALED_FIELDS)."""
    d = manifest.to_dict()
    if manifest.complete:
        d[SEAL_KEY] = manifest_checksum(manifest)
    atomic_write_json(Path(run_dir) / MANIFEST, d)


# --- state --------------------------------------------------------------------------------------


def deployed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without the float weights that integer codes replace."""
    drop = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, QUANT_LAYERS) and m.weight_quantizer.mode == "int"
    }
    state = {k: v for k, v in model.state_dict().items() if k not in drop}
    return _dedupe(state)


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: give each entry its own copy."""
    return {k: v.detach().clone() for k, v in state.items()}


# The manifest's fields that say what the run is and what it measured. Their checksum is written
# into run.json itself (against careless edits) and, when calibration passes the manifest to
# ``save_deployed``, into the state file's metadata, whose sha256 the manifest and every exported
# ONNX file record: editing ``quant.a_bits``, a group or the status makes the run damaged, not a
# different model under the same label. Timings, versions and the device describe, they do not
# decide, and are not covered.
SEALED_FIELDS = (
    "format", "format_version", "status", "model", "family", "quant", "calibration", "plan", "groups", "data",
    "output_mse", "output_top1_agreement",
)
SEAL_KEY = "manifest_sha256"


def canonical_sha256(obj: object) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys, no spaces): equal for equal JSON values."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_checksum(manifest: Manifest | dict, recorded: dict | None = None) -> str:
    """The checksum of a manifest's :data:`SEALED_FIELDS` (absent ones count as absent).

    Taken over ``Manifest.to_dict()``, the one form both the writer and every reader produce.
    ``recorded``: the run.json a reader parsed ``manifest`` from; a config field of
    ``LATER_FIELDS`` it lacks is left out, as the version that wrote it sealed it.
    """
    d = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
    if isinstance(manifest, Manifest):  # as a reader will see it: JSON, then parsed (ints of float fields...)
        d = json.loads(json.dumps({**d, "state_sha256": d.get("state_sha256") or "0" * 64}))
        d = Manifest.from_dict(d).to_dict()
    for section, later in manifest_io.LATER_FIELDS.items():
        kept = (recorded or {}).get(section)
        if isinstance(kept, dict) and isinstance(d.get(section), dict):
            d = {**d, section: {k: v for k, v in d[section].items()
                                if k in kept or k not in later or v != later[k]}}
    return canonical_sha256({k: d[k] for k in SEALED_FIELDS if k in d})


def tensor_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file, without reading its tensors."""
    try:
        with open(path, "rb"):
            pass
        with safetensors.safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except OSError as e:
        raise read_error(path, e) from None
    except Exception as e:  # safetensors raises several types for damaged files
        raise RunError(f"{path}: cannot read tensors ({type(e).__name__}: {_one_line(e)})") from None


def save_deployed(run_dir: Path, model: nn.Module, manifest: Manifest | dict | None = None) -> str:
    """Write the deployed state, sealing ``manifest`` (final but for ``state_sha256``) into its metadata.

    Returns the state's sha256, for the manifest.
    """
    metadata = {"format": RUN_FORMAT}
    if manifest is not None:
        metadata[SEAL_KEY] = manifest_checksum(manifest)
    return save_tensors(Path(run_dir) / STATE, deployed_state(model), metadata)


def check_sealed(run_dir: Path, manifest: Manifest) -> None:
    """Refuse a run whose state file or sealed manifest fields changed since calibration wrote them."""
    path = Path(run_dir) / STATE
    if not path.is_file():
        raise RunError(f"{run_dir}: damaged run: missing {STATE}")
    if sha256_file(path) != manifest.state_sha256:
        raise RunError(f"{path}: checksum mismatch (file changed or damaged since calibration)")
    recorded = read_raw_manifest(run_dir)
    expected = manifest_checksum(manifest, recorded)
    in_state, in_manifest = tensor_metadata(path).get(SEAL_KEY), recorded.get(SEAL_KEY)
    if any(sealed is not None and sealed != expected for sealed in (in_state, in_manifest)):
        raise RunError(
            f"{Path(run_dir) / MANIFEST}: damaged run: its settings, plan, groups or status differ from what "
            "calibration recorded"
        )


def load_deployed(run_dir: Path, model: nn.Module, manifest: Manifest) -> None:
    """Load a deployed state into a model prepared with the run's quant config."""
    path = Path(run_dir) / STATE
    check_sealed(run_dir, manifest)
    state = load_tensors(path)
    for m in model.modules():
        if isinstance(m, QUANT_LAYERS):
            m.weight_quantizer.make_deployable_structure()
    result = model.load_state_dict(state, strict=False)
    allowed_missing = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    if missing or result.unexpected_keys:
        raise RunError(
            f"{path}: state does not match the model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    set_mode(act_quantizers([model]), QuantMode.NEAREST)


@dataclass
class Checkpoint:
    done_groups: int
    groups: list[dict]
    modes: dict[str, str]
    files: list[str]  # state.safetensors, then the deltas to apply on it in order


def save_checkpoint(
    run_dir: Path, model: nn.Module, done_groups: int, groups: list[dict], fingerprint: str,
    changed: list[str] | None = None,
) -> None:
    """State after ``done_groups`` groups, for ``--resume``.

    Without ``changed`` it writes the full state, float weights included. With ``changed`` (the
    names of the modules the last group's reconstruction touched) it writes only the state under
    them, as a delta that resuming applies on top of the full state and the deltas before it:
    reconstructing a group changes nothing outside its own modules, and rewriting Swin-B's 350 MB
    after each of its 72 slice groups took 1-2 s each.
    """
    ck = Path(run_dir) / CHECKPOINT
    progress = ck / "progress.json"
    modes = {n: m.weight_quantizer.mode for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}
    # the record's meaning, sealed into the tensor file written with it (see _record_checksum)
    seal = {SEAL_KEY: _record_checksum(done_groups, groups, modes, fingerprint)}
    state = model.state_dict()
    if changed is None:
        digest, deltas = save_tensors(ck / "state.safetensors", _dedupe(dict(state)), seal), []
    else:
        try:
            info = json.loads(progress.read_bytes())
        except OSError as e:
            raise read_error(progress, e) from None
        digest, deltas = info["sha256"], list(info.get("deltas", []))
        prefixes = tuple(f"{name}." for name in changed)
        name = f"delta-{done_groups:04d}.safetensors"
        part = {k: v for k, v in state.items() if k.startswith(prefixes)}
        deltas.append({"file": name, "sha256": save_tensors(ck / name, _dedupe(part), seal)})
    atomic_write_json(
        progress,
        {"done_groups": done_groups, "groups": groups, "modes": modes, "fingerprint": fingerprint, "sha256": digest,
         "deltas": deltas},
    )
    listed = {d["file"] for d in deltas}
    for stale in ck.glob("delta-*.safetensors"):  # of an older full state
        if stale.name not in listed:
            stale.unlink()


def _record_checksum(done_groups: object, groups: object, modes: object, fingerprint: object) -> str:
    """Checksum of what a progress record means; the newest tensor file of the checkpoint keeps it, so
    an edited ``done_groups``, group record or layer mode no longer matches the tensors it describes."""
    return canonical_sha256([done_groups, groups, modes, fingerprint])


def changed_weights(run_dir: Path) -> list[str]:
    """The weights file the run's manifest records, if its contents changed since it was read.

    The manifest keeps the path and the sha256 of the bytes calibration loaded
    (``LoadedModel.source``); a file overwritten in place keeps its path, not its digest.
    """
    try:
        source = json.loads((Path(run_dir) / MANIFEST).read_bytes())["model"]["source"]
        path, recorded = source.get("checkpoint") or source.get("demo"), source["sha256"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return []
    if not isinstance(path, str) or not isinstance(recorded, str):
        return []
    try:
        now = sha256_file(Path(path))
    except RunError:
        return [f"weights file {path} is gone or unreadable"]
    if now == recorded:
        return []
    return [f"weights file {path} changed since the interrupted run read it (sha256 {recorded[:12]}… → {now[:12]}…)"]


def read_checkpoint(run_dir: Path, fingerprint: str, changed: list[str] | None = None) -> Checkpoint | None:
    """The checkpoint to resume from, or None if there is none; refuses one from other inputs.

    ``changed`` names the settings known to differ (from the interrupted run's manifest), for the message.
    """
    ck = Path(run_dir) / CHECKPOINT
    info = _read_progress(run_dir)
    if info is None:
        return None
    if info.get("fingerprint") != fingerprint:
        changed = list(changed or []) + changed_weights(run_dir)
        what = ", ".join(changed) if changed else "the same settings, other weights or calibration images"
        raise RunError(
            f"{run_dir} holds a checkpoint of a calibration with other inputs ({what}); rerun with the "
            f"interrupted run's inputs to resume it, use another --run-dir, or delete {ck} to start over"
        )
    return _verified_checkpoint(run_dir, info)


def _read_progress(run_dir: Path) -> dict | None:
    """The progress record, checked field by field; None when there is no checkpoint."""
    ck = Path(run_dir) / CHECKPOINT
    progress = ck / "progress.json"
    if not progress.is_file():
        return None
    try:
        text = progress.read_bytes()
    except OSError as e:
        raise read_error(progress, e) from None
    try:
        info = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunError(f"{progress}: corrupt checkpoint ({_one_line(e)}); delete {ck} to start over") from None
    _check_progress(info, progress, ck)
    return info


def _verified_checkpoint(run_dir: Path, info: dict) -> Checkpoint:
    """The checkpoint ``info`` describes, once its files and its seal match it."""
    ck = Path(run_dir) / CHECKPOINT
    files = [("state.safetensors", info.get("sha256"))] + [(d["file"], d["sha256"]) for d in info.get("deltas", [])]
    for name, digest in files:
        if not (ck / name).is_file() or sha256_file(ck / name) != digest:
            raise RunError(f"{ck}: checkpoint state damaged ({name}); delete {ck} to start over")
    sealed = tensor_metadata(ck / files[-1][0]).get(SEAL_KEY)
    if sealed != _record_checksum(info["done_groups"], info["groups"], info["modes"], info["fingerprint"]):
        raise RunError(
            f"{ck / 'progress.json'}: damaged checkpoint record (it does not match the state it describes); "
            f"delete {ck} to start over"
        )
    return Checkpoint(info["done_groups"], info["groups"], info["modes"], [f for f, _ in files])


@dataclass(frozen=True)
class RunHealth:
    """What ``osq inspect`` reports about a run directory before reading anything else from it.

    ``status``: "complete" (finished, every check passed), "in_progress" (unfinished;
    ``resumable_groups`` finished groups wait in a sound checkpoint, None without one) or
    "damaged" (``reason`` says what failed; nothing in it should be trusted).
    """

    status: str
    reason: str = ""
    manifest: Manifest | None = None
    resumable_groups: int | None = None

    @property
    def ok(self) -> bool:
        return self.status != "damaged"


def verify_run(run_dir: str | Path) -> RunHealth:
    """Check a run directory end to end: manifest fields, state checksum and seal, checkpoint.

    Raises :class:`RunError` only when ``run_dir`` is not a run directory at all; everything else
    is a :class:`RunHealth`.
    """
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        read_manifest(run_dir)  # raises the right "no such / not a run directory" error
    try:
        manifest = read_manifest(run_dir)
        if manifest.complete:
            check_sealed(run_dir, manifest)
            return RunHealth("complete", manifest=manifest)
        info = _read_progress(run_dir)
        if info is None:
            return RunHealth("in_progress", manifest=manifest)
        return RunHealth("in_progress", manifest=manifest,
                         resumable_groups=_verified_checkpoint(run_dir, info).done_groups)
    except RunError as e:
        return RunHealth("damaged", reason=str(e))


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DELTA = re.compile(r"^delta-\d{4,}\.safetensors$")
WEIGHT_MODES = ("fp", "nearest", "soft", "hard", "int")


def _check_progress(info: object, progress: Path, ck: Path) -> None:
    """Every field of the progress record by type and range: a damaged one is refused in one line."""

    def bad(what: str) -> RunError:
        return RunError(f"{progress}: damaged checkpoint record ({what}); delete {ck} to start over")

    if not isinstance(info, dict):
        raise bad("not a JSON object")
    done = info.get("done_groups")
    if type(done) is not int or done < 0:
        raise bad(f"done_groups {done!r} is not a count")
    groups = info.get("groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise bad("groups is not a list of records")
    if len(groups) != done:
        raise bad(f"done_groups {done} but {len(groups)} group records")
    for i, group in enumerate(groups):
        problem = group_record_problem(group, i)
        if problem:
            raise bad(problem)
    modes = info.get("modes")
    if not isinstance(modes, dict) or not all(isinstance(k, str) and v in WEIGHT_MODES for k, v in modes.items()):
        raise bad(f"modes must map layer names to one of {', '.join(WEIGHT_MODES)}")
    for key in ("fingerprint", "sha256"):
        if not isinstance(info.get(key), str) or not _SHA256.match(info[key]):
            raise bad(f"{key} is not a sha256")
    deltas = info.get("deltas", [])
    if not isinstance(deltas, list) or not all(
        isinstance(d, dict) and isinstance(d.get("file"), str) and _DELTA.match(d["file"])
        and isinstance(d.get("sha256"), str) and _SHA256.match(d["sha256"]) for d in deltas
    ):
        raise bad("deltas must list delta-NNNN.safetensors files with their sha256")
    if len(deltas) > done:
        raise bad(f"{len(deltas)} deltas for {done} finished groups")


def load_checkpoint_state(run_dir: Path, model: nn.Module, ck: Checkpoint) -> None:
    state: dict[str, torch.Tensor] = {}
    for name in ck.files:  # the full state, then each group's delta in order
        state.update(load_tensors(Path(run_dir) / CHECKPOINT / name))
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            mode = ck.modes.get(name, "nearest")
            if mode == "int":
                m.weight_quantizer.make_deployable_structure()
                m.weight_quantizer.float_available = True
            set_mode(m.weight_quantizer, QuantMode(mode))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # the record's layer modes and the saved tensors disagree
        detail = " ".join(str(e).split())[:200]
        raise RunError(f"{Path(run_dir) / CHECKPOINT}: checkpoint does not fit the model ({detail}); delete it "
                       "to start over") from None
    set_mode(act_quantizers([model]), QuantMode.NEAREST)


def checkpointed_groups(run_dir: Path) -> int | None:
    """How many groups an unfinished run's checkpoint holds (None when there is none or it is unreadable)."""
    try:
        done = json.loads((Path(run_dir) / CHECKPOINT / "progress.json").read_text())["done_groups"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return None
    return done if isinstance(done, int) and not isinstance(done, bool) and done >= 0 else None


def clear_checkpoint(run_dir: Path) -> None:
    ck = Path(run_dir) / CHECKPOINT
    for p in (ck / "progress.json", ck / "state.safetensors", *ck.glob("delta-*.safetensors")):
        p.unlink(missing_ok=True)
    if ck.is_dir() and not any(ck.iterdir()):
        ck.rmdir()
