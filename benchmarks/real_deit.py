"""What the real-DeiT-Tiny analysis scripts share: their options and the seeded split of the images.

The split is ``deit_tiny_accuracy.py``'s (same fraction and seed), so every script measures the
runs that one calibrated on the images it held out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osqdeploy.load.data import ImageFiles, eval_transform  # noqa: E402
from osqdeploy.load.models import load_model  # noqa: E402


def add_options(ap: argparse.ArgumentParser, device: str) -> None:
    ap.add_argument("--images", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--eval-fraction", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0, help="the split's seed (deit_tiny_accuracy.py's)")
    ap.add_argument("--device", default=device)


def model_and_split(args: argparse.Namespace):
    """The fp32 model and the (calibration, held-out) halves of the images, as datasets."""
    fp = load_model(args.model, checkpoint=args.checkpoint).model
    data = ImageFiles(args.images, transform=eval_transform(fp))
    calibration, held_out = data.split(args.eval_fraction, seed=args.seed)
    return fp, calibration, held_out
