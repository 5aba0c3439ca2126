"""The ``--fast`` preset against the paper's schedule (issue 5): final-output MSE on the test models.

Calibrates the tiny planted-outlier ViT and Swin the tests use (W4A4, ``auto`` plan, 128
calibration images, batch 32) at the full schedule (20,000 iterations per group) and at fewer
iterations, and prints each one's final-output MSE against full precision on held-out inputs,
relative to the full schedule. CPU is fine (it is slow: the full Swin schedule is 12 groups).

    python benchmarks/fast_preset.py --iters 2000 20000 --out benchmarks/results/fast_preset.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from osqdeploy.adapters import adapter_for  # noqa: E402
from osqdeploy.config import CalibrationConfig, QuantConfig  # noqa: E402
from osqdeploy.plan import build_plan  # noqa: E402
from osqdeploy.reconstruct import Reconstructor, logits, prepare_model  # noqa: E402

from conftest import images, tiny_swin, tiny_vit  # noqa: E402

MODELS = {"tiny_vit": (tiny_vit, 32), "tiny_swin": (tiny_swin, 56)}


def output_mse(model_name: str, iters: int, device: torch.device) -> tuple[float, float]:
    build, size = MODELS[model_name]
    model = build()
    q = copy.deepcopy(model)
    adapter = prepare_model(q, QuantConfig(4, 4), adapter_for)
    ccfg = CalibrationConfig(samples=128, iters=iters)
    rec = Reconstructor(q, adapter, build_plan("auto", adapter.units(q)), ccfg, device)
    x = images(128, size)
    t0 = time.perf_counter()
    rec.initialize(x)
    rec.reconstruct(x)
    seconds = time.perf_counter() - t0
    held_out = images(256, size, seed=7)
    ref = logits(model.to(device), held_out, 64, device)
    return float((logits(q, held_out, 64, device) - ref).pow(2).mean()), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--iters", nargs="+", type=int, default=[2000, 20000], help="the last is the reference")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for name in args.models:
        ref = None
        for iters in sorted(args.iters, reverse=True):
            mse, seconds = output_mse(name, iters, device)
            ref = mse if ref is None else ref
            rows.append({"model": name, "iters": iters, "output_mse": mse, "vs_full": mse / ref, "seconds": seconds})
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(rows, indent=2))
    print("\n| model | iters/group | output MSE | vs full schedule | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['iters']} | {r['output_mse']:.4g} | {r['vs_full']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
