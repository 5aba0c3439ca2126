"""What the benchmarks that read finished runs' predictions share (``logit_scale``, ``class_prior``).

Each evaluates fp32 and every run on the held-out half of ``--images``, split as every real
DeiT-Tiny figure splits it, and prints one row per model as a markdown table (``--json``: the
rows too).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.accuracy_seeds import EVAL_FRACTION, SPLIT_SEED


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--images", required=True)
    ap.add_argument("--checkpoint")
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the rows here")


def held_out_logits(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                       list[tuple[str, torch.Tensor]]]:
    """(fp32 logits, labels, the calibration half's labels, [(run, its logits)]) on the held-out half."""
    from osqdeploy.api import load_run
    from osqdeploy.evaluation import TorchRuntime, evaluate
    from osqdeploy.load import ImageFiles, eval_transform, load_model

    fp = load_model(args.model, checkpoint=args.checkpoint)
    calib, held = ImageFiles(args.images, transform=eval_transform(fp.model)).split(EVAL_FRACTION, seed=SPLIT_SEED)
    ref = evaluate(TorchRuntime(fp.model, args.device), held, progress=False).logits
    runs = [(run, evaluate(TorchRuntime(load_run(run, args.device).model, args.device), held, progress=False).logits)
            for run in args.runs]
    return ref, torch.tensor(held.labels), torch.tensor(calib.labels), runs


def write_rows(rows: list[dict], json_path: str | None) -> None:
    """Print ``rows`` (a ``run`` key, then figures) as a markdown table; also to ``json_path`` if given."""
    keys = list(rows[0])[1:]
    print("| run | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for row in rows:
        print(f"| {row['run']} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
