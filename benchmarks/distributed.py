"""Several GPUs against one: data-parallel calibration, sharded evaluation, a sweep.

Side by side on 1 GPU and on ``--gpus`` GPUs (default 2) of this host, each in its own freshly
spawned processes (osqdeploy.distributed.launch, NCCL):

* calibration — DeiT-B W4A4, random weights, the paper's global batch of 32 (16 per GPU on 2),
  the default CUDA engine (CUDA graph with the ranks' collectives captured in it, fused quantizer
  kernels, fp16 autocast). ``--groups`` groups of the ``auto`` plan at ``--iters`` iterations are
  timed; seconds per 1,000 iterations are taken between two logged iterations past the capture,
  and the paper's schedule (20,000 iterations × every group) is projected from them. Then each
  larger global batch (``--batch-scale`` × 32, that many times fewer iterations) the same way,
  and with ``--shard off on`` all of it also with the rounding variables whole on every rank
  instead of sharded over the ranks (``CalibrationConfig.shard_rounding``), with ``--overlap off on``
  the whole variables' all-reduce also after backward instead of overlapping it
  (``CalibrationConfig.overlap_allreduce``).
  Rounding codes of 1 GPU and of N are compared (fp16 autocast: not bit-identical, the sum order
  differs) with each run's group MSE.
* evaluation — DeiT-B fp32 logits of ``--eval-images`` random images, images/s of all ranks
  together (slowest rank's runtime seconds), logits checked identical to one GPU's.
* sweep — ``--sweep-jobs`` DeiT-Tiny jobs (random weights, random images, short schedule), wall
  time of the whole sweep: jobs run one per GPU at a time.

Prints a table and writes JSON (``--out``). Sized to finish within about 8 minutes on a 2×H200 host:

    python -m benchmarks.distributed --gpus 2 --out benchmarks/results/distributed_h200x2.json
    # the calibration alone at batches 32, 128 and 256, the rounding variables sharded and whole:
    python -m benchmarks.distributed --gpus 2 --parts calib --batch-scale 4 8 --shard off on --samples 512
    # V whole, its all-reduce after and during backward:
    python -m benchmarks.distributed --gpus 2 --parts calib --batch-scale 2 4 --shard off --overlap off on
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from osqdeploy.adapters import Adapter, adapter_for
from osqdeploy.config import CalibrationConfig, QuantConfig
from osqdeploy.distributed import SWEEP_TIMEOUT, DistContext, launch, scale_global_batch
from osqdeploy.evaluation import TorchRuntime, evaluate
from osqdeploy.load.models import load_model
from osqdeploy.plan import Plan, build_plan
from osqdeploy.quant.layers import quant_layers
from osqdeploy.reconstruct import Callbacks, Reconstructor, prepare_model
from osqdeploy.sweep import SweepSpec, run_sweep


class _Clock(Callbacks):
    """Wall time of each logged iteration (each log waits for the device)."""

    def __init__(self) -> None:
        self.marks: dict[int, list[tuple[int, float]]] = {}

    def on_iter(self, index: int, it: int, loss: float | None) -> None:
        self.marks.setdefault(index, []).append((it, time.perf_counter()))


def _per_1k(marks: list[tuple[int, float]]) -> float:
    """Seconds per 1,000 iterations between the first log past 10 % of the group and the last."""
    last_it = marks[-1][0]
    start = next((m for m in marks if m[0] >= max(10, last_it // 10)), marks[0])
    return 1000 * (marks[-1][1] - start[1]) / max(1, marks[-1][0] - start[0])


def random_w4a4_model(model_name: str, samples: int) -> tuple[torch.nn.Module, Adapter, Plan, torch.Tensor]:
    """``model_name`` with seeded random weights prepared for W4A4, its ``auto`` plan and ``samples`` random images."""
    torch.manual_seed(0)
    model = load_model(model_name, pretrained=False).model
    adapter = prepare_model(model, QuantConfig(4, 4), adapter_for)
    plan = build_plan("auto", adapter.units(model))
    images = torch.randn(samples, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return model, adapter, plan, images


def _calibration(ctx: DistContext, model_name: str, groups: int, iters: int, samples: int, scale: int,
                 overlap: bool, shard: bool) -> dict:
    model, adapter, plan, images = random_w4a4_model(model_name, samples)
    ccfg = scale_global_batch(CalibrationConfig(samples=samples, iters=iters, overlap_allreduce=overlap,
                                                     shard_rounding=shard), scale)
    clock = _Clock()
    t0 = time.perf_counter()
    rec = Reconstructor(model, adapter, plan, ccfg, ctx.device, clock, dist=ctx)
    rec.initialize(images)
    q, fp = rec.initial_states(images)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    fixed = time.perf_counter() - t0
    results = []
    for index in range(min(groups, len(plan.groups))):
        result, q, fp = rec.reconstruct_group(index, q, fp)
        results.append(result)
    per_1k = [_per_1k(clock.marks[r.index]) for r in results]
    group_fixed = [r.seconds - r.phases.get("steps", 0) - r.phases.get("first_step", 0) for r in results]
    n_groups = len(plan.groups)
    paper_iters = -(-20_000 // scale)
    projected = fixed + n_groups * (np.mean(group_fixed) + paper_iters / 1000 * np.mean(per_1k[1:] or per_1k))
    codes = [layer.weight_quantizer.w_int.cpu() for r in results for layer in quant_layers(
        [m for u in rec.groups[r.index] for m in u.modules])]
    return {
        "ranks": ctx.world,
        "global_batch": ccfg.batch_size,
        "iters_per_group": ccfg.iters,
        "groups_timed": len(results),
        "groups_in_plan": n_groups,
        "seconds_per_1k_iters": [round(s, 3) for s in per_1k],
        "group_fixed_seconds": [round(s, 2) for s in group_fixed],
        "first_step_seconds": [r.phases.get("first_step") for r in results],
        "setup_seconds": round(fixed, 2),
        "projected_minutes_at_paper_schedule": round(projected / 60, 2),
        "paper_schedule_iters_per_group": paper_iters,
        "mse_after": [r.mse_after for r in results],
        "_codes": codes,
    }


_SUFFIXES = {"_after_backward": ", after backward", "_whole": ", V whole"}  # report key → table label


def _calibration_cases(args: argparse.Namespace) -> list[tuple[str, str, int, bool, bool]]:
    """(report key, the key of its batch alone, global batch scale, overlapped all-reduce, sharded V)
    of every calibration timed."""
    cases = []
    # the default engine's case first: on one GPU the others repeat it
    for shard in sorted(args.shard, reverse=True):
        for overlap in sorted(args.overlap, reverse=True):
            for scale in sorted({1, *args.batch_scale}):
                base = "calibration" if scale == 1 else f"batch_x{scale}"
                key = base + ("_after_backward" if overlap == "off" else "") + ("_whole" if shard == "off" else "")
                cases.append((key, base, scale, overlap == "on", shard == "on"))
    return cases


def _eval(ctx: DistContext, model_name: str, n: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = load_model(model_name, pretrained=False).model
    images = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    data = torch.utils.data.TensorDataset(images, torch.randint(0, 1000, (n,), generator=torch.Generator()))
    r = evaluate(TorchRuntime(model, ctx.device), data, batch_size=batch, progress=False, dist=ctx)
    return {"ranks": ctx.world, "images": r.n, "images_per_s": round(r.images_per_s, 1), "top1": r.top1,
            "_logits": r.logits}


def _on_ranks(ctx: DistContext, args: argparse.Namespace) -> dict:
    out: dict = {"device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"}
    if "calib" in args.parts:
        for key, base, scale, overlap, shard in _calibration_cases(args):
            if key != base and ctx.world == 1 and base in out:  # one rank has nothing to share: the same run
                out[key] = dict(out[base], same_run_as=base)
                continue
            # scale_global_batch divides the iterations by the scale: ``--iters`` stays the paper batch's
            out[key] = _calibration(ctx, args.model, args.groups, args.iters, args.samples, scale, overlap, shard)
    if "eval" in args.parts:
        out["evaluation"] = _eval(ctx, args.model, args.eval_images, args.eval_batch)
    return out if ctx.is_main else {}


def _sweep(ctx: DistContext, spec: SweepSpec, out: str) -> dict:
    t0 = time.perf_counter()
    table = run_sweep(spec, out, ctx)
    return {"ranks": ctx.world, "seconds": round(time.perf_counter() - t0, 1),
            "jobs": [{k: r.get(k) for k in ("job", "status", "minutes", "calibration_minutes", "rank", "top1",
                                            "ort_top1_agreement")}
                     for r in table["jobs"]]}


def _image_folder(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(root / f"c{i % 4}" / f"{i}.jpg")
    return root


def _compare_codes(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    same = sum(int((x == y).sum()) for x, y in zip(a, b, strict=True))
    return same / max(1, sum(x.numel() for x in a))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--parts", nargs="+", default=["calib", "eval", "sweep"], choices=["calib", "eval", "sweep"])
    p.add_argument("--model", default="deit_base_patch16_224")
    p.add_argument("--groups", type=int, default=2, help="groups timed (the projection takes the rest as alike)")
    p.add_argument("--iters", type=int, default=1000, help="iterations per timed group at the paper's batch")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--batch-scale", type=int, nargs="+", default=[2],
                   help="larger global batches: these many times 32, each with that many times fewer iterations")
    p.add_argument("--overlap", nargs="+", choices=["off", "on"], default=["on"],
                   help="the gradient all-reduce overlapping backward (on, the default engine) or after it (off)")
    p.add_argument("--shard", nargs="+", choices=["off", "on"], default=["on"],
                   help="the rounding variables sharded over the ranks (on, the default engine) or whole on every "
                        "rank (off; both: off on)")
    p.add_argument("--eval-images", type=int, default=4096)
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--sweep-jobs", type=int, default=4)
    p.add_argument("--sweep-iters", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed.json"))
    args = p.parse_args()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    if {"calib", "eval"} & set(args.parts):
        for n in (1, args.gpus):
            t = time.perf_counter()
            report[f"{n}_gpu"] = launch(_on_ranks, args, processes=n, device_type=device_type)
            report[f"{n}_gpu"]["wall_seconds"] = round(time.perf_counter() - t, 1)
            print(f"{n} GPU(s): done in {report[f'{n}_gpu']['wall_seconds']} s", flush=True)
        one, many = report["1_gpu"], report[f"{args.gpus}_gpu"]
        for key, *_ in _calibration_cases(args):
            if key in one:
                one[key]["codes_identical_to_1_gpu"] = 1.0
                many[key]["codes_identical_to_1_gpu"] = _compare_codes(one[key].pop("_codes"),
                                                                       many[key].pop("_codes"))
        if "evaluation" in one:
            a, b = one["evaluation"].pop("_logits"), many["evaluation"].pop("_logits")
            many["evaluation"]["logits_identical_to_1_gpu"] = bool(torch.equal(a, b))
            many["evaluation"]["max_abs_logit_diff_to_1_gpu"] = float((a - b).abs().max())

    if "sweep" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            folder = _image_folder(Path(tmp) / "images", 64)
            spec = SweepSpec(models=["deit_tiny_patch16_224"], plans=["auto"], seeds=list(range(args.sweep_jobs)),
                             data=str(folder), pretrained=False, method="paper",
                             calibration={"iters": args.sweep_iters, "samples": 64}, eval_limit=64)
            for n in (1, args.gpus):
                report[f"sweep_{n}_gpu"] = launch(_sweep, spec, str(Path(tmp) / f"sweep{n}"), processes=n,
                                                  device_type=device_type, timeout=SWEEP_TIMEOUT)
                print(f"sweep on {n} GPU(s): {report[f'sweep_{n}_gpu']['seconds']} s", flush=True)

    _print(report, args.gpus)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"wrote {args.out}")


def _print(report: dict, n: int) -> None:
    rows = []
    one, many = report.get("1_gpu", {}), report.get(f"{n}_gpu", {})
    for key in [k for k in one if k == "calibration" or k.startswith(("calibration_", "batch_x"))]:
        a, b = one[key], many[key]
        label = f"batch {a['global_batch']}" + "".join(text for s, text in _SUFFIXES.items() if s in key)
        s1, sn = np.mean(a["seconds_per_1k_iters"]), np.mean(b["seconds_per_1k_iters"])
        pa, pb = a["projected_minutes_at_paper_schedule"], b["projected_minutes_at_paper_schedule"]
        rows.append((f"{label}: s/1k it", f"{s1:.2f}", f"{sn:.2f}", f"{s1 / sn:.2f}x"))
        rows.append((f"{label}: projected min", f"{pa:.1f}", f"{pb:.1f}", f"{pa / pb:.2f}x"))
        rows.append((f"{label}: codes = 1 GPU's", "100%", f"{100 * b['codes_identical_to_1_gpu']:.2f}%", ""))
        if key.startswith("batch_x") and "calibration" in one:
            # what a user waits for: the paper's schedule on 1 GPU against the option on N
            pa = one["calibration"]["projected_minutes_at_paper_schedule"]
            rows.append((f"paper 1 GPU -> {label} {n} GPUs, min", f"{pa:.1f}", f"{pb:.1f}", f"{pa / pb:.2f}x"))
    if "evaluation" in one:
        a, b = one["evaluation"]["images_per_s"], many["evaluation"]["images_per_s"]
        rows.append(("evaluation images/s", f"{a:.0f}", f"{b:.0f}", f"{b / a:.2f}x"))
    if "sweep_1_gpu" in report:
        a, b = report["sweep_1_gpu"]["seconds"], report[f"sweep_{n}_gpu"]["seconds"]
        rows.append((f"sweep of {len(report['sweep_1_gpu']['jobs'])} jobs, s", f"{a:.0f}", f"{b:.0f}", f"{a / b:.2f}x"))
    print(f"{'':50s} {'1 GPU':>10s} {f'{n} GPUs':>10s} {'speed-up':>9s}")
    for r in rows:
        print(f"{r[0]:50s} {r[1]:>10s} {r[2]:>10s} {r[3]:>9s}")


if __name__ == "__main__":
    main()
