"""Calibration speed (issue 5): seconds per 1,000 iterations per group, projected totals, TFLOP/s.

Random weights are fine for timing. For each model it builds the paper's `auto` plan at W4A4,
runs the real engine (initialisation, cached group inputs, reconstruction) with a short
iteration count per group, and projects the paper's schedule (20,000 iterations per group)
from the measured per-iteration time of every group plus the measured fixed costs. It repeats
the measurement with the speed features off (plain eager fp32: no TF32) so every speed-up is a
ratio measured side by side, and measures the matmul ceilings (bf16 and tf32) in the same run.

    python benchmarks/calib_speed.py --models vit_s deit_b swin_b --measure-iters 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osqdeploy.adapters import adapter_for  # noqa: E402
from osqdeploy.config import CalibrationConfig, QuantConfig  # noqa: E402
from osqdeploy.load.models import load_model  # noqa: E402
from osqdeploy.plan import build_plan  # noqa: E402
from osqdeploy.reconstruct import Reconstructor, prepare_model  # noqa: E402


def matmul_ceiling(dtype: torch.dtype, tf32: bool, n: int = 8192, reps: int = 20) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def group_flops(rec: Reconstructor, index: int, q_in, fp_in) -> float:
    """FLOPs of one training iteration (forward + backward) of a group at the benchmark batch size."""
    group = rec.groups[index]
    bs = rec.cfg.batch_size
    state = tuple(t[:bs].to(rec.device) for t in q_in)
    layers = [m for u in group for root in u.modules for m in root.modules() if hasattr(m, "weight_quantizer")]
    for layer in layers:
        layer.weight_quantizer.init_adaround(layer.weight)
    with FlopCounterMode(display=False) as counter:
        out = rec._run_group(group, state)[-1]
        out.pow(2).sum().backward()
    for layer in layers:
        layer.weight_quantizer.mode = "nearest"
        layer.weight_quantizer.alpha = None
    return counter.get_total_flops()


def measure(model_name: str, fast: bool, measure_iters: int, samples: int, batch: int, full_iters: int) -> dict:
    loaded = load_model(model_name, pretrained=False)
    model = loaded.model
    adapter = prepare_model(model, QuantConfig(4, 4), adapter_for)
    plan = build_plan("auto", adapter.units(model))
    ccfg = CalibrationConfig(samples=samples, batch_size=batch, iters=measure_iters, tf32=fast, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast
    rec = Reconstructor(model, adapter, plan, ccfg, torch.device("cuda"))
    images = torch.randn(samples, 3, 224, 224)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rec.initialize(images)
    q_state, fp_state = rec.initial_states(images)
    torch.cuda.synchronize()
    fixed = time.perf_counter() - t0
    flops = group_flops(rec, 0, q_state, fp_state)
    per_iter = []
    for index in range(len(rec.groups)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        result, q_state, fp_state = rec.reconstruct_group(index, q_state, fp_state)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        # includes the group's own fixed costs (targets, MSE before/after): an upper bound per iteration
        per_iter.append(dt / measure_iters)
    projected = fixed + sum(p * full_iters for p in per_iter)
    mean_iter = sum(per_iter) / len(per_iter)
    return {
        "model": model_name,
        "fast": fast,
        "groups": len(rec.groups),
        "s_per_1k_iters_per_group": round(1000 * mean_iter, 3),
        "projected_total_s": round(projected, 1),
        "fixed_s": round(fixed, 1),
        "group0_tflops": round(flops / per_iter[0] / 1e12, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_s", "deit_b", "swin_b"])
    ap.add_argument("--measure-iters", type=int, default=200)
    ap.add_argument("--full-iters", type=int, default=20000)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--modes", nargs="+", default=["plain", "fast"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("calib_speed.py measures GPU calibration; no CUDA device here")
    print(f"device: {torch.cuda.get_device_name()}")
    ceil = {"bf16": matmul_ceiling(torch.bfloat16, False), "tf32": matmul_ceiling(torch.float32, True),
            "fp32": matmul_ceiling(torch.float32, False)}
    print("matmul ceilings TFLOP/s:", {k: round(v, 1) for k, v in ceil.items()})
    rows = []
    for name in args.models:
        for mode in args.modes:
            r = measure(name, mode == "fast", args.measure_iters, args.samples, args.batch_size, args.full_iters)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print("\n| model | mode | groups | s / 1k iters / group | projected total (min) | group TFLOP/s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mode = "fast" if r["fast"] else "plain fp32"
        print(f"| {r['model']} | {mode} | {r['groups']} | {r['s_per_1k_iters_per_group']} | "
              f"{r['projected_total_s'] / 60:.1f} | {r['group0_tflops']} | {r['peak_mem_gib']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"ceilings": ceil, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
