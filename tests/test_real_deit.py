"""The real-checkpoint path end to end: real DeiT-Tiny weights, real ImageNet images.

A handful of images and a few iterations: this checks the workflow and that nothing in it breaks
a real network, not the accuracy of the full schedule (benchmarks/deit_tiny_accuracy.py does that).
"""

import pytest

from osqdeploy.api import calibrate, load_run
from osqdeploy.api import export as export_run
from osqdeploy.config import CalibrationConfig, QuantConfig
from osqdeploy.evaluation import OnnxRuntime, TorchRuntime, evaluate, parity
from osqdeploy.load.data import ImageFiles, calibration_tensor, eval_transform
from osqdeploy.load.models import load_model

pytestmark = pytest.mark.long_file


def test_real_deit_tiny_w8a8_end_to_end(tmp_path, deit_tiny_weights, imagenet_sample):
    loaded = load_model("deit_t", checkpoint=deit_tiny_weights)
    data = ImageFiles(imagenet_sample, transform=eval_transform(loaded.model), max_files=96)
    calib_set, eval_set = data.split(eval_fraction=0.5, seed=0)
    assert not set(calib_set.files) & set(eval_set.files)
    calib = calibration_tensor(calib_set, 16, seed=0)
    run_dir = tmp_path / "run"
    ccfg = CalibrationConfig(samples=16, batch_size=8, iters=2, granularity="auto")
    manifest = calibrate(loaded, calib, QuantConfig(8, 8), ccfg, run_dir).manifest
    assert manifest.plan.spec == "blocks:3" and len(manifest.groups) == 4
    # the real model has the outlier channels the paper describes
    assert max(b["ratio_to_median"] for b in manifest.outliers) > 5

    run = load_run(run_dir)
    quant = evaluate(TorchRuntime(run.model, name="torch-quant"), eval_set, batch_size=16, progress=False)
    onnx_path = tmp_path / "deit_t_w8a8.onnx"
    export_run(run_dir, onnx_path)
    ort_res = evaluate(OnnxRuntime(onnx_path, provider="cpu"), eval_set, batch_size=16, progress=False)
    assert quant.top1 > 50  # 1000 classes: chance is 0.1%
    report = parity(quant, ort_res)
    assert report.top1_agreement >= 90
    assert abs(quant.top1 - ort_res.top1) <= 5
