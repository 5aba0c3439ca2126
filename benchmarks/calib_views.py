"""Time building the calibration tensor: the images once, then seeded random views up to ``--samples``.

This is the part of ``osq calibrate`` before reconstruction that grows with the number of views:
decoding, timm's random resized crop and flip, conversion and normalisation. Each count is built
``--repeats`` times in this process and the fastest is reported (the first also pays for the
page faults of a fresh tensor).

    python -m benchmarks.calib_views --images ../shared/data/imagenet-sample \\
        --checkpoint ../shared/data/weights/deit_tiny_patch16_224.pth --samples 1024 4096 --out views.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks.accuracy_seeds import EVAL_FRACTION, SPLIT_SEED  # the split every real-DeiT-Tiny figure uses
from osqdeploy.load import ImageFiles, calibration_augment, calibration_tensor, eval_transform, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True, help="image folder (its calibration half is used)")
    ap.add_argument("--checkpoint", default=None, help="float weights of --model (only its data config is used)")
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--samples", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()

    model = load_model(args.model, checkpoint=args.checkpoint).model
    calib, _ = ImageFiles(args.images, transform=eval_transform(model)).split(EVAL_FRACTION, seed=SPLIT_SEED)
    augment = calibration_augment(model)
    rows = []
    for n in args.samples:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            x = calibration_tensor(calib, n, seed=args.seed, augment=augment)
            times.append(time.perf_counter() - t0)
            del x
        rows.append({"samples": n, "images": len(calib), "seconds": round(min(times), 2),
                     "all_seconds": [round(t, 2) for t in times]})
        print(f"{n:6d} views of {len(calib)} images: {min(times):6.1f} s (runs: "
              f"{', '.join(f'{t:.1f}' for t in times)})", flush=True)
    if args.out:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        args.out.write_text(json.dumps({"machine": machine, "model": args.model, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
