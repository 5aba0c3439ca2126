"""Where a quantized DeiT-Tiny's sensitivity to float rounding starts (issue 9).

PyTorch and ONNX Runtime, or one GPU kernel and another, give the same quantized model top-1
figures that differ by points at 4 bits, because one-ulp differences carry activations across
rounding thresholds and the flips spread (see ``UlpPerturbed``). This benchmark nudges, by at
most one float32 ulp, the input of one kind of activation quantizer at a time (all qkv inputs,
all fc2 inputs, all softmax outputs, ...), then the quantizers of one block at a time, and
prints how many evaluation images keep their unperturbed top-1 class, with the KL divergence
from the unperturbed predictions: the kinds and blocks with the lowest agreement are where
the chaos starts.

    python benchmarks/deit_tiny_chaos.py RUN --images ../shared/data/imagenet-sample \
        --checkpoint ../shared/data/weights/deit_tiny_patch16_224.pth
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import real_deit  # noqa: E402

from osqdeploy.evaluation import TorchRuntime, UlpPerturbed, evaluate, parity  # noqa: E402
from osqdeploy.pipeline import load_run  # noqa: E402
from osqdeploy.quant.layers import ACT_QUANTIZERS  # noqa: E402

_BLOCK = re.compile(r"^(.*?blocks\.\d+)\.")


def site_sets(model: torch.nn.Module, which: tuple[str, ...] = ("kinds", "blocks")) -> dict[str, list[torch.nn.Module]]:
    """Activation quantizers, all together and by kind (name with the block index wildcarded), and by block."""
    kinds: dict[str, list] = {}
    blocks: dict[str, list] = {}
    for name, m in model.named_modules():
        if not isinstance(m, ACT_QUANTIZERS) or not getattr(m, "enabled", False):
            continue
        kinds.setdefault("kind " + re.sub(r"\.\d+\.", ".*.", name), []).append(m)
        match = _BLOCK.match(name)
        if match:
            blocks.setdefault(match.group(1), []).append(m)
    sets = {"all quantizers": [m for ms in kinds.values() for m in ms], **kinds} if "kinds" in which else {}
    return {**sets, **(blocks if "blocks" in which else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--seeds", type=int, default=2, help="nudge seeds per site set (agreement is their mean)")
    ap.add_argument("--sets", nargs="+", default=["kinds", "blocks"], choices=["kinds", "blocks"])
    real_deit.add_options(ap, device="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    _, _, eval_set = real_deit.model_and_split(args)
    model = load_run(args.run, args.device).model
    runtime = TorchRuntime(model, args.device, name="torch-quant")
    base = evaluate(runtime, eval_set, progress=False)
    print(f"{args.run.name}: unperturbed top-1 {base.top1:.1f} on {base.n} images, {args.device}")
    print("| nudged inputs of | quantizers | top-1 agreement with unperturbed | KL to unperturbed | top-1 |")
    print("|---|---|---|---|---|")
    rows = []
    for label, sites in site_sets(model, tuple(args.sets)).items():
        agree, kl, top1 = [], [], []
        for seed in range(args.seeds):
            res = evaluate(UlpPerturbed(runtime, seed, inputs_of=sites), eval_set, progress=False)
            report = parity(base, res)
            agree.append(report.top1_agreement)
            kl.append(report.kl_divergence)
            top1.append(res.top1)
        row = {"sites": label, "n": len(sites), "agreement": sum(agree) / len(agree), "kl": sum(kl) / len(kl),
               "top1": top1}
        rows.append(row)
        print(f"| {label} | {len(sites)} | {row['agreement']:.1f} % | {row['kl']:.5f} | "
              f"{', '.join(f'{t:.1f}' for t in top1)} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"run": args.run.name, "top1": base.top1, "device": args.device,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
