"""Data-parallel calibration, sharded evaluation and sweeps over 2 CPU processes (gloo).

Starting processes costs seconds here, so one spawn of 2 ranks does every 2-rank check
(``two_ranks``) and the tests compare what it returned with a single process.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from osqdeploy.adapters import adapter_for
from osqdeploy.api import calibrate
from osqdeploy.config import DEFAULT_METHOD, CalibrationConfig, QuantConfig
from osqdeploy.distributed import DistContext, DistributedError, launch, scale_global_batch, tensor_digest
from osqdeploy.evaluation import TorchRuntime, evaluate
from osqdeploy.load.data import ImageFiles, eval_transform
from osqdeploy.load.models import load_model
from osqdeploy.plan import build_plan
from osqdeploy.quant.layers import quant_layers
from osqdeploy.reconstruct import Callbacks, Reconstructor, prepare_model
from osqdeploy.reconstruct.output_tuning import tuned_parameters
from osqdeploy.run import store
from osqdeploy.sweep import SweepError, SweepSpec, parse_bits

from conftest import images, loaded_tiny, tiny_vit

CPU = torch.device("cpu")
ITERS = 24
TINY = {"vit_tiny_patch16_224": dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10,
                                     pretrained_cfg_overlay=dict(input_size=[3, 32, 32]))}


def _calibrate(ctx: DistContext, drop_prob: float = 0.0, data_seed: int = 1, overlap: bool = False,
               shard: bool = False, compile_group: bool = False):
    """A 2-block tiny ViT reconstructed block by block; its codes, group MSEs and loss curves."""
    q, _, results = _reconstructed(ctx, 2, data_seed, iters=ITERS, drop_prob=drop_prob, overlap_allreduce=overlap,
                                   shard_rounding=shard, compile_group=compile_group)
    codes = [layer.weight_quantizer.w_int.cpu() for layer in quant_layers([q])]
    return codes, [r.mse_after for r in results], [r.loss_curve for r in results]


def _tuned(ctx: DistContext):
    """A 1-block tiny ViT reconstructed, then tuned at the output on cutmix blends: its steps and KLs."""
    q, rec, _ = _reconstructed(ctx, 1, 1, iters=4, drop_prob=0.0, output_tuning_iters=12,
                               output_tuning="steps+affine", output_tuning_mix="cutmix")
    steps = [p.detach().cpu().clone() for p in tuned_parameters(q, "steps+affine")[0]]
    return steps, rec.output_tuning.kl_before, rec.output_tuning.kl_after, rec.output_tuning.loss_curve


def _reconstructed(ctx: DistContext, depth: int, data_seed: int, **settings):
    """A tiny ViT of ``depth`` blocks reconstructed one block a group on 32 images: (model, reconstructor, results)."""
    q = tiny_vit(depth=depth)
    adapter = prepare_model(q, QuantConfig(4, 4), adapter_for)
    ccfg = CalibrationConfig(samples=32, batch_size=16, **settings)
    x = images(32, 32, seed=data_seed)
    ctx.require_same(tensor_digest(x), "calibration images")
    rec = Reconstructor(q, adapter, build_plan("blocks:1", adapter.units(q)), ccfg, ctx.device, dist=ctx)
    rec.initialize(x)
    return q, rec, rec.reconstruct(x)


def _folder(root: Path, n: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def _evaluate(ctx: DistContext, folder: str):
    torch.manual_seed(0)
    model = load_model("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY["vit_tiny_patch16_224"]).model
    data = ImageFiles(folder, transform=eval_transform(model))
    return evaluate(TorchRuntime(model, CPU), data, batch_size=3, progress=False, dist=ctx)


def _sweep_spec(folder: str) -> SweepSpec:
    return SweepSpec(
        models=["vit_tiny_patch16_224"], seeds=[0, 1], plans=["blocks:2"], data=folder, pretrained=False,
        model_kwargs=TINY, calibration={"iters": 3, "samples": 8, "batch_size": 4, "output_tuning_iters": 4},
        eval_limit=8,
    )


def _two_rank_checks(ctx: DistContext, folder: str, out: str) -> dict:
    import torch._inductor.config as inductor_config

    threads = (torch.get_num_threads(), inductor_config.compile_threads)  # as launch set them up
    torch.set_num_threads(1)
    from osqdeploy.sweep import run_sweep

    found: dict = {"threads": threads, "calibration": _calibrate(ctx), "tuned": _tuned(ctx)}
    from osqdeploy.distributed import GradientSync, RowShard

    finish, early = GradientSync.finish, []

    def counted(self, others, loss):  # how many collectives backward started, of how many
        out = finish(self, others, loss)
        early.append((self.started_in_backward,
                      sum(isinstance(i, RowShard) or i.grad is not None for i in self.items)))
        return out

    GradientSync.finish = counted
    found["calibration_overlapped"] = (_calibrate(ctx, overlap=True), early)
    GradientSync.finish = finish
    init, owned = RowShard.__init__, []

    def recorded(self, c, alpha):  # the rounding variables this rank trains, of the layer's
        init(self, c, alpha)
        owned.append((self.alpha.numel(), alpha.numel()))

    begin, weight, events = RowShard.begin, RowShard.weight, []

    def began(self, part):  # the order in which gathers start and layers take their weights
        events.append("begin")
        begin(self, part)

    def took(self):
        events.append("weight")
        return weight(self)

    RowShard.__init__, RowShard.begin, RowShard.weight = recorded, began, took
    GradientSync.finish, early = counted, []
    found["calibration_sharded"] = (_calibrate(ctx, shard=True), owned)
    found["sharded_overlap"] = (early, events)
    RowShard.__init__, RowShard.begin, RowShard.weight = init, begin, weight
    GradientSync.finish = finish
    try:
        _calibrate(ctx, data_seed=1 + ctx.rank)
    except DistributedError as e:
        found["different_data"] = str(e)
    r = _evaluate(ctx, folder)
    found["eval"] = (r.n, r.top1, r.logits, r.labels)
    found["sweep_first"] = run_sweep(_sweep_spec(folder), out, ctx)
    found["sweep_again"] = run_sweep(_sweep_spec(folder), out, ctx)
    return found


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def two_ranks(data_folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sweep")
    return {**launch(_two_rank_checks, str(data_folder), str(out), processes=2, device_type="cpu"), "out": out}


# -- calibration ----------------------------------------------------------------------------------


def test_two_rank_calibration_equals_one_process_with_the_same_global_batch(two_ranks):
    codes, mse, curves = _calibrate(DistContext.single())
    codes2, mse2, curves2 = two_ranks["calibration"]
    assert all(torch.equal(a, b) for a, b in zip(codes, codes2, strict=True))
    # fp32 on CPU: only the order of the gradient sum differs (measured: loss curves within 1e-6 relative)
    assert mse2 == pytest.approx(mse, rel=1e-5)
    for c1, c2 in zip(curves, curves2, strict=True):
        assert [it for it, _ in c1] == [it for it, _ in c2]
        assert [v for _, v in c2] == pytest.approx([v for _, v in c1], rel=1e-5)


def test_two_rank_output_tuning_on_blends_equals_one_process(two_ranks):
    # each rank blends its half of every batch with the same partners: the same steps, summed in another order
    steps, before, after, curve = _tuned(DistContext.single())
    steps2, before2, after2, curve2 = two_ranks["tuned"]
    assert after < before and after2 == pytest.approx(after, rel=1e-4) and before2 == pytest.approx(before, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(steps, steps2, strict=True))
    assert [v for _, v in curve2] == pytest.approx([v for _, v in curve], rel=1e-4)


def test_overlapped_all_reduce_gives_the_same_run_and_starts_during_backward(two_ranks):
    (codes, mse, curves), early = two_ranks["calibration_overlapped"]
    codes2, mse2, curves2 = two_ranks["calibration"]
    assert all(torch.equal(a, b) for a, b in zip(codes, codes2, strict=True))
    assert mse == mse2 and curves == curves2  # the same sums, bit for bit
    assert len(early) == 2 * ITERS  # every step of both groups went through it
    # every rounding gradient's all-reduce was started by backward itself, none left for after it
    assert all(started == total == 4 for started, total in early)


def test_sharded_gathers_run_ahead_of_the_forward_and_reduce_scatters_inside_backward(two_ranks):
    early, events = two_ranks["sharded_overlap"]
    assert len(early) == 2 * ITERS
    # every layer's gradient was reduce-scattered by backward itself, none left for after it
    assert all(started == total == 4 for started, total in early)
    # each step starts all four layers' gathers before the first layer takes its weight
    steps = ["".join(e[0] for e in events[i:i + 8]) for i in range(0, len(events), 8)]
    assert len(steps) == 2 * ITERS and set(steps) == {"bbbbwwww"}


def _equal_fraction(codes: list[torch.Tensor], codes2: list[torch.Tensor]) -> float:
    """The fraction of rounding codes two runs agree on, over all their layers."""
    return sum(int((a == b).sum()) for a, b in zip(codes, codes2, strict=True)) / sum(a.numel() for a in codes)


def test_sharded_rounding_variables_give_the_same_run_each_rank_training_half(two_ranks):
    (codes, mse, curves), owned = two_ranks["calibration_sharded"]
    codes2, mse2, curves2 = two_ranks["calibration"]
    # every layer of both blocks (qkv, proj, fc1, fc2) was split, each rank training half of its V
    assert len(owned) == 2 * 4 and all(2 * mine == total for mine, total in owned)
    same = _equal_fraction(codes, codes2)
    print(f"sharded vs whole: {same:.6f} of codes equal; MSE {mse} vs {mse2}")
    assert same == 1.0
    assert mse == pytest.approx(mse2, rel=1e-5)
    for c1, c2 in zip(curves, curves2, strict=True):
        assert [v for _, v in c1] == pytest.approx([v for _, v in c2], rel=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL inside captured CUDA graphs needs 2 GPUs")
def test_overlapped_all_reduce_inside_captured_cuda_graphs_gives_the_same_run():
    """The CUDA engine (captured step, compiled kernels, fp16): hooks launch NCCL at capture only."""
    codes, mse, curves = launch(_calibrate, processes=2, device_type="cuda")
    codes2, mse2, curves2 = launch(_calibrate, 0.0, 1, True, processes=2, device_type="cuda")
    assert all(torch.equal(a, b) for a, b in zip(codes, codes2, strict=True))
    assert mse == mse2 and curves == curves2


@pytest.mark.slow
def test_sharded_rounding_variables_through_a_compiled_group_give_the_same_run():
    """The gather and reduce-scatter inside the group that torch.compile traces (compile_group)."""
    codes, mse, _ = launch(_calibrate, 0.0, 1, False, False, True, processes=2, device_type="cpu")
    codes2, mse2, _ = launch(_calibrate, 0.0, 1, False, True, True, processes=2, device_type="cpu")
    assert all(torch.equal(a, b) for a, b in zip(codes, codes2, strict=True))
    assert mse2 == pytest.approx(mse, rel=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL inside captured CUDA graphs needs 2 GPUs")
def test_sharded_rounding_variables_inside_captured_cuda_graphs_match_the_whole():
    """fp16 autocast: the gradient is averaged before the chain rule through h(V), not after, so the
    sums round differently; the runs must still agree on all but a few codes at a tie."""
    codes, mse, _ = launch(_calibrate, processes=2, device_type="cuda")
    codes2, mse2, _ = launch(_calibrate, 0.0, 1, True, True, processes=2, device_type="cuda")
    same = _equal_fraction(codes, codes2)
    assert same >= 0.999
    assert mse2 == pytest.approx(mse, rel=1e-2)


def test_spawned_ranks_share_the_host_cores(two_ranks):
    import os

    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert two_ranks["threads"] == (share, share)


def test_different_data_on_different_ranks_is_one_clear_error(two_ranks):
    msg = two_ranks["different_data"]
    assert "do not have the same calibration images" in msg and "ranks 0" in msg and "ranks 1" in msg


def test_batch_that_does_not_split_over_the_ranks_is_refused():
    ctx = DistContext(rank=0, world=3)
    with pytest.raises(DistributedError, match="does not split evenly over 3 ranks"):
        ctx.batch_shard(32)
    assert DistContext(rank=1, world=2).batch_shard(32) == slice(16, 32)


def test_larger_global_batch_keeps_lr_times_iterations():
    cfg = CalibrationConfig(iters=20_000, batch_size=32)
    big = scale_global_batch(cfg, 4)
    assert (big.batch_size, big.iters) == (128, 5000)
    assert big.lr_round * big.iters == pytest.approx(cfg.lr_round * cfg.iters)
    assert big.lr_act == cfg.lr_act and big.extra["global_batch_scale"] == 4
    assert scale_global_batch(cfg, 1) is cfg


# -- evaluation -----------------------------------------------------------------------------------


def test_two_rank_evaluation_equals_one_process_image_for_image(two_ranks, data_folder):
    one = _evaluate(DistContext.single(), str(data_folder))
    n, top1, logits, labels = two_ranks["eval"]
    assert (n, top1) == (one.n, one.top1)
    assert torch.equal(labels, one.labels)
    assert torch.equal(logits, one.logits)


@pytest.mark.parametrize("n,align,world", [(20, 3, 2), (5, 4, 3), (0, 2, 2), (64, 1, 4)])
def test_shards_cover_every_image_once_at_batch_boundaries(n, align, world):
    shards = [DistContext(rank=r, world=world).shard(n, align) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert all(s.start % align == 0 for s in shards if len(s))


# -- sweeps ---------------------------------------------------------------------------------------


def test_sweep_over_two_ranks_completes_and_a_rerun_skips_finished_jobs(two_ranks):
    first, again = two_ranks["sweep_first"], two_ranks["sweep_again"]
    assert sorted(first["ran"]) == sorted(j["job"] for j in first["jobs"]) and len(first["jobs"]) == 2
    assert {j["rank"] for j in first["jobs"]} == {0, 1}  # one job on each rank
    for row in first["jobs"]:
        assert row["status"] == "done", row["status"]
        assert row["onnx_bytes"] > 0 and row["ort_top1_agreement"] >= 0 and row["kl_to_fp32"] >= 0
    assert again["ran"] == [] and sorted(again["skipped"]) == sorted(first["ran"])
    assert [j["status"] for j in again["jobs"]] == ["done earlier"] * 2


def test_sweep_writes_json_and_csv_tables(two_ranks):
    lines = (two_ranks["out"] / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("job,model,bits,plan,seed,top1,") and len(lines) == 3
    table = json.loads((two_ranks["out"] / "sweep.json").read_text())
    assert [j["status"] for j in table["jobs"]] == ["done earlier"] * 2  # the rerun's table
    # each job calibrated as `osq calibrate` would: the default method, then the sweep's plan and settings
    runs = sorted((two_ranks["out"] / "jobs").glob("*/run/run.json"))
    assert len(runs) == 2
    for run in runs:
        calibration = store.read_manifest(run.parent).calibration
        assert calibration.method is DEFAULT_METHOD and calibration.granularity == "blocks:2"
        assert (calibration.iters, calibration.output_tuning_iters) == (3, 4)


def test_sweep_spec_from_toml(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('models = ["deit_tiny"]\nbits = ["W4A4", "6,6"]\nplans = ["auto", "blocks:1"]\nseeds = [0, 1]\n'
                    'data = "calib"\n[calibration]\niters = 100\n[eval]\nlimit = 50\n')
    spec = SweepSpec.from_toml(path)
    spec.validate()
    assert len(spec.jobs()) == 8 and spec.bits == [(4, 4), (6, 6)] and spec.eval_limit == 50
    assert spec.data == str(tmp_path / "calib") and spec.calibration == {"iters": 100}
    assert spec.jobs()[0].name == "deit_tiny-w4a4-auto-s0"


def test_a_sweep_job_calibrates_as_osq_calibrate_does_unless_the_sweep_says_otherwise():
    from osqdeploy.api import calibration_config
    from osqdeploy.sweep import job_config

    spec = SweepSpec(models=["deit_t"], calibration={"iters": 50})
    spec.validate()
    (job,) = spec.jobs()
    assert job.plan == "recipe" and job.name == "deit_t-w4a4-recipe-s0"
    assert job_config(job, spec, "cpu") == replace(calibration_config("deit_t"), iters=50, device="cpu")
    other = SweepSpec(models=["deit_t"], plans=["auto"], method="paper")
    cfg = job_config(other.jobs()[0], other, "cpu")
    assert (cfg.granularity, cfg.samples, cfg.method.value) == ("auto", 1024, "paper")


def test_finished_sweep_jobs_are_known_by_the_method_they_ran_not_by_the_word_default():
    unnamed = SweepSpec(models=["deit_t"])
    named = SweepSpec(models=["deit_t"], method=DEFAULT_METHOD.value)
    paper = SweepSpec(models=["deit_t"], method="paper")
    assert unnamed.settings_digest() == named.settings_digest() != paper.settings_digest()


@pytest.mark.parametrize("text,match", [
    ('models = ["x"]\ncolour = 1\n', "unknown sweep settings: colour"),
    ('models = ["x"]\n[calibration]\nitres = 5\n', "does not know: itres"),
    ('models = [\n', "not valid TOML"),
    ('models = ["x"]\nbits = ["W9A4"]\n', "weight bits must be"),
    ('models = ["x"]\nmethod = "best"\n', "method must be one of"),
])
def test_bad_sweep_files_are_one_clear_error(tmp_path, text, match):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    with pytest.raises((SweepError, ValueError), match=match):
        SweepSpec.from_toml(path).validate()
    assert parse_bits("w8a8") == (8, 8)


def test_sweep_command_reports_a_bad_file_on_one_line(tmp_path):
    import typer

    from cli.distributed import sweep

    app = typer.Typer()
    app.command()(sweep)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["sweep", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "sweep file not found" in result.output


def test_more_gpus_than_the_machine_has_is_one_clear_error():
    from osqdeploy.distributed import check_gpus

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(DistributedError, match=f"asks for {n + 1} GPUs but this machine has {n}"):
        check_gpus(n + 1)


# -- a rank dying ---------------------------------------------------------------------------------


def _dies(ctx: DistContext) -> None:
    ctx.barrier()
    if ctx.rank == 1:
        os._exit(7)
    ctx.barrier()  # rank 0 waits on the dead rank until the launcher stops it


@pytest.mark.slow
def test_a_rank_dying_stops_the_others_with_one_line():
    with pytest.raises(DistributedError, match=r"rank 1 died \(exit code 7\); the other ranks were stopped"):
        launch(_dies, processes=2, device_type="cpu")


# -- the calibration entry point: rank 0 writes, a killed run resumes --------------------------------


# without QDrop every draw is shared, so two ranks compute what one process does
PIPELINE_CFG = CalibrationConfig(samples=16, batch_size=8, iters=6, granularity="blocks:1", drop_prob=0.0)


class _Stop(Exception):
    pass


class _StopAfterFirstGroup(Callbacks):
    def on_group_end(self, result) -> None:
        raise _Stop  # on every rank, after rank 0 checkpointed the group, as a kill between groups would


def _pipeline_runs(ctx: DistContext, root: str) -> dict:
    torch.set_num_threads(1)
    ccfg = PIPELINE_CFG
    x = images(16, 32)

    def run(where: str, callbacks=None) -> dict:
        loaded = loaded_tiny(depth=2)
        run = calibrate(loaded, x, QuantConfig(4, 4), ccfg, Path(root) / where, callbacks=callbacks, dist=ctx)
        return run.manifest.to_dict()

    whole = run("whole")
    try:
        run("killed", _StopAfterFirstGroup())
    except _Stop:
        pass
    written = sorted(p.name for p in (Path(root) / "killed").iterdir())
    resumed = run("killed")
    return {"whole": whole, "resumed": resumed, "written_before_resume": written}


@pytest.mark.slow
def test_two_rank_run_is_written_by_rank_0_and_resumes_after_an_interruption(tmp_path):
    found = launch(_pipeline_runs, str(tmp_path), processes=2, device_type="cpu")
    whole, resumed = found["whole"], found["resumed"]
    assert whole["status"] == resumed["status"] == "complete"
    assert resumed["resumed_from_group"] == 1
    assert "checkpoint" in " ".join(found["written_before_resume"])
    assert resumed["state_sha256"] == whole["state_sha256"]  # the same codes and steps, bit for bit
    single = calibrate(loaded_tiny(depth=2), images(16, 32), QuantConfig(4, 4),
                       PIPELINE_CFG, tmp_path / "one").manifest
    assert single.output_mse == pytest.approx(whole["output_mse"], rel=1e-5)


def test_step_profile_counts_overlapping_kernels_once_and_keeps_collectives_apart(tmp_path):
    from benchmarks.distributed_profile import kernel_summary

    kernels = [("gemm", 0, 10), ("ncclDevKernel_AllGather_RING_LL", 5, 10), ("layer_norm", 8, 4), ("gemm", 30, 10)]
    events = [{"cat": "kernel", "name": n, "ts": ts, "dur": dur} for n, ts, dur in kernels]
    events.append({"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100})  # not a kernel
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    s = kernel_summary(trace, steps=2)
    assert s["window_us_per_step"] == 20  # 0..40 over 2 steps
    assert s["compute_union_us_per_step"] == 11  # 0..12 and 30..40
    assert s["compute_sum_us_per_step"] == 12
    assert s["nccl_sum_us_per_step"] == 5 and s["nccl_kernels_per_step"] == 0.5
    assert s["busy_union_us_per_step"] == 12.5  # 0..15 and 30..40: the gather overlaps the compute
    assert s["top_compute"][0] == ("gemm", 1.0, 10.0)
