"""How far half-precision matmuls move a saved run's forward pass (issue 5, autocast candidates).

Reconstruction under autocast trains the rounding against a perturbed forward; this measures the
perturbation itself: the run's fake-quant model on the held-out images in fp32, then under
``torch.autocast`` with each half type (quantizers still round in fp32), as top-1 agreement with
the fp32 forward and KL(fp32 ‖ half). For scale: one-ulp nudges of every quantizer input keep
97.2 % of the W4A4 decisions (``deit_tiny_chaos.py``), ONNX Runtime against PyTorch on one CPU
about 88 %. CPU autocast also runs softmax and GELU in the half type; CUDA's keeps softmax in fp32.
``tf32-operands`` emulates what reconstruction's TF32 matmuls do (operands of every quantized
Linear rounded to 10 mantissa bits, fp32 arithmetic), on any device.

    python benchmarks/deit_tiny_half_forward.py RUN [RUN ...] --images ../shared/data/imagenet-sample \
        --checkpoint ../shared/data/weights/deit_tiny_patch16_224.pth --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import real_deit  # noqa: E402

from osqdeploy.evaluation import kl_divergence  # noqa: E402
from osqdeploy.pipeline import load_run  # noqa: E402
from osqdeploy.quant import layers as M  # noqa: E402
from osqdeploy.reconstruct.engine import tf32  # noqa: E402

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
FORWARDS = ["bf16", "fp16", "tf32-operands"]


def round_mantissa(t: torch.Tensor, bits: int) -> torch.Tensor:
    """``t`` rounded to nearest (ties to even) with ``bits`` explicit mantissa bits, as TF32 (10) does."""
    m, e = torch.frexp(t)
    return torch.ldexp(torch.round(m * 2.0 ** (bits + 1)) / 2.0 ** (bits + 1), e)


@contextmanager
def tf32_operands() -> Iterator[None]:
    """Emulate TF32 on any device: every quantized Linear's operands rounded to 10 bits, fp32 math."""
    original = M.QuantLinear.forward

    def forward(self, x):
        x = self.input_quantizer(x)
        return F.linear(round_mantissa(x, 10), round_mantissa(self.weight_quantizer(self.weight), 10), self.bias)

    M.QuantLinear.forward = forward
    try:
        yield
    finally:
        M.QuantLinear.forward = original


@torch.no_grad()
def forward(model: torch.nn.Module, images: torch.Tensor, device: str, kind: str) -> torch.Tensor:
    out = []
    half = HALF.get(kind)
    for i in range(0, images.shape[0], 50):
        batch = images[i : i + 50].to(device)
        with tf32(False), tf32_operands() if kind == "tf32-operands" else nullcontext(), \
                torch.autocast(torch.device(device).type, dtype=half or torch.bfloat16, enabled=half is not None):
            out.append(model(batch).float().cpu())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    real_deit.add_options(ap, device="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--forwards", nargs="+", default=FORWARDS, choices=FORWARDS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    _, _, held = real_deit.model_and_split(args)
    images = torch.stack([held[i][0] for i in range(len(held))])
    labels = torch.tensor([held[i][1] for i in range(len(held))])
    rows = []
    print(f"{len(held)} held-out images, {args.device}")
    print("| run | forward | top-1 | top-1 agreement with its fp32 forward | KL(fp32 ‖ this) |")
    print("|---|---|---|---|---|")
    for run_dir in args.runs:
        model = load_run(run_dir, args.device).model.eval()
        ref = forward(model, images, args.device, "fp32")
        for name in ["fp32", *args.forwards]:
            out = ref if name == "fp32" else forward(model, images, args.device, name)
            row = {"run": run_dir.name, "forward": name, "device": args.device,
                   "top1": 100 * (out.argmax(1) == labels).float().mean().item(),
                   "agreement": 100 * (out.argmax(1) == ref.argmax(1)).float().mean().item(),
                   "kl": kl_divergence(ref, out)}
            rows.append(row)
            print(f"| {row['run']} | {name} | {row['top1']:.1f} | {row['agreement']:.1f} % | {row['kl']:.4f} |",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
