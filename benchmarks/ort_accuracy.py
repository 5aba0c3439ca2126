"""Accuracy on ONNX Runtime's CPU: osq's qdq and ort-int8 files beside ORT's own ``quantize_static``.

The images of ``--images`` are split as every real-DeiT-Tiny figure of the project splits them
(``ImageFiles.split(0.5, seed=0)``): ``quantize_static`` calibrates on the calibration half (the
same images the osq runs were calibrated on), and every file is evaluated on the held-out half
with ONNX Runtime's CPU provider. Per file: top-1, KL to the float export's predictions; per osq
run, the top-1 agreement of its ort-int8 file with its qdq file (the same grids, so ideally 100 %).

Peers are ``quantize_static`` QDQ files of the float export: uint8 activations (``QUInt4`` for
4-bit ones), int8 per-channel weights (``QInt4`` for 4-bit ones), MinMax / Entropy / Percentile.

    python -m benchmarks.ort_accuracy --checkpoint ../shared/data/weights/deit_tiny_patch16_224.pth \\
        --images ../shared/data/imagenet-sample --runs runs/paper-w8a8-s0 runs/paper-w4a4-s0 ...

Every file's held-out logits are kept under ``--workdir``, so an interrupted run resumes where it
stopped. With ``--noise-floor`` each run's PyTorch fake-quant model is evaluated too, plain and with
every Linear/LayerNorm output moved by one float32 ulp (``UlpPerturbed``), and the qdq file once more
with ONNX Runtime's basic graph optimizations only: top-1 agreements of equally exact float
implementations, against which the ort-int8/qdq agreement is judged; each PyTorch draw's top-1
and KL, how far a run's figures move with float rounding alone; and, over the four draws, the
images the run gets right among those fp32 gets right and among those it gets wrong.
JSON goes to ``benchmarks/results/ort_accuracy_<model>_cpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

from osqdeploy.api import export as export_run
from osqdeploy.api import load_run
from osqdeploy.evaluation import OnnxRuntime, TorchRuntime, UlpPerturbed, evaluate
from osqdeploy.evaluation.evaluator import EvalResult, kl_divergence
from osqdeploy.load.data import ImageFiles, calibration_tensor, eval_transform
from osqdeploy.load.models import load_model
from osqdeploy.onnx_export.onnx_qdq import float_export
from osqdeploy.onnx_export.ort_int8 import to_ort_int8
from osqdeploy.run.store import read_manifest

RESULTS = Path(__file__).resolve().parent / "results"
SPLIT_SEED = 0  # the split of benchmarks/accuracy_seeds.py
EVAL_FRACTION = 0.5
PEERS = [f"{b}-{m}" for b in ("w8a8", "w4a8", "w4a4") for m in ("MinMax", "Entropy", "Percentile")]


@dataclass
class Row:
    label: str
    kind: str  # "float" | "ort quantize_static" | "osq qdq" | "osq ort-int8"
    bits: str
    top1: float
    kl_to_fp32: float
    agreement_with_qdq: float | None = None
    max_abs_logit_diff_to_qdq: float | None = None
    seconds: float | None = None
    error: str | None = None
    # --noise-floor: the run's PyTorch fake-quant model against the ONNX files and against itself
    noise: dict[str, float] | None = None


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100.0 * float((a.argmax(1) == b.argmax(1)).float().mean())


def _right_by_fp32(ref: EvalResult, labels: torch.Tensor, draws: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Images the run gets right (mean over its float draws) among those fp32 gets right and wrong:
    a model closer to fp32 also shares more of fp32's mistakes, which top-1 counts against it."""
    fp32_right = ref.logits.argmax(1) == labels
    right = torch.stack([d.argmax(1) == labels for d in draws]).float().mean(0)
    return {"fp32_right": int(fp32_right.sum()), "right_where_fp32_right": float(right[fp32_right].sum()),
            "right_where_fp32_wrong": float(right[~fp32_right].sum())}


def _torch_logits(run_dir: Path, held_out: ImageFiles, work: Path, ulp_seed: int | None) -> torch.Tensor:
    """Held-out logits of the run's fake-quant model on this CPU (one ulp per output with ``ulp_seed``), cached."""
    cache = work / f"{run_dir.name}.torch{'' if ulp_seed is None else f'~ulp{ulp_seed}'}.logits.pt"
    if cache.is_file():
        return torch.load(cache)
    runtime = TorchRuntime(load_run(run_dir).model, "cpu", name="torch-quant")
    if ulp_seed is not None:
        runtime = UlpPerturbed(runtime, ulp_seed)
    logits = evaluate(runtime, held_out, batch_size=25, progress=False).logits
    torch.save(logits, cache)
    return logits


def _evaluated(path: Path, label: str, held_out: ImageFiles, work: Path, threads: int | None,
               level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> EvalResult:
    """Held-out logits of one file (cached beside it, keyed by the file's size and mtime)."""
    stat = path.stat()
    suffix = "" if level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL else f".{level.name}"
    cache = work / f"{path.name}{suffix}.logits.pt"
    key = [stat.st_size, stat.st_mtime_ns]
    if cache.is_file():
        saved = torch.load(cache)
        if saved["key"] == key:
            return EvalResult(label, len(saved["logits"]), saved["top1"], None, 0.0, saved["logits"], saved["labels"])
    runtime = OnnxRuntime(path, provider="cpu", name=label, intra_op_num_threads=threads,
                          graph_optimization_level=level)
    result = evaluate(runtime, held_out, batch_size=25, progress=False)
    torch.save({"key": key, "logits": result.logits, "labels": result.labels, "top1": result.top1}, cache)
    return result


class _Reader:
    """quantize_static's calibration reader over a tensor of images, in batches.

    ``set_range`` lets quantize_static feed the calibrator a few batches at a time
    (``CalibStridedMinMax``): ORT's histogram calibrators (Entropy, Percentile) otherwise keep every
    intermediate tensor of all 250 images in memory at once (over 20 GB for DeiT-Tiny).
    """

    def __init__(self, images: torch.Tensor, input_name: str, batch: int = 10):
        self._all = [{input_name: b.numpy()} for b in images.split(batch)]
        self._batches = iter(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._batches = iter(self._all[start_index:end_index])

    def get_next(self):
        return next(self._batches, None)


def quantize_static_peer(float_path: Path, out: Path, calib: torch.Tensor, peer: str) -> Path:
    """ONNX Runtime's static QDQ quantization of the float export, ``peer`` as ``wWaA-METHOD``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    bits, method = peer.split("-")
    w, a = (int(b) for b in bits[1:].split("a"))
    pre = out.with_suffix(".pre.onnx")
    if not pre.is_file():
        quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
    # activation ranges depend on the float model, the images and the method only: computed once per method
    ranges = out.parent / f"ranges_{method}.json"
    quantize_static(str(pre), str(out), _Reader(calib, name), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt4 if a == 4 else QuantType.QUInt8,
                    weight_type=QuantType.QInt4 if w == 4 else QuantType.QInt8,
                    calibrate_method=CalibrationMethod[method], calibration_cache_path=str(ranges),
                    extra_options={"CalibStridedMinMax": 1})  # one batch per collection: bounded memory
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--checkpoint", required=True, help="the model's float weights")
    ap.add_argument("--images", type=Path, required=True, help="labelled images, split into calibration/held-out")
    ap.add_argument("--runs", type=Path, nargs="*", default=[], help="finished osq run directories")
    ap.add_argument("--peers", nargs="*", default=PEERS, help="quantize_static configurations wWaA-METHOD")
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: one per core)")
    ap.add_argument("--workdir", type=Path, default=Path(".osq/ort_accuracy"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--noise-floor", action="store_true",
                    help="also run each run's PyTorch fake-quant model, plain and one-ulp perturbed")
    args = ap.parse_args()
    console = Console()
    work = args.workdir / args.model
    work.mkdir(parents=True, exist_ok=True)

    fp = load_model(args.model, checkpoint=args.checkpoint, pretrained=False)
    calib_set, held_out = ImageFiles(args.images, transform=eval_transform(fp.model)).split(EVAL_FRACTION, SPLIT_SEED)
    float_path = work / "float.onnx"
    if not float_path.is_file():
        with contextlib.redirect_stdout(io.StringIO()):
            float_export(fp.model, float_path)
    ref = _evaluated(float_path, "float", held_out, work, args.threads)
    rows = [Row("float export", "float", "fp32", ref.top1, 0.0)]
    console.print(f"float export: top-1 {ref.top1:.1f} on {ref.n} held-out images")

    calib: torch.Tensor | None = None
    for peer in args.peers:
        path = work / f"ort_{peer}.onnx"
        t0 = time.perf_counter()
        try:
            if not path.is_file():
                if calib is None:
                    calib = calibration_tensor(calib_set, len(calib_set), seed=SPLIT_SEED)
                quantize_static_peer(float_path, path, calib, peer)
            r = _evaluated(path, f"ort {peer}", held_out, work, args.threads)
        except Exception as e:  # an ORT build that cannot quantize or run a configuration: a row saying so
            rows.append(Row(f"ort {peer}", "ort quantize_static", peer.split("-")[0].upper(), float("nan"),
                            float("nan"), error=" ".join(str(e).split())[:300]))
            console.print(f"{peer}: failed: {rows[-1].error}")
            continue
        rows.append(Row(f"ort {peer}", "ort quantize_static", peer.split("-")[0].upper(), r.top1,
                        kl_divergence(ref.logits, r.logits), seconds=time.perf_counter() - t0))
        console.print(f"{peer}: top-1 {r.top1:.1f} ({rows[-1].seconds:.0f} s)")

    for run_dir in args.runs:
        m = read_manifest(run_dir)
        bits = f"W{m.quant.w_bits}A{m.quant.a_bits}"
        qdq = work / f"{run_dir.name}.qdq.onnx"
        fast = work / f"{run_dir.name}.ort-int8.onnx"
        t0 = time.perf_counter()
        if not qdq.is_file():
            with contextlib.redirect_stdout(io.StringIO()):
                export_run(run_dir, qdq)
        if not fast.is_file():
            onnx.save(to_ort_int8(onnx.load(str(qdq))), str(fast))
        rq = _evaluated(qdq, f"{run_dir.name} qdq", held_out, work, args.threads)
        rf = _evaluated(fast, f"{run_dir.name} ort-int8", held_out, work, args.threads)
        agree = _agreement(rq.logits, rf.logits)
        rows.append(Row(f"{run_dir.name} qdq", "osq qdq", bits, rq.top1, kl_divergence(ref.logits, rq.logits)))
        rows.append(Row(f"{run_dir.name} ort-int8", "osq ort-int8", bits, rf.top1, kl_divergence(ref.logits, rf.logits),
                        agreement_with_qdq=agree,
                        max_abs_logit_diff_to_qdq=float((rq.logits - rf.logits).abs().max()),
                        seconds=time.perf_counter() - t0))
        console.print(f"{run_dir.name}: qdq {rq.top1:.1f}, ort-int8 {rf.top1:.1f}, agreement {agree:.1f} %")
        if args.noise_floor:
            tq, tu = (_torch_logits(run_dir, held_out, work, seed) for seed in (None, 0))
            labels = rq.labels
            # the same qdq file, ONNX Runtime's basic graph optimizations only (no kernel fusions)
            basic = _evaluated(qdq, f"{run_dir.name} qdq basic", held_out, work, args.threads,
                               ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
            rows[-1].noise = {
                "torch_quant_top1": 100.0 * float((tq.argmax(1) == labels).float().mean()),
                "torch_ulp_top1": 100.0 * float((tu.argmax(1) == labels).float().mean()),
                # KL of each float draw: how far one run's KL to fp32 moves with float rounding alone
                "torch_quant_kl": kl_divergence(ref.logits, tq),
                "torch_ulp_kl": kl_divergence(ref.logits, tu),
                **_right_by_fp32(ref, labels, (tq, tu, rq.logits, rf.logits)),
                "torch_vs_torch_ulp": _agreement(tq, tu),
                "torch_vs_qdq": _agreement(tq, rq.logits),
                "torch_vs_ort_int8": _agreement(tq, rf.logits),
                "qdq_vs_qdq_basic_optimization": _agreement(rq.logits, basic.logits),
            }
            console.print(f"  noise floor: {rows[-1].noise}")

    table = Table(title=f"{args.model}: ONNX Runtime CPU, {ref.n} held-out images", title_justify="left")
    for col in ("file", "bits", "top-1 %", "KL to fp32", "agreement with qdq %", "torch vs torch~ulp %"):
        table.add_column(col, justify="left" if col in ("file", "bits") else "right")
    for r in rows:
        agree = "" if r.agreement_with_qdq is None else f"{r.agreement_with_qdq:.1f}"
        floor = "" if r.noise is None else f"{r.noise['torch_vs_torch_ulp']:.1f}"
        table.add_row(r.label, r.bits, "failed" if r.error else f"{r.top1:.1f}",
                      "" if r.error else f"{r.kl_to_fp32:.4f}", agree, floor)
    console.print(table)
    from benchmarks.ort_speed import _ort_version, cpu_name

    out = args.out or RESULTS / f"ort_accuracy_{args.model.replace('-', '_')}_cpu.json"
    out.write_text(json.dumps({
        "model": args.model, "checkpoint": args.checkpoint, "images": str(args.images),
        "split": {"eval_fraction": EVAL_FRACTION, "seed": SPLIT_SEED, "calibration": len(calib_set),
                  "held_out": len(held_out)},
        "processor": cpu_name(), "cores": os.cpu_count(), "onnxruntime": _ort_version(),
        "runs": {d.name: str(d) for d in args.runs},
        "rows": [r.__dict__ for r in rows],
    }, indent=2, default=str) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
