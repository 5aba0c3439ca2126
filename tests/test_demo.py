"""The embedded digits demo (osqdeploy.load.demo), trained briefly into a temporary cache."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from osqdeploy.evaluation import TorchRuntime, evaluate
from osqdeploy.load import demo
from osqdeploy.load.data import ImageFiles, eval_transform
from osqdeploy.load.models import ModelSpec, load_model, read_state_dict

SHORT_EPOCHS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run shared by the tests of this file (full training takes minutes)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OSQ_CACHE", str(tmp_path_factory.mktemp("osq_cache")))
        loaded = demo.ensure_demo_model(progress=False, epochs=SHORT_EPOCHS)
        yield loaded, demo.demo_paths()


def test_data_split_is_stratified_complete_and_disjoint(trained):
    _, paths = trained
    digits = load_digits()
    train = ImageFiles(paths.train_dir)
    val = ImageFiles(paths.val_dir)
    assert (len(train), len(val)) == (1437, 360)
    train_ids = {int(p.stem) for p in train.files}
    val_ids = {int(p.stem) for p in val.files}
    assert not train_ids & val_ids and train_ids | val_ids == set(range(len(digits.target)))
    for data in (train, val):
        assert data.classes == [str(d) for d in range(10)]
        assert all(digits.target[int(p.stem)] == label for p, label in zip(data.files, data.labels, strict=True))
        counts = np.bincount(data.labels, minlength=10)
        assert counts.min() >= 0.8 * counts.mean()  # stratified: every digit well represented


def test_pngs_are_upsampled_rgb_of_the_real_digits(trained):
    _, paths = trained
    digits = load_digits()
    path = next(iter(sorted(paths.val_dir.glob("*/*.png"))))
    image = Image.open(path)
    assert image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    block_means = pixels.reshape(8, 4, 8, 4).mean(axis=(1, 3)) * 16 / 255
    original = digits.images[int(path.stem)]
    assert np.corrcoef(block_means.ravel(), original.ravel())[0, 1] > 0.9


def test_short_training_clearly_beats_chance_and_evaluator_agrees(trained):
    loaded, paths = trained
    assert loaded.source["demo"] == str(paths.weights)
    assert loaded.source["val_top1"] > 30.0  # chance is 10%
    assert len(loaded.model.blocks) == 6
    val = ImageFiles(paths.val_dir, transform=eval_transform(loaded.model))
    result = evaluate(TorchRuntime(loaded.model), val, batch_size=128, progress=False)
    assert result.top1 == pytest.approx(loaded.source["val_top1"], abs=0.01)


def test_cached_model_is_reused_not_retrained(trained, monkeypatch):
    loaded, paths = trained
    monkeypatch.setenv("OSQ_CACHE", str(paths.root.parent))

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although a matching model was cached")

    monkeypatch.setattr(demo, "train_demo_model", no_training)
    again = demo.ensure_demo_model(progress=False, epochs=SHORT_EPOCHS)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again.model(x), loaded.model(x))


def test_cache_is_keyed_by_training_settings(trained):
    loaded, paths = trained
    config = replace(demo.DemoTrainConfig(), epochs=SHORT_EPOCHS)
    assert demo._load_cached(paths, loaded.spec, config) is not None
    assert demo._load_cached(paths, loaded.spec, replace(config, epochs=SHORT_EPOCHS + 1)) is None


def test_rebuild_from_saved_spec_gives_identical_logits(trained):
    loaded, paths = trained
    meta = json.loads(paths.meta.read_text())
    spec = ModelSpec.from_dict(meta["spec"])
    rebuilt = spec.create()
    rebuilt.load_state_dict(read_state_dict(paths.weights))
    assert rebuilt.pretrained_cfg["input_size"] == (3, 32, 32)
    assert rebuilt.pretrained_cfg["crop_pct"] == 1.0 and rebuilt.pretrained_cfg["interpolation"] == "bilinear"
    assert repr(eval_transform(rebuilt)) == repr(eval_transform(loaded.model))
    val = ImageFiles(paths.val_dir, transform=eval_transform(rebuilt))
    x = torch.stack([val[i][0] for i in range(16)])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), loaded.model(x))
    # the same file also loads through the generic checkpoint path
    via_checkpoint = load_model("demo", checkpoint=paths.weights)
    with torch.no_grad():
        assert torch.equal(via_checkpoint.model(x), loaded.model(x))


def test_no_partial_files_left_behind(trained):
    _, paths = trained
    leftovers = [p.name for p in paths.root.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert {p.name for p in paths.root.iterdir()} == {"data", paths.weights.name, paths.meta.name}
    meta = json.loads(paths.meta.read_text())
    assert meta["train"]["epochs"] == SHORT_EPOCHS and meta["n_val"] == 360
