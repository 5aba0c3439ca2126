"""Image data: a folder of images as a Dataset, timm's eval transform, calibration batches.

One dataset class covers the three folder shapes users have: ImageFolder class sub-folders, a flat
folder of ImageNet files named by WordNet id (``n01440764_tench.JPEG``, as in the common ImageNet
sample sets), and a flat folder of anything (unlabeled; enough for calibration).  Files are checked
up front so a bad file is reported once, before a long calibration, not as a crash mid-way.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..io import os_reason

__all__ = [
    "CalibrationAugment",
    "IMAGE_EXTENSIONS",
    "MAX_DECODE_PIXELS",
    "DataError",
    "DataWarning",
    "ImageFiles",
    "ImageTooLargeError",
    "MemoryEstimate",
    "ResourceError",
    "available_memory",
    "calibration_memory",
    "calibration_augment",
    "calibration_tensor",
    "eval_transform",
    "imagenet_label",
    "load_rgb",
    "spread_indices",
    "split_files",
    "to_rgb",
]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
_WNID = re.compile(r"^(n\d{8})(?=$|[_.\-\s])")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("LA", "La", "PA", "RGBa", "RGBA")
# Transparent pixels are shown over white, as a viewer would; their stored colour is arbitrary.
_BACKGROUND = (255, 255, 255)

# Skip reasons, as counted in ImageFiles.skipped.
NOT_AN_IMAGE = "not an image"
EMPTY = "empty file"
CORRUPT = "corrupt or truncated"
UNREADABLE = "unreadable"
TOO_LARGE = "too large to decode"
OUTSIDE_CLASSES = "outside class folders"

# The most pixels decoded at full size: 48 megapixels (an 8K frame is 33), well below Pillow's
# 89-megapixel bomb warning, since a 13000x13000 picture held alone nearly doubled a calibration's
# memory. Larger JPEGs are decoded at 1/2..1/8 scale by libjpeg (``Image.draft``), which any model
# input size survives; other formats cannot be decoded smaller and are skipped.
MAX_DECODE_PIXELS = 48_000_000


class DataError(ValueError):
    """A data folder (or file list) that cannot give any image."""


class DataWarning(UserWarning):
    """Some files were skipped; the data is still usable."""


class ImageTooLargeError(DataError):
    """A picture above ``MAX_DECODE_PIXELS`` that cannot be decoded at a smaller scale."""


# ------------------------------------------------------------------------------------ pixel modes


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without losing the picture.

    ``Image.convert("RGB")`` clips 16-bit and float data to 0..255 (a mostly white image) and drops
    alpha onto whatever colour transparent pixels happen to store; both are handled here.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        # 16-bit PNG/TIFF (Pillow gives "I;16*" or "I"): scale 0..65535 to 0..255.
        arr = np.asarray(img).astype(np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0  # float images are usually 0..1
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in _ALPHA_MODES:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, _BACKGROUND)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV: Pillow's conversion is right


def load_rgb(path: str | Path) -> Image.Image:
    """Decode one image file into 8-bit RGB, within ``MAX_DECODE_PIXELS`` (see there).

    Runs on decoding threads, so Pillow's bomb warning (above 89 megapixels, before any draft) is
    not silenced here: ``warnings.catch_warnings`` is process-wide state, not a thread's.
    """
    with Image.open(path) as img:
        _within_budget(img, path)
        img.load()
        return to_rgb(img)


def _draft_scale(img: Image.Image) -> int | None:
    """The JPEG scale-down (1, 2, 4 or 8) that brings ``img`` within the budget; None if none does."""
    pixels = img.width * img.height
    for scale in (1, 2, 4, 8):
        if pixels <= MAX_DECODE_PIXELS * scale * scale and (scale == 1 or img.format == "JPEG"):
            return scale
    return None


def _within_budget(img: Image.Image, path: str | Path) -> None:
    """Draft a large JPEG to a smaller scale before decoding; refuse what cannot be brought in budget."""
    scale = _draft_scale(img)
    if scale is None:
        raise ImageTooLargeError(
            f"{path}: {img.width}x{img.height} pixels, above the {MAX_DECODE_PIXELS // 1_000_000}-megapixel "
            "decode limit; downscale it"
        )
    if scale > 1:  # Pillow's draft picks the largest power of two that keeps the size asked for
        img.draft("RGB", (img.width // scale, img.height // scale))


def _skip_reason(path: Path) -> str | None:
    """Why ``path`` can't be used, or None.  Cheap: JPEGs are decoded at 1/8 scale only."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return NOT_AN_IMAGE
    try:
        with open(path, "rb") as f:  # unreadable is not corrupt: say which
            if not f.read(1):
                return EMPTY
    except OSError:
        return UNREADABLE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.verify()  # structure and checksums (PNG), but not JPEG entropy data
            with Image.open(path) as img:
                if _draft_scale(img) is None:
                    return TOO_LARGE
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                    img.load()  # a truncated JPEG fails only when decoded
    except Image.DecompressionBombError:
        return TOO_LARGE
    except (OSError, SyntaxError, ValueError, EOFError):
        return CORRUPT
    return None


# ---------------------------------------------------------------------------------------- dataset


@lru_cache(maxsize=1)
def _imagenet_wnids() -> dict[str, int]:
    wnids = timm.data.ImageNetInfo().label_names()  # sorted ImageNet-1k WordNet ids
    return {w: i for i, w in enumerate(wnids)}


def imagenet_label(path: str | Path) -> int | None:
    """ImageNet-1k class index from a file name starting with its WordNet id, else None."""
    m = _WNID.match(Path(path).name)
    return _imagenet_wnids().get(m.group(1)) if m else None


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


class ImageFiles(Dataset):
    """Images of one folder, labelled by layout, with unusable files skipped up front.

    Layouts: class sub-folders (label = index of the sorted folder name, files found recursively),
    a flat folder of ImageNet files named by WordNet id (label = ImageNet-1k index), or any other
    flat folder (label -1: usable for calibration, not for accuracy).  Items are
    ``(transform(image), label)``, or a PIL RGB image when there is no transform.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        max_files: int | None = None,
    ) -> None:
        root = Path(root).expanduser()
        if not root.exists():
            raise DataError(f"data folder not found: {root}")
        if not root.is_dir():
            raise DataError(f"data path is not a folder: {root}")
        files, labels, classes, layout, skipped = _scan(root)
        if not files and not skipped:
            raise DataError(f"data folder is empty: {root}")
        if max_files is not None and max_files < len(files):
            keep = spread_indices(len(files), max_files)
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        self._setup(files, labels, transform, skipped, where=str(root))
        if layout == "imagenet" and not self.labelled:
            unlabeled = sum(label < 0 for label in self.labels)
            warnings.warn(
                f"{root}: {unlabeled} of {len(self.files)} files have no ImageNet WordNet id prefix; "
                "treating the folder as unlabeled",
                DataWarning,
                stacklevel=2,
            )
            self.labels = [-1] * len(self.files)
            layout, classes = "unlabeled", []
        self.root: Path | None = root
        self.layout = layout
        self.classes = classes

    @classmethod
    def from_files(
        cls,
        files: Sequence[str | Path],
        labels: Sequence[int] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        validate: bool = True,
    ) -> ImageFiles:
        """A dataset over an explicit file list (e.g. one side of :func:`split_files`)."""
        files = [Path(f) for f in files]
        labels = [-1] * len(files) if labels is None else [int(label) for label in labels]
        if len(labels) != len(files):
            raise ValueError(f"got {len(files)} files but {len(labels)} labels")
        dataset = cls.__new__(cls)
        dataset._setup(files, labels, transform, Counter(), where="file list", validate=validate)
        dataset.root = None
        dataset.layout = "files" if dataset.labelled else "unlabeled"
        dataset.classes = []
        return dataset

    def _setup(
        self,
        files: list[Path],
        labels: list[int],
        transform: Callable[[Image.Image], Any] | None,
        skipped: Counter[str],
        where: str,
        validate: bool = True,
    ) -> None:
        kept: list[Path] = []
        kept_labels: list[int] = []
        for path, label in zip(files, labels, strict=True):
            reason = _skip_reason(path) if validate else None
            if reason is None:
                kept.append(path)
                kept_labels.append(label)
            else:
                skipped[reason] += 1
        if not kept:
            detail = f" ({_summary(skipped)})" if skipped else ""
            raise DataError(f"no readable image in {where}{detail}")
        if skipped:
            total = len(kept) + sum(skipped.values())
            warnings.warn(
                f"{where}: skipped {sum(skipped.values())} of {total} files ({_summary(skipped)})",
                DataWarning,
                stacklevel=3,
            )
        self.files: list[Path] = kept
        self.labels: list[int] = kept_labels
        self.skipped: dict[str, int] = dict(skipped)
        self.transform = transform

    @property
    def labelled(self) -> bool:
        return bool(self.labels) and all(label >= 0 for label in self.labels)

    def split(self, eval_fraction: float, seed: int) -> tuple[ImageFiles, ImageFiles]:
        """Disjoint (calibration, evaluation) datasets: calibrate on images you don't report on."""
        calib, held_out = split_files(self.files, eval_fraction, seed)
        return self._subset(calib), self._subset(held_out)

    def _subset(self, files: Sequence[Path]) -> ImageFiles:
        label_of = dict(zip(self.files, self.labels, strict=True))
        subset = ImageFiles.from_files(files, [label_of[f] for f in files], self.transform, validate=False)
        subset.root, subset.layout, subset.classes = self.root, self.layout, self.classes
        return subset

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = _decode(self.files[index])
        return (self.transform(img) if self.transform is not None else img), self.labels[index]

    def __repr__(self) -> str:
        where = self.root if self.root is not None else "file list"
        return f"ImageFiles({where}, n={len(self)}, layout={self.layout}, skipped={self.skipped})"


def _scan(root: Path) -> tuple[list[Path], list[int], list[str], str, Counter[str]]:
    """Candidate files and labels of a folder, before any file is opened."""
    skipped: Counter[str] = Counter()
    entries = sorted(p for p in root.iterdir() if not _is_hidden(p))
    class_dirs = [p for p in entries if p.is_dir()]
    if class_dirs:
        loose = [p for p in entries if p.is_file()]
        if loose:
            skipped[OUTSIDE_CLASSES] += len(loose)
        files, labels = [], []
        for index, folder in enumerate(class_dirs):
            for path in sorted(folder.rglob("*")):
                if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
                    files.append(path)
                    labels.append(index)
        return files, labels, [d.name for d in class_dirs], "folders", skipped
    files = [p for p in entries if p.is_file()]
    wnid_labels = [imagenet_label(p) for p in files]
    images = [label for p, label in zip(files, wnid_labels, strict=True) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if images and any(label is not None for label in images):
        labels = [-1 if label is None else label for label in wnid_labels]
        return files, labels, list(_imagenet_wnids()), "imagenet", skipped
    return files, [-1] * len(files), [], "unlabeled", skipped


def _summary(counts: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


# ------------------------------------------------------------------------- transforms and subsets


def eval_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """The model's own eval preprocessing (resize, crop, normalise) from its timm pretrained config."""
    config = timm.data.resolve_data_config({}, model=model)
    return timm.data.create_transform(**config)


def spread_indices(total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(total)``.

    Taking the first ``n`` of a class-sorted list would give one class only; an even spread keeps
    every part of the list represented and is deterministic.
    """
    if n >= total:
        return list(range(total))
    if n <= 0:
        return []
    return [int(i) for i in np.linspace(0, total - 1, n).round()]


def split_files(files: Sequence[str | Path], eval_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split files into disjoint (calibration, evaluation) lists, reproducibly.

    The split depends only on the set of files and the seed (not on listing order); each side is
    returned sorted.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    unique = sorted({Path(f) for f in files}, key=str)
    if len(unique) < 2:
        raise ValueError(f"need at least 2 files to split, got {len(unique)}")
    n_eval = min(max(round(len(unique) * eval_fraction), 1), len(unique) - 1)
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    calib = [f for i, f in enumerate(unique) if i not in eval_idx]
    held_out = [f for i, f in enumerate(unique) if i in eval_idx]
    return calib, held_out


@dataclass(frozen=True)
class CalibrationAugment:
    """Random views of a picture: timm's random crop and flip per picture, its tensor conversion per batch.

    Calling it gives one view, as timm's whole transform does. :func:`calibration_tensor` instead
    draws the pictures one by one (the random draws stay in order) and converts them a chunk at a
    time: converting and normalising each view alone cost more than decoding and cropping it
    (4,096 views of 250 ImageNet images on 2 cores: 19.8 s one by one, 11.8 s in chunks;
    ``benchmarks.calib_views``). The values are the same.
    """

    views: Callable[[Image.Image], Image.Image]  # timm's primary transform: resized crop, flip
    to_tensor: Callable[[Image.Image], torch.Tensor]  # timm's final transform: to tensor, normalise
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, picture: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.views(picture))

    def stack(self, pictures: Sequence[Image.Image], out: torch.Tensor) -> None:
        """Write the views ``pictures`` (from :attr:`views`) into ``out`` ``[len, 3, H, W]``, normalised.

        The arithmetic of torchvision's ``ToTensor`` and ``Normalize`` (÷255, − mean, ÷ std, in
        float32), on all of them at once.
        """
        x = torch.from_numpy(np.stack([np.asarray(p.convert("RGB")) for p in pictures])).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        torch.div(x.to(torch.float32), 255, out=out)
        out.sub_(mean).div_(std)


def calibration_augment(model: nn.Module, scale: tuple[float, float] = (0.35, 1.0)) -> CalibrationAugment:
    """Mild random views (resized crop, horizontal flip) in the model's own resolution and normalisation.

    Reconstruction sees each calibration image thousands of times (20,000 iterations of batch 32
    over the paper's 1,024 images); with fewer images it learns them rather than the model's
    activation statistics.  Extra views of the same images are the cheapest fresh inputs.  No
    colour jitter or erasing: calibration should match deployment statistics, not regularise.
    """
    config = timm.data.resolve_data_config({}, model=model)
    primary, secondary, final = timm.data.create_transform(
        input_size=config["input_size"], is_training=True, scale=scale, hflip=0.5, color_jitter=None,
        auto_augment=None, re_prob=0.0, interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
        separate=True,
    )
    if len(secondary.transforms):  # nothing between crop and tensor: stack() converts exactly what timm would
        raise RuntimeError(f"unexpected calibration transform {secondary}")
    return CalibrationAugment(primary, final, tuple(config["mean"]), tuple(config["std"]))


def calibration_tensor(
    dataset: Dataset,
    n: int,
    seed: int,
    augment: Callable[[Image.Image], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A seeded random subset of ``n`` transformed images, stacked ``[n, 3, H, W]`` float32.

    With ``augment`` (e.g. :func:`calibration_augment`) and fewer images than ``n``, every image is
    used once as the dataset transforms it and the rest are random ``augment`` views of the images in
    turn, seeded, so the same call gives the same tensor.  ``augment`` needs an :class:`ImageFiles`
    dataset (it transforms the decoded picture, not the dataset's tensor).
    """
    if n < 1:
        raise ValueError(f"number of calibration images must be >= 1, got {n}")
    total = len(dataset)
    if total == 0:
        raise DataError("cannot calibrate on an empty dataset")
    extra = 0
    if n > total:
        if augment is None:
            warnings.warn(
                f"asked for {n} calibration images but the data has {total}; using all {total}",
                DataWarning,
                stacklevel=2,
            )
        elif not isinstance(dataset, ImageFiles):
            raise TypeError(f"augmented calibration views need an ImageFiles dataset, got {type(dataset).__name__}")
        else:
            extra = n - total
        n = total
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=generator).tolist()
    images, indices, failed = _draw(dataset, order, n)
    if failed:
        if isinstance(dataset, ImageFiles):
            dataset.skipped[CORRUPT] = dataset.skipped.get(CORRUPT, 0) + len(failed)
        if not images:
            raise DataError(f"no calibration image could be decoded ({len(failed)} failed; first: {failed[0]})")
        warnings.warn(
            f"skipped {len(failed)} image{'s' if len(failed) > 1 else ''} that failed to decode (first: "
            f"{failed[0]}); calibrating on {len(images)}",
            DataWarning,
            stacklevel=2,
        )
    out = torch.empty(len(images) + extra, *images[0].shape, dtype=torch.float32)
    torch.stack([image.to(torch.float32) for image in images], out=out[: len(images)])
    if extra:
        _augmented_views(dataset, indices, extra, augment, seed, out[len(images) :])
    return out


def _draw(dataset: Dataset, order: list[int], n: int) -> tuple[list[torch.Tensor], list[int], list[str]]:
    """The first ``n`` items of ``order`` that decode, with their indices and the failures' messages.

    A file that passed the scan can still fail when decoded in full (damaged JPEG entropy data, a
    file changed since): it is skipped like any bad image and the next one in ``order`` drawn.
    """
    images: list[torch.Tensor] = []
    indices: list[int] = []
    failed: list[str] = []

    def one(i: int) -> torch.Tensor | str:
        try:
            item = dataset[i]
        except DataError as e:
            return str(e)
        image = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"dataset items must be tensors for calibration (set a transform), got {type(image)}")
        return image

    parallel = isinstance(dataset, ImageFiles) and dataset.transform is not None  # decoding releases the GIL
    start = 0
    while len(images) < n and start < len(order):
        batch = order[start : start + n - len(images)]
        start += len(batch)
        results = _in_parallel(one, batch) if parallel else map(one, batch)
        for i, result in zip(batch, results, strict=True):
            if isinstance(result, str):
                failed.append(result)
            else:
                images.append(result)
                indices.append(i)
    return images, indices, failed


def _augmented_views(dataset: ImageFiles, order: list[int], count: int, augment: Callable[[Image.Image], torch.Tensor],
                     seed: int, out: torch.Tensor) -> None:
    """``count`` views of the images in ``order``, cycling, into ``out``; both RNGs timm draws from are seeded."""
    state = random.getstate()
    random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # decoding runs ahead on a thread pool; the random views are drawn in order, here
            paths = [dataset.files[order[k % len(order)]] for k in range(count)]
            pictures = _in_parallel(_decode, paths)
            if not isinstance(augment, CalibrationAugment):
                for k, picture in enumerate(pictures):
                    out[k] = augment(picture)
                return
            chunk: list[Image.Image] = []
            done = 0
            for picture in pictures:
                chunk.append(augment.views(picture))
                if len(chunk) == 64 or done + len(chunk) == count:
                    augment.stack(chunk, out[done : done + len(chunk)])
                    done += len(chunk)
                    chunk.clear()
    finally:
        random.setstate(state)


def _decode(path: Path) -> Image.Image:
    """``load_rgb``, with a file Pillow cannot read reported as a DataError naming it."""
    try:
        return load_rgb(path)
    except PermissionError as e:
        raise DataError(f"cannot read {path}: {os_reason(e)}") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode {path}: {' '.join(str(e).split())}") from None


def _in_parallel(fn: Callable[[Any], Any], paths: Sequence[Any], chunk: int = 64) -> Iterator[Any]:
    """``fn`` of each path, in order, computed ``chunk`` paths at a time on a thread pool.

    Decoding a thousand JPEGs one after another took 9 s of a calibration's fixed cost; Pillow
    releases the GIL while it decodes and resizes, so threads share the work. Chunks bound the
    decoded pictures held at once (a calibration folder may hold camera-sized photos).
    """
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), chunk):
            yield from pool.map(fn, paths[start : start + chunk])


# ------------------------------------------------------------------------------------------ memory


class ResourceError(RuntimeError):
    """A calibration that would not fit in the memory available; nothing was started."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a calibration needs, by part, and what the machine has (None: unknown).

    An estimate from one traced image, not a measurement: the cached group inputs and outputs and
    the training step's saved activations are what grow with the sample count and batch size.
    """

    device: str
    images: int  # the calibration tensor, float32
    model: int  # float weights, rounding variables, Adam state
    states: int  # quantized and float inputs and outputs of a group, for every sample
    step: int  # activations one training step keeps for its backward pass
    host_available: int | None
    device_available: int | None  # CUDA only

    @property
    def host(self) -> int:
        """Bytes of host memory: everything on a CPU; the images and a model copy beside a GPU."""
        if self.device == "cpu":
            return self.images + self.model + self.states + self.step
        return self.images + self.model // 4

    @property
    def on_device(self) -> int:
        return 0 if self.device == "cpu" else self.images + self.model + self.states + self.step

    def shortfall(self) -> str | None:
        """Why it will not fit, or None when it will (or when what is available is unknown)."""
        parts = f"images {_gib(self.images)}, model {_gib(self.model)}, group inputs/outputs {_gib(self.states)}"
        parts += f", training step {_gib(self.step)}"
        if self.on_device and self.device_available is not None and self.on_device > self.device_available:
            return (f"calibration needs about {_gib(self.on_device)} on {self.device} ({parts}) and "
                    f"{_gib(self.device_available)} is free there")
        if self.host_available is not None and self.host > self.host_available:
            return (f"calibration needs about {_gib(self.host)} of memory ({parts}) and "
                    f"{_gib(self.host_available)} is available")
        return None

    def check(self) -> MemoryEstimate:
        """Raise :class:`ResourceError` when it will not fit; returns itself otherwise."""
        why = self.shortfall()
        if why:
            raise ResourceError(f"{why}; use fewer calibration images (--samples) or a smaller --batch-size")
        return self


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def available_memory() -> int | None:
    """Bytes of host memory this process may still take: MemAvailable, capped by a cgroup limit."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    try:  # cgroup v2: a container's limit, which MemAvailable does not see
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, min(found)) if found else None


def _activation_sizes(model: nn.Module, image: torch.Tensor) -> tuple[int, int]:
    """Elements per image of (the largest block output, the largest block's activations in all).

    Traced by one forward pass with hooks; a "block" is what the model's adapter calls one, else
    every direct child of a ``ModuleList``/``Sequential``.
    """
    try:
        from ..adapters import adapter_for

        blocks = adapter_for(model).block_outputs(model)
    except Exception:  # a model without adapter: sizes of its generic containers
        blocks = [c for m in model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) for c in m.children()]
    owner = {id(leaf): i for i, block in enumerate(blocks) for leaf in block.modules()}
    outputs = [0] * len(blocks)
    inner = [0] * len(blocks)
    largest_leaf = 0
    hooks = []

    def numel(out: Any) -> int:
        if isinstance(out, torch.Tensor):
            return out.numel()
        if isinstance(out, (tuple, list)):
            return sum(numel(o) for o in out)
        return 0

    def record(module: nn.Module, _inputs: Any, out: Any) -> None:
        nonlocal largest_leaf
        n = numel(out)
        i = owner.get(id(module))
        if i is not None and module is blocks[i]:
            outputs[i] = max(outputs[i], n)
        if not any(True for _ in module.children()):
            largest_leaf = max(largest_leaf, n)
            if i is not None:
                inner[i] += n

    for m in model.modules():
        hooks.append(m.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(image)
    finally:
        for h in hooks:
            h.remove()
    if not blocks:
        return largest_leaf, largest_leaf
    return max(outputs), max(inner)


def calibration_memory(
    model: nn.Module,
    samples: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    input_size: tuple[int, int, int] | None = None,
) -> MemoryEstimate:
    """The memory a calibration of ``model`` on ``samples`` images will need, before it starts.

    Reconstruction holds, on its device, all calibration images, every sample's quantized and
    full-precision inputs of the current group and their outputs (four tensors of a block's output
    size), the model with a rounding variable and two Adam moments per weight, and the activations
    one batch keeps for the backward pass. ``input_size`` defaults to the size the model was built for.
    """
    device = torch.device(device)
    if input_size is None:  # the size the architecture was built for, else its data config's
        built = getattr(getattr(model, "patch_embed", None), "img_size", None)
        config = timm.data.resolve_data_config({}, model=model)["input_size"]
        input_size = (config[0], *built) if built else tuple(config)
    per_image = 1
    for d in input_size:
        per_image *= int(d)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    first = next(model.parameters(), None)
    probe = torch.zeros(1, *input_size, device=first.device if first is not None else "cpu")
    state, activations = _activation_sizes(model, probe)
    device_free = None
    if device.type == "cuda" and torch.cuda.is_available():
        device_free = torch.cuda.mem_get_info(device)[0]
    return MemoryEstimate(
        device=str(device),
        images=samples * per_image * 4,
        model=4 * parameters + buffers,
        states=4 * samples * state * 4,
        step=3 * min(batch_size, samples) * activations * 4,
        host_available=available_memory(),
        device_available=device_free,
    )
