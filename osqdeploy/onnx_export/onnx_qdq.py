"""Saved run → QDQ ONNX that ONNX Runtime executes with the run's exact grids.

torch's exporter traces the deployed fake-quant model in ``QuantMode.EXPORT``; the two custom
ops of ``quant.kernels`` become ``QuantizeLinear→DequantizeLinear`` (activations) and per-channel
``DequantizeLinear`` of integer initializers (weights). The tracer only knows 8-bit integer
types, so a pass over the graph then retypes every ≤4-bit initializer to UINT4 (opset 21),
found by the module path of its quantizer, which torch keeps as the initializer's name. The
log-grid quantizer of the attention probabilities is an explicit elementwise subgraph.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxscript import opset21 as op
from torch import nn

from .. import __version__
from ..quant.layers import quant_layers
from ..quant.mode import QuantMode, quant_mode
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from ..run import store
from .ort_int8 import FORMAT_KEY, ExportFormat, to_ort_int8, weight_types

if TYPE_CHECKING:
    from ..api import Run

OPSET = 21
MAX_IR_VERSION = 10  # ONNX Runtime refuses newer IR versions


class ExportError(RuntimeError):
    """The exported graph failed a check; nothing was written."""


def _qdq(x, scale, zero_point):
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)


def _dequantize_weight(q, scale, zero_point, axis: int):
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


TRANSLATIONS = {
    torch.ops.osqdeploy.qdq.default: _qdq,
    torch.ops.osqdeploy.dequantize_weight.default: _dequantize_weight,
}


@dataclass
class ExportInfo:
    path: str
    bytes: int
    w_bits: int
    a_bits: int
    qdq_pairs: int
    act_quantizers: int
    weight_initializers: dict[str, int]  # ONNX type name -> count
    dynamic_batch: bool
    opset: int = OPSET
    format: str = ExportFormat.qdq.value

    def to_dict(self) -> dict:
        return asdict(self)


def _bit_table(model: nn.Module) -> dict[str, int]:
    """Initializer name → bit-width, for every integer tensor the exporter writes."""
    table: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer):
            table[f"{name}.zero_point_int"] = m.bits
        elif isinstance(m, WeightQuantizer):
            table[f"{name}.w_int_export"] = m.bits
            table[f"{name}.zero_point_int"] = m.bits
    return table


def _retype_low_bit(proto: onnx.ModelProto, bits: dict[str, int]) -> dict[str, int]:
    """Store ≤4-bit codes as UINT4 initializers; returns counts of weight initializer types."""
    counts: dict[str, int] = {}
    for i, init in enumerate(proto.graph.initializer):
        b = bits.get(init.name)
        if b is None:
            continue
        arr = numpy_helper.to_array(init)
        if arr.dtype != np.uint8:
            raise ExportError(f"initializer {init.name} has type {arr.dtype}, expected uint8 codes")
        if arr.size and int(arr.max()) >= 2**b:
            raise ExportError(f"initializer {init.name} holds codes beyond {b} bits")
        if b <= 4:
            new = numpy_helper.from_array(arr.astype(ml_dtypes.uint4), init.name)
            proto.graph.initializer[i].CopyFrom(new)
        if init.name.endswith("w_int_export"):
            kind = "UINT4" if b <= 4 else "UINT8"
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _check_shared_types(proto: onnx.ModelProto, bits: dict[str, int]) -> None:
    """Every Q/DQ node's zero point must be one of ours (no merged constants of other widths)."""
    names = {init.name for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = node.input[2] if len(node.input) > 2 else ""
            if zp not in bits or zp not in names:
                raise ExportError(f"{node.op_type} node {node.name} has a zero point {zp!r} osq did not write")


def _strip_trace_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and scopes: they outweigh 4-bit weights."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """The image size the architecture was built for (timm's patch embedding knows it)."""
    h, w = model.patch_embed.img_size
    return (3, h, w)


def export_model(run: Run, out: str | Path, batch_size: int | None = None, verify: bool = True,
                 format: ExportFormat | str = ExportFormat.qdq) -> ExportInfo:
    """Write ``run``'s deployed model as QDQ ONNX at ``out`` (atomically; checked before rename).

    ``batch_size=None`` exports a dynamic batch axis; an integer fixes it. ``format``: ``qdq``
    (≤4-bit grids packed as int4) or ``ort-int8`` (the same grids in uint8/int8, which ONNX
    Runtime's CPU provider runs as integer kernels; see ``ort_int8``).
    """
    fmt = ExportFormat(format)
    out = Path(out)
    model = copy.deepcopy(run.model).cpu().eval()
    for layer in quant_layers([model]):
        layer.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # integers replace it
    size = input_size(model)
    example = torch.randn(batch_size or 2, *size)
    dynamic = batch_size is None
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
    with quant_mode(model, QuantMode.EXPORT), torch.no_grad():
        try:
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=OPSET,
                custom_translation_table=TRANSLATIONS,
                dynamic_shapes=dynamic_shapes,
                input_names=["image"],
                output_names=["logits"],
                verbose=False,
            )
        except Exception as e:  # the exporter wraps failures in many types
            raise ExportError(f"torch could not export the model: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    proto = program.model_proto
    bits = _bit_table(model)
    counts = _retype_low_bit(proto, bits)
    _check_shared_types(proto, bits)
    del proto.graph.value_info[:]  # types changed; the checker re-infers them
    _strip_trace_metadata(proto)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    w_bits, a_bits = run.bits
    meta = {
        "osq_version": __version__,
        "run_state_sha256": run.manifest.state_sha256 or "",
        "w_bits": str(w_bits),
        "a_bits": str(a_bits),
        "plan": run.manifest.plan.spec,
        "model": run.manifest.model.timm_name,
        FORMAT_KEY: ExportFormat.qdq.value,
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    if fmt is ExportFormat.ort_int8:
        proto = to_ort_int8(proto)
        counts = weight_types(proto)
    try:
        onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except Exception as e:
        raise ExportError(f"exported graph failed the ONNX checker: {e}") from None

    n_qdq = sum(1 for n in proto.graph.node if n.op_type == "QuantizeLinear")
    n_act = sum(1 for m in model.modules() if isinstance(m, ActQuantizer) and m.mode is QuantMode.NEAREST)
    with store.atomic_output(out) as tmp:  # OSError -> OutputError naming ``out``; nothing half-written
        onnx.save_model(proto, str(tmp))
        if verify:
            _verify_with_ort(str(tmp), model, example)
    return ExportInfo(
        path=str(out),
        bytes=out.stat().st_size,
        w_bits=w_bits,
        a_bits=a_bits,
        qdq_pairs=n_qdq,
        act_quantizers=n_act,
        weight_initializers=counts,
        dynamic_batch=dynamic,
        format=fmt.value,
    )


def _verify_with_ort(path: str, model: nn.Module, example: torch.Tensor) -> None:
    """Load in ONNX Runtime and run once before the file is declared written."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})[0]
    except Exception as e:
        raise ExportError(f"ONNX Runtime could not run the exported graph: {e}") from None
    with torch.no_grad():
        ref = model(example).numpy()
    if got.shape != ref.shape or not np.isfinite(got).all():
        raise ExportError(f"ONNX Runtime output has shape {got.shape} / non-finite values; expected {ref.shape}")


def float_export(model: nn.Module, out: str | Path) -> int:
    """Plain float ONNX of a timm model (the size and speed baseline); returns its size in bytes."""
    example = torch.randn(2, *input_size(model))
    program = torch.onnx.export(
        model.eval(), (example,), dynamo=True, opset_version=OPSET,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        input_names=["image"], output_names=["logits"], verbose=False,
    )
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    _strip_trace_metadata(proto)
    with store.atomic_output(out) as tmp:
        onnx.save_model(proto, str(tmp))
    return Path(out).stat().st_size
