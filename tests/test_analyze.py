"""osq analyze: every figure is a real PNG and analysis.json holds the numbers it plots, checked
against direct computations on tiny models with planted outlier channels."""

import json
from pathlib import Path

import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from cli.analyze import analyze as analyze_command
from osqdeploy.analysis import SITES, activation_ranges, analyze
from osqdeploy.api import calibrate, load_run
from osqdeploy.config import CalibrationConfig, QuantConfig
from osqdeploy.evaluation import TorchRuntime, evaluate, kl_divergence
from osqdeploy.evaluation.sensitivity import sensitivity
from osqdeploy.load import ImageFiles, eval_transform
from osqdeploy.load.data import spread_indices

from conftest import OUTLIER_CHANNELS, images, loaded_tiny, tiny_swin, tiny_vit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLANTED = sorted(OUTLIER_CHANNELS)


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5_000  # a drawn figure, not an empty canvas
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
        assert im.size[0] > 400 and im.size[1] > 300


@torch.no_grad()
def _direct_vit_ranges(model, x):
    """Each site's per-channel max |activation|, by running the ViT's blocks by hand."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    out = {k: [] for k in SITES}

    def cmax(t):
        return t.abs().reshape(-1, t.shape[-1]).amax(0)

    for blk in model.blocks:
        out["residual"].append(cmax(h))
        n1 = blk.norm1(h)
        out["post_norm1"].append(cmax(n1))
        a = blk.attn
        B, N, C = n1.shape
        q, k, _ = a.qkv(n1).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        out["post_softmax"].append(cmax((q * a.scale @ k.transpose(-2, -1)).softmax(-1)))
        mid = h + blk.ls1(a(n1))
        n2 = blk.norm2(mid)
        out["post_norm2"].append(cmax(n2))
        out["post_gelu"].append(cmax(blk.mlp.act(blk.mlp.fc1(n2))))
        h = blk(h)
    return out


def test_activation_ranges_match_a_direct_computation_and_mark_the_planted_channels():
    model, x = tiny_vit(), images(16, 32)
    ranges = activation_ranges(model, x, batch_size=8)
    direct = _direct_vit_ranges(model, x)
    assert ranges.blocks == [f"blocks.{i}" for i in range(6)]
    for key in SITES:
        for b, expected in enumerate(direct[key]):
            torch.testing.assert_close(torch.tensor(ranges.sites[key].ranges[b]), expected, rtol=1e-5, atol=1e-6)
    for key in ("post_norm1", "post_norm2"):  # RepQ-ViT's post-LayerNorm outliers, in every block
        assert ranges.sites[key].outliers == [PLANTED] * 6
        assert ranges.sites[key].persistence() == {c: 6 for c in PLANTED}
    for b in range(1, 6):  # the residual writes carry them down the stream: its two widest channels
        top2 = torch.tensor(ranges.sites["residual"].ranges[b]).topk(2).indices.tolist()
        assert sorted(top2) == PLANTED


def test_a_model_without_planted_outliers_has_none_marked_after_layernorm():
    ranges = activation_ranges(tiny_vit(outliers=False), images(16, 32))
    assert all(m == [] for key in ("residual", "post_norm1", "post_norm2") for m in ranges.sites[key].outliers)


def test_swin_blocks_of_every_stage_are_measured():
    ranges = activation_ranges(tiny_swin(), images(8, 56))
    assert ranges.blocks == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1"]
    assert [len(r) for r in ranges.sites["residual"].ranges] == [32, 32, 64, 64]
    assert ranges.sites["post_norm1"].outliers == [PLANTED] * 4
    assert [len(r) for r in ranges.sites["post_softmax"].ranges] == [49] * 4  # 7x7 windows: key tokens


# ------------------------------------------------------------------------------- runs and figures


@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory):
    """Two classes of small PNGs, so sensitivity and top-1 have labels."""
    root = tmp_path_factory.mktemp("data")
    pics = images(24, 32, seed=9)
    for i, pic in enumerate(pics):
        folder = root / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        arr = ((pic - pic.min()) / (pic.max() - pic.min()) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(folder / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished W4A4 runs of the tiny ViT (depth 4): blocks:1 and blocks:2."""
    base = tmp_path_factory.mktemp("runs")
    out = []
    for spec in ("blocks:1", "blocks:2"):
        ccfg = CalibrationConfig(samples=16, batch_size=8, iters=6, granularity=spec, seed=0, device="cpu")
        calibrate(loaded_tiny("vit", depth=4), images(16, 32), QuantConfig(4, 4), ccfg, base / spec.replace(":", ""))
        out.append(base / spec.replace(":", ""))
    return out


def test_one_run_gives_ranges_reconstruction_and_sensitivity_with_their_numbers(runs, labelled_dir, tmp_path):
    fp = loaded_tiny("vit", depth=4).model
    result = analyze([runs[0]], tmp_path, data=labelled_dir, float_model=fp, images=12, limit=24)
    assert set(result.figures) == {"activation_ranges", "reconstruction", "sensitivity"}
    for path in result.figures.values():
        _assert_png(path)
    numbers = json.loads(result.json_path.read_text())
    assert numbers["bits"] == "W4A4" and numbers["figures"]["sensitivity"] == "sensitivity.png"

    ar = numbers["activation_ranges"]
    assert ar["sites"]["post_norm1"]["outliers"] == [PLANTED] * 4
    dataset = ImageFiles(labelled_dir, transform=eval_transform(fp))
    direct_ranges = activation_ranges(fp, torch.stack([dataset[i][0] for i in spread_indices(len(dataset), 12)]))
    assert ar["n_images"] == 12
    for key in SITES:
        got = [v for block in ar["sites"][key]["ranges"] for v in block]
        assert got == pytest.approx([v for block in direct_ranges.sites[key].ranges for v in block], rel=1e-6)

    manifest = json.loads((runs[0] / "run.json").read_text())
    rec = numbers["reconstruction"][str(runs[0])]
    assert [g["mse_before"] for g in rec["groups"]] == [g["mse_before"] for g in manifest["groups"]]
    assert [g["mse_after"] for g in rec["groups"]] == [g["mse_after"] for g in manifest["groups"]]
    assert [g["loss_curve"] for g in rec["groups"]] == [g["loss_curve"] for g in manifest["groups"]]
    assert len(rec["groups"]) == 4 and all(len(g["loss_curve"]) == 6 for g in rec["groups"])

    direct = sensitivity(load_run(runs[0]).model, dataset, "cpu", limit=24, progress=False)
    sens = numbers["sensitivity"]
    assert sens["baseline"]["cross_entropy"] == pytest.approx(direct[0].cross_entropy, rel=1e-6)
    assert [r["released"] for r in sens["rows"]] == [r.released for r in direct[1:]]
    assert [r["delta_cross_entropy"] for r in sens["rows"]] == pytest.approx(
        [r.delta_cross_entropy for r in direct[1:]], rel=1e-5, abs=1e-7)


def test_several_runs_give_the_granularity_comparison_against_a_direct_evaluation(runs, labelled_dir, tmp_path):
    fp = loaded_tiny("vit", depth=4).model
    result = analyze(runs, tmp_path, data=labelled_dir, float_model=fp, images=8, limit=24)
    _assert_png(result.figures["granularity"])
    assert {"reconstruction-blocks1", "reconstruction-blocks2"} <= set(result.figures)
    gran = json.loads(result.json_path.read_text())["granularity"]
    dataset = ImageFiles(labelled_dir, transform=eval_transform(fp))
    fp_res = evaluate(TorchRuntime(fp), dataset, progress=False)
    assert gran["fp32_top1"] == pytest.approx(fp_res.top1)
    assert [p["plan"] for p in gran["plans"]] == ["blocks:1", "blocks:2"]
    for run, plan in zip(runs, gran["plans"], strict=True):
        q_res = evaluate(TorchRuntime(load_run(run).model, name="q"), dataset, progress=False)
        assert plan["kl"] == pytest.approx([kl_divergence(fp_res.logits, q_res.logits)], rel=1e-5)
        assert plan["top1"] == [q_res.top1]
        assert plan["output_mse"] == [json.loads((run / "run.json").read_text())["output_mse"]]


def test_a_run_without_labels_or_float_weights_says_what_it_skipped(runs, tmp_path):
    result = analyze([runs[0]], tmp_path)  # random-init weights were not saved; the run recorded no folder
    assert set(result.figures) == {"reconstruction"}
    notes = " ".join(result.notes)
    assert "float" in notes and "--data" in notes


def test_cli_writes_the_figures_and_refuses_mixed_targets(runs, labelled_dir, tmp_path, monkeypatch):
    app = typer.Typer()
    app.command()(analyze_command)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, [str(runs[0]), str(runs[1]), "--data", str(labelled_dir), "--out", "fig",
                              "--device", "cpu", "--limit", "8"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "fig" / "granularity.png").is_file() and (tmp_path / "fig" / "analysis.json").is_file()
    assert "KL and fp32 top-1 skipped" in res.output  # no float weights recorded: said, not silently dropped
    bad = runner.invoke(app, ["deit_t", str(runs[0]), "--out", "fig2"])
    assert bad.exit_code == 2 and "not both" in bad.output
    missing = runner.invoke(app, [])
    assert missing.exit_code == 2 and "no finished run" in missing.output


@pytest.mark.slow
def test_demo_analysis_runs_offline_in_under_a_minute(tmp_path):
    import time

    from osqdeploy.load import ensure_demo_model

    ensure_demo_model(progress=False)  # trained once and cached; the timing is of the analysis
    t0 = time.perf_counter()
    result = analyze(["demo"], tmp_path)
    assert time.perf_counter() - t0 < 60
    _assert_png(result.figures["activation_ranges"])
    assert json.loads(result.json_path.read_text())["activation_ranges"]["n_images"] == 32


def test_paper_tables_summary_counts_each_run_once_and_times_resumed_runs_by_their_groups(tmp_path):
    """ABC is shown beside blocks:1 without being counted twice; a resumed job's seconds are its groups'."""
    from benchmarks.paper_tables import summarize

    def job(cell: str, seed: int, top1: float, kl: float, calib_s: float, phases: dict) -> None:
        row = {"model": "deit_t", "bits": "W4A4", "cell": cell, "plan": cell, "seed": seed, "iters": 20,
               "calib_images": 16, "eval_images": 8, "fp32_top1": 75.0, "top1": top1, "kl": kl,
               "output_mse": 0.1, "groups": 12, "calib_seconds": calib_s, "phase_seconds": phases, "run": ""}
        (tmp_path / "jobs" / f"{cell.replace(':', '-')}-s{seed}.json").write_text(json.dumps(row))

    (tmp_path / "jobs").mkdir()
    job("blocks:1", 0, 70.0, 0.30, 100.0, {"steps": 90.0, "first_step": 10.0})
    job("blocks:1", 1, 72.0, 0.40, 50.0, {"steps": 280.0, "first_step": 20.0})  # resumed: 50 s in its last process
    text = summarize(tmp_path)
    assert "2 calibrations" in text
    row3 = next(line for line in text.splitlines() if line.startswith("| blocks:1 |"))
    row2 = next(line for line in text.splitlines() if line.startswith("| slices:ABC (= blocks:1) |"))
    assert row3.split("|")[2:] == row2.split("|")[2:]  # the same runs, the same figures
    assert "71 ± 1.4 (70..72)" in row3 and "0.35 ± 0.071 (0.3..0.4)" in row3
    assert row3.rstrip(" |").endswith("200")  # mean of 100 and 300 group-seconds, not of 100 and 50
    _assert_png(tmp_path / "tables.png")
    assert json.loads((tmp_path / "tables.json").read_text())["plans"]
