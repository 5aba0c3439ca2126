"""How far a run's held-out predictions lean toward the calibration images' classes.

The 500 images hold one image per class, so the calibration half and the held-out half share
no class: every held-out prediction of a calibration class is wrong, and a tuning that learns
the calibration set's class mix shows up here before anywhere else. For fp32 and each run this
prints, on the held-out half: top-1, the share of predictions that name a calibration class,
the probability mass on calibration classes, and the mean logit of calibration classes minus
that of the others.

    python -m benchmarks.class_prior --images IMAGES --checkpoint deit_tiny_patch16_224.pth RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.accuracy_seeds import EVAL_FRACTION, SPLIT_SEED


def prior_report(logits: torch.Tensor, labels: torch.Tensor, calib: torch.Tensor) -> dict:
    """The figures of the module docstring for one set of held-out logits; ``calib`` masks the classes."""
    pred = logits.argmax(1)
    return {
        "top1": 100 * float((pred == labels).float().mean()),
        "predicted_calibration_class": 100 * float(calib[pred].float().mean()),
        "calibration_class_mass": float(logits.softmax(1)[:, calib].sum(1).mean()),
        "calibration_logit_lead": float((logits[:, calib].mean(1) - logits[:, ~calib].mean(1)).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--images", required=True)
    ap.add_argument("--checkpoint")
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    from osqdeploy.api import load_run
    from osqdeploy.evaluation import TorchRuntime, evaluate
    from osqdeploy.load import ImageFiles, eval_transform, load_model

    fp = load_model(args.model, checkpoint=args.checkpoint)
    calib_set, held = ImageFiles(args.images, transform=eval_transform(fp.model)).split(EVAL_FRACTION, seed=SPLIT_SEED)
    labels = torch.tensor(held.labels)
    ref = evaluate(TorchRuntime(fp.model, args.device), held, progress=False).logits
    calib = torch.zeros(ref.shape[1], dtype=torch.bool)
    calib[torch.tensor(calib_set.labels)] = True
    rows = [{"run": "fp32", **prior_report(ref, labels, calib)}]
    for run in args.runs:
        logits = evaluate(TorchRuntime(load_run(run, args.device).model, args.device), held, progress=False).logits
        rows.append({"run": run, **prior_report(logits, labels, calib)})
    keys = list(rows[0])[1:]
    print("| run | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for row in rows:
        print(f"| {row['run']} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
