"""The ort-int8 format: the qdq file's grids in 8-bit types, fused by ONNX Runtime's CPU provider."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from osqdeploy.api import calibrate
from osqdeploy.api import export as export_run
from osqdeploy.config import CalibrationConfig, QuantConfig
from osqdeploy.evaluation.throughput import compare_speed, graph_census, speed_table
from osqdeploy.onnx_export.ort_int8 import ExportFormat, FormatError, file_format, to_ort_int8, weight_types

from conftest import images, loaded_tiny

DEPTH = 2
# the W4A8 / W8A8 pairs int8 hardware runs, beside the paper's W4A4
BITS = [(4, 4), (4, 8), (8, 8)]


@pytest.fixture(scope="module", params=BITS, ids=lambda b: f"w{b[0]}a{b[1]}")
def pair(request, tmp_path_factory):
    """(bits, qdq path, ort-int8 path) of a tiny ViT calibrated by round-to-nearest."""
    w, a = request.param
    tmp = tmp_path_factory.mktemp(f"w{w}a{a}")
    calibrate(loaded_tiny("vit", depth=DEPTH), images(16, 32), QuantConfig(w, a),
              CalibrationConfig(samples=16, batch_size=16, iters=0), tmp / "run")
    qdq = tmp / "qdq.onnx"
    export_run(tmp / "run", qdq)
    fast = tmp / "fast.onnx"
    onnx.save(to_ort_int8(onnx.load(str(qdq))), str(fast))
    return (w, a), qdq, fast


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]


def test_fast_file_computes_what_the_qdq_file_computes(pair):
    (w, _), qdq, fast = pair
    x = images(64, 32, seed=7).numpy()
    ref, got = _run(qdq, x), _run(fast, x)
    if w == 8:
        # 8-bit weights sit in 8-bit types in both files: ONNX Runtime runs the same integer kernels on
        # the same codes, so the logits are the same bits (the log-grid table included)
        np.testing.assert_array_equal(ref, got)
    # Same grid values on both sides; only float summation order differs (integer kernels against
    # float MatMuls on dequantized weights), so an activation at a rounding boundary may move one step.
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 63 / 64
    assert np.abs(ref - got).max() <= 0.01 * (ref.max() - ref.min())
    assert np.median(np.abs(ref - got)) <= 1e-4 * (ref.max() - ref.min())


def test_weights_dequantize_to_the_same_values(pair):
    (w, _), qdq, fast = pair
    a, b = onnx.load(str(qdq)), onnx.load(str(fast))
    assert sum(weight_types(b).values()) == sum(weight_types(a).values())
    assert set(weight_types(b)) <= {"INT8", "UINT8"}
    if w == 4:  # the block layers in int8; the 8-bit patch embedding and head in uint8
        assert weight_types(b)["INT8"] == 4 * DEPTH

    def dequantized(proto, symmetric: bool):
        inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        out = {}
        for n in proto.graph.node:
            if n.op_type == "DequantizeLinear" and n.input[0] in inits:
                axis = next((helper.get_attribute_value(t) for t in n.attribute if t.name == "axis"), 1)
                q, s, z = (inits[n.input[i]] for i in range(3))
                shape = [1] * q.ndim
                shape[axis] = -1
                out[n.input[0]] = (q.astype(np.float32) - z.astype(np.float32).reshape(shape)) * s.reshape(shape)
                if symmetric and q.dtype == np.int8:
                    assert not z.any(), "int8 weights are symmetric"
                    # no pair of them can overflow a uint8 x int8 pair sum in int16 (CPUs without VNNI)
                    assert np.abs(q.astype(np.int32)).max() <= 64, n.input[0]
        return out

    ref, got = dequantized(a, False), dequantized(b, True)
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_array_equal(ref[name], got[name], err_msg=name)


def test_weight_grids_wider_than_the_exact_int8_range_stay_uint8():
    # x86 CPUs without VNNI sum uint8 x int8 products in int16 pairs: |w| <= 64 is exact there,
    # so a 7-bit grid centred within that range goes to int8 and any wider one keeps uint8.
    from osqdeploy.onnx_export.ort_int8 import _weight_codes

    zp = np.array([64, 64], np.int64)
    narrow = np.array([[0, 128], [10, 100]])  # centred values -64 … 64
    codes, z = _weight_codes(narrow, zp, 0, "w")
    assert codes.dtype == np.int8 and not z.any() and (codes == narrow - 64).all()
    wide = np.array([[0, 255], [10, 100]])  # 191 above the zero point
    codes, z = _weight_codes(wide, zp, 0, "w")
    assert codes.dtype == np.uint8 and z.dtype == np.uint8 and (codes == wide).all() and (z == zp).all()
    with pytest.raises(FormatError, match="8-bit"):
        _weight_codes(np.array([[0, 300]]), np.array([0]), 0, "w")


def test_onnxruntime_fuses_the_fast_file_into_integer_kernels(pair):
    (w, a), qdq, fast = pair
    fused = graph_census(fast)
    # every block Linear (qkv, proj, fc1, fc2) and the q·kᵀ product
    assert fused.ops.get("MatMulIntegerToFloat", 0) >= 5 * DEPTH
    assert "MatMul" not in fused.ops or fused.ops["MatMul"] <= DEPTH  # only probabilities · v̂ stays float
    if (w, a) == (4, 4):  # int4 QDQ is not fused: dequantize, then float MatMuls
        plain = graph_census(qdq)
        assert plain.integer_kernels == 0 and plain.dequantize > fused.dequantize


def test_metadata_names_the_format(pair):
    _, qdq, fast = pair
    assert file_format(onnx.load(str(qdq))) == "qdq"
    assert file_format(onnx.load(str(fast))) == "ort-int8"
    # converting twice changes nothing
    again = to_ort_int8(onnx.load(str(fast)))
    assert again.SerializeToString() == onnx.load(str(fast)).SerializeToString()


def test_export_writes_the_fast_format(tmp_path):
    calibrate(loaded_tiny("vit", depth=DEPTH), images(16, 32), QuantConfig(4, 8),
              CalibrationConfig(samples=16, batch_size=16, iters=0), tmp_path / "run")
    info = export_run(tmp_path / "run", tmp_path / "fast.onnx", format="ort-int8")
    assert info.format == ExportFormat.ort_int8.value
    # W4A8: the block layers' 4-bit codes as int8, the 8-bit patch embedding and head as uint8
    assert info.weight_initializers == {"INT8": 4 * DEPTH, "UINT8": 2}
    assert file_format(onnx.load(str(tmp_path / "fast.onnx"))) == "ort-int8"
    rows = compare_speed({"fast": tmp_path / "fast.onnx"}, batch_sizes=(1, 4), seconds=0.05, min_runs=2)
    assert [r.batch for r in rows] == [1, 4] and all(r.images_per_s > 0 for r in rows)
    assert rows[0].provider == "CPUExecutionProvider" and rows[0].census.integer_kernels >= 5 * DEPTH
    assert speed_table(rows, baseline="fast").row_count == 2


def test_a_graph_osq_did_not_write_is_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s"], ["y"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x, s], [y]))
    with pytest.raises(FormatError, match="not an initializer"):
        to_ort_int8(proto)


def test_cli_convert_and_speed(pair, tmp_path):
    import typer
    from typer.testing import CliRunner

    from cli import deploy

    app = typer.Typer()
    app.command("convert")(deploy.convert)
    app.command("speed")(deploy.speed)
    runner = CliRunner()
    _, qdq, _ = pair
    target = tmp_path / "fast.onnx"
    result = runner.invoke(app, ["convert", str(qdq), "--out", str(target)])
    assert result.exit_code == 0, result.output
    assert file_format(onnx.load(str(target))) == "ort-int8"
    result = runner.invoke(app, ["speed", str(qdq), str(target), "--batch", "2", "--seconds", "0.01",
                                 "--report", str(tmp_path / "speed.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "speed.json").read_text())
    assert [r["label"] for r in rows] == ["qdq.onnx", "fast.onnx"] and rows[1]["census"]["integer_kernels"] > 0
    assert runner.invoke(app, ["convert", str(tmp_path / "missing.onnx")]).exit_code == 2


@pytest.mark.parametrize("bits", [(4, 8), (8, 8)], ids=["w4a8", "w8a8"])
def test_uniform_attention_grid_leaves_no_float_attention_work(bits, tmp_path):
    """attn_grid="uniform": the probabilities get one QuantizeLinear, so every matmul is an integer kernel."""
    import torch

    from osqdeploy.api import load_run

    w, a = bits
    calibrate(loaded_tiny("vit", depth=DEPTH), images(16, 32), QuantConfig(w, a, attn_grid="uniform"),
              CalibrationConfig(samples=16, batch_size=16, iters=0), tmp_path / "run")
    qdq, fast = tmp_path / "qdq.onnx", tmp_path / "fast.onnx"
    export_run(tmp_path / "run", qdq)
    onnx.save(to_ort_int8(onnx.load(str(qdq))), str(fast))
    fused = graph_census(fast)
    assert "Log" not in fused.ops and "Gather" not in fused.ops
    assert "MatMul" not in fused.ops and fused.integer_kernels >= 6 * DEPTH  # probabilities · v̂ too
    x = images(64, 32, seed=7)
    ref, got = _run(qdq, x.numpy()), _run(fast, x.numpy())
    if w == 8:
        np.testing.assert_array_equal(ref, got)
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 63 / 64
    # and the file computes what the fake-quant model computes
    with torch.no_grad():
        fq = load_run(tmp_path / "run").model(x).numpy()
    assert (fq.argmax(1) == ref.argmax(1)).mean() >= 62 / 64
    assert np.median(np.abs(fq - ref)) <= 1e-3 * (fq.max() - fq.min())


def test_unknown_attention_grid_is_refused():
    from osqdeploy.config import ConfigError

    with pytest.raises(ConfigError, match="attn_grid"):
        QuantConfig(attn_grid="cubic").validate()


@pytest.mark.parametrize("grid", [pytest.param("channel", marks=pytest.mark.slow), "hadamard"])
def test_post_gelu_grids_export_and_run_in_both_formats(tmp_path, grid):
    """post_gelu_grid="channel" adds a multiply-add per block before fc2's QuantizeLinear,
    "hadamard" a block rotation (a float MatMul) and an Add; both files still compute what the
    fake-quant model computes, and ORT still fuses fc2."""
    import torch

    from osqdeploy.api import load_run
    from osqdeploy.config import ConfigError

    calibrate(loaded_tiny("vit", depth=DEPTH), images(16, 32), QuantConfig(8, 8, post_gelu_grid=grid),
              CalibrationConfig(samples=16, batch_size=16, iters=0), tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run.manifest.quant.post_gelu_grid == grid
    qdq, fast = tmp_path / "qdq.onnx", tmp_path / "fast.onnx"
    export_run(tmp_path / "run", qdq)
    onnx.save(to_ort_int8(onnx.load(str(qdq))), str(fast))
    x = images(64, 32, seed=7)
    ref, got = _run(qdq, x.numpy()), _run(fast, x.numpy())
    np.testing.assert_array_equal(ref, got)  # W8A8: the same integer kernels
    with torch.no_grad():
        fq = run.model(x).numpy()
    assert (fq.argmax(1) == ref.argmax(1)).mean() >= 62 / 64
    assert graph_census(fast).integer_kernels >= 4 * DEPTH
    with pytest.raises(ConfigError, match="post_gelu_grid"):
        QuantConfig(post_gelu_grid="head").validate()
