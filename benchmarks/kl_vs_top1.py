"""What a lower KL buys in top-1 on the 250 held-out images: a line through every measured run.

Reads the raw rows ``benchmarks.accuracy_seeds`` wrote (``--files``, default every
``accuracy_deit_t*.json`` in benchmarks/results), keeps each distinct full-schedule run of the
bit-width once (a run re-measured in a later file has the same KL and top-1), and fits top-1 =
a + b · KL by least squares. The residual spread is what one run's top-1 moves at a given KL,
seeds and methods together; the fit says which KL a top-1 target asks for on these images.
Then the same runs' ONNX Runtime top-1 minus fake-quant top-1, where measured: its mean over all
of them, and how far one run's difference moves.

    python -m benchmarks.kl_vs_top1 --bits w4a4 --target 71.9
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def distinct_runs(files: list[Path], bits: str, min_iters: int) -> dict[tuple[float, float], float | None]:
    """(held-out KL, top-1) of each distinct finished run of ``bits`` evaluated on 250 images, with its
    ONNX Runtime minus fake-quant top-1 where any file measured it (else None)."""
    seen: dict[tuple[float, float], float | None] = {}
    for path in files:
        for row in json.loads(path.read_text()).get("jobs", []):
            if (row.get("status") != "ok" or row.get("bits") != bits or row.get("eval_images") != 250
                    or row.get("iters", 0) < min_iters):
                continue
            key = (round(row["kl"], 5), row["top1"])
            if seen.get(key) is None:
                seen[key] = row.get("ort_minus_fake_quant")
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="+", type=Path, default=sorted(RESULTS.glob("accuracy_deit_t*.json")))
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--min-iters", type=int, default=1000, help="leave out shorter schedules than this per group")
    ap.add_argument("--target", type=float, nargs="*", default=[], help="top-1 values to solve the fit for")
    ap.add_argument("--kl", type=float, nargs="*", default=[], help="KL values to read the fit at")
    args = ap.parse_args()

    runs = distinct_runs(args.files, args.bits, args.min_iters)
    if len(runs) < 3:
        raise SystemExit(f"{len(runs)} distinct {args.bits} runs in the files: too few to fit a line")
    kl, top1 = np.array(list(runs)).T
    slope, intercept = np.polyfit(kl, top1, 1)
    residual = top1 - (intercept + slope * kl)
    spread = residual.std(ddof=2)
    slope_se = spread / np.sqrt(((kl - kl.mean()) ** 2).sum())
    print(f"{len(runs)} distinct {args.bits} runs from {len(args.files)} files, KL {kl.min():.3f}-{kl.max():.3f}, "
          f"top-1 {top1.min():.1f}-{top1.max():.1f}")
    r = np.corrcoef(kl, top1)[0, 1]
    print(f"top-1 = {intercept:.1f} {slope:+.1f} x KL (slope SE {slope_se:.1f}), r = {r:.2f}, "
          f"one run's top-1 about the line: SD {spread:.2f} points (a 3-seed mean: {spread / np.sqrt(3):.2f})")
    for value in args.kl:
        print(f"  KL {value:.3f} -> top-1 {intercept + slope * value:.1f}")
    for value in args.target:
        print(f"  top-1 {value:.1f} <- KL {(value - intercept) / slope:.3f}")
    ort = np.array([d for d in runs.values() if d is not None])
    if len(ort) > 1:
        sd = ort.std(ddof=1)
        print(f"ONNX Runtime minus fake-quant top-1, {len(ort)} of the runs: mean {ort.mean():+.2f} "
              f"(standard error {sd / np.sqrt(len(ort)):.2f}), one run SD {sd:.2f} "
              f"(a 3-seed mean: {sd / np.sqrt(3):.2f})")


if __name__ == "__main__":
    main()
