"""Per-layer parity: where an exported ONNX file and the PyTorch fake-quant model part ways.

Logit parity says *that* a deployed model disagrees with the framework; this says *where*. The
ONNX file is run with every activation quantizer's ``DequantizeLinear`` output (and the input of
its ``QuantizeLinear``) exposed as graph outputs, the fake-quant model with a forward hook on every
uniform activation quantizer, on the same images. Per quantizer, in execution order:

* ``mismatch_fraction`` — values on a different grid step in the two runs (what reached it
  differs, or the quantizer itself does);
* ``mean_step_diff`` / ``max_step_diff`` — how far apart, in steps of that quantizer's grid;
* ``own_mismatch_fraction`` — values the ONNX quantizer put on another step than the fake-quant
  grid puts the *same* ONNX input: non-zero only where the quantizer itself differs (a wrong scale
  or zero point, another rounding), never from differences it inherited;
* ``same_grid`` — the ONNX quantizer's scale and zero point are those of the PyTorch module.

The first quantizer whose mismatch exceeds ``threshold`` names the block where the two diverge.
Float summation order alone moves a few values across rounding boundaries at any quantizer (see
``UlpPerturbed``), which is what the threshold is for. Quantizers are matched in execution order:
the exporter writes the graph in the order the model runs, and the log-grid attention quantizer
(an elementwise subgraph, no ``QuantizeLinear``) is left out on both sides.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from osqdeploy.adapters.attention import QuantMatMulAttention
from osqdeploy.load.data import spread_indices
from osqdeploy.quant import primitives as P
from osqdeploy.quant.mode import QuantMode
from osqdeploy.quant.quantizers import ActQuantizer

__all__ = ["LayerParityRow", "PerLayerReport", "QuantizerTap", "per_layer_parity", "per_layer_table", "taps"]

_INDEX = re.compile(r"^(.*\.\d+)\.(.+)$")  # "<container>.<i>.<rest>": the last numbered path


def block_of(name: str) -> str:
    """The block a module path belongs to ("blocks.3", "layers.2.blocks.1"), or the path itself outside blocks."""
    match = _INDEX.match(name)
    return match.group(1) if match else name


@dataclass
class LayerParityRow:
    """One activation quantizer's agreement between the ONNX file and the fake-quant model."""

    index: int  # execution order among the uniform activation quantizers
    quantizer: str  # module path in the PyTorch model
    block: str
    bits: int
    values: int  # values compared (over all images)
    mismatch_fraction: float
    mean_step_diff: float  # mean |Δ| in grid steps, over all values
    max_step_diff: int
    own_mismatch_fraction: float
    same_grid: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PerLayerReport:
    """Rows in execution order and where the two runs first part ways (None: nowhere above threshold)."""

    onnx: str
    n_images: int
    threshold: float
    rows: list[LayerParityRow] = field(default_factory=list)
    first_divergent_quantizer: str | None = None
    first_divergent_block: str | None = None
    # the first quantizer that itself computes another grid (own mismatch above threshold or another grid)
    first_own_divergence: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "rows"}, "rows": [r.to_dict() for r in self.rows]}


@dataclass(frozen=True)
class QuantizerTap:
    """One activation QuantizeLinear→DequantizeLinear pair of an ONNX graph, in graph order."""

    quantize_input: str
    dequantize_output: str
    scale: float
    zero_point: int


def taps(proto: onnx.ModelProto) -> list[QuantizerTap]:
    """The activation quantizers of an osq graph (each ``QuantizeLinear`` and the ``DequantizeLinear`` it feeds).

    Graph order is the order the model computes them in, for graphs ``torch.onnx`` wrote.
    """
    inits = {i.name: i for i in proto.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        dq = [n for n in consumers.get(node.output[0], []) if n.op_type == "DequantizeLinear"]
        if len(dq) != 1:
            raise ValueError(f"QuantizeLinear {node.name} feeds {len(dq)} DequantizeLinear nodes, expected one")
        scale_name, zp_name = dq[0].input[1], dq[0].input[2] if len(dq[0].input) > 2 else ""
        if scale_name not in inits or zp_name not in inits:
            raise ValueError(f"DequantizeLinear {dq[0].name} has a scale or zero point that is not an initializer")
        scale = numpy_helper.to_array(inits[scale_name])
        zp = numpy_helper.to_array(inits[zp_name])
        if scale.size != 1 or zp.size != 1:
            raise ValueError(f"activation quantizer {node.name} is not per-tensor")
        found.append(QuantizerTap(node.input[0], dq[0].output[0], float(scale.reshape(())), int(zp.reshape(()))))
    return found


def _exposed(proto: onnx.ModelProto, tapped: Sequence[QuantizerTap]) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph outputs also carry every tap's quantizer input and output."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    present = {o.name for o in out.graph.output}
    for t in tapped:
        for name in (t.quantize_input, t.dequantize_output):
            if name not in present:
                out.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
                present.add(name)
    return out


@contextmanager
def _unfused_attention(model: nn.Module) -> Iterator[None]:
    """Route attention through its per-quantizer ``forward`` (same arithmetic) so every quantizer's hook fires."""
    cores = [m for m in model.modules() if isinstance(m, QuantMatMulAttention)]
    for m in cores:
        m.fusable = lambda: False
    try:
        yield
    finally:
        for m in cores:
            del m.fusable  # the class's method again


def _quantizers(model: nn.Module) -> dict[nn.Module, str]:
    return {m: name for name, m in model.named_modules() if isinstance(m, ActQuantizer) and m.mode is QuantMode.NEAREST}


def _batches(images: torch.Tensor | Dataset, batch_size: int, limit: int | None) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        data = images[:limit] if limit is not None else images
        yield from data.split(batch_size)
        return
    if limit is not None and limit < len(images):
        images = Subset(images, spread_indices(len(images), limit))
    for batch in DataLoader(images, batch_size=batch_size, shuffle=False):
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


class _Acc:
    """Running sums of one quantizer's comparison."""

    def __init__(self) -> None:
        self.values = self.mismatched = self.own_mismatched = self.max_steps = 0
        self.steps = 0.0


def per_layer_parity(
    model: nn.Module,
    onnx_path: str | Path,
    images: torch.Tensor | Dataset,
    batch_size: int = 16,
    limit: int | None = None,
    threshold: float = 0.01,
    provider: str = "cpu",
) -> PerLayerReport:
    """Compare every activation quantizer of ``onnx_path`` with the fake-quant ``model`` on ``images``.

    ``model`` is the run's fake-quant model (``load_run(...).model``), evaluated on the CPU in fp32;
    ``images`` a tensor ``[N, 3, H, W]`` or a dataset of (image, label). ``provider`` picks ONNX
    Runtime's execution provider ("cpu" or "cuda").
    """
    proto = onnx.load(str(onnx_path))
    tapped = taps(proto)
    model = model.eval().cpu()
    names = _quantizers(model)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(_exposed(proto, tapped).SerializeToString(), providers=providers)
    input_name = sess.get_inputs()[0].name
    wanted = [t.dequantize_output for t in tapped] + [t.quantize_input for t in tapped]

    calls: list[tuple[nn.Module, torch.Tensor]] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        calls.append((module, output.detach()))

    handles = [m.register_forward_hook(hook) for m in names]
    order: list[nn.Module] | None = None
    accs: list[_Acc] = []
    n_images = 0
    try:
        with _unfused_attention(model), torch.no_grad():
            for batch in _batches(images, batch_size, limit):
                calls.clear()
                model(batch.float())
                got = dict(zip(wanted, sess.run(wanted, {input_name: batch.numpy().astype(np.float32)}),
                               strict=True))
                if order is None:
                    order = [m for m, _ in calls]
                    if len(order) != len(tapped):
                        raise ValueError(
                            f"{onnx_path} has {len(tapped)} activation quantizers, the model ran {len(order)}: "
                            "is it the export of this run?"
                        )
                    accs = [_Acc() for _ in tapped]
                for acc, t, (module, ref) in zip(accs, tapped, calls, strict=True):
                    _accumulate(acc, module, ref, got[t.dequantize_output], got[t.quantize_input])
                n_images += len(batch)
    finally:
        for h in handles:
            h.remove()
    if order is None:
        raise ValueError("no images to compare on")

    rows = []
    for i, (acc, t, module) in enumerate(zip(accs, tapped, order, strict=True)):
        same = bool(np.float32(t.scale) == np.float32(module.scale.item()) and t.zero_point == round(
            module.zero_point.item()))
        rows.append(LayerParityRow(
            index=i, quantizer=names[module], block=block_of(names[module]), bits=module.bits, values=acc.values,
            mismatch_fraction=acc.mismatched / max(acc.values, 1), mean_step_diff=acc.steps / max(acc.values, 1),
            max_step_diff=acc.max_steps, own_mismatch_fraction=acc.own_mismatched / max(acc.values, 1),
            same_grid=same,
        ))
    report = PerLayerReport(onnx=str(onnx_path), n_images=n_images, threshold=threshold, rows=rows)
    first = next((r for r in rows if r.mismatch_fraction > threshold), None)
    if first is not None:
        report.first_divergent_quantizer, report.first_divergent_block = first.quantizer, first.block
    own = next((r for r in rows if r.own_mismatch_fraction > threshold or not r.same_grid), None)
    report.first_own_divergence = own.quantizer if own is not None else None
    return report


def _accumulate(acc: _Acc, module: ActQuantizer, ref: torch.Tensor, onnx_out: np.ndarray,
                onnx_in: np.ndarray) -> None:
    out = torch.from_numpy(onnx_out)
    if out.numel() != ref.numel():
        raise ValueError(f"quantizer output sizes differ: ONNX {tuple(out.shape)}, PyTorch {tuple(ref.shape)}")
    out = out.reshape(ref.shape)
    scale = module.scale.detach().float()
    steps = torch.round((out - ref.float()) / scale).abs()
    own_ref = P.fake_quantize_uniform(torch.from_numpy(onnx_in).float(), scale, module.zero_point.float(), module.bits)
    own = torch.round((torch.from_numpy(onnx_out).float() - own_ref.reshape(onnx_out.shape)) / scale) != 0
    acc.values += steps.numel()
    acc.mismatched += int((steps != 0).sum())
    acc.steps += float(steps.sum())
    acc.max_steps = max(acc.max_steps, int(steps.max()) if steps.numel() else 0)
    acc.own_mismatched += int(own.sum())


def per_layer_table(report: PerLayerReport, only_mismatched: bool = False) -> Table:
    """A rich table of the rows; the first divergent one is marked."""
    table = Table(title=f"Per-layer parity: {Path(report.onnx).name} vs fake-quant ({report.n_images} images)",
                  title_justify="left")
    for col in ("#", "quantizer", "bits", "off-grid %", "mean Δsteps", "max Δ", "own %", "grid"):
        table.add_column(col, justify="left" if col == "quantizer" else "right")
    for r in report.rows:
        if only_mismatched and r.mismatch_fraction == 0 and r.same_grid:
            continue
        mark = " ◀" if r.quantizer == report.first_divergent_quantizer else ""
        table.add_row(str(r.index), r.quantizer + mark, str(r.bits), f"{100 * r.mismatch_fraction:.3f}",
                      f"{r.mean_step_diff:.4f}", str(r.max_step_diff), f"{100 * r.own_mismatch_fraction:.3f}",
                      "same" if r.same_grid else "DIFFERS")
    if report.first_divergent_block is not None:
        table.caption = (f"first divergence above {100 * report.threshold:g} % of values: "
                         f"{report.first_divergent_quantizer} (block {report.first_divergent_block})")
    else:
        table.caption = f"no quantizer has more than {100 * report.threshold:g} % of its values on another step"
    return table
