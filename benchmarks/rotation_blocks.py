"""Which Hadamard block size the post-GELU rotation should use: held-out KL per size.

The rotation multiplies each block of fc2's input channels by a Hadamard matrix of the block's
order (``primitives.rotation_block``: the largest power of two up to 64 dividing the width). A
larger block spreads an outlier channel over more channels, and costs a larger MatMul in the
exported graph. This runs the same calibration (``benchmarks.accuracy_seeds``' job, the default
round-to-nearest on the CPU) once per largest block size and prints held-out top-1 and KL:

    python -m benchmarks.rotation_blocks --images IMAGES --checkpoint deit_tiny_patch16_224.pth --out OUT \
        --blocks 64 128 256
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from benchmarks.accuracy_seeds import Job, run_job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--checkpoint")
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--out", required=True)
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--variant", default="paper,post_gelu_grid=hadamard")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=0, help="iterations per group (0: round-to-nearest)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import osqdeploy.quant.primitives as P

    default_block = P.rotation_block
    job_args = argparse.Namespace(model=args.model, checkpoint=args.checkpoint, images=args.images,
                                  iters=args.iters, samples=args.samples, device=args.device, limit_eval=None,
                                  float_draws=0, post_tuning=[], concurrent=1)
    rows = []
    for block in args.blocks:
        P.rotation_block = partial(default_block, largest=block)  # what reparam.rotate_input asks for
        try:
            job_args.out = str(Path(args.out) / f"block{block}")
            row = next(run_job(Job(args.variant, args.bits, args.seed), job_args))[0]
        finally:
            P.rotation_block = default_block
        rows.append({"largest_block": block, **row})
        print(f"block {block}: top-1 {row['top1']:.1f}  KL {row['kl']:.4f}  logit MSE {row['logit_mse']:.3f}",
              flush=True)
    (Path(args.out) / "rotation_blocks.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
