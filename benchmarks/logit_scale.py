"""How much of a run's held-out KL to fp32 is the scale of its logits, and how much their order.

KL(fp32 ‖ quantized) falls when a model's confidence matches fp32's even if it ranks classes no
better, so a change that lowers KL can leave top-1 where it was, or lower it. For each run this
prints, on the held-out half of the images: top-1, agreement with fp32, KL, the single
temperature T that minimises KL(fp32 ‖ softmax(logits / T)) and the KL left at it (the part no
rescaling removes), the ratio of the logits' spread to fp32's, and the cross-entropy to the labels.

    python -m benchmarks.logit_scale --images IMAGES --checkpoint deit_tiny_patch16_224.pth RUN [RUN ...]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.held_out import add_arguments, held_out_logits, write_rows
from osqdeploy.evaluation import kl_divergence

TEMPERATURES = torch.linspace(0.5, 2.0, 151)


def scale_report(ref: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The figures of the module docstring for one set of logits against fp32's."""
    kls = torch.tensor([kl_divergence(ref, logits / t) for t in TEMPERATURES])
    best = int(kls.argmin())
    kl = kl_divergence(ref, logits)
    return {
        "top1": 100 * float((logits.argmax(1) == labels).float().mean()),
        "agreement": 100 * float((logits.argmax(1) == ref.argmax(1)).float().mean()),
        "kl": kl,
        "best_temperature": float(TEMPERATURES[best]),
        "kl_at_best_temperature": float(kls[best]),
        "kl_share_of_scale": (kl - float(kls[best])) / kl if kl > 0 else 0.0,
        "logit_spread_vs_fp32": float(logits.std(1).mean() / ref.std(1).mean()),
        "cross_entropy": float(torch.nn.functional.cross_entropy(logits, labels)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap)
    args = ap.parse_args()
    ref, labels, _, runs = held_out_logits(args)
    write_rows([{"run": "fp32", **scale_report(ref, ref, labels)}]
               + [{"run": run, **scale_report(ref, logits, labels)} for run, logits in runs], args.json)


if __name__ == "__main__":
    main()
