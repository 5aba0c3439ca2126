"""The embedded demo: a small ViT trained on scikit-learn's bundled handwritten digits.

``osq calibrate demo`` has to work on a fresh machine with no downloads, on real images and a real
trained model, so that quantization error shows up as an accuracy change one can read.  The digits
(1797 real 8x8 scans, 10 classes) ship inside scikit-learn; they are written once as 32x32 RGB PNGs
in ImageFolder layout, so the demo goes through exactly the same file -> timm transform path as any
user folder, and a 6-block ViT is trained on them on the CPU (about a minute or two).

Everything lands in ``$OSQ_CACHE/demo`` (default ``~/.cache/osqdeploy/demo``); each file appears
atomically, so an interrupted run leaves nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from osqdeploy.io import os_reason
from osqdeploy.load.data import DataError, ImageFiles, eval_transform
from osqdeploy.load.models import (
    DEMO_RECIPE,
    CheckpointError,
    LoadedModel,
    ModelSpec,
    content_fingerprint,
    read_checkpoint_file,
    resolve_recipe,
)

__all__ = [
    "DemoPaths",
    "DemoTrainConfig",
    "cache_dir",
    "demo_paths",
    "ensure_demo_data",
    "ensure_demo_model",
    "train_demo_model",
]

log = logging.getLogger(__name__)

DATA_SEED = 0  # the train/val split is a fixed artifact, independent of the training seed
VAL_FRACTION = 0.2
IMAGE_SIZE = 32  # 8x8 digits upsampled 4x: large enough for timm's transforms and 8x8 patches


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo's data and model live."""

    root: Path
    train_dir: Path
    val_dir: Path
    weights: Path

    @property
    def meta(self) -> Path:
        """JSON next to the weights: held-out accuracy, spec and training config.  Written last."""
        return self.root / "model.json"


@dataclass(frozen=True)
class DemoTrainConfig:
    """Training settings.  The defaults reach ~98.6% held-out top-1 in ~75 s on 2 Xeon cores."""

    epochs: int = 25
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    max_shift: int = 2  # random translation in pixels: the only augmentation, and enough
    seed: int = 0


def cache_dir() -> Path:
    """``$OSQ_CACHE``, else ``~/.cache/osqdeploy``."""
    return Path(os.environ.get("OSQ_CACHE") or "~/.cache/osqdeploy").expanduser()


def demo_paths() -> DemoPaths:
    root = cache_dir() / "demo"
    return DemoPaths(
        root=root,
        train_dir=root / "data" / "train",
        val_dir=root / "data" / "val",
        weights=root / "model.safetensors",
    )


# ------------------------------------------------------------------------------------------- data


def ensure_demo_data() -> DemoPaths:
    """Write the digits as PNGs (``data/{train,val}/<digit>/<index>.png``) unless already there.

    The whole ``data`` folder is built beside its final place and renamed into it in one step, so
    it either exists complete or not at all.
    """
    paths = demo_paths()
    data_dir = paths.train_dir.parent
    if data_dir.is_dir():
        return paths
    try:
        _write_demo_data(paths, data_dir)
    except OSError as e:
        raise _cache_error(e) from None
    return paths


def _cache_error(e: OSError) -> DataError:
    where = e.filename or cache_dir()
    return DataError(f"cannot write the demo cache {where}: {os_reason(e)}; set OSQ_CACHE to a writable folder")


def _write_demo_data(paths: DemoPaths, data_dir: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
        indices, test_size=VAL_FRACTION, stratify=digits.target, random_state=DATA_SEED
    )
    paths.root.mkdir(parents=True, exist_ok=True)
    tmp = paths.root / f".data-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # mkdir honours the umask
    tmp.mkdir()
    try:
        for split, split_idx in (("train", train_idx), ("val", val_idx)):
            for i in sorted(split_idx.tolist()):
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                _digit_image(digits.images[i]).save(folder / f"{i:04d}.png")
        try:
            os.replace(tmp, data_dir)
        except OSError:
            if not data_dir.is_dir():  # not just another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _digit_image(pixels: np.ndarray) -> Image.Image:
    """An 8x8 digit (values 0..16) as a 32x32 RGB image, bilinearly upsampled."""
    gray = Image.fromarray(np.rint(pixels * (255.0 / 16.0)).astype(np.uint8), "L")
    return gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).convert("RGB")


def _as_tensors(dataset: ImageFiles) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.tensor(labels)


# ------------------------------------------------------------------------------------------ model


def ensure_demo_model(progress: bool = True, epochs: int | None = None) -> LoadedModel:
    """The trained demo model, trained (and cached) on first use.

    A cached model is reused only if it was trained for the same architecture and settings;
    ``epochs`` overrides the default training length (tests use a few).
    """
    paths = ensure_demo_data()
    config = DemoTrainConfig() if epochs is None else replace(DemoTrainConfig(), epochs=epochs)
    recipe = resolve_recipe(DEMO_RECIPE)
    spec = recipe.spec()
    cached = _load_cached(paths, spec, config)
    if cached is None:
        model, meta = train_demo_model(paths, spec, config, progress=progress)
        try:
            _save(paths, model, meta)
            digest = content_fingerprint(paths.weights)
        except OSError as e:
            raise _cache_error(e) from None
    else:
        model, meta, digest = cached
    source = {"demo": str(paths.weights), "val_top1": meta["val_top1"], **digest}
    return LoadedModel(model=model.eval(), recipe=recipe, spec=spec, source=source)


def _read_meta(paths: DemoPaths) -> dict[str, Any]:
    try:
        return json.loads(paths.meta.read_text())
    except (OSError, ValueError):
        return {}


def _load_cached(
    paths: DemoPaths, spec: ModelSpec, config: DemoTrainConfig
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]] | None:
    """The cached model, its metadata and the weights file's digest, if made with this spec and config."""
    meta = _read_meta(paths)
    if meta.get("spec") != spec.to_dict() or meta.get("train") != asdict(config) or "val_top1" not in meta:
        return None
    model = spec.create()
    try:
        state, digest = read_checkpoint_file(paths.weights)
        model.load_state_dict(state, strict=True)
    except (CheckpointError, RuntimeError) as e:
        log.warning("demo model cache unusable (%s); retraining", e)
        return None
    return model, meta, digest


def train_demo_model(
    paths: DemoPaths, spec: ModelSpec, config: DemoTrainConfig, progress: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """Train from scratch on ``paths.train_dir``; returns the model and its metadata.

    Seeded and run inside ``fork_rng`` so it is reproducible without touching the caller's RNG.
    """
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), _training_threads():
        torch.manual_seed(config.seed)
        model = spec.create()
        transform = eval_transform(model)
        x_train, y_train = _as_tensors(ImageFiles(paths.train_dir, transform))
        x_val, y_val = _as_tensors(ImageFiles(paths.val_dir, transform))
        background = float(x_train.amin())  # a black pixel after normalisation
        steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=config.lr,
            total_steps=config.epochs * steps_per_epoch,
            pct_start=config.warmup_fraction,
        )
        with _progress_bar(progress) as bar:
            task = bar.add_task("training demo ViT", total=config.epochs * steps_per_epoch, loss=float("nan"))
            model.train()
            for _ in range(config.epochs):
                order = torch.randperm(len(x_train))
                for begin in range(0, len(x_train), config.batch_size):
                    batch = order[begin : begin + config.batch_size]
                    images = _random_shift(x_train[batch], config.max_shift, background)
                    loss = F.cross_entropy(model(images), y_train[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    bar.update(task, advance=1, loss=loss.item())
        model.eval()
        with torch.no_grad():
            val_top1 = 100.0 * (model(x_val).argmax(dim=1) == y_val).float().mean().item()
        threads = torch.get_num_threads()
    seconds = time.perf_counter() - start
    meta = {
        "val_top1": round(val_top1, 2),
        "n_train": len(x_train),
        "n_val": len(x_val),
        "train_seconds": round(seconds, 1),
        "threads": threads,
        "spec": spec.to_dict(),
        "train": asdict(config),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    message = (
        f"demo ViT: held-out top-1 {val_top1:.2f}% on {len(x_val)} digits "
        f"(trained {config.epochs} epochs in {seconds:.0f} s)"
    )
    log.info(message)
    if progress:
        Console(stderr=True).print(message)
    return model, meta


def _random_shift(images: torch.Tensor, max_shift: int, fill: float) -> torch.Tensor:
    """Translate each image by its own random offset of up to ``max_shift`` pixels."""
    if max_shift <= 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, value=fill)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2)).tolist()
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)])


def _save(paths: DemoPaths, model: nn.Module, meta: dict[str, Any]) -> None:
    """Weights first, then the JSON that vouches for them, each via tmp file + ``os.replace``."""
    from safetensors.torch import save_file

    paths.root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with _atomic_path(paths.weights) as tmp:
        save_file(state, str(tmp))
    with _atomic_path(paths.meta) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")


@contextlib.contextmanager
def _atomic_path(target: Path) -> Iterator[Path]:
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # umask applies
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _free_cores() -> int:
    """Cores this process may use that other processes are not already keeping busy.

    OpenMP threads that share a core with another busy process stall at every barrier: on a 2-core
    machine with one core taken, a demo training step took 2.5 s with 2 threads and 72 ms with 1.
    The 1-minute load average stands in for the other processes' demand.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, cores - int(busy + 0.5)))


@contextlib.contextmanager
def _training_threads() -> Iterator[None]:
    """Train on the free cores; restore the caller's thread count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(_free_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )
