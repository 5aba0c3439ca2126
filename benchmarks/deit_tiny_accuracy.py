"""Real-model accuracy: DeiT-Tiny at W4A4/W6A6/W8A8 on real ImageNet images.

The 500 sample images are split once (seeded) into a calibration part and an evaluation part
that never overlap; every number printed is top-1 on the evaluation part. For each
configuration it calibrates through the library the CLI uses, reloads the saved run (so the
fake-quant numbers are those of the artifact), exports QDQ ONNX and evaluates it in ONNX
Runtime (CPU, and CUDA when the provider is present).

    python -m benchmarks.deit_tiny_accuracy --images ../shared/data/imagenet-sample \
        --checkpoint ../shared/data/weights/deit_tiny_patch16_224.pth --iters 20000 \
        --configs 4,4,auto 4,4,blocks:1 6,6,auto 8,8,auto --out results/

A configuration is ``W,A,PLAN`` optionally followed by ``,key=value`` settings of QuantConfig or
CalibrationConfig (``6,6,auto,edge_range=minmax``). ``--augment`` (the default, as in ``osq
calibrate``) fills the calibration set up to ``--calib-samples`` with random crops and flips of
the calibration part (never of the evaluation part). Each row also gives the KL divergence of the
fake-quant predictions from the fp32 ones on the evaluation part, which ranks runs more stably
than top-1 on a few hundred images; ``--calib-kl`` adds the same KL on the calibration part's
own images (un-augmented), which shows how far a reconstruction fitted its calibration images
rather than the task (round-to-nearest has the same KL on both parts).

A configuration whose run directory already holds a finished run is not calibrated again: it is
reloaded and evaluated (its calibration time is the one its manifest recorded), so the ONNX
Runtime CUDA figures can be added later, on the machine that has the provider, with ``--ort cuda``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from osqdeploy.api import calibrate, load_run
from osqdeploy.api import export as export_run
from osqdeploy.config import CalibrationConfig, QuantConfig
from osqdeploy.evaluation import OnnxRuntime, TorchRuntime, UlpPerturbed, evaluate, parity
from osqdeploy.load.data import ImageFiles, calibration_augment, calibration_tensor, eval_transform
from osqdeploy.load.models import load_model
from osqdeploy.run.store import MANIFEST


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--configs", nargs="+", default=["4,4,auto", "4,4,blocks:1", "6,6,auto", "8,8,auto"])
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-fraction", type=float, default=0.5)
    ap.add_argument("--calib-samples", type=int, default=1024,
                    help="capped by the calibration part's size, unless --augment")
    ap.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                    help="make up --calib-samples with random crops/flips of the calibration images (as osq does)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ort", nargs="*", default=["cpu", "cuda"], choices=["cpu", "cuda"],
                    help="ONNX Runtime providers to evaluate (CUDA only where this onnxruntime has it)")
    ap.add_argument("--dither", type=int, default=0, metavar="K",
                    help="also evaluate torch fake-quant under K seeds of one-ulp noise on its layer outputs")
    ap.add_argument("--calib-kl", action="store_true",
                    help="also give the KL to fp32 on the calibration part's images (overfitting check)")
    ap.add_argument("--only-finished", action="store_true",
                    help="skip configurations whose run has not finished (never calibrate)")
    ap.add_argument("--out", default="results/deit_tiny")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device

    fp = load_model(args.model, checkpoint=args.checkpoint)
    transform = eval_transform(fp.model)
    data = ImageFiles(args.images, transform=transform)
    calib_set, eval_set = data.split(args.eval_fraction, seed=args.seed)
    print(f"images: {len(data)} → calibration {len(calib_set)}, evaluation {len(eval_set)} (disjoint)")
    if args.augment:
        calib = calibration_tensor(calib_set, args.calib_samples, seed=args.seed, augment=calibration_augment(fp.model))
    else:
        calib = calibration_tensor(calib_set, min(args.calib_samples, len(calib_set)), seed=args.seed)
    suffix = f"-aug{calib.shape[0]}" if calib.shape[0] > len(calib_set) else ""

    rows: list[dict] = []
    fp_res = evaluate(TorchRuntime(fp.model, device=device, name="torch-fp32"), eval_set, progress=False)
    print(f"fp32 top-1 {fp_res.top1:.2f}  top-5 {fp_res.top5:.2f}")
    fp_calib = (evaluate(TorchRuntime(fp.model, device=device, name="torch-fp32"), calib_set, progress=False)
                if args.calib_kl else None)
    if args.ort:  # imported only when asked for: a GPU host may lack onnxruntime
        import onnxruntime as ort

        providers = ort.get_available_providers()
    else:
        providers = []
    for cfg in args.configs:
        w, a, plan, *extra = cfg.split(",")
        qcfg, settings = QuantConfig(int(w), int(a)), dict(kv.split("=", 1) for kv in extra)
        name = f"w{w}a{a}-{plan.replace(':', '')}-{args.iters}{suffix}" + "".join(f"-{v}" for v in settings.values())
        run_dir = out / "runs" / name
        finished = _finished(run_dir)
        if finished:
            print(f"{name}: reusing the finished run in {run_dir}")
            calib_s = json.loads((run_dir / MANIFEST).read_text())["seconds"]
        elif args.only_finished:
            print(f"{name}: no finished run in {run_dir}, skipped")
            continue
        else:
            ccfg = CalibrationConfig(
                samples=calib.shape[0], batch_size=args.batch_size, iters=args.iters, granularity=plan,
                seed=args.seed, device=device,
            )
            for key, value in settings.items():
                target = qcfg if hasattr(qcfg, key) else ccfg
                if not hasattr(target, key):
                    raise SystemExit(f"{cfg}: {key} is a setting of neither QuantConfig nor CalibrationConfig")
                default = getattr(target, key)
                setattr(target, key, type(default)(value) if not isinstance(default, bool) else value == "true")
            t0 = time.perf_counter()
            calibrate(load_model(args.model, checkpoint=args.checkpoint), calib, qcfg, ccfg, run_dir,
                      data_info={"calib_files": len(calib_set), "eval_files": len(eval_set),
                                 "augmented_views": calib.shape[0] - min(len(calib_set), calib.shape[0])})
            calib_s = time.perf_counter() - t0
        run = load_run(run_dir, device=device)
        manifest = run.manifest
        q_rt = TorchRuntime(run.model, device=device, name="torch-quant")
        q_res = evaluate(q_rt, eval_set, progress=False)
        row = {
            "model": args.model, "bits": f"W{w}A{a}", "plan": manifest.plan.spec, "iters": args.iters,
            "fp32": fp_res.top1, "fake_quant": q_res.top1, "calib_seconds": round(calib_s, 1),
            "kl": parity(fp_res, q_res).kl_divergence,
            "calib_images": manifest.calibration.samples, "settings": settings,
            "groups": [(g["mse_before"], g["mse_after"]) for g in manifest.groups],
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        }
        if fp_calib is not None:
            q_calib = evaluate(TorchRuntime(run.model, device=device, name="torch-quant"), calib_set, progress=False)
            row["kl_calibration_images"] = parity(fp_calib, q_calib).kl_divergence
        if args.dither:
            row["fake_quant_ulp"] = _dithered(q_rt, eval_set, args.dither)
        if args.ort:
            info = export_run(run_dir, out / f"{name}.onnx")
            row["onnx_bytes"] = info.bytes
            for prov in args.ort:
                if prov == "cuda" and "CUDAExecutionProvider" not in providers:
                    continue
                o_res = evaluate(OnnxRuntime(out / f"{name}.onnx", provider=prov), eval_set, progress=False)
                p = parity(q_res, o_res)
                row[f"ort_{prov}"] = o_res.top1
                row[f"ort_{prov}_agreement"] = p.top1_agreement
                row[f"ort_{prov}_max_logit_diff"] = p.max_abs_logit_diff
                row[f"ort_{prov}_images_per_s"] = round(o_res.images_per_s, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))

    print("\n| model | bits | plan | iters | fp32 | fake-quant | ORT CPU | ORT CUDA | calib s | device |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['bits']} | {r['plan']} | {r['iters']} | {r['fp32']:.1f} | {r['fake_quant']:.1f} | "
            f"{r.get('ort_cpu', float('nan')):.1f} | {r.get('ort_cuda', float('nan')):.1f} | {r['calib_seconds']} | "
            f"{r['device']} |"
        )


def _dithered(runtime, dataset, k: int) -> list[float]:
    """Top-1 under k seeds of one-ulp noise on every layer output: the spread arithmetic alone causes."""
    return [evaluate(UlpPerturbed(runtime, seed), dataset, progress=False).top1 for seed in range(k)]


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / MANIFEST).read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    main()
