"""The run directory: reload without weights, integrity checks, determinism, resume after a kill."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from osqdeploy.api import calibrate, load_run
from osqdeploy.config import CalibrationConfig, QuantConfig
from osqdeploy.reconstruct import Callbacks
from osqdeploy.run import store

from conftest import images, loaded_tiny

QCFG = QuantConfig(4, 4)
CCFG = dict(samples=32, batch_size=16, iters=12, granularity="blocks:2", seed=3)
TESTS = Path(__file__).parent


def _calibrate(run_dir, callbacks=None):
    run = calibrate(loaded_tiny("vit", depth=4), images(32, 32), QCFG, CalibrationConfig(**CCFG), run_dir,
                    callbacks=callbacks)
    return run.manifest


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "a"
    manifest = _calibrate(run_dir)
    return run_dir, manifest


def test_run_reloads_into_the_same_fake_quant_model_without_the_weights_file(finished, tmp_path):
    run_dir, manifest = finished
    assert manifest.complete and len(manifest.groups) == 2
    assert manifest.calibration.autocast == "off"  # "auto" recorded as what ran: off on a CPU
    assert manifest.plan.groups[0][0] == "blocks.0.A"
    first = load_run(run_dir).model
    second = load_run(run_dir).model
    x = images(8, 32, seed=9)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
    state = store.load_tensors(run_dir / store.STATE)
    assert state["blocks.0.attn.qkv.weight_quantizer.w_int"].dtype == torch.uint8
    assert "blocks.0.attn.qkv.weight" not in state  # integers replace the float weight
    assert not (run_dir / store.CHECKPOINT).exists()


def test_same_seed_same_device_gives_a_bit_identical_run(finished, tmp_path):
    run_dir, _ = finished
    again = tmp_path / "b"
    _calibrate(again)
    assert store.sha256_file(again / store.STATE) == store.sha256_file(run_dir / store.STATE)


def test_damaged_state_is_refused(finished, tmp_path):
    run_dir, _ = finished
    copy = tmp_path / "damaged"
    copy.mkdir()
    for f in (store.MANIFEST, store.STATE):
        (copy / f).write_bytes((run_dir / f).read_bytes())
    data = bytearray((copy / store.STATE).read_bytes())
    data[-5] ^= 0xFF
    (copy / store.STATE).write_bytes(bytes(data))
    with pytest.raises(store.RunError, match="checksum"):
        load_run(copy)


def test_other_format_version_and_corrupt_manifest_are_refused(finished, tmp_path):
    run_dir, manifest = finished
    other = tmp_path / "other"
    other.mkdir()
    (other / store.MANIFEST).write_text(json.dumps({**manifest.to_dict(), "format_version": 99}))
    with pytest.raises(store.RunError, match="format version 99"):
        load_run(other)
    (other / store.MANIFEST).write_text("{not json")
    with pytest.raises(store.RunError, match="corrupt manifest"):
        load_run(other)
    with pytest.raises(store.RunError, match="no such run"):
        load_run(tmp_path / "missing")


class _Crash(Callbacks):
    """Interrupts calibration once group ``after`` has finished (and been checkpointed)."""

    def __init__(self, after: int = 0):
        self.after = after

    def on_group_end(self, result):
        if result.index == self.after:
            raise KeyboardInterrupt


def _crashed(tmp_path: Path, after: int = 0) -> Path:
    """A run directory whose calibration was interrupted once group ``after`` had finished."""
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        _calibrate(crashed, _Crash(after))
    return crashed


def _assert_resumes_bit_identically(run_dir: Path, finished_dir: Path, from_group: int) -> None:
    """The same calibration again continues ``run_dir`` from ``from_group`` to the uninterrupted result."""
    manifest = _calibrate(run_dir)
    assert manifest.resumed_from_group == from_group
    assert store.sha256_file(run_dir / store.STATE) == store.sha256_file(finished_dir / store.STATE)


def test_interrupted_run_does_not_look_complete_and_resumes_bit_identically(finished, tmp_path):
    run_dir, _ = finished
    crashed = _crashed(tmp_path)
    with pytest.raises(store.RunError, match="did not finish"):
        load_run(crashed)
    assert (crashed / store.CHECKPOINT / "progress.json").is_file()
    _assert_resumes_bit_identically(crashed, run_dir, from_group=1)  # the same command again


def test_a_checkpoint_of_other_settings_is_refused_naming_them_and_leaving_the_run_as_it_was(finished, tmp_path):
    run_dir, _ = finished
    crashed = _crashed(tmp_path)
    before = (crashed / store.MANIFEST).read_bytes()
    other = {**CCFG, "iters": 13, "autocast": "bf16"}
    with pytest.raises(store.RunError, match=r"calibration\.iters 12 → 13, calibration\.autocast 'off' → 'bf16'"):
        calibrate(loaded_tiny("vit", depth=4), images(32, 32), QCFG, CalibrationConfig(**other), crashed)
    assert (crashed / store.MANIFEST).read_bytes() == before  # the interrupted run's manifest is untouched
    with pytest.raises(store.RunError, match="same settings, other weights or calibration images"):
        calibrate(loaded_tiny("vit", depth=4), images(32, 32, seed=5), QCFG, CalibrationConfig(**CCFG), crashed)
    _assert_resumes_bit_identically(crashed, run_dir, from_group=1)  # its own settings resume it


def test_checkpoint_keeps_one_full_state_and_a_small_delta_per_group(finished, tmp_path):
    run_dir, _ = finished
    crashed = _crashed(tmp_path, after=1)
    ck = crashed / store.CHECKPOINT
    assert sorted(p.name for p in ck.glob("*.safetensors")) == [
        "delta-0001.safetensors", "delta-0002.safetensors", "state.safetensors"]
    full = (ck / "state.safetensors").stat().st_size
    for name, blocks in (("delta-0001", ("blocks.0.", "blocks.1.")), ("delta-0002", ("blocks.2.", "blocks.3."))):
        delta = store.load_tensors(ck / f"{name}.safetensors")
        assert delta and all(k.startswith(blocks) for k in delta)  # only the group's own modules
        assert delta["".join(blocks[:1]) + "attn.qkv.weight_quantizer.w_int"].numel() > 0  # its finished integers
        # two of the four blocks: their float weights and new integers, not the embeddings or head
        assert (ck / f"{name}.safetensors").stat().st_size < 0.7 * full
    damaged = tmp_path / "damaged"
    shutil.copytree(crashed, damaged)
    (damaged / ".lock").unlink(missing_ok=True)
    data = bytearray((damaged / store.CHECKPOINT / "delta-0002.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (damaged / store.CHECKPOINT / "delta-0002.safetensors").write_bytes(bytes(data))
    with pytest.raises(store.RunError, match=r"damaged \(delta-0002"):
        _calibrate(damaged)
    _assert_resumes_bit_identically(crashed, run_dir, from_group=2)  # full state + both deltas: nothing left


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = [{tests!r}, {root!r}]
    from test_run import _calibrate
    from osqdeploy.reconstruct import Callbacks

    class Kill(Callbacks):
        def on_iter(self, index, it, loss):
            if (index, it) == ({group}, {it}):
                os.kill(os.getpid(), signal.SIGKILL)

    _calibrate({run!r}, Kill())
    """
)


@pytest.mark.parametrize("group, it", [(0, 0), (1, 6)], ids=["first-group", "mid-second-group"])
def test_sigkilled_calibration_resumes_bit_identically(finished, tmp_path, group, it):
    run_dir, _ = finished
    target = tmp_path / "killed"
    code = KILLER.format(tests=str(TESTS), root=str(TESTS.parent), group=group, it=it, run=str(target))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with pytest.raises(store.RunError, match="did not finish"):
        load_run(target)
    # the killed process held the lock; it is stale now and is taken over
    _assert_resumes_bit_identically(target, run_dir, from_group=group)


def test_a_live_writer_holds_the_run(tmp_path):
    run_dir = tmp_path / "locked"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / store.LOCK).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        with pytest.raises(store.RunLockedError, match=f"process {holder.pid}"):
            _calibrate(run_dir)
    finally:
        holder.kill()


def test_a_finished_run_is_not_overwritten(finished):
    run_dir, _ = finished
    with pytest.raises(store.RunError, match="already holds a finished run"):
        _calibrate(run_dir)
