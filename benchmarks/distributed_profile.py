"""Where a data-parallel calibration step's time goes: kernels, collectives and gaps, per step.

DeiT-B W4A4 (random weights, 1,024 random images), group 0 of the ``auto`` plan with the default
CUDA engine (CUDA graph, fp16 autocast, V sharded over the ranks). Each case calibrates the group
for ``--iters`` iterations and profiles 20 replays of the captured step on rank 0 with
torch.profiler (CUDA activity only, from replay 60 on). Cases: one GPU at half the global batch
(what each of two ranks computes) and at the whole batch, then two ranks at the whole batch, also
under the NCCL settings given by ``--nccl`` (``LABEL:NAME=VALUE``, an environment variable each).

Per step it reports the profiled window, the union of compute-kernel time, NCCL kernel time, the
union of all kernel time (the rest of the window is the GPU idle) and the largest compute kernels.
The profiler's start costs time of its own, so the ``s_per_1k`` figure of a case (taken over the
whole group, as ``benchmarks.distributed`` takes it) is above an unprofiled run's; compare windows
with windows. Run on a host with 2 GPUs:

    python -m benchmarks.distributed_profile --out benchmarks/results/distributed_step_profile_h200x2.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from benchmarks.distributed import _Clock, _per_1k, random_w4a4_model
from osqdeploy.config import CalibrationConfig
from osqdeploy.distributed import DistContext, launch, scale_global_batch
from osqdeploy.reconstruct import Reconstructor

PROFILE_FROM, PROFILE_STEPS = 60, 20  # replays: past the capture and the allocator's settling


def _union(events: list[dict]) -> float:
    """Microseconds covered by at least one of ``events`` (chrome-trace kernels: ts, dur)."""
    total, start, end = 0.0, None, None
    for e in sorted(events, key=lambda e: e["ts"]):
        s, f = e["ts"], e["ts"] + e["dur"]
        if end is None or s > end:
            if end is not None:
                total += end - start
            start, end = s, f
        else:
            end = max(end, f)
    return total + (end - start if end is not None else 0.0)


def kernel_summary(trace: Path, steps: int) -> dict:
    kernels = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return {"kernels": 0}
    t0, t1 = min(e["ts"] for e in kernels), max(e["ts"] + e["dur"] for e in kernels)
    nccl = [e for e in kernels if "nccl" in e["name"].lower()]
    compute = [e for e in kernels if "nccl" not in e["name"].lower()]
    by_name: dict[str, list[float]] = {}
    for e in compute:
        entry = by_name.setdefault(e["name"][:90], [0, 0.0])
        entry[0] += 1
        entry[1] += e["dur"]
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]
    return {
        "window_us_per_step": (t1 - t0) / steps,
        "compute_kernels_per_step": len(compute) / steps,
        "compute_sum_us_per_step": sum(e["dur"] for e in compute) / steps,
        "compute_union_us_per_step": _union(compute) / steps,
        "nccl_kernels_per_step": len(nccl) / steps,
        "nccl_sum_us_per_step": sum(e["dur"] for e in nccl) / steps,
        "busy_union_us_per_step": _union(kernels) / steps,
        "top_compute": [(name, n / steps, round(us / steps, 1)) for name, (n, us) in top],
        "nccl_names": sorted({e["name"][:60] for e in nccl}),
    }


def _case(ctx: DistContext, scale: int, tag: str, iters: int) -> dict:
    model, adapter, plan, images = random_w4a4_model("deit_base_patch16_224", 1024)
    ccfg = scale_global_batch(CalibrationConfig(samples=1024, iters=iters * scale), scale)
    clock = _Clock()
    rec = Reconstructor(model, adapter, plan, ccfg, ctx.device, clock, dist=ctx)
    t = time.perf_counter()
    rec.initialize(images)
    torch.cuda.synchronize()
    t_init = time.perf_counter() - t
    t = time.perf_counter()
    q, fp = rec.initial_states(images)
    torch.cuda.synchronize()
    t_states = time.perf_counter() - t

    # the replays run_steps makes are counted here; rank 0 profiles a window of them
    seen = {"n": 0, "prof": None}
    replay = torch.cuda.CUDAGraph.replay

    def counted_replay(graph: torch.cuda.CUDAGraph) -> None:
        seen["n"] += 1
        if seen["n"] == PROFILE_FROM and ctx.is_main:
            torch.cuda.synchronize()
            seen["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            seen["prof"].__enter__()
        replay(graph)
        if seen["n"] == PROFILE_FROM + PROFILE_STEPS - 1 and seen["prof"] is not None:
            torch.cuda.synchronize()
            seen["prof"].__exit__(None, None, None)

    torch.cuda.CUDAGraph.replay = counted_replay
    try:
        result, q, fp = rec.reconstruct_group(0, q, fp)
    finally:
        torch.cuda.CUDAGraph.replay = replay
    out = {"tag": tag, "ranks": ctx.world, "global_batch": ccfg.batch_size, "iters": ccfg.iters,
           "s_per_1k": _per_1k(clock.marks[0]), "phases": result.phases, "initialize_s": t_init,
           "initial_states_s": t_states, "group_seconds": result.seconds}
    if seen["prof"] is not None:
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            seen["prof"].export_chrome_trace(str(trace))
            out["kernels"] = kernel_summary(trace, PROFILE_STEPS)
    return out if ctx.is_main else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=250, help="iterations of the group at the whole batch")
    p.add_argument("--scale", type=int, default=8, help="the whole global batch: this many times 32")
    p.add_argument("--nccl", nargs="*", metavar="LABEL:NAME=VALUE",
                   default=["ch4:NCCL_MAX_NCHANNELS=4", "simple:NCCL_PROTO=Simple", "ch2:NCCL_MAX_NCHANNELS=2"],
                   help="a further 2-rank case under each environment variable")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed_step_profile.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("profiles CUDA kernels: no CUDA device here")
    if args.scale < 2 or args.scale % 2:
        p.error(f"--scale must be even (one GPU runs half of it), got {args.scale}")
    half = args.scale // 2
    cases = [(f"1gpu_b{32 * half}", 1, half, {}), (f"1gpu_b{32 * args.scale}", 1, args.scale, {}),
             (f"2gpu_b{32 * args.scale}", 2, args.scale, {})]
    for setting in args.nccl:
        label, _, assignment = setting.partition(":")
        name, _, value = assignment.partition("=")
        if not (label and name and value):
            p.error(f"--nccl takes LABEL:NAME=VALUE, got {setting!r}")
        cases.append((f"2gpu_b{32 * args.scale}_{label}", 2, args.scale, {name: value}))
    results = []
    for tag, ranks, scale, env in cases:
        t = time.perf_counter()
        with mock.patch.dict(os.environ, env):  # the spawned ranks inherit it
            r = launch(_case, scale, tag, args.iters, processes=ranks, device_type="cuda")
        r["wall"] = time.perf_counter() - t
        results.append(r)
        k = {name: r.get("kernels", {}).get(f"{name}_us_per_step", 0.0)
             for name in ("window", "compute_union", "nccl_sum", "busy_union")}
        print(f"{tag:28s} us per step: window {k['window']:8.0f}  compute {k['compute_union']:8.0f}  "
              f"nccl {k['nccl_sum']:6.0f}  busy {k['busy_union']:8.0f}  idle {k['window'] - k['busy_union']:5.0f}",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
