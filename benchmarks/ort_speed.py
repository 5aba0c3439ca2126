"""ONNX Runtime speed of an exported run against the float export of the same model.

It saves ORT's optimised graph to see which kernels ran: an 8-bit QDQ graph on the CPU provider
should be fused into integer kernels (QLinearMatMul / MatMulInteger / QLinearConv, …), while ≤4-bit
graphs run dequantize-then-float (ORT has no 4-bit activation kernels).

    python -m benchmarks.ort_speed RUN_DIR --checkpoint WEIGHTS [--batch 32] [--threads N]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from osqdeploy.api import export as export_run
from osqdeploy.load.models import load_model
from osqdeploy.onnx_export.onnx_qdq import float_export
from osqdeploy.run.store import read_manifest

INTEGER_KERNELS = {"QLinearMatMul", "MatMulInteger", "QLinearConv", "ConvInteger", "QGemm", "DynamicQuantizeMatMul",
                   "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul", "QAttention", "MatMulNBits"}


def time_session(path: Path, batch: np.ndarray, threads: int | None, reps: int) -> tuple[float, dict[str, int]]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    optimized = Path(tempfile.mkdtemp()) / "optimized.onnx"
    so.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: batch})
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, {name: batch})
        times.append(time.perf_counter() - t)
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    return statistics.median(times), dict(ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--checkpoint", help="original weights, for the float export")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    manifest = read_manifest(Path(args.run_dir))
    work = Path(args.workdir or tempfile.mkdtemp())
    quant_path = work / "quant.onnx"
    info = export_run(args.run_dir, quant_path)
    name = manifest.model.recipe or manifest.model.timm_name
    loaded = load_model(name, checkpoint=args.checkpoint)
    float_path = work / "float.onnx"
    float_bytes = float_export(loaded.model, float_path)
    h, w = loaded.model.patch_embed.img_size
    batch = np.random.default_rng(0).standard_normal((args.batch, 3, h, w)).astype(np.float32)
    t_float, _ = time_session(float_path, batch, args.threads, args.reps)
    t_quant, ops = time_session(quant_path, batch, args.threads, args.reps)
    fused = {k: v for k, v in ops.items() if k in INTEGER_KERNELS}
    print(f"model {manifest.model.timm_name}  W{info.w_bits}A{info.a_bits}  batch {args.batch}  "
          f"ORT {ort.__version__}  threads {args.threads or 'default'}")
    print("| export | size (MB) | median ms / batch | images/s |")
    print("|---|---|---|---|")
    print(f"| float | {float_bytes / 1e6:.1f} | {1e3 * t_float:.1f} | {args.batch / t_float:.1f} |")
    print(f"| QDQ | {info.bytes / 1e6:.1f} | {1e3 * t_quant:.1f} | {args.batch / t_quant:.1f} |")
    print(f"speed-up {t_float / t_quant:.2f}x; integer kernels in ORT's optimised graph: {fused or 'none'}")


if __name__ == "__main__":
    main()
