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

import torch

from benchmarks.held_out import add_arguments, held_out_logits, write_rows


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
    add_arguments(ap)
    args = ap.parse_args()
    ref, labels, calib_labels, runs = held_out_logits(args)
    calib = torch.zeros(ref.shape[1], dtype=torch.bool)
    calib[calib_labels] = True
    write_rows([{"run": "fp32", **prior_report(ref, labels, calib)}]
               + [{"run": run, **prior_report(logits, labels, calib)} for run, logits in runs], args.json)


if __name__ == "__main__":
    main()
