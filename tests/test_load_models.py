"""Recipes, model specs and checkpoint loading (osqdeploy.load.models)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import timm
import torch

from osqdeploy.load.data import ImageFiles, eval_transform, spread_indices
from osqdeploy.load.models import (
    CheckpointError,
    ModelSpec,
    RecipeError,
    UnknownModelError,
    WeightsUnavailableError,
    _parse_recipe,
    list_recipes,
    load_model,
    resolve_recipe,
)

TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=2, num_classes=10)


def _tiny(**overrides):
    return load_model("vit_tiny_patch16_224", pretrained=False, model_kwargs={**TINY, **overrides})


def _logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------------------------------- recipes


def test_every_recipe_names_a_real_timm_model():
    recipes = {r.name: r for r in list_recipes()}
    expected = {
        "vit_s": ("vit_small_patch16_224", "vit"),
        "vit_b": ("vit_base_patch16_224", "vit"),
        "deit_t": ("deit_tiny_patch16_224", "vit"),
        "deit_s": ("deit_small_patch16_224", "vit"),
        "deit_b": ("deit_base_patch16_224", "vit"),
        "swin_t": ("swin_tiny_patch4_window7_224", "swin"),
        "swin_s": ("swin_small_patch4_window7_224", "swin"),
        "swin_b": ("swin_base_patch4_window7_224", "swin"),
        "demo": ("vit_tiny_patch16_224", "vit"),
    }
    assert set(recipes) == set(expected)
    for name, (timm_name, family) in expected.items():
        r = recipes[name]
        assert (r.timm_name, r.family) == (timm_name, family)
        assert timm.is_model(r.timm_name)
        assert (r.w_bits, r.a_bits) == (4, 4)
        # Algorithm 1's plan unless the model's own measurement chose another
        assert r.granularity == ("blocks:4" if name == "deit_t" else "auto")
        assert {(4, 8), (8, 8)} <= set(r.bit_pairs), "W4A8 and W8A8 are first-class pairs of every recipe"


@pytest.mark.parametrize(("bits", "pairs"), [
    ([4, 4], [(4, 4)]),
    ([[8, 8], [4, 8]], [(8, 8), (4, 8)]),
])
def test_recipe_bits_is_a_pair_or_a_list_of_pairs_first_is_default(bits, pairs):
    data = {"name": "x", "timm_name": "vit_tiny_patch16_224", "family": "vit", "bits": bits}
    r = _parse_recipe(data, "x.toml")
    assert r.bit_pairs == pairs and (r.w_bits, r.a_bits) == pairs[0]
    assert _parse_recipe(r.to_dict(), "round trip").bit_pairs == pairs


@pytest.mark.parametrize("bits", [[], [4], [[4, 4], [4, 4]], [[4, 16]], [[4, 4.0]], "w4a4"])
def test_recipe_bits_refused(bits):
    data = {"name": "x", "timm_name": "vit_tiny_patch16_224", "family": "vit", "bits": bits}
    with pytest.raises(RecipeError, match="bits"):
        _parse_recipe(data, "x.toml")


def test_demo_recipe_has_two_groups_of_three_blocks():
    model = load_model("demo", pretrained=False).model
    assert len(model.blocks) == 6
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model.num_classes == 10


@pytest.mark.parametrize("name", ["deit_t", "DeiT-T", "deit_tiny", " deit_tiny_patch16_224 "])
def test_resolve_by_name_alias_or_timm_name(name):
    assert resolve_recipe(name).name == "deit_t"


def test_resolve_keeps_a_pretrained_tag():
    r = resolve_recipe("deit_tiny_patch16_224.fb_in1k")
    assert r.name == "deit_t" and r.timm_name == "deit_tiny_patch16_224.fb_in1k"


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"])
def test_the_timm_name_the_demo_reshapes_is_timms_own_model_not_the_demo(name):
    r = resolve_recipe(name)
    assert r.name != "demo" and r.model_kwargs == {} and r.timm_name == name
    model = load_model(name, pretrained=False).model
    assert model.num_classes == 1000 and model.pretrained_cfg["input_size"] == (3, 224, 224)


def test_bare_timm_name_gets_an_adhoc_recipe_without_family():
    r = resolve_recipe("resnet18")
    assert (r.name, r.timm_name, r.family) == ("resnet18", "resnet18", None)


def test_unknown_name_suggests_close_recipes():
    with pytest.raises(UnknownModelError, match="deit_t") as info:
        resolve_recipe("deit_tt")
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_recipes_are_copies():
    list_recipes()[0].aliases.append("mutated")
    assert all("mutated" not in r.aliases for r in list_recipes())


# ------------------------------------------------------------------------------------ random init


def test_tiny_random_init_and_kwargs_override():
    loaded = _tiny()
    assert loaded.source == {"random_init": True}
    assert len(loaded.model.blocks) == 4 and not loaded.model.training
    assert _logits(loaded.model).shape == (2, 10)
    assert loaded.spec.kwargs["depth"] == 4
    json.dumps(loaded.to_dict())  # run metadata must be JSON-able


def test_spec_json_round_trip_rebuilds_the_same_model():
    loaded = load_model("demo", pretrained=False)
    spec = ModelSpec.from_dict(json.loads(json.dumps(loaded.spec.to_dict())))
    assert spec.to_dict() == loaded.spec.to_dict()
    rebuilt = spec.create()
    rebuilt.load_state_dict(loaded.model.state_dict())
    assert torch.equal(_logits(rebuilt), _logits(loaded.model))
    assert rebuilt.pretrained_cfg == loaded.model.pretrained_cfg
    assert repr(eval_transform(rebuilt)) == repr(eval_transform(loaded.model))


# ------------------------------------------------------------------------------------ checkpoints


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"state_dict": _prefixed(sd, "module.")},
        lambda sd: {"state_dict_ema": sd},
    ],
    ids=["bare", "model", "state_dict+module", "state_dict_ema"],
)
def test_checkpoint_wrappers_load_to_identical_logits(tmp_path, wrap):
    torch.manual_seed(1)
    reference = _tiny().model
    path = tmp_path / "tiny.pth"
    torch.save(wrap(reference.state_dict()), path)
    loaded = load_model("vit_tiny_patch16_224", checkpoint=path, model_kwargs=TINY)
    digest = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
    assert loaded.source == {"checkpoint": str(path.resolve()), **digest}
    assert torch.equal(_logits(loaded.model), _logits(reference))


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    reference = _tiny().model
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    loaded = load_model("vit_tiny_patch16_224", checkpoint=path, model_kwargs=TINY)
    assert torch.equal(_logits(loaded.model), _logits(reference))


def test_wrong_architecture_names_model_and_keys(tmp_path):
    path = tmp_path / "deep.pth"
    torch.save(_tiny().model.state_dict(), path)  # 4 blocks
    with pytest.raises(CheckpointError) as info:
        load_model("vit_tiny_patch16_224", checkpoint=path, model_kwargs={**TINY, "depth": 2})
    message = str(info.value)
    assert "vit_tiny_patch16_224" in message and "unexpected" in message and "blocks.2." in message
    assert "\n" not in message


class _NotATensor:
    pass


def _write_bad(kind: str, path: Path) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        torch.save(_tiny().model.state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "code":
        torch.save({"model": _NotATensor()}, path)  # needs unpickling a class: refused
    elif kind == "not_state_dict":
        torch.save([1, 2, 3], path)


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "truncated", "code", "not_state_dict", "dir"])
def test_bad_checkpoint_files_give_one_line_errors(tmp_path, kind):
    path = tmp_path / "ckpt.pth"
    if kind == "dir":
        path.mkdir()
    elif kind != "missing":
        _write_bad(kind, path)
    with pytest.raises(CheckpointError) as info:
        load_model("vit_tiny_patch16_224", checkpoint=path, model_kwargs=TINY)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    if kind == "code":
        assert "refusing to unpickle" in message


# ------------------------------------------------------------------------------------- pretrained


def test_pretrained_without_cache_fails_fast_and_explains(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    offline_before = hf_constants.HF_HUB_OFFLINE
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("deit_t")
    message = str(info.value)
    assert "not available offline" in message and "--checkpoint FILE" in message
    # the offline switch is scoped to the attempt
    assert "HF_HUB_OFFLINE" not in os.environ and hf_constants.HF_HUB_OFFLINE == offline_before


# ------------------------------------------------------------------------------------- real model


def test_real_deit_tiny_checkpoint_classifies_real_images(deit_tiny_weights, imagenet_sample):
    loaded = load_model("deit_t", checkpoint=deit_tiny_weights)
    assert loaded.source["checkpoint"] == str(deit_tiny_weights.resolve())
    assert loaded.source["bytes"] == deit_tiny_weights.stat().st_size and len(loaded.source["sha256"]) == 64
    assert loaded.recipe.family == "vit"
    data = ImageFiles(imagenet_sample, transform=eval_transform(loaded.model))
    picks = spread_indices(len(data), 16)
    images = torch.stack([data[i][0] for i in picks])
    labels = torch.tensor([data[i][1] for i in picks])
    with torch.no_grad():
        top1 = (loaded.model(images).argmax(1) == labels).float().mean().item()
    assert top1 >= 0.5  # ~79% on the full sample; random weights would give ~0.1%
