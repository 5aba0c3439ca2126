"""Per-layer parity names the block where an ONNX file stops computing what the fake-quant model computes."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from rich.console import Console

from osqdeploy.api import calibrate, load_run
from osqdeploy.api import export as export_run
from osqdeploy.config import CalibrationConfig, QuantConfig
from osqdeploy.evaluation.per_layer import block_of, per_layer_parity, per_layer_table, taps
from osqdeploy.onnx_export.ort_int8 import to_ort_int8
from osqdeploy.quant.mode import QuantMode, quant_mode

from conftest import images, loaded_tiny

PLANTED = "blocks.1.mlp.fc1.input_quantizer"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("per_layer")
    calibrate(loaded_tiny("vit", depth=3), images(16, 32), QuantConfig(4, 4),
              CalibrationConfig(samples=16, batch_size=16, iters=0), tmp / "run")
    export_run(tmp / "run", tmp / "model.onnx")
    return load_run(tmp / "run").model, tmp / "model.onnx"


def _plant_one_step(src, dst, index: int) -> None:
    """Shift the zero point of the ``index``-th quantizer's DequantizeLinear by one: every value one step lower."""
    proto = onnx.load(str(src))
    tap = taps(proto)[index]
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == tap.dequantize_output)
    old = next(i for i in proto.graph.initializer if i.name == dq.input[2])
    arr = numpy_helper.to_array(old)
    shifted = numpy_helper.from_array((arr.astype(np.int32) + 1).astype(arr.dtype), "planted_zero_point")
    proto.graph.initializer.append(shifted)
    dq.input[2] = "planted_zero_point"  # its own initializer: the exporter shares equal zero points
    onnx.save(proto, str(dst))


def test_export_agrees_quantizer_by_quantizer(exported):
    model, path = exported
    report = per_layer_parity(model, path, images(8, 32, seed=3))
    assert report.n_images == 8 and report.first_divergent_block is None and report.first_own_divergence is None
    assert len(report.rows) == 2 + 3 * 7  # patch embedding, head, and qkv, q, k, v, proj, fc1, fc2 per block
    assert all(r.same_grid and r.own_mismatch_fraction == 0 for r in report.rows)
    assert report.rows[0].quantizer == "patch_embed.proj.input_quantizer" and report.rows[0].mismatch_fraction == 0


def test_planted_disagreement_is_found_in_its_block(exported, tmp_path):
    model, path = exported
    names = [r.quantizer for r in per_layer_parity(model, path, images(2, 32)).rows]
    planted = tmp_path / "planted.onnx"
    _plant_one_step(path, planted, names.index(PLANTED))
    report = per_layer_parity(model, planted, images(8, 32, seed=3))
    assert report.first_divergent_quantizer == PLANTED and report.first_divergent_block == "blocks.1"
    assert report.first_own_divergence == PLANTED
    row = report.rows[names.index(PLANTED)]
    assert not row.same_grid and row.mismatch_fraction > 0.5 and row.max_step_diff >= 1
    assert 0.5 < row.mean_step_diff <= 1.0  # one step wherever the grid does not clip
    assert all(r.mismatch_fraction <= report.threshold for r in report.rows[: row.index])
    json.dumps(report.to_dict())  # the JSON report's rows
    console = Console(record=True, width=160)
    console.print(per_layer_table(report))
    text = console.export_text()
    assert PLANTED in text and "DIFFERS" in text


def test_fast_format_keeps_every_grid(exported, tmp_path):
    model, path = exported
    fast = tmp_path / "fast.onnx"
    onnx.save(to_ort_int8(onnx.load(str(path))), str(fast))
    report = per_layer_parity(model, fast, images(8, 32, seed=3))
    assert all(r.same_grid and r.own_mismatch_fraction == 0 for r in report.rows)
    assert report.first_divergent_block is None


def test_a_file_of_another_model_is_refused(exported):
    model, path = exported
    quantizer = model.get_submodule(PLANTED)
    # the model now runs one quantizer fewer than the file holds
    with quant_mode(quantizer, QuantMode.FLOAT), pytest.raises(ValueError, match="is it the export of this run"):
        per_layer_parity(model, path, images(2, 32))


def test_block_names():
    assert block_of("blocks.3.attn.qkv.input_quantizer") == "blocks.3"
    assert block_of("layers.2.blocks.1.mlp.fc2.input_quantizer") == "layers.2.blocks.1"
    assert block_of("head.input_quantizer") == "head.input_quantizer"
