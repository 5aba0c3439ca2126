"""Where two ONNX files of one run part ways: activation codes that differ, quantizer by quantizer.

The ``ort-int8`` file carries the ``qdq`` file's grids value for value, but ONNX Runtime runs its
MatMuls as integer kernels (exact int32 sums, then one float scale) where the ``qdq`` file runs
float MatMuls on dequantized values (float32 sums in the GEMM's order). Every activation
quantizer after the first MatMul therefore sees inputs that differ in the last bits; a value
within that distance of a rounding threshold lands on the neighbouring code, and the flip travels
into every later block. This prints, per activation quantizer in graph order (uniform grids and
the attention probabilities' log grid), the fraction of codes that differ between the two files
on the same images, so one can tell a first divergence (a bug: codes differ where the inputs are
identical) from accumulated summation-order flips (a few per million at the first MatMul, growing
downstream).

    python -m benchmarks.ort_code_flips run.qdq.onnx run.ort-int8.onnx --images DIR --limit 25
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from osqdeploy.load.data import ImageFiles, eval_transform
from osqdeploy.load.models import load_model

_LEVELS = {TensorProto.UINT4: 15, TensorProto.UINT8: 255, TensorProto.INT4: 15, TensorProto.INT8: 255}


def quantizers(proto: onnx.ModelProto) -> list[tuple[str, str, float, int, int]]:
    """(name, tensor holding the codes' source, scale, zero point, levels) per activation quantizer, graph order.

    Uniform grids: the float input of the ``QuantizeLinear`` (codes recomputed from it); log grids:
    the ``Round`` output that holds the codes (scale 0 marks it).
    """
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    found = []
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            x = node.input[0]
            while x in producer and producer[x].op_type == "Clip" and producer[x].name.endswith(".grid_clip"):
                x = producer[x].input[0]  # the ort-int8 file's clip to the narrow grid: compare what enters it
            zp = inits[node.input[2]]
            scale = float(numpy_helper.to_array(inits[node.input[1]]).reshape(()))
            found.append((node.name or node.output[0], x, scale, int(numpy_helper.to_array(zp).reshape(())),
                          _LEVELS[zp.data_type]))
        elif node.op_type == "Round":
            found.append((node.name or node.output[0], node.output[0], 0.0, 0, 0))
    return found


def _codes(x: np.ndarray, scale: float, zp: int, levels: int, narrow: int | None) -> np.ndarray:
    if scale == 0.0:
        return x
    hi = levels if narrow is None else narrow
    return np.clip(np.rint(x / np.float32(scale)) + zp, 0, hi)


def _session(proto: onnx.ModelProto, names: list[str]) -> ort.InferenceSession:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    present = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                for n in dict.fromkeys(names) if n not in present)
    return ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path, help="the qdq file")
    ap.add_argument("candidate", type=Path, help="the ort-int8 file of the same run")
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--model", default="deit_t", help="recipe whose data transform the images take")
    ap.add_argument("--limit", type=int, default=25)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    ref_proto, cand_proto = onnx.load(str(args.reference)), onnx.load(str(args.candidate))
    rq, cq = quantizers(ref_proto), quantizers(cand_proto)
    if [q[0] for q in rq] != [q[0] for q in cq]:
        raise SystemExit("the two files do not have the same activation quantizers in the same order")
    # the reference's narrow grids (4-bit zero points) bound the candidate's uint8 codes the same way
    narrow = {q[0]: q[4] for q in rq}
    names = [q[1] for q in rq]
    ref_sess, cand_sess = _session(ref_proto, names), _session(cand_proto, [q[1] for q in cq])
    input_name = ref_sess.get_inputs()[0].name
    data = ImageFiles(args.images, transform=eval_transform(load_model(args.model, pretrained=False).model))
    data = data.split(0.5, seed=0)[1]  # the held-out half, as benchmarks/ort_accuracy.py evaluates
    images = torch.stack([data[i][0] for i in range(min(args.limit, len(data)))]).numpy()
    differ = np.zeros(len(rq))
    total = np.zeros(len(rq))
    agree = 0
    for begin in range(0, len(images), args.batch):
        x = images[begin:begin + args.batch]
        ref_out = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, {input_name: x}), strict=True))
        cand_out = dict(zip([o.name for o in cand_sess.get_outputs()], cand_sess.run(None, {input_name: x}),
                            strict=True))
        logits = ref_sess.get_outputs()[0].name
        agree += int((ref_out[logits].argmax(1) == cand_out[logits].argmax(1)).sum())
        for i, ((name, src, s, z, lv), (_, csrc, _, _, _)) in enumerate(zip(rq, cq, strict=True)):
            a = _codes(ref_out[src], s, z, lv, narrow[name])
            b = _codes(cand_out[csrc], s, z, lv, narrow[name])
            differ[i] += float((a != b).sum())
            total[i] += a.size
    table = Table(title=f"codes that differ, {len(images)} images (top-1 agreement {100 * agree / len(images):.1f} %)",
                  title_justify="left")
    for col in ("#", "quantizer", "grid", "differ ppm"):
        table.add_column(col, justify="right" if col in ("#", "differ ppm") else "left")
    rows = []
    for i, (name, _, s, _, _) in enumerate(rq):
        grid = "log" if s == 0.0 else f"{int(np.log2(narrow[name] + 1))}-bit"
        ppm = 1e6 * differ[i] / max(total[i], 1)
        rows.append({"index": i, "quantizer": name, "grid": grid, "differ_ppm": ppm, "values": int(total[i])})
        table.add_row(str(i), name, grid, f"{ppm:.1f}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"top1_agreement": 100 * agree / len(images), "images": len(images),
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
