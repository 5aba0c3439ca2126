"""Where ONNX Runtime's CPU time goes in an ONNX file: per operator type, and the attention log grid's share.

ONNX Runtime's own profiler (``SessionOptions.enable_profiling``) times every kernel; this sums the
times per operator type and, for osq files, those of the attention probabilities' log-grid nodes
(what lies between each ``Softmax`` and the ``Gather`` or ``Where`` that yields the grid value),
an elementwise chain over the model's largest tensor that no ONNX Runtime kernel fuses.

    python -m benchmarks.ort_profile FILE.onnx [FILE.onnx ...] --batch 32 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def log_grid_nodes(proto: onnx.ModelProto) -> set[str]:
    """Names of the nodes from each Softmax's consumers to the log grid's value (Round's descendants included)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    producer = {o: n for n in proto.graph.node for o in n.output}
    names: set[str] = set()
    for rnd in (n for n in proto.graph.node if n.op_type == "Round"):
        stack = [rnd]  # back to the Softmax
        while stack:
            node = stack.pop()
            if node.name in names or node.op_type == "Softmax":
                continue
            names.add(node.name)
            stack += [producer[i] for i in node.input if i in producer]
        stack = list(consumers.get(rnd.output[0], []))  # forward to the value (stop at the next MatMul)
        while stack:
            node = stack.pop()
            if node.name in names or node.op_type in ("MatMul", "FusedMatMul", "MatMulIntegerToFloat"):
                continue
            names.add(node.name)
            stack += [c for o in node.output for c in consumers.get(o, [])]
    return names


def profile(path: Path, batch: int, runs: int, threads: int | None) -> dict:
    proto = onnx.load(str(path))
    grid = log_grid_nodes(proto)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    if threads:
        options.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal((batch, *inp.shape[1:])).astype(np.float32)
    sess.run(None, {inp.name: x})  # warm-up, profiled too: dropped below by run count
    for _ in range(runs):
        sess.run(None, {inp.name: x})
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op: Counter = Counter()
    in_grid = 0.0
    model_runs = [e for e in events if e["name"] == "model_run"]  # one per InferenceSession.run
    first_end = model_runs[0]["ts"] + model_runs[0]["dur"]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < first_end:
            continue
        per_op[e["args"]["op_name"]] += e["dur"]
        if e["name"].removesuffix("_kernel_time") in grid:
            in_grid += e["dur"]
    total = sum(per_op.values())
    return {
        "file": str(path), "batch": batch, "runs": runs, "threads": threads,
        "ms_per_run": total / runs / 1000,
        "ms_per_op": {k: v / runs / 1000 for k, v in per_op.most_common()},
        "log_grid_ms_per_run": in_grid / runs / 1000,
        "log_grid_share": in_grid / total if total else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", type=Path, nargs="+")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = []
    for path in args.files:
        r = profile(path, args.batch, args.runs, args.threads)
        results.append(r)
        top = ", ".join(f"{k} {v:.0f}" for k, v in list(r["ms_per_op"].items())[:8])
        print(f"{path.name}: {r['ms_per_run']:.0f} ms/run (batch {args.batch}); log grid "
              f"{r['log_grid_ms_per_run']:.0f} ms ({100 * r['log_grid_share']:.0f} %); {top}")
    if args.json:
        args.json.write_text(json.dumps({"load_average": os.getloadavg(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
