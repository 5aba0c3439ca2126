"""Hostile files: crafted pickles never run, random bytes never crash a loader with a traceback."""

import json
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osqdeploy.api import load_run
from osqdeploy.config import CalibrationConfig, QuantConfig
from osqdeploy.evaluation import OnnxRuntime, RuntimeLoadError
from osqdeploy.load.models import CheckpointError, load_model
from osqdeploy.plan import Plan
from osqdeploy.run import store
from osqdeploy.run.manifest import Manifest, ModelInfo, RunStatus


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
