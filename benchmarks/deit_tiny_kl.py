"""How far saved runs are from the fp32 model on the calibration and the held-out images (issue 9).

Top-1 on a few hundred images moves in whole images and, at 4-6 bits, with the float arithmetic
of the runtime (see ``UlpPerturbed``). The KL divergence from the fp32 model's predicted
distribution and the logit MSE average over every class of every image, so they rank runs
stably; measuring them on both halves of the split also shows how much a reconstruction fitted
its calibration images rather than the task (round-to-nearest has the same figures on both).

    python benchmarks/deit_tiny_kl.py RUN [RUN ...] --images ../shared/data/imagenet-sample \
        --checkpoint ../shared/data/weights/deit_tiny_patch16_224.pth
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import real_deit
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osqdeploy.pipeline import load_run  # noqa: E402

from osqdeploy.evaluation import TorchRuntime, evaluate, parity  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    real_deit.add_options(ap, device="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    fp, calibration, held_out = real_deit.model_and_split(args)
    splits = {"calibration": calibration, "held-out": held_out}
    ref = {k: evaluate(TorchRuntime(fp, args.device), d, progress=False) for k, d in splits.items()}
    rows = []
    print("| run | split | fp32 top-1 | top-1 | KL to fp32 | logit MSE | top-1 agreement with fp32 |")
    print("|---|---|---|---|---|---|---|")
    for run_dir in args.runs:
        model = load_run(run_dir, args.device).model
        for split, dataset in splits.items():
            q, f = evaluate(TorchRuntime(model, args.device, name="torch-quant"), dataset, progress=False), ref[split]
            row = {
                "run": run_dir.name, "split": split, "fp32_top1": f.top1, "top1": q.top1,
                "kl": parity(f, q).kl_divergence,
                "logit_mse": (q.logits - f.logits).pow(2).mean().item(),
                "agreement": 100 * (q.logits.argmax(1) == f.logits.argmax(1)).float().mean().item(),
                "device": args.device,
            }
            rows.append(row)
            print(f"| {row['run']} | {split} | {row['fp32_top1']:.1f} | {row['top1']:.1f} | {row['kl']:.4f} | "
                  f"{row['logit_mse']:.4f} | {row['agreement']:.1f} % |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
