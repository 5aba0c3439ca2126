"""ONNX Runtime CPU speed, side by side: float export, ORT's own ``quantize_static`` W8A8, osq's qdq and ort-int8 files.

One run, one processor, the same random batch: the float export of the model; ONNX Runtime's
``quantize_static`` at W8A8 (uint8 activations, int8 per-channel weights, MinMax calibration on
the same calibration images), the peer an ORT user would reach for; and osq's ``qdq`` (int4
packed) and ``ort-int8`` files of runs at W4A4, W4A8 and W8A8. Batch 1 and 32; beside each the
node census of the graph ORT actually executes (integer kernels, QuantizeLinear, DequantizeLinear).
Optionally, top-1 of every file on held-out images and the top-1 agreement of ort-int8 with qdq.

Runs calibrated elsewhere (e.g. on a GPU), one directory per bit pair under ``--runs-dir``:

    python -m benchmarks.ort_speed --model deit_t --checkpoint ../shared/data/weights/deit_tiny_patch16_224.pth \\
        --calib-dir ../shared/data/imagenet-sample --runs-dir runs/ --eval-fraction 0.5

Self-calibrating (round-to-nearest or a short reconstruction, here on the CPU; speed does not
depend on calibration quality); without ``--checkpoint`` the model has random weights:

    python -m benchmarks.ort_speed --model deit_t --self-calibrate --iters 0 --calib-samples 32

With ``--eval-fraction F`` the images of ``--calib-dir`` are split (seeded, as
``deit_tiny_accuracy.py`` splits them): calibration on one part, accuracy on the other.
JSON goes to ``benchmarks/results/ort_speed_<model>_<machine>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import time
from pathlib import Path

import onnx
import torch
from rich.console import Console

from osqdeploy.api import calibrate
from osqdeploy.api import export as export_run
from osqdeploy.config import ATTN_GRIDS, POST_GELU_GRIDS, CalibrationConfig, QuantConfig
from osqdeploy.evaluation import OnnxRuntime, evaluate, parity
from osqdeploy.evaluation.throughput import compare_speed, speed_table
from osqdeploy.load.data import ImageFiles, calibration_tensor, eval_transform
from osqdeploy.load.models import load_model
from osqdeploy.onnx_export.onnx_qdq import float_export
from osqdeploy.onnx_export.ort_int8 import to_ort_int8
from osqdeploy.run.store import MANIFEST, read_manifest

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = ((4, 4), (4, 8), (8, 8))


def finished_runs(runs_dir: Path) -> dict[tuple[int, int], Path]:
    """Finished run directories under ``runs_dir`` by (w_bits, a_bits); the newest of each pair wins."""
    found: dict[tuple[int, int], tuple[float, Path]] = {}
    for manifest in sorted(runs_dir.glob(f"**/{MANIFEST}")):
        try:
            m = json.loads(manifest.read_text())
        except ValueError:
            continue
        if m.get("status") != "complete":
            continue
        key = (m["quant"]["w_bits"], m["quant"]["a_bits"])
        mtime = manifest.stat().st_mtime
        if key not in found or mtime > found[key][0]:
            found[key] = (mtime, manifest.parent)
    return {k: v for k, (_, v) in found.items()}


class _Reader:
    """quantize_static's calibration reader over a tensor of images."""

    def __init__(self, images: torch.Tensor, input_name: str, batch: int = 16):
        self._batches = iter([{input_name: b.numpy()} for b in images.split(batch)])

    def get_next(self):
        return next(self._batches, None)


def ort_quantize_static(float_path: Path, out: Path, calib: torch.Tensor, method: str = "MinMax",
                        w_type: str = "QInt8", a_type: str = "QUInt8") -> Path:
    """ONNX Runtime's own static QDQ quantization of the float export (per-channel weights)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
    quantize_static(str(pre), str(out), _Reader(calib, name), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType[a_type], weight_type=QuantType[w_type],
                    calibrate_method=CalibrationMethod[method])
    pre.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--checkpoint", help="the model's float weights (random weights without it)")
    ap.add_argument("--calib-dir", help="calibration images (quantize_static's, and --self-calibrate's)")
    ap.add_argument("--eval-fraction", type=float, default=None,
                    help="split --calib-dir: this fraction held out for top-1 of every file (seed --seed)")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate at most N held-out images")
    ap.add_argument("--runs-dir", type=Path, help="finished osq runs, one per bit pair (found by their manifests)")
    ap.add_argument("--self-calibrate", action="store_true", help="calibrate the missing bit pairs here")
    ap.add_argument("--iters", type=int, default=0, help="reconstruction iterations per group (--self-calibrate)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--pairs", nargs="+", default=[f"{w},{a}" for w, a in PAIRS], help="bit pairs W,A")
    ap.add_argument("--peers", nargs="*", default=["w8a8-MinMax"],
                    help="quantize_static configurations wWaA-METHOD (MinMax, Entropy or Percentile; "
                         "4-bit grids as QInt4/QUInt4)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: one per core)")
    ap.add_argument("--seconds", type=float, default=4.0, help="timed seconds per file and batch size")
    ap.add_argument("--machine", default=None, help="name in the results file (default: the host name)")
    ap.add_argument("--workdir", type=Path, default=Path(".osq/ort_speed"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="device of --self-calibrate")
    ap.add_argument("--attn-grid", default="log", choices=list(ATTN_GRIDS),
                    help="post-softmax grid of --self-calibrate's runs (QuantConfig.attn_grid)")
    ap.add_argument("--post-gelu-grids", nargs="+", default=["tensor"], choices=list(POST_GELU_GRIDS),
                    help="--self-calibrate one run per bit pair with each of these post-GELU grids")
    args = ap.parse_args()
    console = Console()
    work = args.workdir / args.model
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    fp = load_model(args.model, checkpoint=args.checkpoint, pretrained=False)
    calib, held_out = _images(args, fp.model)
    files: list[tuple[str, Path]] = []
    float_path = work / "float.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        float_export(fp.model, float_path)
    files.append(("float", float_path))

    for peer in args.peers:
        bits, method = peer.split("-")
        w, a = (int(b) for b in bits[1:].split("a"))
        path = work / f"ort_{peer}.onnx"
        t0 = time.perf_counter()
        ort_quantize_static(float_path, path, calib, method, "QInt4" if w == 4 else "QInt8",
                            "QUInt4" if a == 4 else "QUInt8")
        console.print(f"quantize_static {peer}: {time.perf_counter() - t0:.0f} s")
        files.append((f"ort {peer}", path))

    runs = finished_runs(args.runs_dir) if args.runs_dir else {}
    for pair in args.pairs:
        w, a = (int(b) for b in pair.split(","))
        found = runs.get((w, a))
        if found is None and not args.self_calibrate:
            console.print(f"W{w}A{a}: no finished run under {args.runs_dir}, skipped (or pass --self-calibrate)")
            continue
        for post_gelu in [None] if found is not None else args.post_gelu_grids:
            run_dir = found or work / f"run_w{w}a{a}_{args.iters}it_{args.attn_grid}_{post_gelu}"
            if not (run_dir / MANIFEST).is_file():
                t0 = time.perf_counter()
                model = load_model(args.model, checkpoint=args.checkpoint, pretrained=False)
                qcfg = QuantConfig(w, a, attn_grid=args.attn_grid, post_gelu_grid=post_gelu)
                calibrate(model, calib, qcfg, CalibrationConfig(
                    samples=len(calib), batch_size=32, iters=args.iters, device=args.device, seed=args.seed), run_dir)
                console.print(f"W{w}A{a}: calibrated in {time.perf_counter() - t0:.0f} s ({args.iters} it/group)")
            quant = read_manifest(run_dir).quant
            uniform, rotated = quant.attn_grid == "uniform", quant.post_gelu_grid != "tensor"
            tag = f"w{w}a{a}" + ("_uniform" if uniform else "") + (f"_{quant.post_gelu_grid}" if rotated else "")
            label = (f"osq W{w}A{a}" + (" uniform softmax" if uniform else "")
                     + (f" {quant.post_gelu_grid} post-GELU" if rotated else ""))
            qdq = work / f"osq_{tag}.qdq.onnx"
            with contextlib.redirect_stdout(io.StringIO()):
                export_run(run_dir, qdq)
            fast = work / f"osq_{tag}.ort-int8.onnx"
            onnx.save(to_ort_int8(onnx.load(str(qdq))), str(fast))
            files += [(f"{label} qdq", qdq), (f"{label} ort-int8", fast)]

    console.print(f"timing {len(files)} files, taking turns, {args.seconds:g} s each per batch size")
    rows = compare_speed(dict(files), tuple(args.batches), threads=args.threads, seconds=args.seconds)

    accuracy = _accuracy(files, held_out, args) if held_out is not None else {}
    machine = args.machine or platform.node() or "cpu"
    info = {
        "model": args.model, "checkpoint": args.checkpoint, "machine": machine, "processor": cpu_name(),
        "cores": os.cpu_count(), "threads": args.threads, "load_average": os.getloadavg(),
        "onnxruntime": _ort_version(), "torch": torch.__version__, "iters": args.iters,
        "calibration_images": len(calib), "runs": {f"W{w}A{a}": str(p) for (w, a), p in runs.items()},
    }
    title = f"{args.model} on {info['processor']} ({info['cores']} cores, threads {args.threads or 'all'})"
    console.print(speed_table(rows, baseline="float", title=title))
    if accuracy:
        console.print_json(data=accuracy)
    out = RESULTS / f"ort_speed_{args.model}_{machine}.json"
    out.write_text(json.dumps({**info, "rows": [r.to_dict() for r in rows], "accuracy": accuracy}, indent=2) + "\n")
    console.print(f"wrote {out}")


def _images(args: argparse.Namespace, model: torch.nn.Module) -> tuple[torch.Tensor, ImageFiles | None]:
    """(calibration tensor, held-out dataset or None); random images without --calib-dir."""
    if args.calib_dir is None:
        g = torch.Generator().manual_seed(args.seed)
        size = model.patch_embed.img_size
        return torch.randn(args.calib_samples, 3, *size, generator=g), None
    data = ImageFiles(args.calib_dir, transform=eval_transform(model))
    held_out = None
    if args.eval_fraction:
        data, held_out = data.split(args.eval_fraction, seed=args.seed)
    n = min(args.calib_samples, len(data))
    return calibration_tensor(data, n, seed=args.seed), held_out


def _accuracy(files: list[tuple[str, Path]], held_out: ImageFiles, args: argparse.Namespace) -> dict:
    """Top-1 of every file on the held-out images; ort-int8 against qdq: top-1 agreement and max |Δlogit|."""
    results = {}
    for label, path in files:
        runtime = OnnxRuntime(path, provider="cpu", name=label, intra_op_num_threads=args.threads)
        results[label] = evaluate(runtime, held_out, batch_size=32, progress=False, limit=args.eval_limit)
    summary = {label: {"top1": r.top1, "n": r.n} for label, r in results.items()}
    for label in results:
        if label.endswith("ort-int8"):
            qdq = label.removesuffix("ort-int8") + "qdq"
            p = parity(results[qdq], results[label])
            summary[label].update(agreement_with_qdq=p.top1_agreement, max_abs_logit_diff=p.max_abs_logit_diff)
    return summary


def cpu_name() -> str:
    """The processor's model name (shared by the benchmarks that record where they ran)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
