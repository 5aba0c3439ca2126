"""Reconstruction plans on the tiny test ViT: final-output MSE against round-to-nearest.

Runs W4A4 reconstruction of the test suite's tiny ViT (depth 6, planted outlier channels) for
every combination of plan, iteration count, calibration seed and configuration variant asked
for, and prints the final-output (logit) MSE against full precision on held-out inputs (the
metric of ``tests/test_reconstruct.py``) and on the calibration inputs, with the ratio to
round-to-nearest. A variant is a name plus ``CalibrationConfig`` overrides, e.g.

    python -m benchmarks.granularity_tiny --specs blocks:1 blocks:3 --iters 400 --seeds 0 1 2 \
        --variant base --variant "lr=lr_round=3e-3"

CPU, one thread per run; ``--jobs 2`` runs two configurations side by side.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the thread count is set)

from osqdeploy.adapters import adapter_for  # noqa: E402
from osqdeploy.config import CalibrationConfig, QuantConfig  # noqa: E402
from osqdeploy.plan import build_plan  # noqa: E402
from osqdeploy.reconstruct import Reconstructor, logits, prepare_model  # noqa: E402
from tests.conftest import images, tiny_vit  # noqa: E402

CPU = torch.device("cpu")
SIZE = 32


def parse_variant(text: str) -> tuple[str, dict]:
    """``name=key=value,key=value`` (or just ``name``) → (name, overrides)."""
    name, _, rest = text.partition("=")
    overrides: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        overrides[key] = value
    return name, overrides


def output_mse(model, quantized, x) -> float:
    return float((logits(quantized, x, 64, CPU) - logits(model, x, 64, CPU)).pow(2).mean())


def run_one(job: dict) -> dict:
    torch.set_num_threads(1)
    model = tiny_vit(depth=job["depth"], seed=job["model_seed"])
    q = copy.deepcopy(model)
    adapter = prepare_model(q, QuantConfig(4, 4), adapter_for)
    overrides = dict(job["overrides"])
    ccfg = CalibrationConfig(
        samples=job["n"], batch_size=16, iters=job["iters"], seed=job["seed"], device="cpu", **overrides
    )
    rec = Reconstructor(q, adapter, build_plan(job["spec"], adapter.units(q)), ccfg, CPU)
    x = images(job["n"], SIZE)
    t0 = time.perf_counter()
    rec.initialize(x)
    results = rec.reconstruct(x)
    held_out = images(128, SIZE, seed=7)
    return {
        **job,
        "held_out": output_mse(model, q, held_out),
        "calib": output_mse(model, q, x[:128]),
        "held_out_1k": output_mse(model, q, images(1024, SIZE, seed=11)),
        "seconds": time.perf_counter() - t0,
        "flipped": [round(r.flipped, 4) for r in results],
        "group_mse": [(round(r.mse_before, 4), round(r.mse_after, 4)) for r in results],
    }


def report(rows: list[dict], per_run: bool) -> None:
    """Print the per-run lines (optional) and the table of means over calibration seeds."""
    rtn = {r["model_seed"]: r["held_out"] for r in rows if r["variant"] == "rtn"}
    rtn_cal = {r["model_seed"]: r["calib"] for r in rows if r["variant"] == "rtn"}
    rtn_1k = {r["model_seed"]: r["held_out_1k"] for r in rows if r["variant"] == "rtn"}
    print(f"RTN held-out MSE by model seed: {rtn}  (calib {rtn_cal}, held-out 1k {rtn_1k})")
    if per_run:
        print("per run: variant spec iters n mseed seed | held-out  xRTN | calib | held-out 1k xRTN | flipped | s")
    for r in rows if per_run else []:
        if r["variant"] == "rtn":
            continue
        print(f"  {r['variant']:<10} {r['spec']:<9} {r['iters']:>5} {r['n']:>4} {r['model_seed']:>2} {r['seed']:>2} | "
              f"{r['held_out']:.4f} {rtn[r['model_seed']] / r['held_out']:5.2f}x | {r['calib']:.4f} | "
              f"{r['held_out_1k']:.4f} {rtn_1k[r['model_seed']] / r['held_out_1k']:5.2f}x | "
              f"{r['flipped']} | {r['seconds']:.0f}")
    print()
    print("| variant | plan | iters | samples | model seed | runs | held-out MSE mean ± sd | min..max | "
          "×RTN mean | calib MSE mean | held-out-1k MSE mean ± sd | ×RTN (1k) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    keys = []
    for r in rows:
        k = (r["variant"], r["spec"], r["iters"], r["n"], r["model_seed"])
        if r["variant"] != "rtn" and k not in keys:
            keys.append(k)
    for k in keys:
        sel = [r for r in rows if (r["variant"], r["spec"], r["iters"], r["n"], r["model_seed"]) == k]
        ho = [r["held_out"] for r in sel]
        sd = statistics.stdev(ho) if len(ho) > 1 else 0.0
        ratio = statistics.mean(rtn[k[4]] / h for h in ho)
        cal = statistics.mean(r["calib"] for r in sel)
        big = [r["held_out_1k"] for r in sel]
        big_sd = statistics.stdev(big) if len(big) > 1 else 0.0
        big_ratio = statistics.mean(rtn_1k[k[4]] / h for h in big)
        print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {len(sel)} | {statistics.mean(ho):.4f} ± {sd:.4f} | "
              f"{min(ho):.4f}..{max(ho):.4f} | {ratio:.2f}× | {cal:.4f} | {statistics.mean(big):.4f} ± {big_sd:.4f} | "
              f"{big_ratio:.2f}× |")


def load_rows(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a repeated configuration keeps its last run."""
    rows: dict = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "held_out_1k" in r:
            rows[(r["variant"], r["spec"], r["iters"], r["n"], r["model_seed"], r["seed"])] = r
    return list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=["blocks:1", "blocks:3"])
    ap.add_argument("--iters", nargs="+", type=int, default=[400])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration seeds (batches, drop masks)")
    ap.add_argument("--model-seeds", nargs="+", type=int, default=[0], help="tiny_vit seeds (0 is the test's)")
    ap.add_argument("--samples", nargs="+", type=int, default=[128], help="calibration images (the test uses 128)")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--variant", action="append", default=None, help="name=key=value,... (CalibrationConfig)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--json", type=Path, help="append raw rows to this JSON-lines file")
    ap.add_argument("--summarize", type=Path, help="only print the table of a --json file's rows")
    args = ap.parse_args()
    if args.summarize:
        report(load_rows(args.summarize), per_run=False)
        return
    variants = [parse_variant(v) for v in (args.variant or ["base"])]

    jobs = []
    for ms in args.model_seeds:
        jobs.append(dict(spec="auto", iters=0, seed=0, model_seed=ms, n=128, depth=args.depth,
                         variant="rtn", overrides={}))
        for n in args.samples:
            for spec in args.specs:
                for iters in args.iters:
                    for name, ov in variants:
                        for seed in args.seeds:
                            jobs.append(dict(spec=spec, iters=iters, seed=seed, model_seed=ms, n=n,
                                             depth=args.depth, variant=name, overrides=ov))
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(run_one, jobs))
    else:
        rows = [run_one(j) for j in jobs]
    if args.json:
        with args.json.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    report(rows, per_run=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
