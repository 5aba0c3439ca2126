"""Which quantizer costs DeiT-Tiny the most top-1 at W4A4? Ablations and cheap alternatives.

Every configuration starts from the same real DeiT-Tiny, initialises the quantizers exactly as
``osqdeploy`` does (activation observation, RepQ-ViT reparameterisation, weight grids) on the
calibration half of the 500 sample images, optionally reconstructs, then evaluates top-1 on the
evaluation half (disjoint, the split of ``deit_tiny_accuracy.py``). With ``iters=0`` the weights
are round-to-nearest (RTN). Besides top-1 (250 images: one image is 0.4 points, the binomial
standard error near 60% is about 3 points) it prints two paired, less noisy measures against the
fp32 model on the same images: top-1 agreement and the mean KL(fp32 || quantized).

A configuration is a comma-separated list of ``key=value`` (``base`` alone: the library's default):

* ``fp=FAM[+FAM...]`` keep these quantizer families in float (all 12 blocks): weights
  ``w_qkv w_proj w_fc1 w_fc2`` (``w_all``), input activations ``a_qkv a_proj a_fc1 a_fc2``,
  attention operands ``a_q a_k a_v``, post-softmax ``a_attn`` (``a_all``: every block activation).
* ``winit=minmax|mse`` ``QuantConfig.weight_init``; ``log=sqrt2|2`` ``QuantConfig.attn_log_base``;
  ``gelu=mse|mse_max`` ``QuantConfig.post_gelu_range``.
* ``arange=FAM:METHOD`` re-initialise the per-tensor activation quantizers of one family from
  full-precision activations of all calibration images (a ~1M-value sample per quantizer):
  ``mse`` (MSE-optimal, min and max shrunk together, as the library's observer but on all data
  at once), ``msemax`` (min kept, max shrunk), ``pctP`` (max at the P-th percentile, e.g. pct99.9),
  ``minmax``, ``outmse`` (the range minimising the next Linear's output error
  ||(Q(x) − x)·Wᵀ||², min at the data minimum or 0, max shrunk in 1% steps).
* ``bc=1`` empirical bias correction of every block Linear after initialisation (RTN only).
* ``iters=N`` AdaRound/QDrop reconstruction iterations per group (``blocks:3``), default ``--iters``.
* ``loss=mse|fisher`` the reconstruction objective (``CalibrationConfig.loss``).

    OMP_NUM_THREADS=1 python benchmarks/w4a4_ablation.py --images ../shared/data/imagenet-sample \
        --checkpoint ../shared/data/weights/deit_tiny_patch16_224.pth --configs base fp=w_fc2 winit=mse
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osqdeploy.adapters import adapter_for  # noqa: E402
from osqdeploy.config import CalibrationConfig, QuantConfig  # noqa: E402
from osqdeploy.evaluation import kl_divergence  # noqa: E402
from osqdeploy.load.data import ImageFiles, calibration_tensor, eval_transform  # noqa: E402
from osqdeploy.load.models import load_model  # noqa: E402
from osqdeploy.plan import build_plan  # noqa: E402
from osqdeploy.quant import primitives as P  # noqa: E402
from osqdeploy.quant.mode import QuantMode, quant_mode, set_mode  # noqa: E402
from osqdeploy.quant.quantizers import ActQuantizer  # noqa: E402
from osqdeploy.reconstruct import Reconstructor, prepare_model  # noqa: E402

FAMILIES = {
    "w_qkv": lambda b: b.attn.qkv.weight_quantizer,
    "w_proj": lambda b: b.proj.weight_quantizer,
    "w_fc1": lambda b: b.mlp.fc1.weight_quantizer,
    "w_fc2": lambda b: b.mlp.fc2.weight_quantizer,
    "a_qkv": lambda b: b.attn.qkv.input_quantizer,
    "a_proj": lambda b: b.proj.input_quantizer,
    "a_fc1": lambda b: b.mlp.fc1.input_quantizer,
    "a_fc2": lambda b: b.mlp.fc2.input_quantizer,
    "a_q": lambda b: b.attn.core.q_quantizer,
    "a_k": lambda b: b.attn.core.k_quantizer,
    "a_v": lambda b: b.attn.core.v_quantizer,
    "a_attn": lambda b: b.attn.core.attn_quantizer,
}
NEXT_LINEAR = {
    "a_qkv": lambda b: b.attn.qkv,
    "a_proj": lambda b: b.proj,
    "a_fc1": lambda b: b.mlp.fc1,
    "a_fc2": lambda b: b.mlp.fc2,
}
ALIASES = {
    "w_all": ["w_qkv", "w_proj", "w_fc1", "w_fc2"],
    "a_all": ["a_qkv", "a_proj", "a_fc1", "a_fc2", "a_q", "a_k", "a_v", "a_attn"],
}


def parse_config(text: str, default_iters: int) -> dict:
    cfg = {"name": text, "fp": [], "winit": "minmax", "log": "sqrt2", "gelu": "mse", "arange": [],
           "iters": default_iters, "bc": False, "loss": "mse"}
    if text == "base":
        return cfg
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key == "fp":
            for fam in value.split("+"):
                cfg["fp"] += ALIASES.get(fam, [fam])
        elif key == "arange":
            fam, _, method = value.partition(":")
            cfg["arange"].append((fam, method))
        elif key in ("winit", "log", "gelu", "loss"):
            cfg[key] = value
        elif key == "iters":
            cfg["iters"] = int(value)
        elif key == "bc":
            cfg["bc"] = value in ("1", "true", "yes")
        else:
            raise SystemExit(f"unknown config key {key!r} in {text!r}")
    unknown = [f for f in cfg["fp"] + [f for f, _ in cfg["arange"]] if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown quantizer families {unknown}; known: {sorted(FAMILIES)} {sorted(ALIASES)}")
    return cfg


def load_data(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(calibration images, evaluation images, evaluation labels), cached across invocations."""
    cache = Path(args.cache) / f"deit_data_{args.calib}_{args.seed}.pt"
    if cache.is_file():
        d = torch.load(cache, weights_only=True)
        return d["calib"], d["eval"], d["labels"]
    fp = load_model("deit_t", checkpoint=args.checkpoint)
    data = ImageFiles(args.images, transform=eval_transform(fp.model))
    calib_set, eval_set = data.split(0.5, seed=args.seed)
    calib = calibration_tensor(calib_set, min(args.calib, len(calib_set)), seed=args.seed)
    items = [eval_set[i] for i in range(len(eval_set))]
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([y for _, y in items])
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"calib": calib, "eval": images, "labels": labels}, cache)
    return calib, images, labels


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, bs: int = 50) -> torch.Tensor:
    return torch.cat([model(images[i : i + bs]).float() for i in range(0, images.shape[0], bs)])


@torch.no_grad()
def collect(model: nn.Module, quantizers: list[nn.Module], images: torch.Tensor, bs: int, per_q: int = 1 << 20):
    """Full-precision inputs of ``quantizers`` on ``images`` as [rows, last dim]: a strided sample of
    about ``per_q`` values (whole rows, so a following Linear can be applied) per quantizer."""
    samples: dict[int, list[torch.Tensor]] = {id(q): [] for q in quantizers}
    n_batches = math.ceil(images.shape[0] / bs)

    def hook(q):
        def fn(_m, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            stride = max(1, math.ceil(x.numel() * n_batches / per_q))
            samples[id(q)].append(x[::stride].clone())

        return fn

    _fp_pass_with_hooks(model, {q: hook(q) for q in quantizers}, images, bs)
    return {k: torch.cat(v) for k, v in samples.items()}


@torch.no_grad()
def _fp_pass_with_hooks(model: nn.Module, hooks: dict, images: torch.Tensor, bs: int) -> None:
    """One full-precision pass over ``images`` with forward-pre hooks on the given modules."""
    handles = [m.register_forward_pre_hook(fn) for m, fn in hooks.items()]
    try:
        with quant_mode(model, QuantMode.FLOAT):
            for i in range(0, images.shape[0], bs):
                model(images[i : i + bs])
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def bias_correct(model: nn.Module, images: torch.Tensor, bs: int) -> None:
    """Empirical bias correction (Nagel et al., 2019, DFQ): subtract from each block Linear's bias the
    mean output shift its quantization causes on calibration data, E[Q(x)]·Q(W)ᵀ − E[x]·Wᵀ.

    Means are over full-precision inputs. RTN only: the corrected bias would also shift the
    full-precision targets of a later reconstruction (``QuantMode.FLOAT`` leaves biases alone).
    """
    layers = [m for b in model.blocks for m in (b.attn.qkv, b.proj, b.mlp.fc1, b.mlp.fc2)]
    sums = {id(m): [0.0, 0.0, 0] for m in layers}
    enabled = {id(m): m.input_quantizer.mode is QuantMode.NEAREST for m in layers}

    def hook(m):
        def fn(_m, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            iq = m.input_quantizer
            qx = P.fake_quantize_uniform(x, iq.scale, iq.zero_point, iq.bits) if enabled[id(m)] else x
            acc = sums[id(m)]
            acc[0] += x.sum(0)
            acc[1] += qx.sum(0)
            acc[2] += x.shape[0]

        return fn

    _fp_pass_with_hooks(model, {m: hook(m) for m in layers}, images, bs)
    for m in layers:
        sx, sqx, n = sums[id(m)]
        wq = m.weight_quantizer(m.weight)
        m.bias.sub_(wq @ (sqx / n) - m.weight @ (sx / n))


def act_range(x: torch.Tensor, bits: int, method: str, weight: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor range of the rows ``x`` by ``method`` (``weight``: the next Linear's, for ``outmse``)."""
    if method == "outmse":  # minimise the next Linear's output error ||(Q(x) - x) Wᵀ||², not ||Q(x) - x||²
        rows = x[:: max(1, x.shape[0] // 2048)]
        best, best_range = float("inf"), (x.min(), x.max())
        for lo in (x.min(), torch.zeros(())):
            for i in range(90):
                hi = x.max() * (1 - 0.01 * i)
                s, z = P.qparams_from_range(lo, hi, bits)
                err = float(((P.fake_quantize_uniform(rows, s, z, bits) - rows) @ weight.t()).pow(2).mean())
                if err < best:
                    best, best_range = err, (lo, hi)
        return best_range
    x = x.reshape(-1)
    if method == "minmax":
        return x.min(), x.max()
    if method == "mse":
        lo, hi = P.mse_optimal_range(x, bits)
        return lo[0], hi[0]
    if method == "msemax":  # keep the minimum, search the maximum only
        lo = x.min()
        best, best_hi = float("inf"), x.max()
        for i in range(90):
            hi = x.max() * (1 - 0.01 * i)
            s, z = P.qparams_from_range(lo, hi, bits)
            err = float((P.fake_quantize_uniform(x, s, z, bits) - x).pow(2).mean())
            if err < best:
                best, best_hi = err, hi
        return lo, best_hi
    if method.startswith("pct"):
        p = float(method[3:]) / 100
        xs = x if x.numel() <= 1 << 24 else x[:: math.ceil(x.numel() / (1 << 24))]
        return xs.min(), torch.quantile(xs.float(), p)
    raise SystemExit(f"unknown activation range method {method!r}")


_INITIALIZED: dict[tuple, nn.Module] = {}


def initialized_model(cfg: dict, args, calib: torch.Tensor) -> nn.Module:
    """The model after the library's initialisation for this config's QuantConfig (cached in memory
    and in ``--cache``: the fp/arange/bc/iters variants only change the model afterwards, so they
    share one initialisation; delete the cache after changing the library's initialisation)."""
    key = (cfg["winit"], cfg["log"], cfg["gelu"])
    disk = Path(args.cache) / f"init_w{args.w_bits}a{args.a_bits}_{'_'.join(key)}_{args.calib}_{args.batch_size}.pt"
    if key not in _INITIALIZED and disk.is_file():
        _INITIALIZED[key] = torch.load(disk, weights_only=False)
    if key not in _INITIALIZED:
        torch.manual_seed(args.seed)
        model = load_model("deit_t", checkpoint=args.checkpoint).model.eval()
        qkw = {"attn_log_base": cfg["log"]}
        if cfg["winit"] != "minmax":
            qkw["weight_init"] = cfg["winit"]
        if cfg["gelu"] != "mse":
            qkw["post_gelu_range"] = cfg["gelu"]
        qcfg = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, **qkw)
        adapter = prepare_model(model, qcfg, adapter_for)
        rec = Reconstructor(model, adapter, build_plan("blocks:3", adapter.units(model)),
                            calib_config(args, 0, calib), torch.device("cpu"))
        rec.initialize(calib)
        _INITIALIZED[key] = model
        torch.save(model, disk)
    return copy.deepcopy(_INITIALIZED[key])


def calib_config(args, iters: int, calib: torch.Tensor, batch_size: int | None = None,
                 loss: str = "mse") -> CalibrationConfig:
    return CalibrationConfig(samples=calib.shape[0], batch_size=batch_size or args.batch_size, iters=iters,
                             granularity="blocks:3", seed=args.seed, device="cpu", loss=loss,
                             extra={"init_samples": calib.shape[0]})


def run_config(cfg: dict, args, calib: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
               fp_logits: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    model = initialized_model(cfg, args, calib)
    for fam, method in cfg["arange"]:
        qs = [FAMILIES[fam](b) for b in model.blocks]
        if not all(isinstance(q, ActQuantizer) for q in qs):
            raise SystemExit(f"arange needs uniform activation quantizers, {fam} is not")
        data = collect(model, qs, calib, args.batch_size)
        for b, q in zip(model.blocks, qs, strict=True):
            layer = NEXT_LINEAR[fam](b) if fam in NEXT_LINEAR else None
            lo, hi = act_range(data[id(q)], q.bits, method, None if layer is None else layer.weight)
            q.set_range(lo, hi)
    for fam in cfg["fp"]:
        for b in model.blocks:
            set_mode(FAMILIES[fam](b), QuantMode.FLOAT)
    groups = []
    if cfg["bc"]:
        if cfg["iters"] > 0:
            raise SystemExit("bc=1 is for RTN only (iters=0)")
        bias_correct(model, calib, args.batch_size)
    if cfg["iters"] > 0:
        adapter = adapter_for(model)
        ccfg = calib_config(args, cfg["iters"], calib, args.recon_batch_size, loss=cfg["loss"])
        rec = Reconstructor(model, adapter, build_plan("blocks:3", adapter.units(model)), ccfg, torch.device("cpu"))
        groups = rec.reconstruct(calib)
    t_init = time.perf_counter() - t0
    q_logits = predict(model, images)
    top1 = float((q_logits.argmax(1) == labels).float().mean()) * 100
    agree = float((q_logits.argmax(1) == fp_logits.argmax(1)).float().mean()) * 100
    kl = kl_divergence(fp_logits, q_logits)
    if groups:
        mses = ", ".join(f"{g.mse_before:.3f}->{g.mse_after:.3f}" for g in groups)
        print(f"  {cfg['name']}: group output MSE before->after reconstruction {mses}", flush=True)
    return {"config": cfg["name"], "iters": cfg["iters"], "top1": round(top1, 1), "fp_agree": round(agree, 1),
            "kl": round(kl, 4), "seconds": round(time.perf_counter() - t0, 1), "init_seconds": round(t_init, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="../shared/data/imagenet-sample")
    ap.add_argument("--checkpoint", default="../shared/data/weights/deit_tiny_patch16_224.pth")
    ap.add_argument("--configs", nargs="+", default=["base"])
    ap.add_argument("--calib", type=int, default=128, help="calibration images (from the calibration half)")
    ap.add_argument("--iters", type=int, default=0, help="reconstruction iterations per group (0: RTN)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--recon-batch-size", type=int, default=None,
                    help="reconstruction batch (default --batch-size, which also batches the initialisation)")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="/tmp/osq_w4a4_ablation")
    ap.add_argument("--out", default=None, help="append result rows (JSON lines) to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = [parse_config(c, args.iters) for c in args.configs]

    calib, images, labels = load_data(args)
    fp = load_model("deit_t", checkpoint=args.checkpoint).model.eval()
    fp_logits = predict(fp, images)
    fp_top1 = float((fp_logits.argmax(1) == labels).float().mean()) * 100
    print(f"calibration {calib.shape[0]} images, evaluation {images.shape[0]} images; fp32 top-1 {fp_top1:.1f}",
          flush=True)
    rows = []
    for cfg in configs:
        row = run_config(cfg, args, calib, images, labels, fp_logits)
        row["bits"] = f"W{args.w_bits}A{args.a_bits}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"\n| config | bits | iters | top-1 | Δ vs fp32 ({fp_top1:.1f}) | fp32 agreement | KL(fp‖q) | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['bits']} | {r['iters']} | {r['top1']:.1f} | {r['top1'] - fp_top1:+.1f} | "
              f"{r['fp_agree']:.1f} | {r['kl']:.3f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
