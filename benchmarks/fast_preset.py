"""The ``--fast`` preset against the paper's schedule: final-output MSE on the test models.

Calibrates the tiny planted-outlier ViT and Swin the tests use (W4A4, ``auto`` plan, 128
calibration images, batch 32) at the full schedule (20,000 iterations per group) and at fewer
iterations, and prints each one's final-output MSE against full precision on held-out inputs,
relative to the full schedule. Held-out inputs are the 1,024 the tests use (the tiny ViT's
per-image error is heavy-tailed, so fewer would be noise). CPU is fine but slow (the full Swin
schedule is 12 groups); ``--jobs 2`` runs two calibrations side by side, one thread each.

    python -m benchmarks.fast_preset --preset --seeds 0 1 2 --device cuda --jobs 6 --out fast_preset.json
    python -m benchmarks.fast_preset --iters 2000 3000 20000 --set lr_round=0.01 --seeds 0 1 2 --device cuda

``--preset`` compares ``osq calibrate --fast`` (``osqdeploy.config.fast_preset``) with the full
schedule; ``--set`` tries other settings for the shorter runs. One seed is not enough: the MSE
at a fixed count moves with the calibration seed (batches, QDrop masks) by 10 % on the tiny ViT,
and without a raised learning rate it is not even monotone in the count.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from osqdeploy.adapters import adapter_for
from osqdeploy.config import CalibrationConfig, QuantConfig, fast_preset
from osqdeploy.plan import build_plan
from osqdeploy.reconstruct import Reconstructor, logits, prepare_model
from tests.conftest import images, tiny_swin, tiny_vit

FULL = CalibrationConfig().iters  # the paper schedule
MODELS = {"tiny_vit": (tiny_vit, 32), "tiny_swin": (tiny_swin, 56)}


def output_mse(model_name: str, iters: int, device: torch.device, threads: int | None = None,
               seed: int = 0, settings: dict | None = None) -> tuple[float, float]:
    if threads:
        torch.set_num_threads(threads)
    build, size = MODELS[model_name]
    model = build()
    q = copy.deepcopy(model)
    adapter = prepare_model(q, QuantConfig(4, 4), adapter_for)
    ccfg = CalibrationConfig(samples=128, iters=iters, seed=seed, **(settings or {}))
    rec = Reconstructor(q, adapter, build_plan("auto", adapter.units(q)), ccfg, device)
    x = images(128, size)
    t0 = time.perf_counter()
    rec.initialize(x)
    rec.reconstruct(x)
    seconds = time.perf_counter() - t0
    held_out = images(1024, size, seed=11)  # tests/test_reconstruct.py's VIT_HELD_OUT
    ref = logits(model.to(device), held_out, 64, device)
    return float((logits(q, held_out, 64, device) - ref).pow(2).mean()), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--iters", nargs="+", type=int, default=[2000, 20000], help="the last is the reference")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="calibration seeds (batches, drop masks): the spread at one count is what a preset must beat")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1, help="calibrations side by side (one thread each)")
    ap.add_argument("--preset", action="store_true", help="the --fast preset against the full schedule")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="CalibrationConfig settings for every run shorter than the paper's schedule (20,000)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    settings = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    if args.preset:
        fast = fast_preset(CalibrationConfig())
        args.iters = sorted({fast.iters, FULL})
        settings = {"lr_round": fast.lr_round, **settings}
    device = torch.device(args.device)
    # longest first, so that side-by-side jobs finish together
    work = sorted(((n, i, s) for n in args.models for i in args.iters for s in args.seeds), key=lambda w: -w[1])
    threads = 1 if args.jobs > 1 else None
    results = {}
    # spawned, not forked: a forked child cannot use CUDA
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=spawn) if args.jobs > 1 else _Serial() as pool:
        futures = {pool.submit(output_mse, w[0], w[1], device, threads, w[2],
                               settings if w[1] < FULL else None): w for w in work}
        for future in as_completed(futures):  # each as it finishes: a stopped run keeps what is done
            results[futures[future]] = future.result()
            mse, seconds = results[futures[future]]
            name, iters, seed = futures[future]
            print(json.dumps({"model": name, "iters": iters, "seed": seed, "output_mse": mse, "seconds": seconds}),
                  flush=True)
    rows = []
    for name in args.models:
        ref = statistics.mean(results[(name, max(args.iters), s)][0] for s in args.seeds)
        for iters in sorted(args.iters, reverse=True):
            mses = [results[(name, iters, s)][0] for s in args.seeds]
            mean = statistics.mean(mses)
            rows.append({"model": name, "iters": iters, "seeds": args.seeds, "output_mse": mses, "mean": mean,
                         "settings": settings if iters < FULL else {},
                         "std": statistics.stdev(mses) if len(mses) > 1 else None, "vs_full": mean / ref,
                         "seconds": [results[(name, iters, s)][1] for s in args.seeds],
                         "threads": threads or torch.get_num_threads(), "cpus": os.cpu_count()})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"\n| model | iters/group | output MSE, mean over seeds {args.seeds} | seed std | vs full schedule |")
    print("|---|---|---|---|---|")
    for r in rows:
        std = f"{r['std']:.3g}" if r["std"] is not None else "–"
        print(f"| {r['model']} | {r['iters']} | {r['mean']:.4g} | {std} | {r['vs_full']:.3f} |")


class _Serial:
    """``ProcessPoolExecutor``'s submit/result, run in this process (``--jobs 1``)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args):
        future = Future()
        future.set_result(fn(*args))
        return future


if __name__ == "__main__":
    main()
