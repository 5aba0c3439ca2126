"""Hostile files and conditions: crafted pickles never run, random bytes never crash a loader, unreadable
and unwritable places, full disks and size limits are one line naming the path, and nothing on disk is lost."""

import contextlib
import errno
import hashlib
import json
import os
import pickle
import resource
import shutil
import stat
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import safetensors.torch
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from osqdeploy.api import calibrate, load_run
from osqdeploy.config import CalibrationConfig, ConfigError, QuantConfig
from osqdeploy.evaluation import OnnxRuntime, RuntimeLoadError
from osqdeploy.load import data as data_module
from osqdeploy.load.data import (
    DataError,
    DataWarning,
    ImageFiles,
    ResourceError,
    available_memory,
    calibration_memory,
    calibration_tensor,
    load_rgb,
)
from osqdeploy.load.models import CheckpointError, content_fingerprint, load_model, source_changes
from osqdeploy.plan import Plan
from osqdeploy.reconstruct import Callbacks
from osqdeploy.run import store
from osqdeploy.run.integrity import OnnxMismatchError, check_onnx_for_run, check_onnx_input, onnx_info
from osqdeploy.run.manifest import LATER_FIELDS, Manifest, ModelInfo, RunStatus


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling would create this file


def test_a_malicious_checkpoint_is_refused_and_never_executed(tmp_path):
    victim = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pth"
    with open(ckpt, "wb") as f:
        pickle.dump({"model": _Exploit(str(victim))}, f)
    with pytest.raises(CheckpointError):
        load_model("vit_tiny_patch16_224", checkpoint=ckpt, model_kwargs=dict(img_size=32, patch_size=8, depth=1,
                                                                               embed_dim=32, num_heads=2))
    assert not victim.exists()


def _manifest(state_sha: str) -> dict:
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    return Manifest(
        status=RunStatus.COMPLETE, model=ModelInfo("vit_tiny_patch16_224", kwargs), family="vit",
        quant=QuantConfig(4, 4), calibration=CalibrationConfig(), plan=Plan("blocks:1", []), device="cpu",
        state_sha256=state_sha,
    ).to_dict()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=4096), where=st.sampled_from(["manifest", "state"]))
def test_random_bytes_in_a_run_directory_give_a_run_error(tmp_path_factory, blob, where):
    run_dir = tmp_path_factory.mktemp("fuzz")
    if where == "manifest":
        (run_dir / store.MANIFEST).write_bytes(blob)
    else:
        (run_dir / store.STATE).write_bytes(blob)
        sha = store.sha256_file(run_dir / store.STATE)
        (run_dir / store.MANIFEST).write_text(json.dumps(_manifest(sha)))
    with pytest.raises(store.RunError):
        load_run(run_dir)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=4096))
def test_random_bytes_as_onnx_give_a_load_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    path.write_bytes(blob)
    with pytest.raises(RuntimeLoadError):
        OnnxRuntime(path, provider="cpu")


def test_a_run_state_with_wrong_tensors_is_refused(tmp_path):
    state = {"not.a.key": torch.zeros(3)}
    sha = store.save_tensors(tmp_path / store.STATE, state)
    (tmp_path / store.MANIFEST).write_text(json.dumps(_manifest(sha)))
    with pytest.raises(store.RunError, match="does not match the model"):
        load_run(tmp_path)


# ------------------------------------------------------------------------------ hostile conditions
# Each case: the library's own error type, one line naming the path, and whatever was on disk
# before byte-identical after.

TINY = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=10)


@pytest.fixture
def base():
    """A folder another user may enter (pytest's own tmp folders are private to their owner)."""
    path = Path(tempfile.mkdtemp(prefix="osq-hostile-"))
    path.chmod(0o755)
    yield path
    for p in (path, *path.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(path)


@contextlib.contextmanager
def unprivileged():
    """Permission checks as an ordinary user sees them: root reads and writes anything."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)  # nobody; only the effective id, so it can be taken back
    try:
        yield
    finally:
        os.seteuid(0)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text and "Traceback" not in text
    return text


def _tiny_checkpoint(path: Path, fill: float | None = None, key: str | None = None) -> Path:
    torch.manual_seed(0)
    state = load_model("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY).model.state_dict()
    if fill is not None:
        state[key][0] = fill
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


# -- clear, true reasons ----------------------------------------------------------------------------


def test_an_unreadable_checkpoint_is_reported_unreadable_not_corrupt(base):
    path = _tiny_checkpoint(base / "w.pth")
    load_model("vit_tiny_patch16_224", checkpoint=path, model_kwargs=TINY)  # readable: loads
    path.chmod(0)
    with unprivileged(), pytest.raises(CheckpointError) as info:
        load_model("vit_tiny_patch16_224", checkpoint=path, model_kwargs=TINY)
    message = _one_line(info.value)
    assert "permission denied" in message and str(path) in message and "corrupt" not in message


@pytest.mark.parametrize(
    "name, blob",
    [("w.pth", b"hello, this is a text file\n" * 20), ("w.pt", b"\x00" * 512), ("w.bin", b"<html>404</html>"),
     ("w.safetensors", b"PK\x03\x04 but not a safetensors header")],
)
def test_garbage_in_a_checkpoint_says_it_is_not_a_checkpoint(tmp_path, name, blob):
    path = tmp_path / name
    path.write_bytes(blob)
    with pytest.raises(CheckpointError) as info:
        load_model("vit_tiny_patch16_224", checkpoint=path, model_kwargs=TINY)
    assert f"{path} is not a checkpoint" in _one_line(info.value)
    assert path.read_bytes() == blob


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, suffix, value):
    path = _tiny_checkpoint(tmp_path / f"w{suffix}", fill=value, key="blocks.0.mlp.fc1.weight")
    before = path.read_bytes()
    with pytest.raises(CheckpointError) as info:
        load_model("vit_tiny_patch16_224", checkpoint=path, model_kwargs=TINY)
    message = _one_line(info.value)
    assert "blocks.0.mlp.fc1.weight" in message and "NaN or Inf" in message and str(path) in message
    assert path.read_bytes() == before


def test_the_checkpoint_source_carries_the_sha256_of_the_bytes_it_read(tmp_path):
    path = _tiny_checkpoint(tmp_path / "w.pth")
    loaded = load_model("vit_tiny_patch16_224", checkpoint=path, model_kwargs=TINY)
    assert loaded.source == {"checkpoint": str(path.resolve()), **content_fingerprint(path)}
    assert loaded.source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.source["bytes"] == path.stat().st_size
    # overwritten in place with other weights: same path, another digest, and the change is named
    state = torch.load(path, weights_only=True)
    state["head.bias"] += 1
    torch.save(state, path)
    again = load_model("vit_tiny_patch16_224", checkpoint=path, model_kwargs=TINY)
    assert again.source["checkpoint"] == loaded.source["checkpoint"]
    assert again.source["sha256"] != loaded.source["sha256"]
    (change,) = source_changes(loaded.source, again.source)
    assert str(path.resolve()) in change and loaded.source["sha256"][:12] in change


def _png(path: Path, seed: int, size: tuple[int, int] = (24, 24)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_an_unreadable_image_is_skipped_as_unreadable(base):
    for i in range(3):
        _png(base / f"{i}.png", i)
    (base / "1.png").chmod(0)
    with unprivileged(), pytest.warns(DataWarning, match="1 unreadable"):
        data = ImageFiles(base)
    assert data.skipped == {"unreadable": 1} and len(data) == 2


def test_an_image_that_fails_to_decode_after_the_scan_is_skipped_with_the_count(tmp_path):
    for i in range(8):
        _png(tmp_path / f"{i}.png", i)
    data = ImageFiles(tmp_path, transform=lambda img: torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()  # calibration_tensor's draw
    expected = torch.stack([data[i][0] for i in order[2:6]]).float()
    data.files[order[0]].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # damaged after the scan
    data.files[order[1]].write_bytes(b"")
    with pytest.warns(DataWarning, match="skipped 2 images that failed to decode"):
        images = calibration_tensor(data, 4, seed=0)
    assert torch.equal(images, expected)  # the next images of the seeded order took their places
    assert data.skipped == {"corrupt or truncated": 2}
    for path in data.files:
        path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="no calibration image could be decoded") as info:
        calibration_tensor(data, 4, seed=0)
    _one_line(info.value)


def test_pictures_above_the_pixel_budget_are_drafted_or_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "MAX_DECODE_PIXELS", 10_000)
    Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(tmp_path / "big.jpg", quality=90)  # 12x budget
    _png(tmp_path / "big.png", 0, (200, 100))  # 2x budget, cannot be decoded smaller
    Image.fromarray(np.full((400, 400, 3), 9, np.uint8)).save(tmp_path / "huge.jpg")  # 16x: 1/4 scale fits
    Image.fromarray(np.full((1000, 700, 3), 9, np.uint8)).save(tmp_path / "giant.jpg")  # 70x: beyond 1/8
    _png(tmp_path / "small.png", 1, (50, 50))
    with pytest.warns(DataWarning, match="2 too large to decode"):
        data = ImageFiles(tmp_path)
    assert sorted(p.name for p in data.files) == ["big.jpg", "huge.jpg", "small.png"]
    for name in ("big.jpg", "huge.jpg"):
        picture = load_rgb(tmp_path / name)
        assert picture.width * picture.height <= 10_000 and picture.mode == "RGB"
    assert load_rgb(tmp_path / "small.png").size == (50, 50)  # within budget: decoded as it is
    with pytest.raises(DataError, match="decode limit") as info:
        load_rgb(tmp_path / "big.png")
    _one_line(info.value)


def test_pillow_decompression_bombs_are_too_large_not_corrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # Pillow refuses above twice this
    _png(tmp_path / "bomb.png", 0, (100, 100))
    _png(tmp_path / "fine.png", 1, (10, 10))
    with pytest.warns(DataWarning, match="1 too large to decode"):
        data = ImageFiles(tmp_path)
    assert [p.name for p in data.files] == ["fine.png"]


# -- every failure is one line ----------------------------------------------------------------------


def test_writes_honour_the_umask_and_leave_no_temporary_file(tmp_path):
    old = os.umask(0o022)
    try:
        store.atomic_write_json(tmp_path / "a.json", {"x": 1})
        os.umask(0o077)
        store.atomic_write_bytes(tmp_path / "b.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]


def test_orphaned_temporary_files_are_removed_when_the_run_is_next_written(tmp_path):
    (tmp_path / store.CHECKPOINT).mkdir()
    store.atomic_write_json(tmp_path / store.MANIFEST, {"kept": True})
    orphans = [tmp_path / f".{store.MANIFEST}.osq-abc123.tmp", tmp_path / ".state.safetensors.x1y2z3.tmp",
               tmp_path / store.CHECKPOINT / ".progress.json.osq-q9.tmp"]
    for p in orphans:
        p.write_bytes(b"half a write")
    (tmp_path / ".notes.tmp").write_bytes(b"someone else's")
    before = (tmp_path / store.MANIFEST).read_bytes()
    with store.run_lock(tmp_path):
        assert not any(p.exists() for p in orphans)
    assert (tmp_path / store.MANIFEST).read_bytes() == before
    assert (tmp_path / ".notes.tmp").read_bytes() == b"someone else's"


def _full_disk(*_args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("case", ["read-only folder", "full disk", "file-size limit", "under a file", "a folder"])
def test_a_failed_write_is_one_line_naming_the_path_and_loses_nothing(base, monkeypatch, case):
    target = base / "out" / "run.json"
    store.atomic_write_json(target, {"before": True})
    before = _snapshot(base)
    blob = b"x" * 100_000
    guard: contextlib.AbstractContextManager = contextlib.nullcontext()
    if case == "read-only folder":
        target.parent.chmod(0o555)
        guard = unprivileged()
    elif case == "full disk":
        monkeypatch.setattr(os, "fsync", _full_disk)  # where a delayed allocation reports ENOSPC
    elif case == "file-size limit":
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, limits[1]))
        guard = contextlib.ExitStack()
        guard.callback(resource.setrlimit, resource.RLIMIT_FSIZE, limits)
    elif case == "under a file":
        target = target / "inner.json"
    else:
        target = target.parent
    with guard, pytest.raises(store.OutputError) as info:
        store.atomic_write_bytes(target, blob)
    message = _one_line(info.value)
    reason = {"read-only folder": "permission denied", "full disk": "no space left", "file-size limit": "ulimit -f",
              "under a file": "not a folder", "a folder": "is a folder"}[case]
    assert str(target) in message and reason in message and "nothing was lost" in message
    assert _snapshot(base) == before  # no temporary file left, the old file untouched


@pytest.mark.parametrize("case", ["read-only", "a file", "a folder", "no room", "file-size limit"])
def test_check_writable_refuses_before_any_work(base, case):
    folder = case in ("read-only", "a file")
    target = base / "runs" / "r1"
    need = 0
    guard: contextlib.AbstractContextManager = contextlib.nullcontext()
    if case == "read-only":
        target.parent.mkdir()
        target.parent.chmod(0o555)
        guard = unprivileged()
    elif case == "a file":
        (base / "runs").write_bytes(b"a file where a folder should be")
    elif case == "a folder":
        target.mkdir(parents=True)
    elif case == "no room":
        need = 1 << 62
    else:
        need = 10_000_000
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, limits[1]))
        guard = contextlib.ExitStack()
        guard.callback(resource.setrlimit, resource.RLIMIT_FSIZE, limits)
    before = _snapshot(base)
    with guard, pytest.raises(store.OutputError) as info:
        store.check_writable(target, folder=folder, need_bytes=need)
    assert str(target) in _one_line(info.value)
    assert _snapshot(base) == before
    store.check_writable(base / "elsewhere" / "deep", folder=True, need_bytes=1000)  # fine, and creates nothing
    assert not (base / "elsewhere").exists()


def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one_resumable(tmp_path, monkeypatch):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)
    fingerprint = "0" * 64
    store.save_checkpoint(tmp_path, model, 0, [], fingerprint)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(os, "fsync", _full_disk)
    with pytest.raises(store.OutputError) as info:
        store.save_checkpoint(tmp_path, model, 0, [], fingerprint)
    assert "nothing was lost" in _one_line(info.value)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before
    assert store.read_checkpoint(tmp_path, fingerprint).done_groups == 0


def test_an_unreadable_manifest_is_unreadable_not_corrupt(base):
    (base / "run").mkdir()
    (base / "run").chmod(0o755)
    (base / "run" / store.MANIFEST).write_text(json.dumps(_manifest("0" * 64)))
    (base / "run" / store.MANIFEST).chmod(0)
    with unprivileged(), pytest.raises(store.RunError) as info:
        load_run(base / "run")
    message = _one_line(info.value)
    assert "permission denied" in message.lower() and "corrupt" not in message


@pytest.mark.parametrize("seed", [2**64, 2**47, -1, 1.5, "7", True])
def test_seeds_torch_cannot_take_are_refused_by_validate(seed):
    with pytest.raises(ConfigError, match="seed must be an integer") as info:
        CalibrationConfig(seed=seed).validate()
    _one_line(info.value)


# -- resources are bounded --------------------------------------------------------------------------


def test_calibration_memory_counts_the_parts_and_refuses_with_the_number():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    estimate = calibration_memory(model, samples=64, batch_size=8)
    assert estimate.images == 64 * 3 * 32 * 32 * 4
    params = sum(p.numel() for p in model.parameters()) * 4
    assert params * 4 <= estimate.model <= params * 4 + 10 * 2**20
    assert estimate.states == 4 * 64 * 17 * 32 * 4  # four [64, 17 tokens, 32] group tensors
    assert estimate.step > 0 and estimate.host_available and estimate.host_available > 0
    assert estimate.check() is estimate and estimate.shortfall() is None
    # 2^21 images of 32x32 need 24 GiB for the images alone; pretend this machine has 1 GiB
    tight = replace(calibration_memory(model, samples=2**21, batch_size=8), host_available=2**30)
    with pytest.raises(ResourceError) as info:
        tight.check()
    message = _one_line(info.value)
    assert "24.00 GiB" in message and "1.00 GiB is available" in message and "--samples" in message
    # doubling the samples doubles what grows with them
    double = calibration_memory(model, samples=128, batch_size=8)
    assert double.images == 2 * estimate.images and double.states == 2 * estimate.states


def test_available_memory_reads_the_machine():
    available = available_memory()
    assert available is not None and 0 < available <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# -- an ONNX file belongs to one run ----------------------------------------------------------------


def _onnx(path: Path, shape: list, meta: dict[str, str]) -> Path:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["image"], ["logits"])], "g",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, shape)],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, shape)],
    )
    proto = onnx.helper.make_model(graph)
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save_model(proto, str(path))
    return path


def test_an_onnx_file_of_another_run_is_refused_before_anything_runs(tmp_path):
    ours, theirs = "a" * 64, "b" * 64
    path = _onnx(tmp_path / "m.onnx", ["batch", 3, 32, 32], {"run_state_sha256": ours})
    info = check_onnx_for_run(path, ours)
    assert info.input_shape == ("batch", 3, 32, 32)
    check_onnx_input(info, (3, 32, 32))
    with pytest.raises(OnnxMismatchError) as caught:
        check_onnx_for_run(path, theirs)
    message = _one_line(caught.value)
    assert str(path) in message and "another run" in message and ours[:12] in message and theirs[:12] in message
    unrecorded = _onnx(tmp_path / "plain.onnx", ["batch", 3, 32, 32], {})
    with pytest.raises(OnnxMismatchError, match="records no run checksum"):
        check_onnx_for_run(unrecorded, ours)
    assert isinstance(caught.value, store.RunError)  # a library error every front end already reports


@pytest.mark.parametrize("shape, data", [([1, 3, 224, 224], (3, 32, 32)), (["b", 3, 32], (3, 32, 32)),
                                         ([2, 1, 32, 32], (3, 32, 32))])
def test_an_onnx_input_that_does_not_fit_the_images_is_one_line(tmp_path, shape, data):
    path = _onnx(tmp_path / "m.onnx", shape, {"run_state_sha256": "a" * 64})
    with pytest.raises(OnnxMismatchError) as caught:
        check_onnx_input(onnx_info(path), data)
    assert str(path) in _one_line(caught.value)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=2048))
def test_random_bytes_as_onnx_metadata_give_a_run_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    path.write_bytes(blob)
    try:
        info = onnx_info(path)
    except store.RunError as e:
        _one_line(e)
    else:  # a few byte strings are valid (empty) protobuf messages: then the run check refuses
        with pytest.raises(store.RunError):
            check_onnx_for_run(info.path, "a" * 64)


# -- fuzzed values of the checkpoint progress record -------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _quantized_tiny():
    from osqdeploy.adapters import adapter_for
    from osqdeploy.config import QuantConfig
    from osqdeploy.reconstruct import prepare_model

    torch.manual_seed(0)
    model = load_model("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY).model
    prepare_model(model, QuantConfig(), adapter_for)
    return model


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ck")
    model = _quantized_tiny()
    store.save_checkpoint(run_dir, model, 0, [], "f" * 64)
    group = {"index": 0, "units": ["block0"], "iters": 10, "mse_before": 0.5, "mse_after": 0.25, "seconds": 1.0,
             "loss_curve": [[0, 1.0], [9, 0.5]], "flipped": 0.1, "phases": {"steps": 0.9}}
    store.save_checkpoint(run_dir, model, 1, [group], "f" * 64, changed=["blocks.0"])
    return run_dir, json.loads((run_dir / store.CHECKPOINT / "progress.json").read_text())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_values_of_the_progress_record_give_a_run_error_or_resume(checkpointed, tmp_path_factory, data):
    source, record = checkpointed
    run_dir = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(source / store.CHECKPOINT, run_dir / store.CHECKPOINT)
    record = json.loads(json.dumps(record))
    key = data.draw(st.sampled_from(sorted(record)))
    action = data.draw(st.sampled_from(["replace", "delete", "nest"]))
    if action == "delete":
        del record[key]
    elif action == "nest" and isinstance(record[key], (list, dict)) and record[key]:
        inner = record[key]
        slot = data.draw(st.sampled_from(list(inner) if isinstance(inner, dict) else list(range(len(inner)))))
        inner[slot] = data.draw(JSON_VALUES)
    else:
        record[key] = data.draw(JSON_VALUES)
    (run_dir / store.CHECKPOINT / "progress.json").write_text(json.dumps(record))
    try:
        ck = store.read_checkpoint(run_dir, "f" * 64)
        store.load_checkpoint_state(run_dir, _quantized_tiny(), ck)
    except store.RunError as e:
        _one_line(e)


# -- a resume trusts nothing it has not verified ----------------------------------------------------


class _StopAfterFirstGroup(Callbacks):
    def on_group_end(self, result):
        raise KeyboardInterrupt


def test_a_resume_after_the_weights_file_changed_in_place_is_refused_naming_the_file(tmp_path):
    from conftest import images, plant_outliers

    kwargs = dict(TINY, depth=2, embed_dim=64)
    torch.manual_seed(0)
    weights = tmp_path / "weights.pth"
    torch.save(plant_outliers(load_model("vit_tiny_patch16_224", pretrained=False, model_kwargs=kwargs).model)
               .state_dict(), weights)
    original = weights.read_bytes()
    qcfg, ccfg = QuantConfig(4, 4), CalibrationConfig(samples=16, batch_size=8, iters=4, granularity="blocks:1")
    run_dir = tmp_path / "run"

    def attempt(callbacks=None):
        loaded = load_model("vit_tiny_patch16_224", checkpoint=weights, model_kwargs=kwargs)
        return calibrate(loaded, images(16, 32), qcfg, ccfg, run_dir, callbacks=callbacks)

    with pytest.raises(KeyboardInterrupt):
        attempt(_StopAfterFirstGroup())
    interrupted = _snapshot(run_dir)
    state = torch.load(weights, weights_only=True)
    state["head.bias"] += 0.5  # other weights, same path, same size
    torch.save(state, weights)
    with pytest.raises(store.RunError) as info:
        attempt()
    message = _one_line(info.value)
    assert f"weights file {weights}" in message and "changed since the interrupted run read it" in message
    assert _snapshot(run_dir) == interrupted  # nothing of the interrupted run was touched
    weights.write_bytes(original)  # the weights it read, back in place: it resumes
    assert attempt().manifest.resumed_from_group == 1


# -- the whole run is covered by its checksum ------------------------------------------------------


def _reseal(run_dir: Path, manifest: dict) -> None:
    """Write ``manifest`` as calibration would have: sealed into the state file, whose sha256 it records."""
    tensors = store.load_tensors(run_dir / store.STATE)
    body = {k: v for k, v in manifest.items() if k != "state_sha256"}
    try:  # the seal is of the manifest as a reader parses it
        seal = store.manifest_checksum(Manifest.from_dict({**body, "state_sha256": "0" * 64}))
    except store.RunError:
        seal = store.manifest_checksum(body)
    metadata = {"format": store.RUN_FORMAT, store.SEAL_KEY: seal}
    manifest = {**body, "state_sha256": store.save_tensors(run_dir / store.STATE, tensors, metadata)}
    (run_dir / store.MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def sealed_run(tmp_path_factory):
    from conftest import images, loaded_tiny

    run_dir = tmp_path_factory.mktemp("sealed") / "run"
    ccfg = CalibrationConfig(samples=8, batch_size=8, iters=2, granularity="blocks:1")
    run = calibrate(loaded_tiny("vit", depth=2), images(8, 32), QuantConfig(4, 4), ccfg, run_dir)
    _reseal(run_dir, run.manifest.to_dict())
    return run_dir


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["quant"].update(a_bits=8),
        lambda m: m["groups"].pop(),
        lambda m: m["groups"][0].update(mse_after=0.0),
        lambda m: m["plan"].update(spec="blocks:2"),
        lambda m: m["model"]["spec"]["kwargs"].update(num_classes=11),
        lambda m: m.update(output_top1_agreement=1.0),
    ],
    ids=["a_bits", "drop a group", "a group's loss", "plan", "model spec", "reported agreement"],
)
def test_an_edited_manifest_is_damaged_not_another_model(sealed_run, tmp_path, edit):
    run_dir = tmp_path / "run"
    shutil.copytree(sealed_run, run_dir)
    assert store.verify_run(run_dir).status == "complete"
    manifest = json.loads((run_dir / store.MANIFEST).read_text())
    edit(manifest)
    (run_dir / store.MANIFEST).write_text(json.dumps(manifest))
    before = _snapshot(run_dir)
    health = store.verify_run(run_dir)
    assert health.status == "damaged" and not health.ok
    _one_line(RuntimeError(health.reason))
    with pytest.raises(store.RunError) as info:
        load_run(run_dir)
    _one_line(info.value)
    assert _snapshot(run_dir) == before


def test_verify_run_tells_complete_in_progress_and_damaged_apart(sealed_run, checkpointed, tmp_path):
    assert store.verify_run(sealed_run).status == "complete"
    (tmp_path / "state-gone").mkdir()
    shutil.copy(sealed_run / store.MANIFEST, tmp_path / "state-gone" / store.MANIFEST)
    health = store.verify_run(tmp_path / "state-gone")
    assert health.status == "damaged" and "missing" in health.reason
    ck_dir, _ = checkpointed
    unfinished = tmp_path / "unfinished"
    shutil.copytree(ck_dir, unfinished)
    manifest = json.loads((sealed_run / store.MANIFEST).read_text())
    manifest["status"] = "in_progress"
    (unfinished / store.MANIFEST).write_text(json.dumps(manifest))
    health = store.verify_run(unfinished)
    assert (health.status, health.resumable_groups, health.manifest.status) == ("in_progress", 1, RunStatus.IN_PROGRESS)
    progress = unfinished / store.CHECKPOINT / "progress.json"
    record = json.loads(progress.read_text())
    record["groups"].append({**record["groups"][0], "index": 1})  # "done" a group never reconstructed
    record["done_groups"] = 2
    progress.write_text(json.dumps(record))
    health = store.verify_run(unfinished)
    assert health.status == "damaged" and "does not match the state it describes" in health.reason
    with pytest.raises(store.RunError, match="not a run directory"):
        store.verify_run(tmp_path)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_values_of_run_json_give_a_run_error_or_a_model(sealed_run, tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(sealed_run, run_dir)
    manifest = json.loads((run_dir / store.MANIFEST).read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        holder = manifest
        key = data.draw(st.sampled_from(sorted(holder)))
        while isinstance(holder[key], (dict, list)) and holder[key] and data.draw(st.booleans()):
            holder = holder[key]
            key = data.draw(st.sampled_from(sorted(holder) if isinstance(holder, dict) else range(len(holder))))
        if isinstance(holder, dict) and data.draw(st.booleans()):
            del holder[key]
        else:
            holder[key] = data.draw(JSON_VALUES)
    if data.draw(st.booleans()):  # forged consistently: only the field checks stand in the way
        _reseal(run_dir, manifest)
    else:
        (run_dir / store.MANIFEST).write_text(json.dumps(manifest))
    health = store.verify_run(run_dir)
    assert health.status in ("complete", "in_progress", "damaged")
    try:
        load_run(run_dir)
    except store.RunError as e:
        _one_line(e)


def test_run_bytes_bounds_the_checkpoint_a_calibration_writes(tmp_path):
    torch.manual_seed(0)
    float_model = load_model("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY).model
    total, largest = store.run_bytes(float_model)
    store.save_checkpoint(tmp_path, _quantized_tiny(), 0, [], "f" * 64)
    written = (tmp_path / store.CHECKPOINT / "state.safetensors").stat().st_size
    assert written <= largest <= total
    assert largest < 4 * written  # an estimate, not a blanket refusal


# -- fuzzed values of the workspace index and the lock ----------------------------------------------


def _index_entry() -> dict:
    return {
        "format": "osq-workspace", "format_version": 1, "latest_run": ".osq/runs/r1", "latest_export": "m.onnx",
        "runs": [".osq/runs/r1"],
        "exports": {"m.onnx": {"run": ".osq/runs/r1", "created": "2026-01-01T00:00:00", "bytes": 10,
                               "float_bytes": None, "qdq_pairs": 3, "weight_initializers": {"UINT4": 2},
                               "w_bits": 4, "a_bits": 4, "dynamic_batch": True}},
    }


PATHS = st.text(max_size=20) | st.just("a\0b") | st.just("x" * 300) | st.just("/" + "y/" * 3000)


def test_a_workspace_index_of_another_version_is_one_line_naming_it(tmp_path):
    from cli.workspace import Workspace, WorkspaceError

    (tmp_path / ".osq").mkdir()
    (tmp_path / ".osq" / "workspace.json").write_text(json.dumps({**_index_entry(), "format_version": "\n2"}))
    with pytest.raises(WorkspaceError) as e:
        Workspace(tmp_path / ".osq").read()
    assert "format version '\\n2'" in _one_line(e.value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_values_of_the_workspace_index_give_a_workspace_error_or_an_answer(tmp_path_factory, data):
    from cli.workspace import Workspace, WorkspaceError

    base = tmp_path_factory.mktemp("ws")
    (base / ".osq" / "runs" / "r1").mkdir(parents=True)
    (base / "m.onnx").write_bytes(b"not onnx")
    index = _index_entry()
    holder: dict | list = index
    key = data.draw(st.sampled_from(sorted(index)))
    while isinstance(holder[key], (dict, list)) and holder[key] and data.draw(st.booleans()):
        holder = holder[key]
        key = data.draw(st.sampled_from(sorted(holder) if isinstance(holder, dict) else range(len(holder))))
    holder[key] = data.draw(JSON_VALUES | PATHS)
    (base / ".osq" / "workspace.json").write_text(json.dumps(index))
    ws = Workspace(base / ".osq")
    for call in (ws.read, ws.latest_run, ws.latest_finished_run, ws.latest_export,
                 lambda: ws.latest_export_of(base / ".osq" / "runs" / "r1"),
                 lambda: ws.run_of_export(base / "m.onnx", "a" * 64), lambda: ws.export_record(base / "m.onnx"),
                 lambda: ws.sizes(base / "m.onnx", base / ".osq" / "runs" / "r1"),
                 lambda: ws.record_run(base / ".osq" / "runs" / "r2")):
        try:
            call()
        except WorkspaceError as e:
            _one_line(e)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(holder=JSON_VALUES | st.fixed_dictionaries({"pid": st.integers(), "host": st.text(max_size=5)}))
def test_any_lock_file_content_is_taken_over_or_refused_in_one_line(tmp_path_factory, holder):
    run_dir = tmp_path_factory.mktemp("locked")
    (run_dir / store.LOCK).write_text(json.dumps(holder))
    try:
        with store.run_lock(run_dir):
            pass
    except store.RunLockedError as e:
        _one_line(e)


# -- the command line: one line, an exit code, nothing lost -----------------------------------------


def _osq(*args: object):
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    """A DeiT-Tiny checkpoint (random weights) and a folder of a few images."""
    base = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    weights = base / "deit.pth"
    torch.save(load_model("deit_t", pretrained=False).model.state_dict(), weights)
    images = base / "images"
    images.mkdir()
    for i in range(4):
        _png(images / f"{i}.png", i, (40, 40))
    return weights, images


@pytest.mark.parametrize("case", ["run dir is a file", "run dir under a file", "seed beyond 64 bits", "NaN weights",
                                  "garbage weights"])
def test_calibrate_refuses_hostile_inputs_in_one_line_before_any_work(cli_inputs, tmp_path, monkeypatch, case):
    weights, images = cli_inputs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_bytes(b"keep me")
    args = ["calibrate", "deit_t", "--checkpoint", weights, "--data", images, "--iters", "1", "--samples", "4",
            "--run-dir", tmp_path / "run"]
    if case == "run dir is a file":
        args[-1] = tmp_path / "a-file"
    elif case == "run dir under a file":
        args[-1] = tmp_path / "a-file" / "run"
    elif case == "seed beyond 64 bits":
        args += ["--seed", 2**64]
    else:
        bad = tmp_path / "bad.pth"
        if case == "NaN weights":
            state = torch.load(weights, weights_only=True)
            state["blocks.3.attn.proj.weight"][0, 0] = float("nan")
            torch.save(state, bad)
        else:
            bad.write_bytes(os.urandom(100).replace(b"\x80", b"\x00").replace(b"P", b"Q"))
        args[3] = bad
    before = _snapshot(tmp_path)
    result = _osq(*args)
    line = _error_line(result)
    expected = {"run dir is a file": ("a-file", 2), "run dir under a file": ("a-file", 1),
                "seed beyond 64 bits": ("seed must be", 2), "NaN weights": ("blocks.3.attn.proj.weight", 2),
                "garbage weights": ("is not a checkpoint", 2)}[case]
    assert expected[0] in line and result.exit_code in (1, 2) and (case == "run dir under a file"
                                                                 or result.exit_code == expected[1])
    after = _snapshot(tmp_path)
    assert {k: after.get(k) for k in before} == before  # what was there is untouched
    assert not (tmp_path / "run").exists() and not (tmp_path / ".osq" / "runs").exists()


def test_export_to_an_unwritable_place_is_one_line_and_leaves_the_old_file(sealed_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_bytes(b"a file where a folder should be")
    result = _osq("export", sealed_run, "--out", tmp_path / "blocker" / "m.onnx")
    assert result.exit_code == 1 and str(tmp_path / "blocker") in _error_line(result)
    assert (tmp_path / "blocker").read_bytes() == b"a file where a folder should be"


@pytest.mark.parametrize(("edit", "named"), [
    (lambda m: m["groups"][0].update(units=7), "units"),
    (lambda m: m.update(output_tuning={"iters": 5, "kl_before": "low", "kl_after": 0.1, "seconds": 1.0}),
     "output_tuning"),
])
def test_a_damaged_run_json_is_one_line_for_every_command(sealed_run, tmp_path, monkeypatch, edit, named):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    shutil.copytree(sealed_run, run_dir)
    manifest = json.loads((run_dir / store.MANIFEST).read_text())
    edit(manifest)
    (run_dir / store.MANIFEST).write_text(json.dumps(manifest))
    before = _snapshot(run_dir)
    for args in (["inspect", run_dir], ["export", run_dir, "--out", tmp_path / "m.onnx"],
                 ["eval", run_dir, "--runtime", "torch-quant"]):
        result = _osq(*args)
        assert result.exit_code == 2 and named in _error_line(result), args
    assert _snapshot(run_dir) == before and not (tmp_path / "m.onnx").exists()


def test_eval_refuses_an_onnx_file_of_another_run_before_running_anything(sealed_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx_path = _onnx(tmp_path / "m.onnx", ["batch", 3, 32, 32], {"run_state_sha256": "b" * 64})
    (tmp_path / ".osq").mkdir()
    index = {"format": "osq-workspace", "format_version": 1, "runs": [str(sealed_run)], "latest_export": "m.onnx",
             "exports": {"m.onnx": {"run": str(sealed_run), "created": "2026-01-01T00:00:00"}}}
    (tmp_path / ".osq" / "workspace.json").write_text(json.dumps(index))
    result = _osq("eval", onnx_path)
    assert result.exit_code == 2 and "another run" in _error_line(result)
    assert not list(tmp_path.glob("*.json"))  # no report was written


@pytest.mark.parametrize("edit", [
    lambda ix: ix.update(runs="not a list"), lambda ix: ix.update(latest_export=["x"]),
    lambda ix: ix["exports"]["m.onnx"].update(run=None), lambda ix: ix["exports"].update({"n.onnx": 3}),
])
def test_a_workspace_index_with_wrong_types_is_one_line(tmp_path, monkeypatch, edit):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".osq").mkdir()
    index = _index_entry()
    edit(index)
    (tmp_path / ".osq" / "workspace.json").write_text(json.dumps(index))
    before = _snapshot(tmp_path)
    result = _osq("eval")
    assert result.exit_code == 2 and "workspace.json is damaged" in _error_line(result)
    assert _snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A run exactly as ``calibrate`` writes it."""
    from conftest import images, loaded_tiny

    run_dir = tmp_path_factory.mktemp("plain") / "run"
    ccfg = CalibrationConfig(samples=8, batch_size=8, iters=2, granularity="blocks:1")
    calibrate(loaded_tiny("vit", depth=2), images(8, 32), QuantConfig(4, 4), ccfg, run_dir)
    return run_dir


@pytest.mark.parametrize("field, value", [("a_bits", 8), ("w_bits", 6), ("edge_bits", 4)])
def test_an_edited_bit_width_makes_the_run_damaged_for_export_and_eval(plain_run, tmp_path, monkeypatch, field, value):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    shutil.copytree(plain_run, run_dir)
    assert store.verify_run(run_dir).status == "complete"
    manifest = json.loads((run_dir / store.MANIFEST).read_text())
    manifest["quant"][field] = value
    (run_dir / store.MANIFEST).write_text(json.dumps(manifest, indent=2))
    before = _snapshot(run_dir)
    health = store.verify_run(run_dir)
    assert health.status == "damaged" and "differ from what calibration recorded" in health.reason
    for args in (["export", run_dir, "--out", tmp_path / "m.onnx"], ["eval", run_dir, "--runtime", "torch-quant"]):
        result = _osq(*args)
        assert result.exit_code == 2 and "damaged run" in _error_line(result), args
    assert _snapshot(run_dir) == before and not (tmp_path / "m.onnx").exists()


def _sealed_without(run_dir: Path, section: str, key: str) -> None:
    """The run as the version before ``section.key`` existed wrote it: the field absent, sealed absent."""
    manifest = json.loads((run_dir / store.MANIFEST).read_text())
    del manifest[section][key]
    body = {k: v for k, v in manifest.items() if k not in ("state_sha256", store.SEAL_KEY)}
    seal = store.manifest_checksum(body)
    tensors = store.load_tensors(run_dir / store.STATE)
    sha = store.save_tensors(run_dir / store.STATE, tensors, {"format": store.RUN_FORMAT, store.SEAL_KEY: seal})
    (run_dir / store.MANIFEST).write_text(json.dumps({**body, "state_sha256": sha, store.SEAL_KEY: seal}))


@pytest.mark.parametrize(("section", "key", "value"),
                         [(s, k, v) for s, later in LATER_FIELDS.items() for k, v in later.items()])
def test_a_run_written_before_a_later_config_field_still_loads(sealed_run, tmp_path, section, key, value):
    run_dir = tmp_path / "run"
    shutil.copytree(sealed_run, run_dir)
    _sealed_without(run_dir, section, key)
    assert store.verify_run(run_dir).status == "complete"
    assert getattr(getattr(load_run(run_dir).manifest, section), key) == value
    manifest = json.loads((run_dir / store.MANIFEST).read_text())
    manifest["quant"]["a_bits"] = 8  # what it did record stays sealed
    (run_dir / store.MANIFEST).write_text(json.dumps(manifest))
    assert store.verify_run(run_dir).status == "damaged"


# The configuration fields runs held when they were first sealed. A field added since must be in
# LATER_FIELDS with the value runs behaved by before it, or a run sealed without it reads as damaged.
FIRST_SEALED = {
    "quant": {"a_bits", "attn_log_base", "edge_bits", "edge_range", "post_gelu_range", "reparam", "w_bits",
              "weight_init"},
    "calibration": {"autocast", "batch_size", "beta_end", "beta_start", "compile", "compile_group", "cross_stage",
                    "cuda_graph", "device", "drop_prob", "extra", "fused_adam", "fused_rng", "granularity", "iters",
                    "loss", "loss_scale", "lr_act", "lr_round", "round_weight", "samples", "seed", "tf32", "warmup"},
}


def test_every_config_field_added_since_runs_were_first_sealed_is_a_later_field():
    from dataclasses import fields

    for section, cls in (("quant", QuantConfig), ("calibration", CalibrationConfig)):
        added = {f.name for f in fields(cls)} - FIRST_SEALED[section]
        assert added == set(LATER_FIELDS[section]), section
        cls(**LATER_FIELDS[section]).validate()  # the values are ones the section accepts


def test_dropping_a_later_field_that_was_recorded_is_damage(tmp_path):
    from conftest import images, loaded_tiny

    run_dir = tmp_path / "run"
    ccfg = CalibrationConfig(samples=8, batch_size=8, iters=0)
    calibrate(loaded_tiny("vit", depth=1), images(8, 32), QuantConfig(8, 8, attn_grid="uniform"), ccfg, run_dir)
    manifest = json.loads((run_dir / store.MANIFEST).read_text())
    del manifest["quant"]["attn_grid"]  # would read back as the log grid: another model
    (run_dir / store.MANIFEST).write_text(json.dumps(manifest))
    assert store.verify_run(run_dir).status == "damaged"
