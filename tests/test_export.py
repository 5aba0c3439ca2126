"""QDQ ONNX export: ONNX Runtime computes what the fake-quant model computes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from osqdeploy.api import calibrate, load_run
from osqdeploy.api import export as export_run
from osqdeploy.config import CalibrationConfig, QuantConfig
from osqdeploy.onnx_export.onnx_qdq import float_export
from osqdeploy.quant.quantizers import ActQuantizer

from conftest import images, loaded_tiny

pytestmark = pytest.mark.long_file

SIZES = {"vit": 32, "swin": 56}


@pytest.fixture(scope="module", params=[("vit", 4), ("vit", 6), ("vit", 8), ("swin", 4), ("swin", 6), ("swin", 8)],
                ids=lambda p: f"{p[0]}-w{p[1]}a{p[1]}")
def exported(request, tmp_path_factory):
    kind, bits = request.param
    loaded = loaded_tiny(kind)
    run_dir = tmp_path_factory.mktemp(f"{kind}{bits}") / "run"
    calib = images(32, SIZES[kind])
    calibrate(loaded, calib, QuantConfig(bits, bits), CalibrationConfig(samples=32, batch_size=16, iters=20), run_dir)
    out = run_dir.parent / "model.onnx"
    info = export_run(run_dir, out)
    return kind, bits, run_dir, out, info


def test_onnxruntime_agrees_with_fake_quant(exported):
    kind, bits, run_dir, path, _ = exported
    run = load_run(run_dir)
    x = images(128, SIZES[kind], seed=11)
    with torch.no_grad():
        ref = run.model(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})[0]
    agreement = (got.argmax(1) == ref.argmax(1)).mean()
    # One near-tie may flip: on the tiny W4A4 ViT an image whose top-2 logits are 0.04 % of the
    # logit range apart does, under a largest deviation of 0.24 % of it.
    assert agreement >= 0.99
    # Bound: exact integer grids on both sides; what differs is float rounding inside LayerNorm,
    # GELU, softmax and the matmuls. An ulp-level difference can move a value across a rounding
    # boundary of an 8-bit grid (one step), which then propagates: a few percent of the logit
    # range at most, never the size of the quantization error itself.
    assert np.abs(got - ref).max() <= 0.03 * (ref.max() - ref.min())


def test_weights_are_stored_as_integers_of_their_bit_width(exported):
    kind, bits, run_dir, path, info = exported
    model = onnx.load(str(path))
    weight_types = {i.name: i.data_type for i in model.graph.initializer if i.name.endswith("w_int_export")}
    assert weight_types
    for name, dtype in weight_types.items():
        edge = name.startswith(("patch_embed", "head"))  # 8-bit edges
        expected = TensorProto.UINT4 if (bits <= 4 and not edge) else TensorProto.UINT8
        assert dtype == expected, name
    # no float copy of a quantized weight travels along
    quantized = {n.removesuffix(".weight_quantizer.w_int_export") for n in weight_types}
    float_names = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    assert not any(f"{q}.weight" in float_names for q in quantized)


def test_one_qdq_pair_per_activation_quantizer(exported):
    kind, bits, run_dir, path, info = exported
    model = onnx.load(str(path))
    n_q = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    n_dq_act = sum(n.op_type == "DequantizeLinear" and "w_int" not in n.input[0] for n in model.graph.node)
    n_quantizers = sum(isinstance(m, ActQuantizer) for m in load_run(run_dir).model.modules())
    assert n_q == n_dq_act == n_quantizers == info.qdq_pairs
    assert model.ir_version <= 10 and any(o.version == 21 for o in model.opset_import if o.domain == "")


def test_w4_file_is_a_fraction_of_the_float_export(tmp_path):
    loaded = loaded_tiny("vit", embed_dim=128, depth=4, num_heads=2)
    float_size = float_export(loaded.model, tmp_path / "float.onnx")
    run_dir = tmp_path / "run"
    calibrate(loaded, images(16, 32), QuantConfig(4, 4), CalibrationConfig(samples=16, batch_size=16, iters=0), run_dir)
    info = export_run(run_dir, tmp_path / "w4.onnx")
    assert info.bytes <= 0.2 * float_size


def test_fixed_batch_export(tmp_path):
    run_dir = tmp_path / "run"
    calibrate(loaded_tiny("vit"), images(16, 32), QuantConfig(4, 4), CalibrationConfig(samples=16, iters=0), run_dir)
    info = export_run(run_dir, tmp_path / "b3.onnx", batch_size=3)
    sess = ort.InferenceSession(str(tmp_path / "b3.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == 3 and not info.dynamic_batch
