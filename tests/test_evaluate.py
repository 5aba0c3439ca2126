"""Runtimes, evaluation, parity and reports (osqdeploy.evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from osqdeploy.evaluation import (
    EvalResult,
    OnnxRuntime,
    RuntimeLoadError,
    TorchRuntime,
    evaluate,
    parity,
    write_report,
)
from osqdeploy.load.data import ImageFiles, eval_transform

TINY = dict(
    img_size=32,
    patch_size=8,
    depth=2,
    embed_dim=64,
    num_heads=2,
    num_classes=10,
    pretrained_cfg_overlay=dict(input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear"),
)
N_CLASSES, PER_CLASS = 10, 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **TINY).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(N_CLASSES):
        (root / f"class_{c}").mkdir()
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def dataset(model, folder):
    return ImageFiles(folder, transform=eval_transform(model))


def _export(model: torch.nn.Module, path: Path, batch: int, dynamic: bool) -> Path:
    x = torch.randn(batch, 3, 32, 32)
    shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic else None
    torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=21, dynamic_shapes=shapes)
    return path


@pytest.fixture(scope="module")
def onnx_dynamic(model, tmp_path_factory):
    return _export(model, tmp_path_factory.mktemp("onnx") / "dynamic.onnx", batch=2, dynamic=True)


@pytest.fixture(scope="module")
def onnx_fixed(model, tmp_path_factory):
    return _export(model, tmp_path_factory.mktemp("onnx") / "fixed.onnx", batch=4, dynamic=False)


# ----------------------------------------------------------------------------------------- torch


def test_torch_runtime_keeps_logits_and_labels_in_order(model, dataset):
    result = evaluate(TorchRuntime(model), dataset, batch_size=8, progress=False)
    assert result.runtime == "torch-fp32" and result.n == N_CLASSES * PER_CLASS
    assert result.logits.shape == (result.n, N_CLASSES) and result.logits.dtype == torch.float32
    assert result.labels.tolist() == dataset.labels
    x = torch.stack([dataset[i][0] for i in range(result.n)])
    with torch.no_grad():
        assert torch.allclose(result.logits, model(x), atol=1e-5)
    assert 0.0 <= result.top1 <= result.top5 <= 100.0 and result.images_per_s > 0


class _Oracle:
    """Reads the label hidden in pixel (0, 0, 0); ranks ``label + shift`` first, the class after it second."""

    name = "oracle"

    def __init__(self, shift: int = 0) -> None:
        self.shift = shift

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        label = batch[:, 0, 0, 0].long()
        first = (label + self.shift) % N_CLASSES
        logits = torch.full((len(batch), N_CLASSES), -1.0)
        logits[torch.arange(len(batch)), label] = -5.0  # last, unless placed first or second below
        logits[torch.arange(len(batch)), first] = 2.0
        logits[torch.arange(len(batch)), (first + 1) % N_CLASSES] = 1.0
        return logits


def test_accuracy_arithmetic():
    labels = torch.arange(30) % N_CLASSES
    images = torch.zeros(30, 3, 4, 4)
    images[:, 0, 0, 0] = labels.float()
    data = TensorDataset(images, labels)  # any (image, label) dataset works, not just ImageFiles
    perfect = evaluate(_Oracle(), data, batch_size=8, progress=False)
    assert (perfect.top1, perfect.top5) == (100.0, 100.0)
    second = evaluate(_Oracle(shift=-1), data, batch_size=8, progress=False)
    assert (second.top1, second.top5) == (0.0, 100.0)
    wrong = evaluate(_Oracle(shift=3), data, batch_size=8, progress=False)
    assert (wrong.top1, wrong.top5) == (0.0, 0.0)
    assert torch.equal(wrong.labels, labels)


def test_limit_spreads_over_the_dataset(model, dataset):
    result = evaluate(TorchRuntime(model), dataset, batch_size=4, progress=False, limit=5)
    assert result.n == 5 and len(set(result.labels.tolist())) == 5


def test_unlabeled_data_has_no_accuracy(model, folder, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(folder.glob("*/*.png"))[:6]:
        (flat / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    data = ImageFiles(flat, transform=eval_transform(model))
    result = evaluate(TorchRuntime(model), data, batch_size=4, progress=False)
    assert result.n == 6 and result.top1 is None and result.top5 is None


# ------------------------------------------------------------------------------------------ onnx


def test_onnx_matches_torch(model, dataset, onnx_dynamic):
    runtime = OnnxRuntime(onnx_dynamic, provider="cpu")
    assert runtime.provider == "CPUExecutionProvider" and runtime.fixed_batch is None
    reference = evaluate(TorchRuntime(model), dataset, batch_size=8, progress=False)
    result = evaluate(runtime, dataset, batch_size=8, progress=False)
    report = parity(reference, result)
    assert report.top1_agreement == 100.0
    assert report.max_abs_logit_diff < 1e-4
    assert report.top1_a == report.top1_b == reference.top1


def test_onnx_fixed_batch_is_chunked_and_padded(model, dataset, onnx_fixed):
    runtime = OnnxRuntime(onnx_fixed, provider="auto")
    assert runtime.fixed_batch == 4
    reference = evaluate(TorchRuntime(model), dataset, batch_size=7, progress=False)  # 7,7,6: never 4
    result = evaluate(runtime, dataset, batch_size=7, progress=False)
    assert parity(reference, result).max_abs_logit_diff < 1e-4


def test_auto_provider_picks_what_is_available(onnx_dynamic):
    runtime = OnnxRuntime(onnx_dynamic)
    expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else None
    assert runtime.provider == (expected or "CPUExecutionProvider")
    assert runtime.name == ("onnx-cuda" if expected else "onnx-cpu")


def test_cuda_provider_is_asked_for_full_fp32_unless_tf32_is_wanted(monkeypatch):
    from osqdeploy.evaluation import runtimes

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    # device_id: each rank of a sharded evaluation on its own GPU (torch's current device; 0 here)
    assert runtimes._providers("cuda") == [
        ("CUDAExecutionProvider", {"use_tf32": "0", "device_id": "0"}), "CPUExecutionProvider"
    ]
    assert runtimes._providers("auto", tf32=True)[0] == ("CUDAExecutionProvider", {"use_tf32": "1", "device_id": "0"})
    assert runtimes._providers("cpu") == ["CPUExecutionProvider"]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA provider is available here")
def test_cuda_provider_unavailable_is_a_clear_error(onnx_dynamic):
    with pytest.raises(RuntimeLoadError, match="onnxruntime-gpu"):
        OnnxRuntime(onnx_dynamic, provider="cuda")


@pytest.mark.parametrize("kind", ["missing", "garbage", "truncated", "empty"])
def test_bad_onnx_files_raise_runtime_load_error(tmp_path, onnx_dynamic, kind):
    path = tmp_path / "model.onnx"
    if kind == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        data = onnx_dynamic.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(RuntimeLoadError) as info:
        OnnxRuntime(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------- reports


def test_parity_refuses_different_inputs(model, dataset):
    full = evaluate(TorchRuntime(model), dataset, batch_size=8, progress=False)
    part = evaluate(TorchRuntime(model), dataset, batch_size=8, progress=False, limit=5)
    with pytest.raises(ValueError, match="cannot compare"):
        parity(full, part)


def test_parity_kl_divergence_is_kl_of_a_from_b_predictions(model, dataset):
    a = evaluate(TorchRuntime(model), dataset, batch_size=8, progress=False)
    assert parity(a, a).kl_divergence == pytest.approx(0.0, abs=1e-7)
    torch.manual_seed(0)
    other = a.logits + torch.randn_like(a.logits)
    b = EvalResult("other", a.n, a.top1, a.top5, 1.0, other, a.labels.clone())
    p, q = a.logits.softmax(1), other.softmax(1)
    expected = float((p * (p.log() - q.log())).sum(1).mean())  # KL(a||b) per input, averaged
    assert parity(a, b).kl_divergence == pytest.approx(expected, rel=1e-5)
    assert parity(b, a).kl_divergence != pytest.approx(expected, rel=1e-3)  # not symmetric


def test_report_json(model, dataset, tmp_path):
    a = evaluate(TorchRuntime(model), dataset, batch_size=8, progress=False)
    noisy = a.logits + 0.01
    b = EvalResult("noisy", a.n, a.top1, a.top5, 1.0, noisy, a.labels.clone())
    report = parity(a, b)
    assert report.top1_agreement == 100.0
    assert report.max_abs_logit_diff == pytest.approx(0.01, abs=1e-6)
    assert report.mean_abs_logit_diff == pytest.approx(0.01, abs=1e-6)
    path = write_report(tmp_path / "out" / "eval.json", [a, b], report, {"model": "tiny", "seed": 0})
    data = json.loads(path.read_text())
    assert data["model"] == "tiny" and [r["runtime"] for r in data["results"]] == ["torch-fp32", "noisy"]
    assert data["results"][0]["top1"] == a.top1 and data["parity"]["top1_agreement"] == 100.0
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temporary file left
    with pytest.raises(ValueError, match="results"):
        write_report(path, [a], None, {"results": []})


def test_flat_imagenet_folder_evaluates_with_imagenet_labels(tmp_path, imagenet_sample):
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=16, depth=1, num_classes=1000)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 64, 64)}
    data = ImageFiles(imagenet_sample, transform=eval_transform(model), max_files=8)
    result = evaluate(TorchRuntime(model), data, batch_size=4, progress=False)
    assert result.n == 8 and result.labels.tolist() == data.labels
    assert all(label % 2 == 0 for label in data.labels) and result.top1 is not None


def test_ulp_perturbation_moves_each_layer_output_by_at_most_one_ulp_and_is_seeded():
    from osqdeploy.evaluation import UlpPerturbed

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32))
    x = torch.randn(8, 16)
    exact = TorchRuntime(net)(x)
    a = UlpPerturbed(TorchRuntime(net), seed=3)(x)
    assert torch.equal(a, UlpPerturbed(TorchRuntime(net), seed=3)(x))
    assert not torch.equal(a, UlpPerturbed(TorchRuntime(net), seed=4)(x))
    up = torch.nextafter(exact, torch.full_like(exact, torch.inf))
    down = torch.nextafter(exact, torch.full_like(exact, -torch.inf))
    assert bool(((a == exact) | (a == up) | (a == down)).all())
    assert 0.5 < (a != exact).float().mean().item() < 0.8  # two thirds move, one way or the other
    assert not net[0]._forward_hooks  # the hooks are gone after the call
    assert torch.equal(TorchRuntime(net)(x), exact)


def test_ulp_perturbation_refuses_runtimes_it_cannot_reach(onnx_dynamic):
    from osqdeploy.evaluation import UlpPerturbed

    with pytest.raises(TypeError, match="TorchRuntime"):
        UlpPerturbed(OnnxRuntime(onnx_dynamic, provider="cpu"), seed=0)


def test_sensitivity_releases_each_role_and_block_and_restores_the_model():
    import copy as _copy

    from osqdeploy.adapters import adapter_for
    from osqdeploy.config import CalibrationConfig, QuantConfig
    from osqdeploy.evaluation.sensitivity import activation_sites, sensitivity
    from osqdeploy.plan import build_plan
    from osqdeploy.quant.mode import QuantMode, quant_mode
    from osqdeploy.reconstruct import Reconstructor, prepare_model

    from conftest import images as _images
    from conftest import tiny_vit as _tiny_vit

    fp = _tiny_vit(depth=2)
    q = _copy.deepcopy(fp)
    adapter = prepare_model(q, QuantConfig(4, 4), adapter_for)
    x = _images(48, 32)
    rec = Reconstructor(q, adapter, build_plan("auto", adapter.units(q)), CalibrationConfig(samples=48, iters=0),
                        torch.device("cpu"))
    rec.initialize(x)
    rec.reconstruct(x)
    q.eval()
    with torch.no_grad():
        labels = fp(x).argmax(1)  # the float model's answers: the quantized one loses some
        before = q(x)
    data = torch.utils.data.TensorDataset(x, labels)

    sites = activation_sites(q)
    assert {"attn.qkv.input_quantizer", "mlp.fc2.input_quantizer"} <= set(sites)
    assert [b for b, _, _ in sites["mlp.fc2.input_quantizer"]] == ["blocks.0", "blocks.1"]
    rows = sensitivity(q, data, progress=False)
    base, rest = rows[0], rows[1:]
    assert base.kind == "baseline" and base.n == 48
    assert {r.released for r in rest if r.kind == "block"} == {"blocks.0", "blocks.1"}
    assert {r.released for r in rest if r.kind == "role"} == set(sites)
    assert [r.delta_cross_entropy for r in rest] == sorted((r.delta_cross_entropy for r in rest), reverse=True)

    # a row is exactly the evaluation with those quantizers off
    fc2 = next(r for r in rest if r.released == "mlp.fc2.input_quantizer")
    with quant_mode([m for _, _, m in sites["mlp.fc2.input_quantizer"]], QuantMode.FLOAT), torch.no_grad():
        ce = torch.nn.functional.cross_entropy(q(x), labels).item()
    assert fc2.cross_entropy == pytest.approx(ce, rel=1e-5)
    assert fc2.delta_cross_entropy == pytest.approx(base.cross_entropy - ce, rel=1e-4, abs=1e-7)
    assert any(abs(r.delta_cross_entropy) > 1e-4 for r in rest)  # releasing quantizers changes the answer
    with torch.no_grad():
        assert torch.equal(q(x), before)  # every quantizer is back on


def test_ulp_perturbation_of_chosen_inputs_moves_only_those():
    from osqdeploy.evaluation import UlpPerturbed

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    exact = TorchRuntime(net)(x)
    seen = []
    net[1].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))  # sees the nudged input
    out = UlpPerturbed(TorchRuntime(net), seed=1, inputs_of=[net[1]])(x)
    hidden = net[0](x).detach()
    nudged = seen[-1]
    up = torch.nextafter(hidden, torch.full_like(hidden, torch.inf))
    down = torch.nextafter(hidden, torch.full_like(hidden, -torch.inf))
    assert bool(((nudged == hidden) | (nudged == up) | (nudged == down)).all()) and not torch.equal(nudged, hidden)
    assert torch.equal(out, net[1](nudged).detach())  # the layer's own output is not nudged
    assert not torch.equal(out, exact)
    assert not net[1]._forward_pre_hooks  # the nudging hooks are gone after the call
