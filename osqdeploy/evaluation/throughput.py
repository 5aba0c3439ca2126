"""Images per second of an ONNX file in ONNX Runtime, per execution provider, and what ORT actually ran.

Accuracy is measured on real images by ``evaluate``; speed needs none: a fixed random batch,
one untimed warm-up run, then the median of timed runs. Beside each figure goes a census of the
graph ORT executes after its optimizer (``SessionOptions.optimized_model_filepath``): whether a
QDQ graph became integer kernels (``MatMulIntegerToFloat``, ``QLinearMatMul``, …) or stayed
``QuantizeLinear``/``DequantizeLinear`` around float ops is what decides its speed.
"""

from __future__ import annotations

import collections
import os
import statistics
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from rich.table import Table

__all__ = [
    "INTEGER_KERNELS", "GraphCensus", "SpeedRow", "compare_speed", "graph_census", "ort_session",
    "speed_table",
]

# ONNX Runtime's integer compute kernels (what a fused QDQ graph runs)
INTEGER_KERNELS = frozenset({
    "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "QLinearConv", "ConvInteger",
    "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearSoftmax", "QAttention", "MatMulNBits",
    "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat",
})

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass
class GraphCensus:
    """Node types of the graph ORT runs after optimization."""

    nodes: int
    integer_kernels: int
    quantize: int
    dequantize: int
    ops: dict[str, int] = field(default_factory=dict)


@dataclass
class SpeedRow:
    """One file at one batch size on one execution provider."""

    label: str
    path: str
    provider: str  # the execution provider ORT reports using, e.g. "CPUExecutionProvider"
    batch: int
    threads: int | None  # intra-op threads asked for (None: ORT's default, one per core)
    median_ms: float
    images_per_s: float
    runs: int
    file_bytes: int
    census: GraphCensus

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ort_session(path: str | Path, provider: str = "cpu", threads: int | None = None,
                optimized_path: str | Path | None = None) -> ort.InferenceSession:
    """An ONNX Runtime InferenceSession with every graph optimization on.

    ``optimized_path`` receives the graph ORT really runs (fused kernels included).
    """
    if provider not in _PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(_PROVIDERS)}, got {provider!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    providers = [_PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    return ort.InferenceSession(str(path), options, providers=providers)


def graph_census(path: str | Path, provider: str = "cpu") -> GraphCensus:
    """Node types of ``path`` after ONNX Runtime's optimizer (the file ORT would execute)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(path, provider, optimized_path=optimized)
        ops = collections.Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node)
    return GraphCensus(
        nodes=sum(ops.values()),
        integer_kernels=sum(v for k, v in ops.items() if k in INTEGER_KERNELS),
        quantize=ops.get("QuantizeLinear", 0),
        dequantize=ops.get("DequantizeLinear", 0),
        ops=dict(ops.most_common()),
    )


def compare_speed(
    files: Mapping[str, str | Path],
    batch_sizes: tuple[int, ...] = (1, 32),
    provider: str = "cpu",
    threads: int | None = None,
    seconds: float = 3.0,
    min_runs: int = 3,
    max_runs: int = 200,
) -> list[SpeedRow]:
    """Median latency and images/s of every file (label → path) at each batch size, with their graph census.

    The files take turns, one timed run each per round, so a processor whose load changes while
    they are measured (other programs, clock boost) slows them all alike instead of whichever ran
    then. Rounds continue until each file has ``seconds`` of timed runs (at least ``min_runs``, at
    most ``max_runs``), after one warm-up run each. The input is a seeded standard-normal batch of
    each file's input shape: speed does not depend on pixel values.
    """
    census = {label: graph_census(path, provider) for label, path in files.items()}
    runners = {label: ort_session(path, provider, threads) for label, path in files.items()}
    rows = []
    for batch in batch_sizes:
        feeds = {}
        for label, sess in runners.items():
            inp = sess.get_inputs()[0]
            fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
            if fixed is not None and fixed != batch:
                continue  # a fixed-batch file runs its own batch size only
            dims = [batch, *(d if isinstance(d, int) else 1 for d in inp.shape[1:])]
            feeds[label] = {inp.name: np.random.default_rng(0).standard_normal(dims).astype(np.float32)}
            sess.run(None, feeds[label])
        times: dict[str, list[float]] = {label: [] for label in feeds}
        while any(len(t) < max_runs and (len(t) < min_runs or sum(t) < seconds) for t in times.values()):
            for label, feed in feeds.items():
                t = times[label]
                if len(t) >= max_runs or (len(t) >= min_runs and sum(t) >= seconds):
                    continue
                start = time.perf_counter()
                runners[label].run(None, feed)
                t.append(time.perf_counter() - start)
        for label, t in times.items():
            median = statistics.median(t)
            rows.append(SpeedRow(
                label=label, path=str(files[label]), provider=runners[label].get_providers()[0], batch=batch,
                threads=threads, median_ms=1e3 * median, images_per_s=batch / median, runs=len(t),
                file_bytes=os.path.getsize(files[label]), census=census[label],
            ))
    return rows


def speed_table(rows: list[SpeedRow], baseline: str | None = None, title: str = "ONNX Runtime speed") -> Table:
    """One line per file and batch size; ``baseline`` (a label) adds each file's speed-up over it."""
    table = Table(title=title, title_justify="left")
    cols = ["file", "provider", "batch", "ms / batch", "images/s"]
    cols += ["× " + baseline] if baseline else []
    cols += ["MiB", "int kernels", "Q", "DQ", "nodes"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("file", "provider") else "right")
    base = {r.batch: r.median_ms for r in rows if r.label == baseline}
    for r in rows:
        cells = [r.label, r.provider.removesuffix("ExecutionProvider"), str(r.batch), f"{r.median_ms:.1f}",
                 f"{r.images_per_s:,.1f}"]
        if baseline:
            cells.append(f"{base[r.batch] / r.median_ms:.2f}" if r.batch in base else "-")
        cells += [f"{r.file_bytes / 2**20:.1f}", str(r.census.integer_kernels), str(r.census.quantize),
                  str(r.census.dequantize), str(r.census.nodes)]
        table.add_row(*cells)
    return table
