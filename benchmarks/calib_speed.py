"""Calibration speed: seconds per 1,000 iterations per group, projected totals, TFLOP/s.

Random weights are fine for timing. For each model it builds the paper's `auto` plan at W4A4 and
runs the real engine (initialisation, cached group inputs, every group's reconstruction) with a
short iteration count per group. Per-iteration time is taken between two logged iterations well
past the start (logging synchronises with the GPU), so a group's fixed costs (targets, MSE
before/after, graph capture) are measured separately and the paper's schedule (20,000 iterations
per group) is projected as fixed costs + groups × per-iteration time × 20,000.

Modes, run side by side in one process on one GPU:
  plain  — eager fp32: no TF32, no CUDA graph, foreach Adam (all speed features off)
  graph  — the step replayed as a CUDA graph, fp32: must compute exactly what plain computes
  graph+compile — and the quantizer arithmetic as torch.compile'd fused kernels, fp32
  fast   — graph + compile + TF32 matmuls + fused Adam, fp32 activations (the engine before fp16)
  fast+rng — and QDrop's masks drawn inside the compiled kernels (fused_rng: other draws)
  fast+fp16 — and the group's forward/backward under fp16 autocast, quantizers rounding in fp32:
           the default engine on CUDA (autocast "auto"); its group-0 loss and MSE, computed in
           fp32, are printed next to the others'
  fast+bf16 — the same under bf16 autocast (opt-in)
  fast+fp16+rng, fast+fp16+group(+rng) — the default engine with fused_rng / compile_group (opt-in
           candidates, last measured without fp16)
  fast+fp16+pad — the default engine with the attention's keys padded to a multiple of 8 tokens
           (pad_attention, opt-in: aligned operands for the attention's batched products)
  fast+group — fast, with the group's whole forward/backward torch.compile'd (compile_group),
           not each quantizer alone; +rng and +bf16 add those to it
For each mode it prints the final reconstruction loss of group 0 and the fraction of group-0
weight codes identical to plain's, so every speed-up is shown next to what it changed. The
projection also counts drawing the full schedule's batches (once per group, on the host).

``--end-to-end DIR`` then runs the real thing per model: ``osq calibrate MODEL --bits 4 4 --data DIR``
at the paper's schedule on random weights saved as a checkpoint, timed from process start to exit.

    python -m benchmarks.calib_speed --models vit_s deit_b swin_b --measure-iters 200
    python -m benchmarks.calib_speed --models vit_s --modes --end-to-end /path/to/images [--e2e-args '--method paper']
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from osqdeploy.adapters import adapter_for
from osqdeploy.config import CalibrationConfig, QuantConfig
from osqdeploy.load.models import load_model
from osqdeploy.plan import build_plan
from osqdeploy.quant import kernels as M
from osqdeploy.quant.layers import quant_layers
from osqdeploy.quant.mode import QuantMode, set_mode
from osqdeploy.reconstruct import Callbacks, Reconstructor, prepare_model
from osqdeploy.reconstruct.step import Schedule
from osqdeploy.run import store

OFF = dict(autocast="off")
MODES = {
    "plain": dict(tf32=False, cuda_graph=False, compile=False, fused_adam=False, **OFF),
    "graph": dict(tf32=False, cuda_graph=True, compile=False, fused_adam=False, **OFF),
    "graph+compile": dict(tf32=False, cuda_graph=True, compile=True, fused_adam=False, **OFF),
    "fast": dict(tf32=True, cuda_graph=True, compile=True, **OFF),
    "fast+rng": dict(tf32=True, cuda_graph=True, compile=True, fused_rng=True, **OFF),
    "fast+bf16": dict(tf32=True, cuda_graph=True, compile=True, autocast="bf16"),
    "fast+fp16": dict(tf32=True, cuda_graph=True, compile=True, autocast="fp16"),
    "fast+fp16+rng": dict(tf32=True, cuda_graph=True, compile=True, autocast="fp16", fused_rng=True),
    "fast+fp16+pad": dict(tf32=True, cuda_graph=True, compile=True, autocast="fp16", pad_attention=True),
    "fast+fp16+group": dict(tf32=True, cuda_graph=True, compile=True, autocast="fp16", compile_group=True),
    "fast+fp16+group+rng": dict(tf32=True, cuda_graph=True, compile=True, autocast="fp16", compile_group=True,
                                fused_rng=True),
    "fast+group": dict(tf32=True, cuda_graph=True, compile=True, compile_group=True, **OFF),
    "fast+group+rng": dict(tf32=True, cuda_graph=True, compile=True, compile_group=True, fused_rng=True, **OFF),
    "fast+group+bf16": dict(tf32=True, cuda_graph=True, compile=True, compile_group=True, autocast="bf16"),
}


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


def group_flops(rec: Reconstructor, index: int, q_in) -> float:
    """Matmul FLOPs of one training iteration (forward + backward) of a group at the batch size."""
    group = rec.groups[index]
    state = tuple(t[: rec.cfg.batch_size].detach() for t in q_in)
    layers = quant_layers([m for u in group for m in u.modules])
    for layer in layers:
        layer.weight_quantizer.init_adaround(layer.weight)
    with FlopCounterMode(display=False) as counter:
        out = rec._run_group(group, state)[-1]
        out.pow(2).sum().backward()
    for layer in layers:
        wq = layer.weight_quantizer
        wq.alpha, wq.w_floor = None, None
        set_mode(wq, QuantMode.NEAREST)
    return counter.get_total_flops()


class _Clock(Callbacks):
    """Wall time at each logged iteration (each log synchronises with the GPU)."""

    def __init__(self):
        self.marks: dict[int, list[tuple[int, float]]] = {}

    def on_iter(self, index, it, loss):
        self.marks.setdefault(index, []).append((it, time.perf_counter()))


def _reconstructor(model_name: str, ccfg: CalibrationConfig, callbacks: Callbacks | None = None):
    """A W4A4 ``auto`` Reconstructor of the model on random weights, and random images for it.

    The compile cache is emptied first, so each mode compiles afresh (its compile time lands in
    its fixed costs).
    """
    torch._dynamo.reset()
    M._COMPILED.clear()
    torch.manual_seed(0)
    model = load_model(model_name, pretrained=False).model
    adapter = prepare_model(model, QuantConfig(4, 4), adapter_for)
    plan = build_plan("auto", adapter.units(model))
    rec = Reconstructor(model, adapter, plan, ccfg, torch.device("cuda"), callbacks=callbacks)
    return rec, torch.randn(ccfg.samples, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def measure(model_name: str, mode: str, measure_iters: int, samples: int, batch: int, full_iters: int) -> dict:
    ccfg = CalibrationConfig(samples=samples, batch_size=batch, iters=measure_iters, device="cuda", **MODES[mode])
    torch.backends.cuda.matmul.allow_tf32 = ccfg.tf32
    torch.backends.cudnn.allow_tf32 = ccfg.tf32
    clock = _Clock()
    rec, images = _reconstructor(model_name, ccfg, clock)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rec.initialize(images)
    q_state, fp_state = rec.initial_states(images)
    torch.cuda.synchronize()
    fixed = time.perf_counter() - t0
    flops = None
    if mode == "plain":  # each group's FLOPs on its own input (Swin's slices change the state's shape)
        flops, state = [], q_state
        for i in range(len(rec.groups)):
            flops.append(group_flops(rec, i, state))
            with torch.no_grad():
                state = rec._run_group(rec.groups[i], tuple(t[:batch] for t in state))
    per_iter, overhead, group0 = [], [], {}
    for index in range(len(rec.groups)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        result, q_state, fp_state = rec.reconstruct_group(index, q_state, fp_state)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
        marks = [m for m in clock.marks[index] if m[0] >= min(10, measure_iters // 4)]
        (i0, t_0), (i1, t_1) = marks[0], marks[-1]
        dt = (t_1 - t_0) / max(1, i1 - i0)
        per_iter.append(dt)
        overhead.append(total - dt * measure_iters)
        if index == 0:
            group0 = {
                "final_loss": result.loss_curve[-1][1],
                "mse_after": result.mse_after,
                "codes": torch.cat([m.weight_quantizer.w_int.flatten().cpu()
                                   for m in quant_layers([r for u in rec.groups[0] for r in u.modules])]),
            }
    t = time.perf_counter()
    Schedule.build(replace(ccfg, iters=full_iters), samples, torch.Generator().manual_seed(0), torch.device("cuda"))
    schedule_s = (time.perf_counter() - t) * len(rec.groups)
    projected = fixed + sum(overhead) + schedule_s + sum(p * full_iters for p in per_iter)
    return {
        "model": model_name,
        "mode": mode,
        "groups": len(rec.groups),
        "s_per_1k_iters_per_group": round(1000 * sum(per_iter) / len(per_iter), 3),
        "projected_total_min": round(projected / 60, 2),
        "fixed_s": round(fixed + sum(overhead), 1),
        "schedule_s": round(schedule_s, 1),
        "flops_per_iter_all_groups": sum(flops) if flops else None,
        "sum_iter_s": sum(per_iter),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "group0": group0,
    }


class _StepProfiler(Callbacks):
    """Profiles the optimisation steps of the groups in ``indices`` only: not their propagations."""

    def __init__(self, indices: set[int]):
        self.indices = indices
        self.profs: dict[int, torch.profiler.profile] = {}

    def on_group_start(self, index, units, iters):
        self.iters = iters
        if index in self.indices:
            self.profs[index] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.profs[index].start()

    def on_iter(self, index, it, loss):
        if index in self.profs and it == self.iters - 1:
            torch.cuda.synchronize()
            self.profs[index].stop()


def profile_groups(model_name: str, indices: list[int], samples: int, batch: int, iters: int = 12,
                   mode: str = "fast+fp16") -> None:
    """Top CUDA kernels of the eager optimisation steps of some groups, under a mode's settings.

    Eager, because a replayed graph runs these same kernels; the kernel-time sum per iteration
    against the graphed step's wall time tells whether the step is bound by its kernels.
    """
    ccfg = CalibrationConfig(samples=samples, batch_size=batch, iters=iters, device="cuda",
                             **{**MODES[mode], "cuda_graph": False})
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = ccfg.tf32
    profiler = _StepProfiler(set(indices))
    rec, images = _reconstructor(model_name, ccfg, profiler)
    rec.initialize(images)
    q_state, fp_state = rec.initial_states(images)
    for index in range(max(indices) + 1):
        _, q_state, fp_state = rec.reconstruct_group(index, q_state, fp_state)
    for index in indices:
        events = profiler.profs[index].key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        total_us = sum(e.self_device_time_total for e in kernels)
        count = sum(e.count for e in kernels)
        units = " + ".join(u.name for u in rec.groups[index])
        print(f"\n{model_name} group {index} ({units}), {mode}, {iters} eager iterations: "
              f"{count / iters:.0f} kernels and {total_us / iters / 1e3:.3f} ms of kernel time per iteration")
        by_kind: dict[str, list[float]] = {}
        for e in kernels:
            kind = by_kind.setdefault(kernel_kind(e.key), [0, 0.0])
            kind[0] += e.count / iters
            kind[1] += e.self_device_time_total / iters
        print("  per iteration: " + ", ".join(
            f"{k} {n:.0f} kernels {us / 1e3:.3f} ms" for k, (n, us) in sorted(by_kind.items(), key=lambda x: -x[1][1])))
        print(events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=220))


_KINDS = (("matmul", ("gemm", "cutlass", "xmma", "splitK", "cublas")), ("triton", ("triton",)),
          ("rng", ("distribution", "philox")), ("adam", ("adam", "Adam")),
          ("norm/softmax/gelu", ("layer_norm", "GammaBeta", "softmax", "Gelu", "LayerNorm")),
          ("copy/cat/index", ("Copy", "copy", "cat", "index", "gather", "Cat")),
          ("reduce", ("reduce",)), ("elementwise", ("elementwise",)))


def kernel_kind(name: str) -> str:
    """A coarse class of a CUDA kernel by its name, to see where a step's time goes."""
    return next((kind for kind, keys in _KINDS if any(k in name for k in keys)), "other")


def end_to_end(model_name: str, data: Path, work: Path, extra: list[str]) -> dict:
    """``osq calibrate MODEL --bits 4 4`` at the paper's schedule (``extra``: further options), as a user runs it.

    Random weights stand in for the pretrained ones (saved as the ``--checkpoint``); the images
    are read from ``data`` (calibration data already on disk). Timed from process start to exit.
    """
    from osqdeploy.load.models import resolve_recipe

    recipe = resolve_recipe(model_name)
    ckpt = work / f"{recipe.name}.pth"
    torch.manual_seed(0)
    torch.save(recipe.spec().create().state_dict(), ckpt)
    run_dir = work / f"run-{recipe.name}"
    cmd = [sys.executable, "-c", "from cli.main import app; app()", "calibrate", recipe.name, "--bits", "4", "4",
           "--checkpoint", str(ckpt), "--data", str(data), "--device", "cuda", "--run-dir", str(run_dir), *extra]
    print("$", " ".join(cmd[3:]), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1])  # its progress lines go to our output
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"osq calibrate {recipe.name} exited with {proc.returncode}")
    manifest = store.read_manifest(run_dir)
    cal = manifest.calibration
    return {"model": model_name, "wall_min": round(wall / 60, 2), "calibrate_min": round(manifest.seconds / 60, 2),
            "groups": len(manifest.groups), "iters": cal.iters, "samples": cal.samples,
            "batch_size": cal.batch_size, "autocast": cal.autocast, "device": manifest.device,
            "stage_s": manifest.stage_seconds,
            "group_phases_s": {k: round(v, 1) for k, v in manifest.phase_totals().items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_s", "deit_b", "swin_b"])
    ap.add_argument("--measure-iters", type=int, default=200)
    ap.add_argument("--full-iters", type=int, default=20000)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", type=int, nargs="*", default=None, metavar="GROUP",
                    help="first print these groups' top CUDA kernels per model (default: group 1)")
    ap.add_argument("--profile-only", action="store_true", help="profile, do not time the modes")
    ap.add_argument("--profile-mode", nargs="+", default=["fast+fp16"], choices=list(MODES),
                    help="the settings the profiled steps run with, one profile each (default: the default engine)")
    ap.add_argument("--end-to-end", type=Path, default=None, metavar="DIR",
                    help="then time `osq calibrate MODEL --bits 4 4 --data DIR` at the full schedule per model")
    ap.add_argument("--e2e-args", default="", metavar="'OPTIONS'",
                    help="further `osq calibrate` options for --end-to-end, e.g. '--autocast off'")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("calib_speed.py measures GPU calibration; no CUDA device here")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ceil = {"bf16": matmul_ceiling(torch.bfloat16, False), "tf32": matmul_ceiling(torch.float32, True),
            "fp32": matmul_ceiling(torch.float32, False)}
    print("matmul ceilings TFLOP/s:", {k: round(v, 1) for k, v in ceil.items()}, flush=True)
    rows = []
    for name in args.models:
        if args.profile is not None:
            for mode in args.profile_mode:
                profile_groups(name, args.profile or [1], args.samples, args.batch_size, mode=mode)
        for mode in [] if args.profile_only else args.modes:
            try:
                r = measure(name, mode, args.measure_iters, args.samples, args.batch_size, args.full_iters)
            except Exception:  # report and go on: one failing mode must not hide the others' figures
                traceback.print_exc()
                continue
            r["group0_final_loss"] = r["group0"]["final_loss"]
            r["group0_mse_after"] = r["group0"]["mse_after"]
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "group0"}), flush=True)
        # speed-up, TFLOP/s and codes against plain, wherever plain ran in the list of modes
        model_rows = [r for r in rows if r["model"] == name]
        base = next((r for r in model_rows if r["mode"] == "plain"), None)
        for r in model_rows if base else []:
            r["speedup_vs_plain"] = round(base["s_per_1k_iters_per_group"] / r["s_per_1k_iters_per_group"], 2)
            r["group0_codes_equal_plain"] = float((r["group0"]["codes"] == base["group0"]["codes"]).float().mean())
            r["tflops"] = round(base["flops_per_iter_all_groups"] / r["sum_iter_s"] / 1e12, 2)
    print(f"\n{torch.cuda.get_device_name()}, W4A4, auto plan, batch {args.batch_size}, {args.samples} images, "
          f"projection for {args.full_iters} iterations/group")
    print("| model | mode | groups | s / 1k iters / group | speed-up | projected total (min) | TFLOP/s | peak GiB "
          "| group-0 loss | group-0 codes = plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['groups']} | {r['s_per_1k_iters_per_group']} | "
              f"{r.get('speedup_vs_plain', '—')}× | {r['projected_total_min']} | {r.get('tflops', '—')} | "
              f"{r['peak_mem_gib']} | "
              f"{r['group0_final_loss']:.5g} | {r.get('group0_codes_equal_plain', float('nan')):.4%} |")
    e2e = []
    if args.end_to_end is not None:
        with tempfile.TemporaryDirectory() as work:
            for name in args.models:
                e2e.append(end_to_end(name, args.end_to_end, Path(work), args.e2e_args.split()))
                print(json.dumps(e2e[-1]), flush=True)
        print(f"\n{torch.cuda.get_device_name()}, `osq calibrate MODEL --bits 4 4` end to end (paper schedule)")
        print("| model | autocast | groups | iterations/group | images | measured wall (min) "
              "| of which calibrate (min) |")
        print("|---|---|---|---|---|---|---|")
        for r in e2e:
            print(f"| {r['model']} | {r['autocast']} | {r['groups']} | {r['iters']} | {r['samples']} | "
                  f"{r['wall_min']} | {r['calibrate_min']} |")
    if args.out:
        for r in rows:
            r.pop("group0", None)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "ceilings": ceil, "rows": rows,
                                              "end_to_end": e2e}, indent=2))


if __name__ == "__main__":
    main()
