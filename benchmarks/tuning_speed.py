"""Output tuning's speed: seconds per 1,000 steps and for the whole stage, per setting.

The tuning stage runs after block reconstruction; what it costs decides which settings fit the
default's time budget (1.25x the paper's calibration). The model is quantized by round-to-nearest
(the stage's arithmetic does not depend on how the integers were found), then tuned once per
setting at two lengths; the per-step time is the difference over the difference in steps, so the
stage's fixed costs (the float predictions, the KL before and after, graph capture) are reported
apart. Weights are random unless ``--checkpoint`` is given; the images are random too.

    python -m benchmarks.tuning_speed --settings default default,output_tuning_batch=128 \\
        default,output_tuning_crop=0.35 --out tuning_speed.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from benchmarks.accuracy_seeds import parse_jobs
from osqdeploy.api import calibrate, load_run
from osqdeploy.config import CalibrationConfig, QuantConfig
from osqdeploy.load import load_model
from osqdeploy.reconstruct.output_tuning import tune_outputs


def tuning_config(spec: str, model: str, samples: int) -> CalibrationConfig:
    """``NAME[,key=value...]``, a variant of ``benchmarks.accuracy_seeds``: the tuning its calibration runs."""
    (job,) = parse_jobs([spec], ["w4a4"], [0])  # the bits and seed do not change the tuning's settings
    _, cfg = job.configs(model, iters=None, samples=samples, device="auto")
    if not cfg.output_tuning_iters:
        raise SystemExit(f"{spec} runs no output tuning")
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--bits", type=int, nargs=2, default=[4, 4])
    ap.add_argument("--samples", type=int, default=4096, help="calibration views the stage draws from")
    ap.add_argument("--settings", nargs="+", default=["default"], metavar="NAME[,key=value...]",
                    help="accuracy_seeds variants whose tuning is timed")
    ap.add_argument("--steps", type=int, nargs=2, default=[100, 400], metavar=("SHORT", "LONG"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    short, long = args.steps
    if not 0 < short < long:
        raise SystemExit(f"--steps takes two lengths, the first shorter, got {short} {long}")
    configs = {spec: tuning_config(spec, args.model, args.samples) for spec in args.settings}  # refuse bad input first

    fp = load_model(args.model, checkpoint=args.checkpoint, pretrained=args.checkpoint is not None)
    size = fp.model.default_cfg["input_size"]
    images = torch.randn(args.samples, *size, generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        rtn = CalibrationConfig(samples=args.samples, iters=0, device=args.device)
        calibrate(load_model(args.model, checkpoint=args.checkpoint, pretrained=args.checkpoint is not None),
                  images, QuantConfig(*args.bits), rtn, work)
        for spec, cfg in configs.items():
            seconds = {}
            for steps in (short, long):
                model = load_run(work, args.device).model
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                tune_outputs(model, images, cfg.with_tuning_steps(steps), torch.device(args.device),
                             reference=fp.model)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds[steps] = time.perf_counter() - t0
            per_step = (seconds[long] - seconds[short]) / (long - short)
            fixed = seconds[short] - short * per_step
            stage = fixed + cfg.output_tuning_iters * per_step
            row = {"setting": spec, "batch": cfg.output_tuning_batch or cfg.batch_size,
                   "seconds_per_1000_steps": round(1000 * per_step, 2), "fixed_seconds": round(fixed, 2),
                   "stage_seconds": round(stage, 2), "stage_steps": cfg.output_tuning_iters,
                   "measured": {str(k): round(v, 3) for k, v in seconds.items()}}
            rows.append(row)
            print(f"{spec:55s} batch {row['batch']:4d}: {row['seconds_per_1000_steps']:7.2f} s / 1k steps, "
                  f"fixed {row['fixed_seconds']:6.2f} s, stage of {row['stage_steps']} steps "
                  f"{row['stage_seconds']:7.2f} s",
                  flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {"model": args.model, "bits": args.bits, "samples": args.samples, "device": device,
              "torch": torch.__version__, "steps": args.steps, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
