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

import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ..quant.layers import QUANT_LAYERS, act_quantizers
from ..quant.mode import QuantMode, set_mode
from . import manifest as manifest_io
from .manifest import MANIFEST, RUN_FORMAT, RUN_FORMAT_VERSION, Manifest, RunError

__all__ = ["MANIFEST", "RUN_FORMAT", "RUN_FORMAT_VERSION", "Manifest", "OutputError", "RunError", "RunLockedError"]

STATE = "state.safetensors"
CHECKPOINT = "checkpoint"
LOCK = ".lock"


class RunLockedError(RunError):
    """Another live process is writing this run."""


class OutputError(RunError):
    """An output location that cannot be written (permissions, a file in the way, a read-only disk)."""


def check_writable(directory: Path) -> None:
    """Prove that files can be created in ``directory`` (or, while it does not exist yet, in the nearest
    existing folder above it), before long work starts; creates nothing."""
    directory = Path(directory).absolute()
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot write to {directory}: {probe} is a file; nothing was written")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {directory}: {probe} is not writable; nothing was written")


# --- atomic file writes -------------------------------------------------------------------------


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


def file_mode() -> int:
    """The mode ``open()`` would give a new file (0644 under the usual umask): temporary files are
    created 0600, and a run or an ONNX file must stay readable by a serving process of another user."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, file_mode())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
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
        return safetensors.torch.load_file(str(path))
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
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == me["host"] and not _pid_alive(pid):
                lock.unlink(missing_ok=True)
                continue
            raise RunLockedError(
                f"{run_dir} is being written by process {pid} on {host}; wait for it or remove {lock} "
                "if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
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
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_manifest(run_dir: Path, manifest: Manifest) -> None:
    atomic_write_json(Path(run_dir) / MANIFEST, manifest.to_dict())


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


def save_deployed(run_dir: Path, model: nn.Module) -> str:
    """Write the deployed state; returns its sha256 for the manifest."""
    return save_tensors(Path(run_dir) / STATE, deployed_state(model), {"format": RUN_FORMAT})


def load_deployed(run_dir: Path, model: nn.Module, manifest: Manifest) -> None:
    """Load a deployed state into a model prepared with the run's quant config."""
    path = Path(run_dir) / STATE
    if not path.is_file():
        raise RunError(f"{run_dir}: missing {STATE}")
    digest = sha256_file(path)
    if digest != manifest.state_sha256:
        raise RunError(f"{path}: checksum mismatch (file changed or damaged since calibration)")
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
    state = model.state_dict()
    if changed is None:
        digest, deltas = save_tensors(ck / "state.safetensors", _dedupe(dict(state))), []
    else:
        info = json.loads(progress.read_text())
        digest, deltas = info["sha256"], list(info.get("deltas", []))
        prefixes = tuple(f"{name}." for name in changed)
        name = f"delta-{done_groups:04d}.safetensors"
        part = {k: v for k, v in state.items() if k.startswith(prefixes)}
        deltas.append({"file": name, "sha256": save_tensors(ck / name, _dedupe(part))})
    atomic_write_json(
        progress,
        {"done_groups": done_groups, "groups": groups, "modes": modes, "fingerprint": fingerprint, "sha256": digest,
         "deltas": deltas},
    )
    listed = {d["file"] for d in deltas}
    for stale in ck.glob("delta-*.safetensors"):  # of an older full state
        if stale.name not in listed:
            stale.unlink()


def read_checkpoint(run_dir: Path, fingerprint: str, changed: list[str] | None = None) -> Checkpoint | None:
    """The checkpoint to resume from, or None if there is none; refuses one from other settings.

    ``changed`` names the settings known to differ (from the interrupted run's manifest), for the message.
    """
    ck = Path(run_dir) / CHECKPOINT
    progress = ck / "progress.json"
    if not progress.is_file():
        return None
    try:
        info = json.loads(progress.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{progress}: corrupt checkpoint ({e}); delete {ck} to start over") from None
    if info.get("fingerprint") != fingerprint:
        what = ", ".join(changed) if changed else "the same settings, other weights or calibration images"
        raise RunError(
            f"{run_dir} holds a checkpoint of a calibration with other settings ({what}); rerun with the "
            f"interrupted run's settings to resume it, use another --run-dir, or delete {ck} to start over"
        )
    files = [("state.safetensors", info.get("sha256"))] + [(d["file"], d["sha256"]) for d in info.get("deltas", [])]
    for name, digest in files:
        if not (ck / name).is_file() or sha256_file(ck / name) != digest:
            raise RunError(f"{ck}: checkpoint state damaged ({name}); delete {ck} to start over")
    return Checkpoint(info["done_groups"], info["groups"], info["modes"], [f for f, _ in files])


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
    model.load_state_dict(state, strict=True)
    set_mode(act_quantizers([model]), QuantMode.NEAREST)


def checkpointed_groups(run_dir: Path) -> int | None:
    """How many groups an unfinished run's checkpoint holds (None when there is none or it is unreadable)."""
    try:
        done = json.loads((Path(run_dir) / CHECKPOINT / "progress.json").read_text())["done_groups"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return done if isinstance(done, int) and not isinstance(done, bool) and done >= 0 else None


def clear_checkpoint(run_dir: Path) -> None:
    ck = Path(run_dir) / CHECKPOINT
    for p in (ck / "progress.json", ck / "state.safetensors", *ck.glob("delta-*.safetensors")):
        p.unlink(missing_ok=True)
    if ck.is_dir() and not any(ck.iterdir()):
        ck.rmdir()
