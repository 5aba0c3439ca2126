"""Accuracy, throughput and parity of runtimes on a dataset, and the report they end up in.

``evaluate`` keeps every logit so that two runtimes (PyTorch fake-quant vs the exported ONNX, FP32
vs INT) can be compared input by input with ``parity``, not just by their accuracies, which can
agree while the predictions behind them differ.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import DataLoader, Dataset, Subset

from osqdeploy.distributed import DistContext
from osqdeploy.evaluation.runtimes import Runtime
from osqdeploy.load.data import spread_indices
from osqdeploy.run.store import atomic_write_bytes

__all__ = ["EvalResult", "ParityReport", "evaluate", "parity", "write_report"]


@dataclass
class EvalResult:
    """One runtime on one dataset.  Accuracies are percentages; None when the data is unlabeled."""

    runtime: str
    n: int
    top1: float | None
    top5: float | None
    images_per_s: float
    logits: torch.Tensor = field(repr=False)
    labels: torch.Tensor = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The summary (no logits), for JSON."""
        return {
            "runtime": self.runtime,
            "n": self.n,
            "top1": self.top1,
            "top5": self.top5,
            "images_per_s": self.images_per_s,
        }


@dataclass
class ParityReport:
    """How closely runtime ``b`` reproduces runtime ``a`` on the same inputs."""

    a: str
    b: str
    n: int
    top1_agreement: float  # % of inputs whose arg-max class agrees
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    # KL(a‖b) of the predicted class distributions, mean over inputs: unlike top-1 it does not
    # move in whole images, so it ranks runs stably on a few hundred of them
    kl_divergence: float
    top1_a: float | None
    top1_b: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    runtime: Runtime,
    dataset: Dataset,
    batch_size: int = 64,
    progress: bool = True,
    limit: int | None = None,
    num_workers: int = 0,
    dist: DistContext | None = None,
) -> EvalResult:
    """Run ``dataset`` through ``runtime``; keep logits, measure top-1/top-5 and throughput.

    Throughput counts only the runtime calls (not decoding or transforms), after one untimed
    warm-up call on the first batch, which absorbs lazy initialisation and autotuning.
    ``limit`` evaluates that many images spread evenly over the dataset. With ``dist`` of several
    ranks each runs whole batches of its contiguous shard and every rank returns the gathered
    result: the logits of a single process, image for image, and the throughput of all ranks.
    """
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, spread_indices(len(dataset), limit))
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    dist = dist or DistContext()
    if dist.active:
        dataset = Subset(dataset, dist.shard(len(dataset), align=batch_size))
        progress = progress and dist.is_main
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    all_logits: list[torch.Tensor] = []
    all_labels: list[torch.Tensor] = []
    seconds = 0.0
    with _progress_bar(progress) as bar:
        task = bar.add_task(f"eval {runtime.name}", total=len(dataset))
        for step, batch in enumerate(loader):
            images, labels = _split_batch(batch)
            if step == 0:
                runtime(images)  # warm-up, untimed
            start = time.perf_counter()
            logits = runtime(images)
            seconds += time.perf_counter() - start
            if logits.ndim != 2 or len(logits) != len(images):
                shape = tuple(logits.shape)
                raise ValueError(f"{runtime.name} returned logits of shape {shape} for {len(images)} images")
            all_logits.append(logits.detach().float().cpu())
            all_labels.append(labels)
            bar.update(task, advance=len(images))
    logits = torch.cat(all_logits) if all_logits else torch.empty(0, 0)
    labels = torch.cat(all_labels) if all_labels else torch.empty(0, dtype=torch.long)
    if dist.active:  # a rank's shard can be empty when there are fewer batches than ranks
        logits, labels = dist.gather_rows(logits), dist.gather_rows(labels)
        seconds = dist.max_float(seconds)
    top1, top5 = _accuracy(logits, labels, runtime.name)
    return EvalResult(
        runtime=runtime.name,
        n=len(logits),
        top1=top1,
        top5=top5,
        images_per_s=len(logits) / max(seconds, 1e-9),
        logits=logits,
        labels=labels,
    )


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from whatever the dataset yields; unlabeled items get label -1."""
    if isinstance(batch, (tuple, list)):
        images = batch[0]
        labels = torch.as_tensor(batch[1]) if len(batch) > 1 else None
    else:
        images, labels = batch, None
    if labels is None:
        labels = torch.full((len(images),), -1, dtype=torch.long)
    return images, labels.long()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, name: str) -> tuple[float | None, float | None]:
    if labels.numel() == 0 or bool((labels < 0).any()):
        return None, None
    if int(labels.max()) >= logits.shape[1]:
        warnings.warn(
            f"{name}: labels go up to {int(labels.max())} but the model has {logits.shape[1]} classes; "
            "accuracy is meaningless (wrong dataset for this model?)",
            stacklevel=3,
        )
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    top1 = 100.0 * int((topk[:, 0] == labels).sum()) / len(labels)
    top5 = 100.0 * int((topk == labels[:, None]).any(dim=1).sum()) / len(labels)
    return top1, top5


def kl_divergence(a_logits: torch.Tensor, b_logits: torch.Tensor) -> float:
    """KL(a‖b) of the class distributions the two sets of logits predict, mean over inputs."""
    return F.kl_div(b_logits.float().log_softmax(1), a_logits.float().log_softmax(1), log_target=True,
                    reduction="batchmean").item()


def parity(a: EvalResult, b: EvalResult) -> ParityReport:
    """Compare two results on the same inputs, in the same order."""
    if a.logits.shape != b.logits.shape:
        raise ValueError(
            f"cannot compare {a.runtime} and {b.runtime}: logits {tuple(a.logits.shape)} vs {tuple(b.logits.shape)}"
        )
    if not torch.equal(a.labels, b.labels):
        raise ValueError(f"cannot compare {a.runtime} and {b.runtime}: they were evaluated on different data")
    diff = (a.logits - b.logits).abs()
    agree = 100.0 * int((a.logits.argmax(dim=1) == b.logits.argmax(dim=1)).sum()) / len(a.logits)
    return ParityReport(
        a=a.runtime,
        b=b.runtime,
        n=a.n,
        top1_agreement=agree,
        max_abs_logit_diff=diff.max().item(),
        mean_abs_logit_diff=diff.mean().item(),
        kl_divergence=kl_divergence(a.logits, b.logits),
        top1_a=a.top1,
        top1_b=b.top1,
    )


def write_report(
    path: str | Path,
    results: Sequence[EvalResult],
    parity: ParityReport | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the evaluation summary as JSON, atomically (a reader never sees half a report).

    ``extra`` adds top-level fields (model, run directory, ...) next to "results" and "parity".
    """
    extra = dict(extra or {})
    clash = {"results", "parity"} & set(extra)
    if clash:
        raise ValueError(f"extra may not override report fields {sorted(clash)}")
    report = {**extra, "results": [r.to_dict() for r in results], "parity": parity.to_dict() if parity else None}
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    return path


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=True,
    )
