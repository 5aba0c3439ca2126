"""The ``ort-int8`` format: the same grids as the ``qdq`` file, in the integer types ONNX Runtime's CPU kernels take.

ONNX Runtime's CPU provider fuses a ``DequantizeLinear → MatMul`` pattern into its integer
kernels (``MatMulIntegerToFloat``, ``QLinearMatMul``, ``QGemm``) only for uint8 activations and
int8/uint8 weights; 4-bit ``QuantizeLinear``/``DequantizeLinear`` stay as separate nodes and the
MatMuls run in float on dequantized copies, slower than the float model. This pass rewrites a
``qdq`` ModelProto so every grid is carried in 8-bit types while every value stays the same:

* a ≤4-bit activation grid becomes a uint8 ``QuantizeLinear`` with the same scale and zero point,
  preceded by a ``Clip`` to the grid's own range ``[(0 − z)·s, (2^b − 1 − z)·s]``, so it lands on the
  same codes (the exporter already clips 5–7-bit grids that way in front of a uint8 quantizer);
* a weight's codes ``q`` with per-channel zero points ``z`` become int8 ``q − z`` with zero point 0
  (symmetric int8, the form the int8 GEMMs take without a zero-point correction) when every
  ``q − z`` lies within ±64, which holds for every ≤6-bit grid; otherwise (8-bit grids, the 8-bit
  patch embedding and head) they stay uint8 with their zero points. CPUs without VNNI sum uint8 ×
  int8 products in saturating int16 pairs, exact only up to that bound (wider int8 weights gave
  wrong logits on an AVX2-only CPU); uint8 weights take ONNX Runtime's U8U8 kernels, exact on every CPU.

* the log√2 / log2 grid of the attention probabilities, an elementwise subgraph of some twenty
  nodes over the largest tensor of the model (``Pow``, ``Where``, ``Ceil``… once per element),
  keeps its code computation (``Round(−k·log2(p/δ))``) and reads the value of each code from a
  table of its 2^b levels (``Clip → Cast`` to int32 ``→ Gather``); the table is that subgraph's own output for
  every code, computed by ONNX Runtime when the file is converted, so the values are the same.

It works on the ModelProto alone, so an existing ``qdq`` file converts without its run.
"""

from __future__ import annotations

import copy
from enum import Enum

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["FORMAT_KEY", "ExportFormat", "FormatError", "file_format", "to_ort_int8", "weight_types"]

# metadata key every osq ONNX file carries: which of the formats below it is
FORMAT_KEY = "osq_format"

# the largest int8 weight magnitude a uint8 x int8 pair sum keeps within int16 (255 * 128 = 32,640)
_EXACT_INT8 = 64
# activation zero-point types narrower than uint8 (the exporter writes ≤4-bit grids as UINT4)
_LOW_BIT = {TensorProto.UINT4, TensorProto.INT4}


class ExportFormat(str, Enum):
    """How the integer grids are stored in the ONNX file."""

    qdq = "qdq"  # packed int4 where the grid allows: smallest file, the reference
    ort_int8 = "ort-int8"  # every grid in uint8/int8: ONNX Runtime's CPU integer kernels run it


class FormatError(ValueError):
    """The graph is not an osq ``qdq`` graph this pass can convert."""


def file_format(proto: onnx.ModelProto) -> str:
    """The ``osq_format`` an osq file declares (files written before the key existed are ``qdq``)."""
    return next((p.value for p in proto.metadata_props if p.key == FORMAT_KEY), ExportFormat.qdq.value)


def weight_types(proto: onnx.ModelProto) -> dict[str, int]:
    """ONNX type name → count of the integer weight tensors (``DequantizeLinear`` inputs that are initializers)."""
    inits = {i.name: i for i in proto.graph.initializer}
    names = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    counts: dict[str, int] = {}
    for name in names:
        kind = TensorProto.DataType.Name(inits[name].data_type)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _set_format(proto: onnx.ModelProto, fmt: ExportFormat) -> None:
    kept = [p for p in proto.metadata_props if p.key != FORMAT_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=FORMAT_KEY, value=fmt.value)


def _as_int(init: TensorProto) -> np.ndarray:
    """An integer initializer's values as int32, whatever its (possibly packed 4-bit) type."""
    return numpy_helper.to_array(init).astype(np.int32)


def _grid_range(init: TensorProto) -> tuple[int, int]:
    """The integer range of an initializer's type (the saturation of its QuantizeLinear)."""
    table = {TensorProto.UINT4: (0, 15), TensorProto.UINT8: (0, 255),
             TensorProto.INT4: (-8, 7), TensorProto.INT8: (-128, 127)}
    if init.data_type not in table:
        raise FormatError(f"zero point {init.name} has ONNX type {init.data_type}, not an integer grid type")
    return table[init.data_type]


def to_ort_int8(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the osq ``qdq`` graph ``proto`` with every grid in uint8 (activations) / int8 or uint8 (weights).

    Raises :class:`FormatError` when a quantizer's scale or zero point is not an initializer (not
    a graph osq wrote) or a weight grid does not fit 8 bits.
    """
    if file_format(proto) == ExportFormat.ort_int8.value:
        return copy.deepcopy(proto)
    out = copy.deepcopy(proto)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    new_inits: list[TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    act_zero_points: set[str] = set()
    weight_nodes: list[onnx.NodeProto] = []

    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            if len(node.input) < 3 or node.input[2] not in inits:
                raise FormatError(f"weight DequantizeLinear {node.name} has no zero-point initializer")
            weight_nodes.append(node)
        elif node.op_type == "QuantizeLinear":
            x, scale_name, zp_name = (list(node.input) + ["", ""])[:3]
            if scale_name not in inits or zp_name not in inits:
                raise FormatError(f"QuantizeLinear {node.name} has a scale or zero point that is not an initializer")
            zp_init = inits[zp_name]
            if zp_init.data_type in _LOW_BIT:
                lo_code, hi_code = _grid_range(zp_init)
                if lo_code < 0:
                    raise FormatError(f"activation zero point {zp_name} is signed; osq writes unsigned grids")
                scale = numpy_helper.to_array(inits[scale_name]).astype(np.float32)
                zp = _as_int(zp_init).astype(np.float32)
                base = f"{node.name or node.output[0]}.grid"
                # float32 bounds of the grid, computed as the dequantizer computes a value: (q − z)·s
                lo = ((np.float32(lo_code) - zp) * scale).astype(np.float32)
                hi = ((np.float32(hi_code) - zp) * scale).astype(np.float32)
                new_inits += [numpy_helper.from_array(lo, f"{base}_min"), numpy_helper.from_array(hi, f"{base}_max")]
                clipped = f"{base}_clipped"
                new_nodes.append(helper.make_node("Clip", [x, f"{base}_min", f"{base}_max"], [clipped],
                                                  name=f"{base}_clip"))
                node.input[0] = clipped
                act_zero_points.add(zp_name)
        new_nodes.append(node)

    # weights first: they read the original zero points, which the exporter may share between layers
    converted: dict[str, str] = {}  # codes initializer -> its new zero point's name
    for node in weight_nodes:
        codes_name, zp_name = node.input[0], node.input[2]
        if zp_name in act_zero_points:
            raise FormatError(f"{node.name}: a weight and an activation share the zero point {zp_name}")
        if codes_name not in converted:
            new_zp_name = f"{codes_name}.zero_point_8bit"
            codes_init = inits[codes_name]
            codes, new_zp = _weight_codes(_as_int(codes_init), _as_int(inits[zp_name]), _axis(node), codes_name)
            codes_init.CopyFrom(numpy_helper.from_array(codes, codes_name))
            new_inits.append(numpy_helper.from_array(new_zp, new_zp_name))
            converted[codes_name] = new_zp_name
        node.input[2] = converted[codes_name]

    for name in act_zero_points:
        init = inits[name]
        init.CopyFrom(numpy_helper.from_array(_as_int(init).astype(np.uint8), name))

    used = {i for n in new_nodes for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    del graph.value_info[:]  # types changed; the checker re-infers them
    _log_grids_as_tables(out)
    _set_format(out, ExportFormat.ort_int8)
    onnx.checker.check_model(out)
    return out


def _axis(node: onnx.NodeProto) -> int:
    return int(next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1))


def _weight_codes(codes: np.ndarray, zp: np.ndarray, axis: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes and zero points with the values of ``(codes − zp)`` along ``axis``, in the type the CPU sums exactly.

    int8 and symmetric (``codes − zp``, zero point 0) when every value is within ±64; otherwise
    (wider grids, 8-bit ones always) uint8 with its zero points. x86 CPUs without VNNI multiply
    uint8 activations by int8 weights in pairs summed into int16 (``vpmaddubsw``), which saturates
    once two weights of a pair together exceed 128 in magnitude; uint8 weights take a kernel
    that widens first, exact on every CPU.
    """
    shape = [1] * codes.ndim
    shape[axis] = -1
    centred = codes - zp.reshape(shape)
    if centred.min() >= -_EXACT_INT8 and centred.max() <= _EXACT_INT8:
        return centred.astype(np.int8), np.zeros(zp.shape, np.int8)
    if codes.min() < 0 or codes.max() > 255 or zp.min() < 0 or zp.max() > 255:
        raise FormatError(f"weight {name} does not fit an 8-bit grid")
    return codes.astype(np.uint8), zp.astype(np.uint8)


def _log_grids_as_tables(proto: onnx.ModelProto) -> int:
    """Replace each log-grid value subgraph (``Round`` → … → ``Where``) by a table lookup; returns how many.

    The exporter writes ``fake_quantize_log`` as codes ``Round(−k·log2(p/δ))``, then a
    ``GreaterOrEqual(codes, 2^b)`` underflow test and the level's value, joined by a ``Where``.
    Codes are clipped to ``[0, 2^b]`` (``2^b``: underflow, value 0) and looked up.
    """
    import onnxruntime as ort

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    replaced = 0
    drop: set[int] = set()
    added: dict[int, list[onnx.NodeProto]] = {}  # insert after the node at this position
    position = {id(n): i for i, n in enumerate(graph.node)}
    for rnd in [n for n in graph.node if n.op_type == "Round"]:
        code = rnd.output[0]
        ge = [n for n in consumers.get(code, []) if n.op_type == "GreaterOrEqual"]
        if len(ge) != 1 or ge[0].input[1] not in inits:
            continue
        where = [n for n in consumers.get(ge[0].output[0], []) if n.op_type == "Where"]
        if len(where) != 1:
            continue
        levels = int(numpy_helper.to_array(inits[ge[0].input[1]]).reshape(()))
        body = _between(code, where[0], producer)
        if body is None or any(o in {x.name for x in graph.output} for n in body for o in n.output):
            continue
        outside = {o for n in body for o in n.output} - {where[0].output[0]}
        if any(c not in body for o in outside for c in consumers.get(o, [])):
            continue  # an intermediate value is used elsewhere: leave the subgraph alone
        table = _evaluate(body, code, where[0].output[0], inits, levels, ort)
        base = f"{code}.level_table"
        graph.initializer.extend([
            numpy_helper.from_array(table, base),
            numpy_helper.from_array(np.array(0, np.float32), f"{base}_lo"),
            numpy_helper.from_array(np.array(levels, np.float32), f"{base}_hi"),
        ])
        lookup = [
            helper.make_node("Clip", [code, f"{base}_lo", f"{base}_hi"], [f"{base}_code"], name=f"{base}_clip"),
            # int32 indices: ONNX Runtime's CPU Gather runs about 1.8x faster on them than on int64
            helper.make_node("Cast", [f"{base}_code"], [f"{base}_index"], to=TensorProto.INT32, name=f"{base}_cast"),
            helper.make_node("Gather", [base, f"{base}_index"], [where[0].output[0]], axis=0, name=f"{base}_gather"),
        ]
        added[position[id(rnd)]] = lookup
        drop |= {id(n) for n in body}
        replaced += 1
    nodes = []
    for i, n in enumerate(graph.node):
        if id(n) not in drop:
            nodes.append(n)
        nodes += added.get(i, [])
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return replaced


def _between(start: str, end: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> list[onnx.NodeProto] | None:
    """The nodes ``end`` depends on that depend on ``start`` (``end`` included), or None if it reaches a graph input."""
    memo: dict[str, bool] = {}

    def reaches(name: str) -> bool:
        if name == start:
            return True
        if name not in memo:
            node = producer.get(name)
            memo[name] = node is not None and any(reaches(i) for i in node.input if i)
        return memo[name]

    body, stack, seen = [], [end], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        body.append(node)
        stack += [producer[i] for i in node.input if i and i != start and reaches(i)]
    return body


def _evaluate(body: list[onnx.NodeProto], code: str, value: str, inits: dict[str, TensorProto], levels: int,
              ort) -> np.ndarray:
    """The subgraph's value for codes 0 … 2^b (the last one: underflow), computed by ONNX Runtime."""
    needed = {i for n in body for i in n.input} - {o for n in body for o in n.output} - {code, ""}
    sub = helper.make_graph(
        body, "log_grid",
        [helper.make_tensor_value_info(code, TensorProto.FLOAT, [levels + 1])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, None)],
        initializer=[inits[n] for n in needed if n in inits],
    )
    if needed - set(inits):
        raise FormatError(f"the log-grid subgraph after {code} reads values that are not initializers")
    model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (table,) = sess.run(None, {code: np.arange(levels + 1, dtype=np.float32)})
    return table.astype(np.float32).reshape(levels + 1)
