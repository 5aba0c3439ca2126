"""Image folders, pixel-mode conversion, transforms, calibration subsets and splits (osqdeploy.load.data)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from osqdeploy.load.data import (
    DataError,
    DataWarning,
    ImageFiles,
    calibration_augment,
    calibration_tensor,
    eval_transform,
    imagenet_label,
    load_rgb,
    split_files,
    to_rgb,
)

TRANSFORM_32 = dict(
    img_size=32,
    patch_size=8,
    depth=1,
    embed_dim=32,
    num_heads=2,
    num_classes=3,
    pretrained_cfg_overlay=dict(input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear"),
)


def _rgb(seed: int, size: int = 24) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    _rgb(seed, 64).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def transform():
    return eval_transform(timm.create_model("vit_tiny_patch16_224", **TRANSFORM_32))


# ---------------------------------------------------------------------------------------- layouts


def test_class_folders(tmp_path):
    for c, name in enumerate(["cat", "dog", "emu"]):
        (tmp_path / name / "nested").mkdir(parents=True)
        _rgb(c).save(tmp_path / name / "a.png")
        _rgb(10 + c).save(tmp_path / name / "nested" / "b.jpg")
    (tmp_path / ".hidden").mkdir()
    _rgb(99).save(tmp_path / ".hidden" / "x.png")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\0\1")
    data = ImageFiles(tmp_path)
    assert data.layout == "folders" and data.classes == ["cat", "dog", "emu"]
    assert data.labels == [0, 0, 1, 1, 2, 2] and data.labelled
    assert [p.parent.name for p in data.files] == ["cat", "nested", "dog", "nested", "emu", "nested"]
    image, label = data[2]
    assert image.mode == "RGB" and label == 1
    assert data.skipped == {}


def test_flat_wordnet_folder_gets_imagenet_labels(tmp_path):
    names = {"n01440764_tench.JPEG": 0, "n01443537_goldfish.png": 1, "n15075141_toilet_tissue.jpg": 999}
    for i, name in enumerate(names):
        _rgb(i).save(tmp_path / name, "JPEG" if name.lower().endswith(("jpg", "jpeg")) else "PNG")
    data = ImageFiles(tmp_path)
    assert data.layout == "imagenet" and data.labelled
    assert dict(zip((p.name for p in data.files), data.labels, strict=True)) == names
    assert imagenet_label("n01440764_1234.JPEG") == 0 and imagenet_label("n99999999_x.png") is None


def test_flat_folder_without_wordnet_ids_is_unlabeled_and_calibrates(tmp_path, transform):
    for i in range(5):
        _rgb(i).save(tmp_path / f"photo_{i}.png")
    data = ImageFiles(tmp_path, transform=transform)
    assert data.layout == "unlabeled" and not data.labelled and data.labels == [-1] * 5
    x = calibration_tensor(data, 3, seed=0)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32


def test_mixed_wordnet_and_other_names_is_unlabeled_with_a_warning(tmp_path):
    _rgb(0).save(tmp_path / "n01440764_tench.png")
    _rgb(1).save(tmp_path / "holiday.png")
    with pytest.warns(DataWarning, match="no ImageNet WordNet id"):
        data = ImageFiles(tmp_path)
    assert not data.labelled and len(data) == 2


def test_real_imagenet_sample_labels_and_split(imagenet_sample):
    data = ImageFiles(imagenet_sample)
    assert len(data) == 500 and data.labelled and data.skipped == {}
    assert sorted(data.labels) == list(range(0, 1000, 2))  # one image per even class index
    wnids = timm.data.ImageNetInfo().label_names()
    assert all(wnids[label] == p.name[:9] for p, label in zip(data.files, data.labels, strict=True))
    calib, held_out = data.split(0.5, seed=0)
    assert len(calib) == len(held_out) == 250
    assert not set(calib.files) & set(held_out.files)
    assert all(imagenet_label(p) == label for p, label in zip(held_out.files, held_out.labels, strict=True))


# -------------------------------------------------------------------------------- hostile files


def test_hostile_files_are_skipped_or_converted_with_one_warning(tmp_path):
    _rgb(0).save(tmp_path / "good.png")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("definitely not a jpeg\n")
    jpeg = _jpeg_bytes(1)
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "notes.txt").write_text("hello")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200  # red, but fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).save(tmp_path / "gray16.png")
    Image.fromarray(np.full((16, 16), 77, np.uint8), "L").save(tmp_path / "gray.png")
    _rgb(2).convert("CMYK").save(tmp_path / "cmyk.jpg")
    _rgb(3).convert("P").save(tmp_path / "palette.png")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ImageFiles(tmp_path)
    skip_warnings = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(skip_warnings) == 1
    assert "skipped 4 of 10" in str(skip_warnings[0].message)
    assert data.skipped == {"empty file": 1, "corrupt or truncated": 2, "not an image": 1}
    assert sorted(p.name for p in data.files) == sorted(
        ["good.png", "rgba.png", "gray16.png", "gray.png", "cmyk.jpg", "palette.png"]
    )
    images = {p.name: np.asarray(data[i][0]) for i, p in enumerate(data.files)}
    assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 for a in images.values())
    assert (images["rgba.png"] == 255).all()  # transparent -> white background, not the hidden red
    gray16 = images["gray16.png"][..., 0].astype(int)
    assert gray16.min() == 0 and gray16.max() == 255  # scaled, not clipped to a white image
    assert np.array_equal(gray16.ravel(), np.arange(256))  # 16-bit v*257 maps back to v exactly
    assert (images["gray.png"] == 77).all()


def test_to_rgb_float_and_int32_modes():
    f = Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), "F")
    out = np.asarray(to_rgb(f))
    assert out.shape == (8, 8, 3) and out.min() == 0 and out.max() == 255
    i32 = Image.fromarray((np.arange(64, dtype=np.int32) * 1000).reshape(8, 8), "I")
    out = np.asarray(to_rgb(i32))[..., 0]
    assert out.max() == round(63000 / 257) and (np.diff(out.ravel().astype(int)) >= 0).all()
    la = Image.fromarray(np.stack([np.full((4, 4), 10, np.uint8), np.full((4, 4), 255, np.uint8)], -1), "LA")
    assert (np.asarray(to_rgb(la)) == 10).all()  # opaque: the gray value itself


def test_load_rgb_reads_through_a_closed_file(tmp_path):
    path = tmp_path / "x.png"
    _rgb(5).save(path)
    assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(_rgb(5)))


# ------------------------------------------------------------------------------------ data errors


@pytest.mark.parametrize("case", ["missing", "file", "empty", "junk_only", "empty_classes"])
def test_unusable_folders_raise_one_line_data_error(tmp_path, case):
    root = tmp_path / "data"
    if case == "file":
        root.write_text("x")
    elif case == "empty":
        root.mkdir()
    elif case == "junk_only":
        root.mkdir()
        (root / "a.txt").write_text("x")
        (root / "b.png").write_bytes(b"")
    elif case == "empty_classes":
        (root / "cat").mkdir(parents=True)
        (root / "dog").mkdir()
    with pytest.raises(DataError) as info:
        ImageFiles(root)
    message = str(info.value)
    assert str(root) in message and "\n" not in message
    assert isinstance(info.value, ValueError)


def test_from_files_validates_and_keeps_labels(tmp_path):
    _rgb(0).save(tmp_path / "a.png")
    _rgb(1).save(tmp_path / "b.png")
    (tmp_path / "c.png").write_bytes(b"")
    with pytest.warns(DataWarning):
        data = ImageFiles.from_files([tmp_path / n for n in ("a.png", "b.png", "c.png")], labels=[3, 4, 5])
    assert [p.name for p in data.files] == ["a.png", "b.png"] and data.labels == [3, 4]
    with pytest.raises(ValueError, match="labels"):
        ImageFiles.from_files([tmp_path / "a.png"], labels=[1, 2])


# ------------------------------------------------------------------------- transforms and subsets


def test_eval_transform_follows_the_model_config():
    model = timm.create_model("deit_tiny_patch16_224")  # crop_pct 0.875, bicubic, ImageNet mean/std
    transform = eval_transform(model)
    gray = Image.new("RGB", (300, 260), (128, 128, 128))
    x = transform(gray)
    assert x.shape == (3, 224, 224)
    mean, std = (torch.tensor(model.pretrained_cfg[k]) for k in ("mean", "std"))
    expected = (128 / 255 - mean) / std
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-3)
    assert "bicubic" in repr(transform).lower() and "CenterCrop" in repr(transform)


def test_calibration_subset_is_seeded(tmp_path, transform):
    for i in range(12):
        _rgb(i).save(tmp_path / f"{i:02d}.png")
    data = ImageFiles(tmp_path, transform=transform)
    a, b, c = (calibration_tensor(data, 5, seed=s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.warns(DataWarning, match="using all 12"):
        everything = calibration_tensor(data, 50, seed=0)
    assert everything.shape[0] == 12
    assert len({tuple(img.flatten()[:8].tolist()) for img in everything}) == 12  # no duplicates
    with pytest.raises(TypeError, match="transform"):
        calibration_tensor(ImageFiles(tmp_path), 2, seed=0)


def _augmentable(folder: Path, n: int):
    """``n`` pictures for a tiny ViT, as an evaluated ImageFiles, and the ViT's calibration views."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    for i in range(n):
        _rgb(i).save(folder / f"{i:02d}.png")
    return ImageFiles(folder, transform=eval_transform(model)), calibration_augment(model)


def test_augmented_calibration_views_fill_up_to_n_reproducibly(tmp_path):
    data, augment = _augmentable(tmp_path, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "using all 5" warning: the views make up the number
        a = calibration_tensor(data, 13, seed=0, augment=augment)
    b = calibration_tensor(data, 13, seed=0, augment=augment)
    c = calibration_tensor(data, 13, seed=1, augment=augment)
    plain = calibration_tensor(data, 5, seed=0)
    assert a.shape == (13, *plain.shape[1:]) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a[5:], c[5:])
    assert torch.equal(a[:5], plain)  # every image once, as evaluated, then the views
    assert not any(torch.equal(v, o) for v in a[5:] for o in plain)
    # The caller's RNG streams are left as they were.
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    calibration_tensor(data, 8, seed=0, augment=augment)
    assert torch.equal(torch.rand(2), expected)


def test_views_converted_a_chunk_at_a_time_equal_timms_transform_view_by_view(tmp_path):
    data, augment = _augmentable(tmp_path, 3)
    chunked = calibration_tensor(data, 150, seed=4, augment=augment)  # 147 views: two chunks and a rest
    one_by_one = calibration_tensor(data, 150, seed=4, augment=lambda picture: augment(picture))
    assert torch.equal(chunked, one_by_one)


def test_augmented_views_need_image_files(transform):
    tensors = torch.utils.data.TensorDataset(torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match="ImageFiles"):
        calibration_tensor(tensors, 4, seed=0, augment=lambda img: img)


def test_split_files_is_disjoint_deterministic_and_order_free():
    files = [Path(f"/x/{i:03d}.png") for i in range(101)]
    calib, held_out = split_files(files, 0.3, seed=7)
    assert len(held_out) == 30 and len(calib) == 71
    assert not set(calib) & set(held_out) and set(calib) | set(held_out) == set(files)
    assert split_files(list(reversed(files)), 0.3, seed=7) == (calib, held_out)
    assert split_files(files, 0.3, seed=8)[1] != held_out
    with pytest.raises(ValueError):
        split_files(files, 1.0, seed=0)


def test_max_files_spreads_over_classes(tmp_path):
    for c in range(4):
        (tmp_path / f"class{c}").mkdir()
        for i in range(5):
            _rgb(c * 10 + i, 8).save(tmp_path / f"class{c}" / f"{i}.png")
    data = ImageFiles(tmp_path, max_files=8)
    assert len(data) == 8 and sorted(set(data.labels)) == [0, 1, 2, 3]
