"""Which activation quantizers cost accuracy: evaluate a quantized model with one kind (or one
block) of them switched back to float at a time.

When a target is missed, this says *which quantizer and which block* are responsible. The
per-group reconstruction losses say where the output drifts but not what causes it; releasing a
set of quantizers and measuring the change is the direct answer. Cross-entropy on the labels is
reported next to top-1 because it moves smoothly where top-1 on a few hundred images moves in
steps of whole images. Only activation quantizers are released: a saved run holds integer
weights, not the float ones, so weight rounding cannot be undone from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from osqdeploy.evaluation.evaluator import evaluate
from osqdeploy.evaluation.runtimes import TorchRuntime
from osqdeploy.quant.layers import ACT_QUANTIZERS
from osqdeploy.quant.mode import QuantMode, quant_mode

__all__ = ["SensitivityRow", "activation_sites", "sensitivity"]

_INDEX = re.compile(r"^(.*\.\d+)\.(.+)$")  # "<container>.<i>.<rest>": the last numbered path


def activation_sites(model: nn.Module) -> dict[str, list[tuple[str, str, nn.Module]]]:
    """Activation quantizers keyed by role, as (block, role, module).

    The role is the quantizer's path inside its block ("attn.qkv.input_quantizer"), the block is
    the path up to the last numbered container ("blocks.3", "layers.2.blocks.1"); quantizers
    outside any block (patch embedding, head) are their own role and block.
    """
    sites: dict[str, list[tuple[str, str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, ACT_QUANTIZERS):
            continue
        match = _INDEX.match(name)
        block, role = (match.group(1), match.group(2)) if match else (name, name)
        sites.setdefault(role, []).append((block, role, module))
    return sites


@dataclass
class SensitivityRow:
    released: str  # what was switched back to float ("(none)" for the quantized baseline)
    kind: str  # "baseline" | "role" | "block"
    count: int  # quantizers released
    n: int  # images evaluated
    top1: float
    cross_entropy: float
    delta_top1: float  # gain over the baseline, points
    delta_cross_entropy: float  # gain over the baseline (positive = releasing it helps)


def sensitivity(
    model: nn.Module,
    dataset: Dataset,
    device: str | torch.device = "cpu",
    by: tuple[str, ...] = ("role", "block"),
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = True,
) -> list[SensitivityRow]:
    """Baseline, then one row per role and/or per block with those activation quantizers released.

    The model is left as it was found. Rows after the baseline are sorted by how much releasing
    them lowers the cross-entropy, most first.
    """
    runtime = TorchRuntime(model, device=device, name="torch-quant")
    sites = [s for group in activation_sites(model).values() for s in group]
    enabled = [s for s in sites if s[2].mode is QuantMode.NEAREST]
    if not enabled:
        raise ValueError("the model has no enabled activation quantizers (is it a calibrated run?)")

    def measure(label: str) -> tuple[int, float, float]:
        runtime.name = label
        res = evaluate(runtime, dataset, batch_size=batch_size, progress=progress, limit=limit)
        if res.top1 is None:
            raise ValueError("sensitivity needs labelled images (class folders or WordNet-id file names)")
        return res.n, res.top1, float(F.cross_entropy(res.logits, res.labels))

    n, base_top1, base_ce = measure("torch-quant")
    rows = [SensitivityRow("(none)", "baseline", 0, n, base_top1, base_ce, 0.0, 0.0)]
    groups: list[tuple[str, str, list[nn.Module]]] = []
    if "role" in by:
        roles: dict[str, list[nn.Module]] = {}
        for _, role, module in enabled:
            roles.setdefault(role, []).append(module)
        groups += [("role", role, mods) for role, mods in roles.items()]
    if "block" in by:
        blocks: dict[str, list[nn.Module]] = {}
        for block, role, module in enabled:
            if block != role:  # quantizers outside blocks already have their role row
                blocks.setdefault(block, []).append(module)
        groups += [("block", block, mods) for block, mods in blocks.items()]
    for kind, label, mods in groups:
        with quant_mode(mods, QuantMode.FLOAT):
            _, top1, ce = measure(f"float {label}")
        rows.append(SensitivityRow(label, kind, len(mods), n, top1, ce, top1 - base_top1, base_ce - ce))
    rows[1:] = sorted(rows[1:], key=lambda r: -r.delta_cross_entropy)
    return rows
