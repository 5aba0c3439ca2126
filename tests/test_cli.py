"""The ``osq`` command line, end to end, through the real ``demo`` recipe.

The demo model is trained for one epoch into a temporary ``OSQ_CACHE`` (full training takes
minutes) and calibration runs for a couple of iterations: these tests check that the commands
chain, report and fail as promised, not how well the model quantizes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner, Result

from cli.main import app
from cli.report import _matmul_precision, _time_split
from osqdeploy import api, config
from osqdeploy.config import CalibrationConfig
from osqdeploy.load import demo
from osqdeploy.reconstruct import Reconstructor
from osqdeploy.run import store

pytestmark = pytest.mark.long_file

QUICK = ["--iters", "2", "--samples", "16", "--batch-size", "8"]
runner = CliRunner()


@dataclass(frozen=True)
class OneEpoch(demo.DemoTrainConfig):
    """The demo's training settings with one epoch, so ``osq calibrate demo`` finds the short model."""

    epochs: int = 1


def osq(*args: object) -> Result:
    """Invoke the CLI; whatever the exit code, a library error must never surface as a traceback."""
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory: pytest.TempPathFactory):
    """A demo cache with a one-epoch model, active for this module's tests only."""
    cache = tmp_path_factory.mktemp("osq_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OSQ_CACHE", str(cache))
        mp.setattr(demo, "DemoTrainConfig", OneEpoch)
        # No real weights may be found, whatever this machine's Hugging Face cache holds.
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf_cache")))
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        demo.ensure_demo_model(progress=False)
        yield cache


@pytest.fixture(scope="module")
def chain(demo_env: Path, tmp_path_factory: pytest.TempPathFactory):
    """``osq calibrate demo`` → ``osq export --out demo.onnx`` → ``osq eval``, no paths repeated."""
    work = tmp_path_factory.mktemp("work")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        results = {
            "calibrate": osq("calibrate", "demo", "--bits", "4", "4", *QUICK),
            "export": osq("export", "--out", "demo.onnx"),
            "eval": osq("eval", "--runtime", "onnxruntime"),
        }
    return work, results


@pytest.fixture
def in_chain(chain, monkeypatch: pytest.MonkeyPatch) -> Path:
    work, _ = chain
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def fresh(demo_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory (no workspace yet)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _workspace(work: Path) -> dict:
    return json.loads((work / ".osq" / "workspace.json").read_text())


# ------------------------------------------------------------------------------------------ chain


def test_chain_exit_codes_and_printed_stages(chain):
    work, r = chain
    for stage, result in r.items():
        assert result.exit_code == 0, f"{stage}: {result.output}"
    cal = r["calibrate"].stdout
    assert "Plan: blocks:3" in cal and "blocks 0-2" in cal and "blocks 3-5" in cal
    assert "Reconstruction" in cal and "MSE before" in cal and "top-1 agreement" in cal
    # the default method tunes the outputs after the groups; the run records what it did
    assert "Output tuning: 100 steps" in " ".join(cal.split())
    tuning = store.read_manifest(work / _workspace(work)["latest_run"]).output_tuning
    assert tuning["iters"] == 100 and tuning["kl_after"] <= tuning["kl_before"]
    exp = r["export"].stdout
    assert "UINT4" in exp and "QDQ pairs" in exp and "larger" in exp  # float export size ratio
    ev = r["eval"].stdout
    for runtime in ("torch-fp32", "torch-quant", "onnxruntime"):
        assert runtime in ev
    assert "top-1 agreement" in ev and "Report: demo.eval.json" in ev


def test_workspace_records_the_chain(chain):
    work, _ = chain
    ws = _workspace(work)
    run = ws["latest_run"]
    assert run.startswith(".osq/runs/demo-w4a4-")
    assert store.read_manifest(work / run).complete
    assert ws["latest_export"] == "demo.onnx"
    assert ws["exports"]["demo.onnx"]["run"] == run
    assert (work / "demo.onnx").is_file()
    data = store.read_manifest(work / run).data
    assert data["eval_dir"].endswith(os.path.join("demo", "data", "val"))
    assert data["calib_dir"].endswith(os.path.join("demo", "data", "train"))


def test_eval_report_has_accuracy_and_parity(chain):
    work, _ = chain
    report = json.loads((work / "demo.eval.json").read_text())
    names = [r["runtime"] for r in report["results"]]
    assert names == ["torch-fp32", "torch-quant", "onnxruntime"]
    assert all(r["n"] == 360 and r["top1"] is not None for r in report["results"])
    parity = report["parity"]
    assert {"top1_agreement", "max_abs_logit_diff", "mean_abs_logit_diff"} <= set(parity)
    assert (parity["a"], parity["b"]) == ("torch-quant", "onnxruntime")
    assert parity["top1_agreement"] >= 95.0
    assert report["bits"] == [4, 4] and report["sizes"]["onnx_bytes"] > 0


def test_eval_of_a_run_with_torch_quant_and_limit(in_chain):
    run = _workspace(in_chain)["latest_run"]
    result = osq("eval", run, "--runtime", "torch-quant", "--limit", "12", "--batch-size", "5")
    assert result.exit_code == 0, result.output
    assert "12 images" in result.stdout and "torch-quant *" in result.stdout


def test_inspect_and_list(in_chain):
    result = osq("inspect")
    assert result.exit_code == 0, result.output
    for text in ("complete", "W4A4", "Outlier channels", "blocks 0-2", "eval_dir", "osqdeploy-run v2", "fp32 matmuls",
                 "initialize", "first steps incl. compilation", "output_tuned, then 100 steps of output tuning",
                 "ending on the average, decay 0.951"):
        assert text in " ".join(result.stdout.replace("│", " ").split())  # a cell's text may wrap
    listing = osq("list")
    assert listing.exit_code == 0
    for text in ("demo", "deit_s", "swin_t", "slices:A-B-C", "blocks:N", "--cross-stage", "(default)", "W4A8", "W8A8",
                 "4,096"):
        assert text in listing.stdout
    assert "method output_tuned" in " ".join(listing.stdout.split())
    assert "--bits 4 8" in " ".join(listing.stdout.split())  # the sentence may wrap at any width


# W4A8 through the CLI is in the slow set: its files are checked format against format in test_ort_int8
@pytest.mark.parametrize("bits", [pytest.param((4, 8), marks=pytest.mark.slow), (8, 8)], ids=["w4a8", "w8a8"])
def test_int8_pairs_calibrate_export_in_both_formats_and_evaluate(fresh, bits):
    w, a = bits
    assert osq("calibrate", "demo", "--bits", w, a, *QUICK).exit_code == 0
    run = _workspace(fresh)["latest_run"]
    assert f"-w{w}a{a}-" in run
    reports = {}
    for fmt in ("qdq", "ort-int8"):
        target = f"demo.{fmt}.onnx"
        result = osq("export", "--format", fmt, "--out", target, "--no-float-baseline")
        assert result.exit_code == 0, result.output
        result = osq("eval", target, "--runtime", "onnxruntime", "--provider", "cpu", "--limit", "48")
        assert result.exit_code == 0, result.output
        reports[fmt] = json.loads((fresh / f"demo.{fmt}.eval.json").read_text())
    for fmt, report in reports.items():
        assert report["bits"] == [w, a], fmt
        # the ONNX file against the PyTorch fake-quant run it came from, on the same 48 images
        assert report["parity"]["top1_agreement"] >= 95.0, fmt
    onnx_top1 = {fmt: next(r["top1"] for r in rep["results"] if r["runtime"] == "onnxruntime")
                 for fmt, rep in reports.items()}
    assert abs(onnx_top1["qdq"] - onnx_top1["ort-int8"]) <= 100 / 48 + 1e-9  # at most one image apart


def test_inspect_names_the_matmul_precision_a_run_was_reconstructed_in():
    def precision(device: str, **calibration) -> str:
        return _matmul_precision(SimpleNamespace(device=device, calibration=CalibrationConfig(**calibration)))

    assert precision("cuda:0", autocast="fp16") == "fp16"
    assert precision("cuda", autocast="auto") == "fp16" and precision("cpu", autocast="auto") == "fp32"
    assert precision("cuda", autocast="off", tf32=True) == "TF32"
    assert precision("cuda", autocast="off", tf32=False) == "fp32"


def test_inspect_sensitivity_table(in_chain):
    result = osq("inspect", "--sensitivity", "--limit", "8", "--device", "cpu")
    assert result.exit_code == 0, result.output
    for text in ("switched back to float", "(none: the quantized model)", "mlp.fc2 input", "blocks.0", "Δ CE"):
        assert text in result.stdout, result.stdout


def test_inspect_sensitivity_needs_labelled_images(in_chain, tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "unlabelled.png")
    result = osq("inspect", "--sensitivity", "--data", tmp_path)
    assert result.exit_code == 2 and "no labels" in result.output


# ------------------------------------------------------------------------------------- bad input


@pytest.fixture
def folders(fresh: Path) -> dict[str, Path]:
    empty = fresh / "empty"
    empty.mkdir()
    text = fresh / "text"
    text.mkdir()
    (text / "notes.txt").write_text("not an image")
    images = fresh / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 60, 90, 200)).save(images / f"{i}.png")
    garbage = fresh / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    return {"empty": empty, "text": text, "images": images, "garbage": garbage}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["calibrate", "deitt"], "did you mean deit_t"),
        (["calibrate", "demo", "--bits", "9", "4"], "weight bits must be an integer bit-width in 2..8"),
        (["calibrate", "demo", "--bits", "4", "1"], "activation bits must be an integer bit-width in 2..8"),
        (["calibrate", "demo", "--granularity", "rows:2"], "unknown granularity"),
        (["calibrate", "demo", "--samples", "0"], "samples must be"),
        (["calibrate", "deit_t"], "cannot be calibrated yet: pass --data DIR"),
        (["calibrate", "deit_t", "--data", "{missing}"], "data folder not found"),
        (["calibrate", "deit_t", "--data", "{empty}"], "data folder is empty"),
        (["calibrate", "deit_t", "--data", "{text}"], "no readable image"),
        (["calibrate", "deit_t", "--data", "{images}"], "--checkpoint FILE"),
        (["calibrate", "deit_t", "--data", "{images}", "--checkpoint", "{missing}"], "checkpoint not found"),
        (["export"], "no finished calibration"),
        (["export", "{missing}"], "no such run directory"),
        (["eval"], "nothing to evaluate"),
        (["eval", "{missing}"], "no such ONNX file or run directory"),
        (["eval", "{garbage}"], "cannot load ONNX model"),
        (["inspect"], "no run in this workspace"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(folders, fresh, args, message):
    paths = {**{k: str(v) for k, v in folders.items()}, "missing": str(fresh / "missing")}
    result = osq(*(a.format(**paths) for a in args))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0  # one line
    assert result.stderr.startswith("error: ")


@pytest.fixture
def finished_run(chain, fresh: Path) -> Path:
    """A copy of the chain's finished run inside a fresh directory."""
    work, _ = chain
    src = work / _workspace(work)["latest_run"]
    dst = fresh / "run"
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(run: Path, **changes) -> None:
    manifest = json.loads((run / store.MANIFEST).read_text())
    manifest.update(changes)
    (run / store.MANIFEST).write_text(json.dumps(manifest))


def test_corrupt_run_is_refused(finished_run):
    (finished_run / store.MANIFEST).write_text("{not json")
    result = osq("export", finished_run, "--out", "x.onnx")
    assert result.exit_code == 2 and "corrupt manifest" in result.stderr


def test_run_from_another_format_version_is_refused(finished_run):
    _edit_manifest(finished_run, format_version=store.RUN_FORMAT_VERSION + 1)
    result = osq("inspect", finished_run)
    assert result.exit_code == 2 and "run format version" in result.stderr


def test_damaged_state_is_refused(finished_run):
    with open(finished_run / store.STATE, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\0" * 8)
    result = osq("export", finished_run, "--out", "x.onnx")
    assert result.exit_code == 2 and "checksum mismatch" in result.stderr


def test_locked_run_is_refused(finished_run):
    (finished_run / store.LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    _edit_manifest(finished_run, status="in_progress")
    result = osq("calibrate", "demo", "--bits", "4", "4", *QUICK, "--run-dir", finished_run)
    assert result.exit_code == 2 and "is being written by process" in result.stderr


def test_finished_run_dir_is_not_overwritten(finished_run):
    result = osq("calibrate", "demo", *QUICK, "--run-dir", finished_run)
    assert result.exit_code == 2 and "already holds a finished run" in result.stderr


def test_eval_without_recorded_data_asks_for_data(finished_run):
    # a run calibrated through the API without data_info records no evaluation folder
    store.write_manifest(finished_run, replace(store.read_manifest(finished_run), data={}))
    result = osq("eval", finished_run, "--runtime", "torch-quant")
    assert result.exit_code == 2 and "pass --data DIR" in result.stderr


def test_eval_needs_an_export_for_onnxruntime(finished_run):
    result = osq("eval", finished_run, "--runtime", "onnxruntime")
    assert result.exit_code == 2 and "osq export" in result.stderr


def test_out_of_memory_names_the_batch_size(finished_run, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(api, "evaluate_runtime", oom)
    result = osq("eval", finished_run, "--runtime", "torch-quant", "--batch-size", "48")
    assert result.exit_code == 1
    assert "batch size 48" in result.stderr and "--batch-size 24" in result.stderr


# ----------------------------------------------------------------------------- interrupt, resume


def test_interrupted_calibration_is_not_exportable_and_resumes(fresh, monkeypatch):
    original = Reconstructor.reconstruct_group

    def interrupt_after_first(self, index, q_in, fp_in):
        if index >= 1:
            raise KeyboardInterrupt
        return original(self, index, q_in, fp_in)

    monkeypatch.setattr(Reconstructor, "reconstruct_group", interrupt_after_first)
    command = ["calibrate", "demo", "--bits", "4", "4", *QUICK, "--run-dir", "r1"]
    result = osq(*command)
    assert result.exit_code == 130
    last = result.stderr.strip().splitlines()[-1]  # after the lines of the finished groups
    assert last.startswith("error: interrupted") and "resume with the same command" in last
    assert not store.read_manifest(fresh / "r1").complete

    for args in (["export", "r1"], ["export"]):
        refused = osq(*args)
        assert refused.exit_code == 2 and "did not finish" in refused.stderr
    assert not list(fresh.rglob("*.onnx"))

    monkeypatch.setattr(Reconstructor, "reconstruct_group", original)
    resumed = osq(*command)
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming: 1 of 2 groups" in resumed.stdout
    manifest = store.read_manifest(fresh / "r1")
    assert manifest.complete and manifest.resumed_from_group == 1
    assert [g["index"] for g in manifest.groups] == [0, 1]
    # the finishing process timed group 1 only; inspect also gives both groups' own time
    assert "(resumed after group 0;" in osq("inspect", "r1").stdout
    groups = sum(manifest.phase_totals().values())
    assert f"every group together {groups:.1f} s" in _time_split(manifest)
    assert osq("export", "--out", "r1.onnx").exit_code == 0


def test_fast_preset_shortens_the_schedule_and_explicit_iters_win(demo_env: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["--samples", "16", "--batch-size", "8"]
    assert osq("calibrate", "demo", "--fast", "--iters", "2", *small, "--run-dir", "a").exit_code == 0
    assert store.read_manifest(tmp_path / "a").calibration.iters == 2
    # the demo's own schedule (100) is already shorter than the preset: --fast never lengthens one
    assert osq("calibrate", "demo", "--fast", *small, "--run-dir", "b").exit_code == 0
    assert store.read_manifest(tmp_path / "b").calibration.iters == min(100, config.FAST_ITERS)
    assert store.read_manifest(tmp_path / "b").calibration.lr_round == CalibrationConfig.lr_round
    # a schedule longer than the preset is cut to it, AdaRound's learning rate raised by the cut
    monkeypatch.setattr(config, "FAST_ITERS", 20)
    assert osq("calibrate", "demo", "--fast", *small, "--run-dir", "c").exit_code == 0
    cut = store.read_manifest(tmp_path / "c").calibration
    assert cut.iters == 20 and cut.lr_round == pytest.approx(CalibrationConfig.lr_round * 100 / 20)


def test_autocast_option_is_recorded_and_bad_values_are_refused(demo_env: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["--samples", "16", "--batch-size", "8", "--iters", "2"]
    assert osq("calibrate", "demo", "--autocast", "bf16", *small, "--run-dir", "a").exit_code == 0
    assert store.read_manifest(tmp_path / "a").calibration.autocast == "bf16"
    refused = osq("calibrate", "demo", "--autocast", "fp8", *small, "--run-dir", "b")
    assert refused.exit_code == 2 and "fp8" in refused.stderr
    assert not (tmp_path / "b").exists()


def test_fast_preset_is_a_fifth_of_the_paper_schedule_at_five_times_the_rounding_rate():
    full = CalibrationConfig()
    fast = config.fast_preset(full)
    assert (fast.iters, fast.lr_round) == (4000, pytest.approx(5e-3))
    assert {k: v for k, v in fast.to_dict().items() if k not in ("iters", "lr_round")} == \
        {k: v for k, v in full.to_dict().items() if k not in ("iters", "lr_round")}
    assert config.fast_preset(CalibrationConfig(iters=300)) == CalibrationConfig(iters=300)


def test_augment_makes_up_the_number_of_calibration_images(demo_env: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "few"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (i * 60, 90, 200)).save(images / f"{i}.png")
    common = ["--data", images, "--samples", "10", "--batch-size", "5", "--iters", "2"]
    result = osq("calibrate", "demo", *common, "--run-dir", "aug")  # on by default
    assert result.exit_code == 0, result.output
    assert "10 calibration images (6 of them augmented views)" in result.stdout
    data = store.read_manifest(tmp_path / "aug").data
    assert (data["calib_images"], data["calib_files"], data["augmented_views"]) == (10, 4, 6)
    plain = osq("calibrate", "demo", *common, "--no-augment", "--run-dir", "plain")
    assert plain.exit_code == 0 and "using all 4" in plain.output
    assert store.read_manifest(tmp_path / "plain").data["calib_images"] == 4


def test_help_shows_placeholder_paths_literally():
    """Markdown help mode swallows <…> as HTML tags unless they sit in a code span."""
    wide = {"COLUMNS": "200"}  # so that rich does not cut the help column short
    assert ".osq/runs/<recipe>-w<W>a<A>-<time>" in runner.invoke(app, ["calibrate", "--help"], env=wide).stdout
    assert ".osq/exports/<run>.onnx" in runner.invoke(app, ["export", "--help"], env=wide).stdout


# ------------------------------------------------------------------------------------ Python API


osq_cli = osq


def test_python_api_gives_the_same_run_and_report_as_the_cli(in_chain, tmp_path):
    import osqdeploy as osq

    work = in_chain
    assert osq_cli("eval", "demo.onnx", "--runtime", "onnxruntime").exit_code == 0  # the whole held-out split
    cli_run = work / _workspace(work)["latest_run"]
    loaded = osq.load_model("demo")
    ccfg = osq.calibration_config("demo", iters=2, samples=16, batch_size=8, device="cpu")
    images = osq.calibration_images(demo.demo_paths().train_dir, loaded.model, ccfg.samples, ccfg.seed)
    run = osq.calibrate(loaded, images, osq.quant_config(4, 4), ccfg)
    saved = run.save(tmp_path / "run")
    assert store.sha256_file(saved / store.STATE) == store.sha256_file(cli_run / store.STATE)
    assert osq.load_run(saved).manifest.state_sha256 == store.read_manifest(cli_run).state_sha256

    info = osq.export(run, tmp_path / "api.onnx")
    assert info.w_bits == 4 and (tmp_path / "api.onnx").is_file()
    report = osq.evaluate(run, tmp_path / "api.onnx", data=demo.demo_paths().val_dir).to_dict()
    cli_report = json.loads((work / "demo.eval.json").read_text())
    strip = ("images_per_s",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in report["results"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in cli_report["results"]
    ]
    assert report["parity"] == cli_report["parity"] and report["kl_to_fp32"] == cli_report["kl_to_fp32"]


def test_written_files_honour_the_umask(chain):
    work, _ = chain
    run = work / _workspace(work)["latest_run"]
    for path in (run / store.STATE, run / store.MANIFEST, work / "demo.onnx", work / "demo.eval.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~_umask(), path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_help_answers_without_importing_torch():
    code = "import sys; from cli.main import app; import typer.main; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_sensitivity_table_signs_are_released_minus_quantized():
    """Δ top-1 and Δ CE are the released set's value minus the quantized model's: a set whose
    release lowers cross-entropy shows a negative Δ CE."""
    from rich.console import Console

    from cli.report import sensitivity_table
    from osqdeploy.evaluation.sensitivity import SensitivityRow

    rows = [SensitivityRow("(none)", "baseline", 0, 8, 50.0, 2.0, 0.0, 0.0),
            SensitivityRow("blocks.0", "block", 3, 8, 62.5, 1.5, 12.5, 0.5)]
    console = Console(record=True, width=200)
    console.print(sensitivity_table(rows, "val"))
    line = next(ln for ln in console.export_text().splitlines() if "blocks.0" in ln)
    assert "+12.5" in line and "-0.5000" in line and "+0.5000" not in line


def test_calibrate_with_a_uniform_attention_grid(fresh):
    assert osq("calibrate", "demo", "--bits", 8, 8, "--attn-grid", "uniform", *QUICK).exit_code == 0
    run = fresh / _workspace(fresh)["latest_run"]
    assert json.loads((run / "run.json").read_text())["quant"]["attn_grid"] == "uniform"
    result = osq("inspect")
    assert result.exit_code == 0 and "uniform" in result.stdout and "log√2" not in result.stdout  # cells wrap
    assert osq("calibrate", "demo", "--attn-grid", "cubic", *QUICK).exit_code == 2
