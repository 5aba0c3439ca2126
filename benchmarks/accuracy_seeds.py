"""Accuracy methods compared over seeds: many independent calibrations of the real DeiT-Tiny at once.

Each job is one calibration — a method variant, a bit-width and a seed — through the library's
own calibrate path, then evaluated on images it never saw: held-out top-1, KL divergence of its
predictions from the fp32 model's and logit MSE (the smooth measures, which rank methods where
top-1 on 250 images moves in whole images), and optionally the exported ONNX file's top-1 in
ONNX Runtime on the CPU. A DeiT-Tiny reconstruction step is bound by kernel launches, not by the
GPU's arithmetic, so several jobs share each GPU (``--jobs-per-gpu``), each a process pinned to
one GPU with CUDA_VISIBLE_DEVICES. On 2× H200 under MPS, 6 jobs per GPU took 437 s each (36 s
per job overall), 11 per GPU 1,224–1,518 s each (about 70 s per job): past about 6 per GPU the
jobs slow each other more than sharing gains. Every job writes its own JSON under ``OUT/jobs/``; a re-run
skips the finished ones (and retries failed ones), so an interrupted batch continues.

The 500 images are split once (seed 0, half and half, ``ImageFiles.split`` → ``split_files``);
each job calibrates on ``--samples`` views of the calibration half (the images once, then seeded
random crops and flips, as ``osq calibrate`` does, drawn with the job's seed) and is evaluated
on the other half.

    python -m benchmarks.accuracy_seeds --images ../shared/data/imagenet-sample \\
        --checkpoint ../shared/data/weights/deit_tiny_patch16_224.pth --out results/accuracy \\
        --variants paper@w4a4 output_tuned@w4a4 paper@w6a6 --seeds 0 1 2 --jobs-per-gpu 7 --ort
    python -m benchmarks.accuracy_seeds --summarize --out results/accuracy
    python -m benchmarks.accuracy_seeds --ort-only --images ... --checkpoint ... --out results/accuracy

``--float-draws K`` evaluates every fake-quant model K more times, each with one seeded float32
ulp per Linear and LayerNorm output, and reports top-1 and KL as means over the draws too: at
4 bits one evaluation's KL moves by a few per cent with float rounding alone.

``--ort-only`` adds ONNX Runtime's CPU figures to rows already measured (calibrated on a GPU host,
evaluated in ORT on the deployment CPU): each finished run is exported and run in ORT beside its
fake-quant model, which is re-evaluated on this host only for the agreement between the two.

A variant is ``NAME[,key=value...][@wWaA]``: a name of ``VARIANTS`` (each a ``Method`` of
``osqdeploy.config`` or one with settings added), then settings of CalibrationConfig or
QuantConfig (``output_tuned,output_tuning_lr=3e-4``), then the bits (``--bits`` when omitted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from unittest import mock

SPLIT_SEED = 0  # the split every real-DeiT-Tiny figure of this project uses (fp32 76.4 % on its held-out half)
EVAL_FRACTION = 0.5

# Method presets and the combinations worth measuring; settings are CalibrationConfig/QuantConfig fields.
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},  # DEFAULT_METHOD on the recipe's plan and views
    "paper": {"method": "paper"},
    "fisher": {"method": "fisher"},
    "prediction": {"method": "prediction"},
    "output_tuned": {"method": "output_tuned"},
    "tuned_steps": {"method": "output_tuned", "output_tuning": "steps"},
    "prediction_tuned": {"method": "output_tuned", "kl_groups": 1},
}

METRICS = ("top1", "kl", "logit_mse", "agreement", "calib_seconds", "ort_cpu_top1", "ort_minus_fake_quant",
           "top1_over_draws", "kl_over_draws")


@dataclass(frozen=True)
class Job:
    variant: str  # NAME[,key=value...]
    bits: str  # "w4a4"
    seed: int

    @property
    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.variant}-{self.bits}-s{self.seed}")

    @property
    def group(self) -> str:
        return f"{self.variant}@{self.bits}"

    def configs(self, model: str, iters: int, samples: int | None, device: str):
        """The job's (QuantConfig, CalibrationConfig)."""
        from osqdeploy.api import calibration_config, quant_config
        from osqdeploy.config import CalibrationConfig

        w, a = parse_bits(self.bits)
        name, *pairs = self.variant.split(",")
        if not all("=" in kv for kv in pairs):
            raise SystemExit(f"a variant is NAME[,key=value...], got {self.variant!r}")
        settings = dict(VARIANTS[name])
        settings.update(kv.split("=", 1) for kv in pairs)
        method = settings.pop("method", None)
        qcfg = quant_config(w, a, method)
        calib_defaults = CalibrationConfig()
        calib = {"samples": samples, "iters": iters, "seed": self.seed, "device": device}
        for key, value in settings.items():
            target = qcfg if key in {f.name for f in fields(qcfg)} else calib_defaults
            if key not in {f.name for f in fields(target)}:
                raise SystemExit(f"{self.variant}: {key} is a setting of neither QuantConfig nor CalibrationConfig")
            if target is qcfg:
                setattr(qcfg, key, _typed(getattr(qcfg, key), value))
            else:
                calib[key] = _typed(getattr(calib_defaults, key), value)
        # what `osq calibrate MODEL --method M` uses: the recipe's plan and views unless M pins its own,
        # the variant's settings as options given by name (a tuning length keeps its average's share)
        ccfg = calibration_config(model, method, **calib)
        qcfg.validate()
        ccfg.validate()
        return qcfg, ccfg


def _typed(default: object, value: object) -> object:
    """A ``key=value`` setting's text as the type of the field's default (presets' values pass as they are)."""
    if isinstance(value, str) and not isinstance(default, str):
        if isinstance(default, bool):  # "True" must not read as False
            if value.lower() not in ("true", "false"):
                raise SystemExit(f"a yes/no setting takes true or false, got {value!r}")
            return value.lower() == "true"
        return type(default)(value)
    return value


def parse_bits(bits: str) -> tuple[int, int]:
    m = re.fullmatch(r"w(\d)a(\d)", bits.lower())
    if not m:
        raise SystemExit(f"bits must look like w4a4, got {bits!r}")
    return int(m.group(1)), int(m.group(2))


def parse_jobs(variants: list[str], default_bits: list[str], seeds: list[int]) -> list[Job]:
    jobs = []
    for spec in variants:
        name, _, bits = spec.partition("@")
        if name.split(",")[0] not in VARIANTS:
            raise SystemExit(f"unknown variant {name.split(',')[0]!r}; known: {', '.join(VARIANTS)}")
        for b in [bits] if bits else default_bits:
            parse_bits(b)
            jobs += [Job(name, b.lower(), seed) for seed in seeds]
    return jobs


# ------------------------------------------------------------------------------------------- worker


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


def run_job(job: Job, args: argparse.Namespace) -> Iterator[tuple[dict, Path, object, object]]:
    """Calibrate (unless its run is already finished) and evaluate in PyTorch.

    Yields (row, run directory, fp32 result, fake-quant result): the job's row, then one per
    ``--post-tuning``, each as soon as it is measured.
    """
    import torch

    from osqdeploy.api import calibrate, load_run
    from osqdeploy.evaluation import TorchRuntime, evaluate
    from osqdeploy.load import ImageFiles, calibration_augment, calibration_tensor, eval_transform, load_model

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    run_dir = out / "runs" / job.name
    fp = load_model(args.model, checkpoint=args.checkpoint)
    data = ImageFiles(args.images, transform=eval_transform(fp.model))
    calib_set, eval_set = data.split(EVAL_FRACTION, seed=SPLIT_SEED)
    qcfg, ccfg = job.configs(args.model, args.iters, args.samples, device)
    calib = calibration_tensor(calib_set, ccfg.samples, seed=ccfg.seed, augment=calibration_augment(fp.model))
    if not _finished(run_dir):
        t0 = time.perf_counter()
        calibrate(load_model(args.model, checkpoint=args.checkpoint), calib, qcfg, ccfg, run_dir,
                  data_info={"calib_files": len(calib_set), "eval_files": len(eval_set),
                             "augmented_views": calib.shape[0] - min(len(calib_set), calib.shape[0])})
        calib_seconds = time.perf_counter() - t0
    else:
        calib_seconds = None  # calibrated by an earlier invocation: its manifest has the time
    manifest = json.loads((run_dir / "run.json").read_text())
    calib_seconds = calib_seconds if calib_seconds is not None else manifest["seconds"]
    ref = evaluate(TorchRuntime(fp.model, device), eval_set, progress=False, limit=args.limit_eval)
    base = {
        "bits": job.bits, "seed": job.seed, "status": "ok", "iters": ccfg.iters, "samples": ccfg.samples,
        "concurrent_jobs": args.concurrent, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "quant": manifest["quant"], "stage_seconds": manifest.get("stage_seconds"),
        "calib_output_mse": manifest.get("output_mse"),
    }
    row, q = _measure(load_run(run_dir, device).model, ref, eval_set, device, args)
    yield ({**base, "job": job.name, "variant": job.variant, "method": ccfg.method.value,
            "calib_seconds": round(calib_seconds, 2), "calibration": manifest["calibration"], **row}, run_dir, ref, q)
    for kind in args.post_tuning:
        row, tuned_dir, q = _post_tuned(job, kind, run_dir, calib, fp.model, ccfg, calib_seconds, ref, eval_set,
                                        device, args)
        yield {**base, **row}, tuned_dir, ref, q


# --post-tuning kind → variant suffix
POST_TUNING = {"steps+affine": "tuned", "steps": "tuned_steps", "steps+affine+wscale": "tuned_wscale"}


def post_tuned_job(job: Job, spec: str) -> tuple[Job, dict[str, str]]:
    """``job`` tuned as ``--post-tuning``'s ``KIND[,key=value...]`` says: (its job, CalibrationConfig settings)."""
    from osqdeploy.config import CalibrationConfig

    kind, *pairs = spec.split(",")
    if kind not in POST_TUNING or not all("=" in kv for kv in pairs):
        raise SystemExit(f"--post-tuning takes KIND[,key=value...] with KIND one of {', '.join(POST_TUNING)}, "
                         f"got {spec!r}")
    unknown = sorted({kv.split("=", 1)[0] for kv in pairs} - {f.name for f in fields(CalibrationConfig)})
    if unknown:
        raise SystemExit(f"--post-tuning {spec}: {', '.join(unknown)} is not a setting of CalibrationConfig")
    variant = f"{job.variant}+{','.join([POST_TUNING[kind], *pairs])}"
    return Job(variant, job.bits, job.seed), {"output_tuning": kind, **dict(kv.split("=", 1) for kv in pairs)}


def post_tuned_config(job: Job, spec: str, ccfg, lr: float | None = None, iters: int | None = None):
    """The CalibrationConfig ``job``'s run (calibrated with ``ccfg``) is tuned with under ``--post-tuning spec``."""
    from osqdeploy.config import METHODS, Method

    _, settings = post_tuned_job(job, spec)
    preset = METHODS[Method.OUTPUT_TUNED]  # its tuning settings only: the reconstruction stays the job's
    # fixed views unless the spec says otherwise, so the commands of earlier rows still mean what they did
    tcfg = replace(ccfg, output_tuning_lr=lr or preset["output_tuning_lr"],
                   output_tuning_iters=iters or preset["output_tuning_iters"], output_tuning_mix="none")
    for key, value in settings.items():
        setattr(tcfg, key, _typed(getattr(tcfg, key), value))
    tcfg.validate()
    return tcfg


def _post_tuned(job: Job, spec: str, run_dir: Path, calib, float_model, ccfg, calib_seconds: float, ref, eval_set,
                device: str, args: argparse.Namespace):
    """The job's finished run tuned at the output (``tune_outputs``, OUTPUT_TUNED's settings), saved as its own run.

    The same reconstruction with and without the stage: a paired comparison, one calibration's cost.
    """
    import shutil

    import torch

    from osqdeploy.api import load_run
    from osqdeploy.reconstruct.output_tuning import tune_outputs
    from osqdeploy.run import store

    tuned_job, _ = post_tuned_job(job, spec)
    variant, name = tuned_job.variant, tuned_job.name
    tuned_dir = Path(args.out) / "runs" / name
    tcfg = post_tuned_config(job, spec, ccfg, args.post_tuning_lr, args.post_tuning_iters)
    run = load_run(run_dir, device)
    result = tune_outputs(run.model, calib, tcfg, torch.device(device), reference=float_model)
    if tuned_dir.exists():
        shutil.rmtree(tuned_dir)
    shutil.copytree(run_dir, tuned_dir)
    tuned = replace(store.read_manifest(tuned_dir), calibration=tcfg,
                    state_sha256=store.save_deployed(tuned_dir, run.model))
    store.write_manifest(tuned_dir, tuned)
    row, q = _measure(run.model, ref, eval_set, device, args)
    return ({"job": name, "variant": variant, "method": tcfg.method.value, "calibration": tcfg.to_dict(),
             "calib_seconds": round(calib_seconds + result.seconds, 2), "tuning_seconds": result.seconds,
             "output_tuning": result.summary(), **row}, tuned_dir, q)


def _measure(model, ref, eval_set, device: str, args: argparse.Namespace):
    """Held-out top-1, KL and logit MSE to fp32 of a fake-quant model, and its evaluation result."""
    from osqdeploy.evaluation import TorchRuntime, evaluate, parity

    q = evaluate(TorchRuntime(model, device, name="torch-quant"), eval_set, progress=False, limit=args.limit_eval)
    p = parity(ref, q)
    row = {"eval_images": q.n, "fp32_top1": ref.top1, "top1": q.top1, "kl": p.kl_divergence,
           "logit_mse": float((q.logits - ref.logits).pow(2).mean()), "agreement": p.top1_agreement}
    if args.float_draws:
        row |= float_draws(model, ref, q, eval_set, device, args.float_draws, args.limit_eval)
    return row, q


def float_draws(model, ref, q, eval_set, device: str, draws: int, limit: int | None = None) -> dict:
    """Top-1 and KL of the fake-quant model over float draws: its plain evaluation ``q`` and
    ``draws`` more, each with every Linear/LayerNorm output moved by one seeded float32 ulp.

    At 4 bits one evaluation is one draw of float rounding (another GEMM kernel, another
    processor): it moves a run's top-1 by points and its KL by a few per cent, as much as the
    differences between the candidates compared. Their mean is the run's figure without that noise.
    """
    from osqdeploy.evaluation import TorchRuntime, UlpPerturbed, evaluate, parity

    results = [q] + [evaluate(UlpPerturbed(TorchRuntime(model, device, name="torch-quant"), seed), eval_set,
                              progress=False, limit=limit) for seed in range(draws)]
    top1 = [r.top1 for r in results]
    kl = [parity(ref, r).kl_divergence for r in results]
    return {"draw_top1": top1, "draw_kl": kl, "top1_over_draws": sum(top1) / len(top1),
            "kl_over_draws": sum(kl) / len(kl)}


def _ort(row: dict, run_dir: Path, ref, q, eval_set, args: argparse.Namespace) -> dict:
    """The run exported to ONNX and evaluated in ONNX Runtime on the CPU, against its fake-quant model."""
    from osqdeploy.api import export
    from osqdeploy.evaluation import OnnxRuntime, evaluate, parity

    onnx_path = Path(args.out) / "onnx" / f"{row['job']}.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    export(run_dir, onnx_path)
    o = evaluate(OnnxRuntime(onnx_path, provider="cpu", intra_op_num_threads=args.ort_threads), eval_set,
                 progress=False, limit=args.limit_eval)
    if not args.keep_onnx:
        onnx_path.unlink()
    return {**row, "ort_cpu_top1": o.top1, "ort_minus_fake_quant": o.top1 - q.top1,
            "ort_agreement_with_fake_quant": parity(q, o).top1_agreement, "ort_kl": parity(ref, o).kl_divergence}


def add_ort(args: argparse.Namespace, only: list[str] | None = None) -> None:
    """ORT CPU figures for every finished row of OUT that lacks them (``only``: job names to restrict to)."""
    import torch

    from benchmarks.ort_speed import cpu_name
    from osqdeploy.api import load_run
    from osqdeploy.evaluation import TorchRuntime, evaluate
    from osqdeploy.load import ImageFiles, eval_transform, load_model

    fp = load_model(args.model, checkpoint=args.checkpoint).model
    eval_set = ImageFiles(args.images, transform=eval_transform(fp)).split(EVAL_FRACTION, seed=SPLIT_SEED)[1]
    ref = None
    for path in sorted((Path(args.out) / "jobs").glob("*.json")):
        row = json.loads(path.read_text())
        if row.get("status") != "ok" or "ort_cpu_top1" in row or (only and row["job"] not in only):
            continue
        if ref is None:
            ref = evaluate(TorchRuntime(fp, "cpu"), eval_set, progress=False, limit=args.limit_eval)
        run_dir = Path(args.out) / "runs" / row["job"]
        if not run_dir.is_dir():
            print(f"{row['job']}: no run directory, skipped", flush=True)
            continue
        q = evaluate(TorchRuntime(load_run(run_dir, "cpu").model, "cpu", name="torch-quant"), eval_set,
                     progress=False, limit=args.limit_eval)
        host = f"{cpu_name()} ({os.cpu_count()} cores)"
        _write({**_ort(row, run_dir, ref, q, eval_set, args), "ort_host": host, "cpu_fake_quant_top1": q.top1,
                "ort_threads": args.ort_threads or torch.get_num_threads()}, args)


def worker(args: argparse.Namespace) -> int:
    """One job in its own process: each row is written as soon as it is measured, ONNX Runtime's figures last."""
    job = Job(**json.loads(args.worker))
    measured = []
    try:
        from osqdeploy.load import ImageFiles, eval_transform, load_model

        for row, run_dir, ref, q in run_job(job, args):
            _write(row, args)
            measured.append((row, run_dir, ref, q))
        if args.ort:
            fp = load_model(args.model, checkpoint=args.checkpoint).model
            eval_set = ImageFiles(args.images, transform=eval_transform(fp)).split(EVAL_FRACTION, seed=SPLIT_SEED)[1]
            for row, run_dir, ref, q in measured:
                _write(_ort(row, run_dir, ref, q, eval_set, args), args)
    except Exception as e:  # recorded, so the summary shows it and a re-run retries it
        _write({"job": job.name, "variant": job.variant, "bits": job.bits, "seed": job.seed, "status": "failed",
                "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}, args)
        return 1
    return 0


def _write(row: dict, args: argparse.Namespace) -> None:
    (Path(args.out) / "jobs" / f"{row['job']}.json").write_text(json.dumps(row, indent=1))
    print(json.dumps({k: row.get(k) for k in ("job", "status", "top1", "kl", "ort_cpu_top1", "error")}), flush=True)


# ------------------------------------------------------------------------------------------- parent


def _done(job: Job, args: argparse.Namespace) -> bool:
    """Whether the job's row, and the row of each post-tuning asked for, are finished (with ORT if asked)."""
    names = [job.name] + [post_tuned_job(job, spec)[0].name for spec in args.post_tuning]
    for name in names:
        try:
            row = json.loads((Path(args.out) / "jobs" / f"{name}.json").read_text())
        except (OSError, ValueError):
            return False
        if row.get("status") != "ok" or (args.ort and "ort_cpu_top1" not in row):
            return False
    return True


def _devices(args: argparse.Namespace) -> list[str | None]:
    """The GPUs to spread jobs over (None: the CPU)."""
    if args.gpus:
        return args.gpus
    if args.device == "cpu":
        return [None]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] or [None]


@contextlib.contextmanager
def mps_daemon(out: Path) -> Iterator[bool]:
    """NVIDIA's Multi-Process Service for the jobs, if it starts and a probe process runs under it.

    Without it, processes sharing a GPU take turns on it (time slices), so jobs whose steps are
    replayed CUDA graphs gain little from sharing (two DeiT-Tiny calibrations on one H200 took
    291 s together against 160 s alone); under MPS their small kernels run side by side. The
    daemon has its own pipe directory, so only these jobs see it; if it does not work, the jobs
    run without it.
    """
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(out / "mps" / "pipe"),
           "CUDA_MPS_LOG_DIRECTORY": str(out / "mps" / "log")}
    for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True, timeout=30)
        probe = "import torch; assert float(torch.ones(4, device='cuda').sum()) == 4"
        subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=90)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"MPS not used ({type(e).__name__}: {e})", flush=True)
        _quit_mps(env)
        yield False
        return
    print("MPS daemon running; jobs share each GPU through it", flush=True)
    try:
        with mock.patch.dict(os.environ, {k: env[k] for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")}):
            yield True
    finally:
        _quit_mps(env)


def _quit_mps(env: dict) -> None:
    try:
        subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env=env, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        pass


def launch(jobs: list[Job], args: argparse.Namespace) -> None:
    out = Path(args.out)
    for sub in ("jobs", "runs", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not _done(j, args)]
    print(f"{len(jobs)} jobs, {len(jobs) - len(todo)} already finished, {len(todo)} to run", flush=True)
    slots = [gpu for _ in range(args.jobs_per_gpu) for gpu in _devices(args)]
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    running: dict[subprocess.Popen, tuple[Job, str | None, float]] = {}
    free = list(slots)
    t0 = time.perf_counter()
    while todo or running:
        elapsed = time.perf_counter() - t0
        if todo and args.start_before is not None and elapsed > args.start_before:
            print(f"[{elapsed:7.1f}s] --start-before reached: {len(todo)} jobs not started", flush=True)
            todo.clear()
        if args.deadline is not None and elapsed > args.deadline:
            print(f"[{elapsed:7.1f}s] --deadline reached: stopping {len(running)} running jobs", flush=True)
            # as Ctrl-C, so each job exits through Python (as paper_tables stops its jobs): jobs
            # terminated outright under MPS coincided with that GPU's other clients faulting
            for proc in running:
                proc.send_signal(signal.SIGINT)
            for proc in running:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                proc.log.close()  # type: ignore[attr-defined]
            break
        while todo and free:
            job, gpu = todo.pop(0), free.pop(0)
            # each job's share of the cores, for its own threads and for inductor's compile workers
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_COMPILE_THREADS": str(threads),
                   "PYTHONUNBUFFERED": "1"}
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            device = "cuda" if gpu is not None else ("cpu" if args.device == "auto" else args.device)
            cmd = [sys.executable, "-m", "benchmarks.accuracy_seeds", "--worker", json.dumps(job.__dict__),
                   "--concurrent", str(len(slots)), "--device", device, *_passthrough(args)]
            log = open(out / "logs" / f"{job.name}.log", "w")  # noqa: SIM115 (closed when the process ends)
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            proc.log = log  # type: ignore[attr-defined]
            running[proc] = (job, gpu, time.perf_counter())
            print(f"[{time.perf_counter() - t0:7.1f}s] start {job.name} on {'GPU ' + gpu if gpu else 'CPU'}",
                  flush=True)
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            job, gpu, started = running.pop(proc)
            proc.log.close()  # type: ignore[attr-defined]
            free.append(gpu)
            state = "done" if proc.returncode == 0 else f"FAILED (see logs/{job.name}.log)"
            print(f"[{time.perf_counter() - t0:7.1f}s] {state} {job.name} in {time.perf_counter() - started:.1f}s",
                  flush=True)
    print(f"all jobs ended after {time.perf_counter() - t0:.1f}s", flush=True)


def _passthrough(args: argparse.Namespace) -> list[str]:
    argv = ["--images", str(args.images), "--checkpoint", str(args.checkpoint), "--model", args.model,
            "--out", str(args.out), "--iters", str(args.iters), "--ort-threads", str(args.ort_threads)]
    if args.samples:
        argv += ["--samples", str(args.samples)]
    if args.limit_eval:
        argv += ["--limit-eval", str(args.limit_eval)]
    if args.ort:
        argv.append("--ort")
    if args.float_draws:
        argv += ["--float-draws", str(args.float_draws)]
    if args.keep_onnx:
        argv.append("--keep-onnx")
    if args.post_tuning:
        argv += ["--post-tuning", *args.post_tuning]
    if args.post_tuning_iters:
        argv += ["--post-tuning-iters", str(args.post_tuning_iters)]
    if args.post_tuning_lr:
        argv += ["--post-tuning-lr", str(args.post_tuning_lr)]
    return argv


# ---------------------------------------------------------------------------------------- summarize


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def _cell(stats: dict | None, fmt: str) -> str:
    if not stats:
        return "–"
    return f"{stats['mean']:{fmt}} [{stats['min']:{fmt}}, {stats['max']:{fmt}}]"


def _paired(by_seed: dict, variant: str, own: str | None, bits: str, seeds: list[int], key: str) -> str:
    """``key``'s change from the runs a post-tuned variant was tuned from (``own``), seed by seed."""
    pairs = [by_seed[(variant, bits, k)][key] / by_seed[(own, bits, k)][key] - 1 for k in seeds
             if own and key in by_seed[(variant, bits, k)] and key in by_seed.get((own, bits, k), {})]
    return _cell(_stats([100 * x for x in pairs]), "+.1f") + " %" if pairs else "–"


def summarize(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted((out / "jobs").glob("*.json"))]
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    groups: dict[str, list[dict]] = {}
    for r in ok:
        groups.setdefault(f"{r['variant']}@{r['bits']}", []).append(r)
    summary = {g: {m: _stats([r[m] for r in rs if r.get(m) is not None]) for m in METRICS} | {
        "seeds": sorted(r["seed"] for r in rs)} for g, rs in groups.items()}

    fp32 = sorted({round(r["fp32_top1"], 2) for r in ok})
    concurrent = sorted({r.get("concurrent_jobs") for r in ok if r.get("concurrent_jobs")})
    lines = [f"fp32 top-1 on the held-out images: {', '.join(f'{v:.1f}' for v in fp32)} %  "
             f"(mean [min, max] over seeds; KL and logit MSE to fp32 on the same images; calibration seconds "
             f"with {', '.join(map(str, concurrent)) or '?'} jobs running at once)", "",
             "| variant | bits | seeds | top-1 % | Δ top-1 vs fp32 | KL to fp32 | KL vs paper | KL vs its base, "
             "paired | logit MSE | agreement % | calib s | ORT CPU top-1 % | ORT − fake-quant |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    drawn = any("kl_over_draws" in r for r in ok)
    if drawn:  # --float-draws: the same figures as means over float draws, and the paired KL change on them
        lines[-2] += " top-1 over float draws % | KL over float draws | KL over draws vs its base, paired |"
        lines[-1] += "---|---|---|"
    by_seed = {(r["variant"], r["bits"], r["seed"]): r for r in ok}
    for g in sorted(summary, key=lambda g: (g.split("@")[1], g)):
        s, (variant, bits) = summary[g], g.split("@")
        paper = summary.get(f"paper@{bits}", {}).get("kl")
        rel = f"{100 * (s['kl']['mean'] / paper['mean'] - 1):+.1f} %" if paper and s["kl"] else "–"
        delta = f"{s['top1']['mean'] - fp32[0]:+.1f}" if fp32 and len(fp32) == 1 else "–"
        # a post-tuned variant against the very runs it was tuned from, seed by seed
        own = variant.rsplit("+", 1)[0] if "+" in variant else None
        pair = {key: _paired(by_seed, variant, own, bits, s["seeds"], key) for key in ("kl", "kl_over_draws")}
        lines.append(
            f"| {variant} | {bits.upper()} | {len(s['seeds'])} | {_cell(s['top1'], '.1f')} | {delta} | "
            f"{_cell(s['kl'], '.4f')} | {rel} | {pair['kl']} | {_cell(s['logit_mse'], '.3f')} | "
            f"{_cell(s['agreement'], '.1f')} | "
            f"{_cell(s['calib_seconds'], '.0f')} | {_cell(s['ort_cpu_top1'], '.1f')} | "
            f"{_cell(s['ort_minus_fake_quant'], '+.1f')} |"
            + (f" {_cell(s['top1_over_draws'], '.1f')} | {_cell(s['kl_over_draws'], '.4f')} | "
               f"{pair['kl_over_draws']} |" if drawn else ""))
    lines += ["", "Per seed:", "", "| variant | bits | seed | top-1 % | KL | logit MSE | calib s | concurrent jobs | "
              "ORT CPU top-1 % |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(ok, key=lambda r: (r["bits"], r["variant"], r["seed"])):
        ort = f"{r['ort_cpu_top1']:.1f}" if "ort_cpu_top1" in r else "–"
        lines.append(f"| {r['variant']} | {r['bits'].upper()} | {r['seed']} | {r['top1']:.1f} | {r['kl']:.4f} | "
                     f"{r['logit_mse']:.3f} | {r['calib_seconds']:.0f} | {r.get('concurrent_jobs')} | {ort} |")
    if failed:
        lines += ["", "Failed:", ""] + [f"- {r['job']}: {r.get('error')}" for r in failed]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"groups": summary, "rows": ok, "failed": failed}, indent=1))
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--out", type=Path, default=Path("results/accuracy_seeds"))
    ap.add_argument("--variants", nargs="+", default=["paper"], help="NAME[,key=value...][@wWaA]; see VARIANTS")
    ap.add_argument("--bits", nargs="+", default=["w4a4"], help="bits of variants given without @")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--iters", type=int, default=20000, help="iterations per reconstruction group")
    ap.add_argument("--samples", type=int, default=None,
                    help="calibration views (default: the method's, else the model recipe's)")
    ap.add_argument("--limit-eval", type=int, default=None, help="evaluate on this many held-out images only")
    ap.add_argument("--jobs-per-gpu", type=int, default=6)
    ap.add_argument("--gpus", nargs="*", default=None, help="GPU ids to use (default: all visible)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    ap.add_argument("--ort", action="store_true", help="also export each run and evaluate it in ONNX Runtime (CPU)")
    ap.add_argument("--ort-threads", type=int, default=2)
    ap.add_argument("--keep-onnx", action="store_true")
    ap.add_argument("--float-draws", type=int, default=0, metavar="K",
                    help="also evaluate each fake-quant model K more times, one float32 ulp per output moved by a "
                         "seeded draw, and report top-1 and KL as means over the draws")
    ap.add_argument("--post-tuning", nargs="*", default=[], metavar="KIND[,key=value...]",
                    help="also tune each finished run at the output (OUTPUT_TUNED's rate and length on fixed views, "
                         f"KIND's parameter set: {', '.join(POST_TUNING)}; settings of CalibrationConfig after it, "
                         "e.g. output_tuning_mix=cutmix) and report it as variant "
                         "NAME+tuned[,key=value...] / NAME+tuned_steps: the same reconstruction, paired")
    ap.add_argument("--post-tuning-iters", type=int, default=None, help="override OUTPUT_TUNED's iterations")
    ap.add_argument("--post-tuning-lr", type=float, default=None, help="override OUTPUT_TUNED's relative rate")
    ap.add_argument("--mps", action="store_true",
                    help="run the jobs under NVIDIA MPS (its own daemon; without it if it does not start)")
    ap.add_argument("--start-before", type=float, default=None, metavar="S",
                    help="start no job later than S seconds after launch")
    ap.add_argument("--deadline", type=float, default=None, metavar="S",
                    help="stop jobs still running S seconds after launch (a re-run resumes them from their last group)")
    ap.add_argument("--summarize", action="store_true", help="print and write the summary of OUT's finished jobs")
    ap.add_argument("--ort-only", nargs="*", default=None, metavar="JOB",
                    help="add ONNX Runtime CPU figures to OUT's finished rows (these jobs only, if named)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--concurrent", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        raise SystemExit(worker(args))
    if args.summarize:
        print(summarize(args.out))
        return
    if args.images is None or args.checkpoint is None:
        ap.error("--images and --checkpoint are needed to calibrate or evaluate")
    if args.ort_only is not None:
        add_ort(args, args.ort_only)
        print(summarize(args.out))
        return
    jobs = parse_jobs(args.variants, args.bits, args.seeds)
    with mps_daemon(args.out) if args.mps else contextlib.nullcontext():
        launch(jobs, args)
    print(summarize(args.out))


if __name__ == "__main__":
    main()
