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
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "DataWarning",
    "ImageFiles",
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
OUTSIDE_CLASSES = "outside class folders"


class DataError(ValueError):
    """A data folder (or file list) that cannot give any image."""


class DataWarning(UserWarning):
    """Some files were skipped; the data is still usable."""


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
    """Decode one image file into 8-bit RGB."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def _skip_reason(path: Path) -> str | None:
    """Why ``path`` can't be used, or None.  Cheap: JPEGs are decoded at 1/8 scale only."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return NOT_AN_IMAGE
    try:
        if path.stat().st_size == 0:
            return EMPTY
        with Image.open(path) as img:
            img.verify()  # structure and checksums (PNG), but not JPEG entropy data
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()  # a truncated JPEG fails only when decoded
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
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


def calibration_augment(
    model: nn.Module, scale: tuple[float, float] = (0.35, 1.0)
) -> Callable[[Image.Image], torch.Tensor]:
    """Mild random views (resized crop, horizontal flip) in the model's own resolution and normalisation.

    Reconstruction sees each calibration image thousands of times (20,000 iterations of batch 32
    over the paper's 1,024 images); with fewer images it learns them rather than the model's
    activation statistics.  Extra views of the same images are the cheapest fresh inputs.  No
    colour jitter or erasing: calibration should match deployment statistics, not regularise.
    """
    config = timm.data.resolve_data_config({}, model=model)
    return timm.data.create_transform(
        input_size=config["input_size"], is_training=True, scale=scale, hflip=0.5, color_jitter=None,
        auto_augment=None, re_prob=0.0, interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
    )


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
    indices = torch.randperm(total, generator=generator)[:n].tolist()
    if isinstance(dataset, ImageFiles) and dataset.transform is not None:  # decoded on a thread pool
        transform = dataset.transform
        images = list(_in_parallel(lambda path: transform(_decode(path)), [dataset.files[i] for i in indices]))
    else:
        images = []
        for i in indices:
            item = dataset[i]
            image = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(image, torch.Tensor):
                raise TypeError(f"dataset items must be tensors for calibration (set a transform), got {type(image)}")
            images.append(image)
    if extra:
        images.extend(_augmented_views(dataset, indices, extra, augment, seed))
    return torch.stack(images).to(torch.float32)


def _augmented_views(
    dataset: ImageFiles, order: list[int], count: int, augment: Callable[[Image.Image], torch.Tensor], seed: int
) -> list[torch.Tensor]:
    """``count`` views of the images in ``order``, cycling; both RNGs torchvision/timm draw from are seeded."""
    state = random.getstate()
    random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # decoding runs ahead on a thread pool; the random views are drawn in order, here
            paths = [dataset.files[order[k % len(order)]] for k in range(count)]
            return [augment(picture) for picture in _in_parallel(_decode, paths)]
    finally:
        random.setstate(state)


def _decode(path: Path) -> Image.Image:
    """``load_rgb``, with a file Pillow cannot read reported as a DataError naming it."""
    try:
        return load_rgb(path)
    except OSError as e:
        raise DataError(f"cannot decode {path}: {e}") from e


def _in_parallel(fn: Callable[[Path], Any], paths: Sequence[Path], chunk: int = 64) -> Iterator[Any]:
    """``fn`` of each path, in order, computed ``chunk`` paths at a time on a thread pool.

    Decoding a thousand JPEGs one after another took 9 s of a calibration's fixed cost; Pillow
    releases the GIL while it decodes and resizes, so threads share the work. Chunks bound the
    decoded pictures held at once (a calibration folder may hold camera-sized photos).
    """
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), chunk):
            yield from pool.map(fn, paths[start : start + chunk])
