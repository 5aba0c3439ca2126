"""The paper's granularity tables on the real DeiT-Tiny: Table 3 (1, 2, 3, 4, 6, 12 blocks per
group) and Table 2's slicings (A-B-C, AB-C, A-BC, ABC) applied to DeiT, W4A4, several seeds each.

Protocol: the 500 ImageNet sample images are split once (seed 0) into 250 calibration and 250
evaluation images; each (cell, seed) calibrates on 1,024 views of the calibration half (the
images plus seeded random crops and flips, as ``osq calibrate`` does) at the paper's schedule
(20,000 iterations per group, batch 32) and reports held-out top-1 and KL(fp32 ‖ quantized).

Every (cell, seed) is an independent calibration in its own process, pinned to one GPU with
CUDA_VISIBLE_DEVICES, ``--jobs-per-gpu`` of them per GPU at once. Each writes
``OUT/jobs/<cell>-s<seed>.json`` when done and checkpoints its run after every group, so a
re-run (after a time limit, a crash, or on another host) skips finished cells and resumes
unfinished ones from their last group. ``--time-budget`` interrupts the jobs cleanly (they
keep their checkpoints) before an outer limit would kill them. A DeiT-Tiny job is bound by kernel
launches: on 2× H200 under MPS, 12 jobs at once pinned to 16 of the host's 32 cores took 650–800 s
each, against 437 s for 12 unpinned (``benchmarks.accuracy_seeds``): leave them the whole CPU;
19 unpinned at once took about 1,000 s each. Under MPS, when accuracy_seeds terminated its jobs
at its deadline, every other job on that GPU failed with "illegal memory access" (both schedulers
now stop jobs as Ctrl-C does); the checkpoints made that a re-run, not a loss.

    # GPU host, the full tables (27 calibrations: slicing ABC is blocks:1), then the markdown table and plot:
    python -m benchmarks.paper_tables --out results/paper_tables --jobs-per-gpu 4
    python -m benchmarks.paper_tables --out results/paper_tables --summarize
    # CPU smoke run:
    python -m benchmarks.paper_tables --out /tmp/pt --iters 2 --samples 16 --seeds 1 \
        --cells blocks:3,slices:A-B-C --eval-limit 8 --jobs 2
    # the slicing table on the planted-outlier test Swin (random weights; no real Swin weights here):
    python -m benchmarks.paper_tables --swin-test --out results/paper_tables_swin --iters 200 --samples 64

``--summarize`` writes ``OUT/tables.md`` and ``OUT/tables.png`` from the per-job JSONs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path("/work/shared/data")
DEFAULT_IMAGES = SHARED / "imagenet-sample"
DEFAULT_CHECKPOINT = SHARED / "weights" / "deit_tiny_patch16_224.pth"
TABLE3 = [f"blocks:{n}" for n in (1, 2, 3, 4, 6, 12)]
TABLE2 = [f"slices:{s}" for s in ("A-B-C", "AB-C", "A-BC", "ABC")]
SPLIT_SEED = 0  # one split for every cell and seed: the evaluation images never change


def same_plans(cells: list[str]) -> dict[str, str]:
    """Each cell → the first cell with the same groups on DeiT-Tiny (itself if none).

    On a ViT, whose blocks have no downsampling unit, ``slices:ABC`` (a block's three slices
    together) is ``blocks:1``: one calibration serves both tables.
    """
    import timm
    import torch

    from osqdeploy.adapters import adapter_for
    from osqdeploy.config import QuantConfig
    from osqdeploy.plan import build_plan
    from osqdeploy.reconstruct import prepare_model

    with torch.device("meta"):  # structure only
        model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
        units = prepare_model(model, QuantConfig(4, 4), adapter_for).units(model)
    first: dict[str, str] = {}
    return {c: first.setdefault(repr(build_plan(c, units).groups), c) for c in cells}


def job_name(cell: str, seed: int) -> str:
    return f"{cell.replace(':', '-')}-s{seed}"


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------- one job


def _real_data(args):
    """(model loader, calibration dataset, evaluation dataset) of the real DeiT-Tiny protocol."""
    from osqdeploy.load import ImageFiles, eval_transform, load_model, split_files

    fp = load_model("deit_t", checkpoint=args.checkpoint)
    all_files = ImageFiles(args.images)
    calib_files, eval_files = split_files(all_files.files, 0.5, SPLIT_SEED)
    label_of = dict(zip(all_files.files, all_files.labels, strict=True))
    transform = eval_transform(fp.model)
    calib = ImageFiles.from_files(calib_files, [label_of[f] for f in calib_files], transform)
    held_out = ImageFiles.from_files(eval_files, [label_of[f] for f in eval_files], transform)
    return fp, calib, held_out


def _cached(path: Path, make):
    """A tensor computed once per output folder and shared by the jobs (written atomically)."""
    import torch

    if path.is_file():
        return torch.load(path)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(value, tmp)
    os.replace(tmp, path)
    return value


def run_job(args) -> dict:
    """Calibrate one (cell, seed) of the real DeiT-Tiny, evaluate it on the held-out half, write its JSON."""
    import torch

    from osqdeploy.api import calibrate, load_run
    from osqdeploy.config import CalibrationConfig, QuantConfig
    from osqdeploy.evaluation import TorchRuntime, evaluate, kl_divergence
    from osqdeploy.load import calibration_augment, calibration_tensor, load_model
    from osqdeploy.run.store import MANIFEST

    out = Path(args.out)
    name = job_name(args.job, args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fp, calib_set, eval_set = _real_data(args)
    images = _cached(out / "cache" / f"calib-n{args.samples}-s{args.seed}.pt", lambda: calibration_tensor(
        calib_set, args.samples, seed=args.seed, augment=calibration_augment(fp.model)))
    run_dir = out / "runs" / f"{name}-{args.iters}it"
    t0 = time.perf_counter()
    manifest_path = run_dir / MANIFEST
    if not (manifest_path.is_file() and json.loads(manifest_path.read_text()).get("status") == "complete"):
        ccfg = CalibrationConfig(samples=int(images.shape[0]), batch_size=32, iters=args.iters,
                                 granularity=args.job, seed=args.seed, device=device)
        calibrate(load_model("deit_t", checkpoint=args.checkpoint), images, QuantConfig(4, 4), ccfg, run_dir,
                  data_info={"calib_files": len(calib_set), "eval_files": len(eval_set), "split_seed": SPLIT_SEED})
    seconds = time.perf_counter() - t0
    limit = args.eval_limit
    fp_res = evaluate(TorchRuntime(fp.model, device), eval_set, limit=limit, progress=False)
    run = load_run(run_dir, device)
    q_res = evaluate(TorchRuntime(run.model, device, "torch-quant"), eval_set, limit=limit, progress=False)
    m = run.manifest
    row = {
        "model": "deit_t", "bits": "W4A4", "cell": args.job, "plan": m.plan.spec, "seed": args.seed,
        "iters": args.iters, "calib_images": int(images.shape[0]), "eval_images": q_res.n,
        "fp32_top1": fp_res.top1, "top1": q_res.top1, "kl": kl_divergence(fp_res.logits, q_res.logits),
        "output_mse": m.output_mse, "groups": len(m.groups),
        "calib_seconds": m.seconds, "job_seconds": round(seconds, 1), "resumed_from_group": m.resumed_from_group,
        # iterations ("steps") apart from per-group fixed costs, to project other schedules
        "phase_seconds": {k: round(v, 1) for k, v in m.phase_totals().items()},
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "run": str(run_dir),
    }
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    _atomic_json(out / "jobs" / f"{name}.json", row)
    return row


# ------------------------------------------------------------------------- the Swin test model


def run_swin_test(args) -> None:
    """Table 2's slicings on the tests' tiny Swin with planted outliers: output MSE and KL against
    its own float model on held-out random images (random weights: top-1 means nothing).
    Sequential, on the GPU when there is one (``--device cpu`` forces the CPU)."""
    import copy

    import torch

    from osqdeploy.api import calibrate
    from osqdeploy.config import CalibrationConfig, QuantConfig
    from osqdeploy.evaluation import kl_divergence
    from osqdeploy.load.synthetic import images as test_images
    from osqdeploy.load.synthetic import loaded_tiny
    from osqdeploy.reconstruct import logits

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    held_out = test_images(256, 56, seed=7)
    for seed in range(args.seeds):  # seed-major: an interrupted run still covers every slicing
        for cell in args.cells or TABLE2:
            path = out / "jobs" / f"{job_name(cell, seed)}.json"
            if path.is_file():
                continue
            loaded = loaded_tiny("swin")
            fp_model = copy.deepcopy(loaded.model)
            ccfg = CalibrationConfig(samples=args.samples, batch_size=min(32, args.samples), iters=args.iters,
                                     granularity=cell, seed=seed, device=device.type)
            t0 = time.perf_counter()
            m = calibrate(loaded, test_images(args.samples, 56, seed=100 + seed), QuantConfig(4, 4), ccfg,
                          out / "runs" / f"{job_name(cell, seed)}-{args.iters}it").manifest
            fp_logits = logits(fp_model.to(device), held_out, 64, device)
            q_logits = logits(loaded.model, held_out, 64, device)
            row = {"model": "tiny test Swin (random weights, planted outliers)", "bits": "W4A4", "cell": cell,
                   "plan": m.plan.spec, "seed": seed, "iters": args.iters, "calib_images": args.samples,
                   "eval_images": held_out.shape[0], "fp32_top1": None, "top1": None,
                   "kl": kl_divergence(fp_logits, q_logits),
                   "output_mse": float((q_logits - fp_logits).pow(2).mean()), "groups": len(m.groups),
                   "job_seconds": round(time.perf_counter() - t0, 1), "device": device.type}
            _atomic_json(path, row)
            print(json.dumps(row), flush=True)
    summarize(out, held_out_mse=True)


# ---------------------------------------------------------------------------------- scheduling


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [str(i) for i, line in enumerate(listed.splitlines()) if line.startswith("GPU ")]


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def schedule(args) -> None:
    """Run every unfinished (cell, seed) as a subprocess, ``--jobs-per-gpu`` per GPU (``--jobs`` on CPU)."""
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cells = args.cells or TABLE3 + TABLE2
    canonical = same_plans(cells)
    for c, same in canonical.items():
        if same != c:
            print(f"{c} is the same plan as {same} on DeiT: its rows are {same}'s", flush=True)
    pending = [(c, s) for c in cells if canonical[c] == c for s in range(args.seeds)
               if not (out / "jobs" / f"{job_name(c, s)}.json").is_file()]
    gpus = _visible_gpus() if args.device != "cpu" else []
    slots = [g for g in gpus for _ in range(args.jobs_per_gpu)] or [None] * args.jobs
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    print(f"{len(pending)} of {len(cells) * args.seeds} jobs to run; {len(slots)} at a time "
          f"({'GPUs ' + ','.join(gpus) if gpus else 'CPU'}), {threads} CPU threads each", flush=True)
    running: dict[int, tuple[subprocess.Popen, str, float]] = {}  # slot → (process, name, start)
    started = time.perf_counter()
    failed: list[str] = []
    # longest plans first, so the tail of the schedule is short jobs
    pending.sort(key=lambda cs: (cs[0] != "slices:A-B-C", cs[0] != "blocks:1", cs[0] != "slices:AB-C"))
    # an outer `timeout` sends SIGTERM: interrupt the jobs the same way as Ctrl-C, so they stop cleanly
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while pending or running:
            over = args.time_budget is not None and time.perf_counter() - started > args.time_budget
            for slot, (proc, name, t0) in list(running.items()):
                if proc.poll() is not None:
                    del running[slot]
                    status = "done" if proc.returncode == 0 else f"exit {proc.returncode} (see logs/{name}.log)"
                    if proc.returncode != 0:
                        failed.append(name)
                    now = time.perf_counter()
                    print(f"[{now - started:7.0f} s] {name}: {status} in {now - t0:.0f} s", flush=True)
            if over:
                break
            for slot in range(len(slots)):
                if slot in running or not pending:
                    continue
                cell, seed = pending.pop(0)
                name = job_name(cell, seed)
                env = {**os.environ, "OMP_NUM_THREADS": str(threads),
                       # each process compiles its own kernels; a shared cache directory would race
                       "TORCHINDUCTOR_CACHE_DIR": str(out / "cache" / "inductor" / f"slot{slot}")}
                if slots[slot] is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slots[slot]
                cmd = [sys.executable, __file__, "--job", cell, "--seed", str(seed), "--out", str(out),
                       "--iters", str(args.iters), "--samples", str(args.samples), "--images", str(args.images),
                       "--checkpoint", str(args.checkpoint)]
                if args.eval_limit:
                    cmd += ["--eval-limit", str(args.eval_limit)]
                with (out / "logs" / f"{name}.log").open("a") as log:
                    running[slot] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                      start_new_session=True), name, time.perf_counter())
                print(f"[{time.perf_counter() - started:7.0f} s] {name}: started on "
                      f"{'GPU ' + slots[slot] if slots[slot] is not None else 'CPU'}", flush=True)
            time.sleep(2)
    finally:
        for proc, _name, _ in running.values():  # interrupted: jobs keep their checkpoints, a re-run resumes
            proc.send_signal(signal.SIGINT)
        for proc, name, _ in running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            print(f"{name}: interrupted (checkpointed; re-run to resume)", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    summarize(out)


# ---------------------------------------------------------------------------------- the tables


def _stats(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4g} ± {sd:.2g} ({min(values):.4g}..{max(values):.4g})"


def _span(counts: list[int]) -> str:
    return str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}–{max(counts)}"


def summarize(out: Path, held_out_mse: bool = False) -> str:
    """``tables.md`` and ``tables.png`` from ``OUT/jobs/*.json``: mean ± sample standard deviation (min..max)."""
    from osqdeploy.analysis import granularity_data
    from osqdeploy.analysis.figures import plot_granularity

    rows = [json.loads(p.read_text()) for p in sorted((out / "jobs").glob("*.json"))]
    if not rows:
        print(f"no finished job in {out / 'jobs'}")
        return ""
    if rows[0]["model"] == "deit_t":  # a plan both tables hold is calibrated once; show it in both
        have = {r["cell"] for r in rows}
        for c, same in same_plans(TABLE3 + TABLE2).items():
            if c not in have and same != c:
                rows += [{**r, "cell": c, "same_run_as": same} for r in rows if r["cell"] == same]
    order = {c: i for i, c in enumerate(TABLE3 + TABLE2)}
    rows.sort(key=lambda r: (order.get(r["cell"], 99), r["seed"]))
    fp32 = {r["fp32_top1"] for r in rows if r.get("fp32_top1") is not None}
    model, iters = rows[0]["model"], sorted({r["iters"] for r in rows})
    lines = [f"# {model} W4A4: reconstruction granularity", "",
             f"{sum(not r.get('same_run_as') for r in rows)} calibrations, {'/'.join(map(str, iters))} "
             "iterations per group, "
             f"{rows[0]['calib_images']} calibration images, {rows[0]['eval_images']} held-out evaluation images"
             + (f"; fp32 top-1 {fp32.pop():.2f}%" if len(fp32) == 1 else "") + ". "
             "Cells: mean ± sample standard deviation over seeds (min..max).", ""]
    metric_cols = ["output MSE (held-out)", "KL(fp32 ‖ quantized)"] if held_out_mse else [
        "top-1 % (held-out)", "KL(fp32 ‖ quantized)"]
    for title, cells in (("Table 3: blocks per group", TABLE3), ("Table 2: slicing of each block", TABLE2),
                         ("other plans", sorted({r["cell"] for r in rows} - set(TABLE3 + TABLE2)))):
        sel = [c for c in cells if any(r["cell"] == c for r in rows)]
        if not sel:
            continue
        lines += [f"## {title}", "",
                  "| plan | seeds | groups | " + " | ".join(metric_cols) + " | reconstruction s (mean) |",
                  "|---|---|---|" + "---|" * len(metric_cols) + "---|"]
        for c in sel:
            rs = [r for r in rows if r["cell"] == c]
            first = [r["output_mse"] for r in rs] if held_out_mse else [r["top1"] for r in rs]
            # the groups' own seconds: a resumed run's process timed only the groups after the resume
            secs = [sum(r["phase_seconds"].values()) if r.get("phase_seconds") else r.get("calib_seconds") or 0.0
                    for r in rs]
            label = f"{c} (= {rs[0]['same_run_as']})" if rs[0].get("same_run_as") else c
            kl = _stats([r["kl"] for r in rs])
            lines.append(f"| {label} | {len(rs)} | {rs[0]['groups']} | {_stats(first)} | {kl} "
                         f"| {statistics.fmean(secs):.0f} |")
        lines.append("")
    text = "\n".join(lines)
    (out / "tables.md").write_text(text + "\n")
    runs = [{"run": r.get("run", ""), "plan": r["cell"], "seed": r["seed"], "output_mse": r["output_mse"],
             "kl": r["kl"], "top1": r["top1"]} for r in rows]
    gd = granularity_data(runs, rows[0].get("fp32_top1"))
    if held_out_mse:
        gd["output_mse_on"] = "held-out images"
    else:  # the calibration images' MSE the manifests record is not what these tables compare
        for p in gd["plans"]:
            p["output_mse"] = []
    plot_granularity(gd, out / "tables.png",
                     f"{model} W4A4 — granularity, {'/'.join(map(str, iters))} iterations per group, "
                     f"seeds per plan: {_span([len(p['runs']) for p in gd['plans']])}")
    _atomic_json(out / "tables.json", gd)
    print(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--cells", type=lambda s: [c for c in s.split(",") if c],
                    help=f"comma-separated plans [default: {','.join(TABLE3 + TABLE2)}]")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per cell")
    ap.add_argument("--iters", type=int, default=20000, help="iterations per group (the paper's 20,000)")
    ap.add_argument("--samples", type=int, default=1024, help="calibration images (views of the 250)")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on N held-out images (smoke runs)")
    ap.add_argument("--jobs-per-gpu", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=1, help="concurrent jobs without a GPU")
    ap.add_argument("--device", choices=["auto", "cpu"], default="auto")
    ap.add_argument("--time-budget", type=float, default=None, metavar="S",
                    help="interrupt running jobs (they keep their checkpoints) after S seconds")
    ap.add_argument("--summarize", action="store_true", help="only write tables.md/tables.png from the job JSONs")
    ap.add_argument("--swin-test", action="store_true", help="slicing table on the planted-outlier test Swin")
    ap.add_argument("--job", help=argparse.SUPPRESS)  # one (cell, seed), run by the scheduler
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.summarize:
        summarize(args.out, held_out_mse=args.swin_test)
    elif args.swin_test:
        run_swin_test(args)
    elif args.job:
        print(json.dumps(run_job(args)), flush=True)
    else:
        schedule(args)


if __name__ == "__main__":
    main()
