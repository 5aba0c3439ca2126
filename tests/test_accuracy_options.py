"""Accuracy options beyond the paper: named methods, the prediction-aware objective, output-level tuning.

Each option runs, repeats itself exactly for a seed, and on the tiny ViT with planted outliers
brings the quantized predictions closer to the float ones on held-out inputs than the same
schedule without it.
"""

import copy
from dataclasses import replace

import pytest
import torch

from osqdeploy.adapters import adapter_for
from osqdeploy.config import METHODS, CalibrationConfig, ConfigError, Method, QuantConfig
from osqdeploy.plan import build_plan
from osqdeploy.quant.layers import act_quantizers, quant_layers
from osqdeploy.reconstruct import Reconstructor, logits, prepare_model
from osqdeploy.reconstruct.mixing import Crops, Mixing, blend_views
from osqdeploy.reconstruct.objective import PredictionAwareMSE, ReconstructionMSE, prediction_kl
from osqdeploy.reconstruct.output_tuning import tuned_parameters

from conftest import images, loaded_tiny, tiny_vit

CPU = torch.device("cpu")


def _calibrate(model, iters=60, n=64, spec="blocks:1", **cfg):
    q = copy.deepcopy(model)
    adapter = prepare_model(q, QuantConfig(4, 4), adapter_for)
    ccfg = CalibrationConfig(samples=n, batch_size=16, iters=iters, **cfg)
    rec = Reconstructor(q, adapter, build_plan(spec, adapter.units(q)), ccfg, CPU)
    x = images(n, 32)
    rec.initialize(x)
    rec.reconstruct(x)
    return q, rec


def _held_out_kl(model, quantized, n=1024, seed=11):
    x = images(n, 32, seed=seed)
    return float(prediction_kl(logits(model, x, 256, CPU), logits(quantized, x, 256, CPU)))


# --------------------------------------------------------------------------------------- methods


def test_the_dataclass_defaults_are_the_papers_and_each_preset_sets_its_own_settings():
    assert CalibrationConfig().method is Method.PAPER
    for method in METHODS:
        cfg = CalibrationConfig(iters=7, seed=3).with_method(method)
        assert cfg.method is method and (cfg.iters, cfg.seed) == (7, 3)  # the schedule is not the method's
        assert CalibrationConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.to_dict()["method"] == method.value
    # a preset resets every accuracy setting, so "paper" after anything is the paper's method
    tuned = CalibrationConfig().with_method(Method.OUTPUT_TUNED)
    assert tuned.output_tuning_iters > 0
    assert CalibrationConfig(loss="fisher").with_method("paper") == CalibrationConfig()
    assert tuned.with_method("paper").method is Method.PAPER
    # a setting changed by hand is a custom method; a weight of a term that is off changes nothing
    assert CalibrationConfig(kl_groups=2).method is Method.CUSTOM
    assert CalibrationConfig(view_mix="cutmix").method is Method.CUSTOM
    assert replace(tuned, output_tuning_drop=0.5).method is Method.CUSTOM
    assert replace(tuned, output_tuning_ema=0.0).method is Method.CUSTOM  # ending on the last step
    assert replace(tuned, output_tuning_ema=0.99).method is Method.OUTPUT_TUNED  # the decay is schedule
    assert replace(tuned, view_mix="mixup").with_method(Method.OUTPUT_TUNED) == tuned
    assert CalibrationConfig(kl_weight=5.0).method is Method.PAPER
    assert CalibrationConfig(output_tuning_lr=1.0).method is Method.PAPER


def test_a_models_settings_are_the_default_method_on_its_recipes_plan_unless_a_method_pins_the_papers():
    from osqdeploy.api import calibration_config
    from osqdeploy.config import DEFAULT_METHOD, FAST_ITERS, fast_preset

    deit = calibration_config("deit_t")
    assert deit.method is DEFAULT_METHOD is Method.OUTPUT_TUNED and deit.output_tuning_iters > 0
    assert (deit.granularity, deit.samples) == ("blocks:4", 4096)  # the recipe's measured plan and views
    assert (calibration_config("vit_s").granularity, calibration_config("vit_s").samples) == ("auto", 1024)
    paper = calibration_config("deit_t", "paper")  # the paper's plan and views, whatever the recipe says
    assert paper.method is Method.PAPER and (paper.granularity, paper.samples, paper.output_tuning_iters) == (
        "auto", 1024, 0)
    assert paper == replace(CalibrationConfig(), granularity="auto")
    # options given by name come last; a changed plan is no longer the paper's method
    custom = calibration_config("deit_t", "paper", granularity="blocks:2", seed=5, samples=None)
    assert (custom.granularity, custom.seed, custom.samples, custom.method) == ("blocks:2", 5, 1024, Method.CUSTOM)
    # the demo's short schedule shortens tuning where the method tunes, and never turns it on
    demo, demo_paper = calibration_config("demo"), calibration_config("demo", "paper")
    assert demo.method is Method.OUTPUT_TUNED and 0 < demo.output_tuning_iters < deit.output_tuning_iters
    assert demo_paper.output_tuning_iters == 0 and demo_paper.method is Method.PAPER
    assert calibration_config("demo", iters=2).iters == 2  # an option given by name beats the recipe's schedule
    # --fast cuts reconstruction and tuning by the same fraction; the method stays
    fast = fast_preset(deit)
    assert fast.iters == FAST_ITERS and fast.output_tuning_iters * deit.iters == deit.output_tuning_iters * FAST_ITERS
    assert fast.method is Method.OUTPUT_TUNED
    # a shorter stage keeps its average over the same share of it: the start's weight is unchanged
    start_weight = deit.output_tuning_ema ** deit.output_tuning_iters
    for short in (fast, demo, calibration_config("deit_t", output_tuning_iters=300)):
        assert short.output_tuning_ema < deit.output_tuning_ema
        assert short.output_tuning_ema ** short.output_tuning_iters == pytest.approx(start_weight)
    assert calibration_config("deit_t", output_tuning_iters=300, output_tuning_ema=0.9).output_tuning_ema == 0.9
    assert calibration_config("deit_t", "paper", output_tuning_iters=300).output_tuning_ema == 0.0


def test_a_method_names_its_quantizer_choices_too():
    """The default rotates the post-GELU inputs; the paper's methods keep its per-tensor grid, and
    a run whose two halves disagree with every method is custom."""
    from osqdeploy.api import calibration_config, quant_config
    from osqdeploy.config import DEFAULT_METHOD, METHOD_QUANT, method_of

    assert set(METHOD_QUANT) == set(METHODS)
    assert QuantConfig().post_gelu_grid == "tensor"  # the dataclass is the paper's, as CalibrationConfig's
    default, paper = quant_config(4, 4), quant_config(6, 6, "paper")
    assert default.post_gelu_grid == "hadamard" and (default.w_bits, default.a_bits) == (4, 4)
    assert paper == QuantConfig(6, 6)
    assert quant_config(4, 4, attn_grid="uniform", post_gelu_grid=None).attn_grid == "uniform"  # None: not given
    assert QuantConfig(post_gelu_grid="channel").with_method("custom").post_gelu_grid == "channel"
    assert method_of(default, calibration_config("deit_t")) is DEFAULT_METHOD
    assert method_of(paper, calibration_config("deit_t", "paper")) is Method.PAPER
    assert method_of(default, calibration_config("deit_t", "paper")) is Method.CUSTOM
    assert method_of(paper, calibration_config("deit_t")) is Method.CUSTOM


def test_the_accuracy_benchmark_builds_each_variant_as_osq_calibrate_would():
    from benchmarks.accuracy_seeds import Job, post_tuned_job
    from osqdeploy.api import calibration_config

    def config(variant, samples=None):
        return Job(variant, "w4a4", 1).configs("deit_t", 20000, samples, "cpu")[1]

    assert config("default") == replace(calibration_config("deit_t"), seed=1, device="cpu")
    quant = Job("paper,post_gelu_grid=hadamard", "w4a4", 1).configs("deit_t", 20000, None, "cpu")[0]
    assert quant.post_gelu_grid == "hadamard"  # a quantizer setting after the name beats the method's
    assert Job("default", "w6a6", 1).configs("deit_t", 20000, None, "cpu")[0] == QuantConfig(6, 6).with_method(
        "output_tuned")
    paper = config("paper")
    assert paper.method is Method.PAPER and (paper.granularity, paper.samples) == ("auto", 1024)
    # settings after the name apply last, whatever the preset pins
    mixed = config("paper,granularity=blocks:4,samples=4096")
    assert (mixed.loss, mixed.granularity, mixed.samples, mixed.output_tuning_iters) == ("mse", "blocks:4", 4096, 0)
    assert config("paper", samples=128).samples == 128
    # a tuning length given in the variant shortens the average with it, as the API's options do
    short = config("default,output_tuning_iters=200")
    assert short == replace(calibration_config("deit_t", output_tuning_iters=200), seed=1, device="cpu")
    assert short.output_tuning_ema < calibration_config("deit_t").output_tuning_ema
    # a yes/no setting reads true or false in either case, and nothing else
    assert config("default,pad_attention=True").pad_attention and config("default,pad_attention=true").pad_attention
    assert not config("default,pad_attention=False").pad_attention
    with pytest.raises(SystemExit, match="true or false, got 'yes'"):
        config("default,pad_attention=yes")
    with pytest.raises(SystemExit, match="granularty"):
        config("paper,granularty=blocks:4")
    with pytest.raises(SystemExit, match="output_tuning_itres"):
        post_tuned_job(Job("paper", "w4a4", 0), "steps+affine,output_tuning_itres=200")


def test_the_rotated_reconstruction_tuned_at_temperature_2_is_the_default_calibration():
    """results.md reports the default from runs reconstructed, saved, then tuned with ``--post-tuning``."""
    from benchmarks.accuracy_seeds import Job, post_tuned_config
    from osqdeploy.api import calibration_config, quant_config

    job = Job("paper,granularity=blocks:4,samples=4096,post_gelu_grid=hadamard", "w4a4", 1)
    quant, ccfg = job.configs("deit_t", 20000, None, "cpu")
    tuning = "steps+affine,output_tuning_mix=cutmix,output_tuning_ema=0.995"
    default = replace(calibration_config("deit_t"), seed=1, device="cpu")
    assert quant == quant_config(4, 4)
    assert post_tuned_config(job, tuning + ",output_tuning_temperature=2", ccfg) == default
    assert post_tuned_config(job, tuning, ccfg).method is Method.CUSTOM


def test_a_recipe_refuses_a_number_of_images_that_is_not_a_positive_integer():
    from osqdeploy.load.models import RecipeError, _parse_recipe

    base = {"name": "m", "timm_name": "vit_tiny_patch16_224", "family": "vit"}
    assert _parse_recipe({**base, "samples": 64}, "m.toml").samples == 64
    assert _parse_recipe(base, "m.toml").samples is None
    for bad in (0, -1, 2.5, "many", True):
        with pytest.raises(RecipeError, match="samples"):
            _parse_recipe({**base, "samples": bad}, "m.toml")


@pytest.mark.parametrize("settings", [
    {"kl_groups": -1}, {"kl_groups": 1, "loss": "fisher"}, {"kl_weight": 0.0}, {"output_tuning_iters": -1},
    {"output_tuning": "weights"}, {"output_tuning_lr": 0.0}, {"loss": "l1"}, {"output_tuning_mix": "cutout"},
    {"view_mix": "cutout"}, {"output_tuning_drop": 1.0}, {"output_tuning_drop": -0.1},
    {"output_tuning_ema": 1.0}, {"output_tuning_ema": -0.5},
])
def test_accuracy_settings_outside_the_method_are_refused(settings):
    with pytest.raises(ConfigError):
        CalibrationConfig(**settings).validate()


def test_an_objective_registered_by_name_is_a_valid_loss(monkeypatch):
    from osqdeploy.reconstruct import OBJECTIVES, make_objective

    monkeypatch.setitem(OBJECTIVES, "mse_copy", ReconstructionMSE)
    CalibrationConfig(loss="mse_copy").validate()  # docs/design.md: register it, then select it by name
    assert isinstance(make_objective("mse_copy"), ReconstructionMSE)


# ------------------------------------------------------------------------ prediction-aware objective


def test_prediction_objective_is_the_block_error_plus_its_balanced_kl():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 5).requires_grad_(False)
    out, target, fp_logits = torch.randn(4, 3, 8), torch.randn(4, 3, 8), torch.randn(4, 5)
    objective = PredictionAwareMSE(lambda o: head(o[:, 0])).balanced(out, target, fp_logits, kl_weight=2.0)
    mse = ReconstructionMSE()(out, target)
    kl = prediction_kl(fp_logits, head(out[:, 0]))
    assert float(objective.kl_scale * kl) == pytest.approx(2.0 * float(mse), rel=1e-5)
    assert torch.allclose(objective(out, target, fp_logits), mse + objective.kl_scale * kl)
    with pytest.raises(ValueError, match="float logits"):
        objective(out, target)


def test_prediction_objective_refuses_a_group_that_ends_inside_a_block():
    # slices:A-B-C: the attention slice A hands on (x, context), not a block output a head can read
    with pytest.raises(ConfigError, match="ends inside a block"):
        _calibrate(tiny_vit(depth=1), iters=2, n=16, spec="slices:A-B-C", kl_groups=3)


# ------------------------------------------------------------------------------ output-level tuning


def test_output_tuning_keeps_the_integer_weights_and_restores_a_start_it_cannot_improve():
    model = tiny_vit(depth=2)
    base, _ = _calibrate(model, iters=10, n=32)
    tuned, rec = _calibrate(model, iters=10, n=32, output_tuning_iters=30, output_tuning="steps+affine")
    result = rec.output_tuning
    assert result.kept and result.kl_after < result.kl_before and result.tensors > 0
    for a, b in zip(quant_layers([base]), quant_layers([tuned]), strict=True):
        assert torch.equal(a.weight_quantizer.w_int, b.weight_quantizer.w_int)
    assert any(not torch.equal(a.scale, b.scale) for a, b in zip(act_quantizers([base]), act_quantizers([tuned]),
                                                                 strict=True) if hasattr(a, "scale"))
    # a rate that throws the model about leaves it as block reconstruction left it, exactly
    wild, rec = _calibrate(model, iters=10, n=32, output_tuning_iters=30, output_tuning="steps+affine",
                           output_tuning_lr=5.0)
    assert not rec.output_tuning.kept
    state, wild_state = base.state_dict(), wild.state_dict()
    assert all(torch.equal(state[k], wild_state[k]) for k in state)


def test_weight_scale_tuning_moves_row_scales_and_keeps_the_codes():
    model = tiny_vit(depth=2)
    affine, _ = _calibrate(model, iters=10, n=32, output_tuning_iters=30, output_tuning="steps+affine")
    tuned, rec = _calibrate(model, iters=10, n=32, output_tuning_iters=30, output_tuning="steps+affine+wscale")
    assert rec.output_tuning.kept and rec.output_tuning.kl_after < rec.output_tuning.kl_before
    layers = list(zip(quant_layers([affine]), quant_layers([tuned]), strict=True))
    # one learned tensor more per layer than without the row scales
    assert rec.output_tuning.tensors == sum(map(len, tuned_parameters(affine, "steps+affine"))) + len(layers)
    for a, b in layers:
        wa, wb = a.weight_quantizer, b.weight_quantizer
        assert torch.equal(wa.w_int, wb.w_int) and torch.equal(wa.zero_point, wb.zero_point)
        assert not torch.equal(wa.scale, wb.scale) and (wb.scale > 0).all()
        assert not wb.scale.requires_grad


def test_tuning_without_the_class_bias_leaves_the_classifiers_prior_as_reconstruction_left_it():
    model = tiny_vit(depth=2)
    base, _ = _calibrate(model, iters=10, n=32)
    with_bias, _ = _calibrate(model, iters=10, n=32, output_tuning_iters=30, output_tuning="steps+affine")
    without, rec = _calibrate(model, iters=10, n=32, output_tuning_iters=30, output_tuning="steps+affine",
                              output_tuning_class_bias=False)
    head = base.get_classifier().bias
    assert not torch.equal(with_bias.get_classifier().bias, head)
    assert torch.equal(without.get_classifier().bias, head)
    # one learned tensor fewer than with the bias
    assert rec.output_tuning.kept
    assert rec.output_tuning.tensors == sum(map(len, tuned_parameters(base, "steps+affine"))) - 1
    # the other biases still move
    assert any(not torch.equal(a.bias, b.bias) for a, b in zip(quant_layers([base])[:-1], quant_layers([without])[:-1],
                                                               strict=True))


def test_tuning_temperature_is_hintons_loss_and_sharpening_weighs_the_top_class():
    gen = torch.Generator().manual_seed(0)
    fp, q = torch.randn(16, 10, generator=gen) * 3, torch.randn(16, 10, generator=gen) * 3
    assert torch.equal(prediction_kl(fp, q, 1.0), prediction_kl(fp, q))
    # T² · KL(softmax(fp / T) ‖ softmax(q / T))
    t = 0.5
    p = (fp / t).softmax(-1)
    ref = (p * ((fp / t).log_softmax(-1) - (q / t).log_softmax(-1))).sum(-1).mean() * t * t
    assert torch.allclose(prediction_kl(fp, q, t), ref, rtol=1e-5)
    assert float(prediction_kl(fp, fp.clone(), 0.5)) == pytest.approx(0.0, abs=1e-6)
    # a wrong top class costs more, relative to spread elsewhere, at T < 1 than at T = 1
    base = torch.tensor([[4.0, 2.0, 0.0, 0.0]])
    top_swapped = torch.tensor([[2.0, 4.0, 0.0, 0.0]])
    tail_moved = torch.tensor([[4.0, 2.0, 1.5, -1.5]])
    ratio = [float(prediction_kl(base, top_swapped, t) / prediction_kl(base, tail_moved, t)) for t in (1.0, 0.5)]
    assert ratio[1] > ratio[0]


def test_tuning_at_the_defaults_temperature_fits_differently_and_is_judged_on_the_plain_kl():
    model = tiny_vit(depth=2)
    plain, _ = _calibrate(model, iters=10, n=32, output_tuning_iters=30, output_tuning="steps+affine")
    soft, rec = _calibrate(model, iters=10, n=32, output_tuning_iters=30, output_tuning="steps+affine",
                           output_tuning_temperature=METHODS[Method.OUTPUT_TUNED]["output_tuning_temperature"])
    # kl_before / kl_after are the plain KL (T = 1) on the calibration images, whatever was fitted
    assert rec.output_tuning.kept and rec.output_tuning.kl_after < rec.output_tuning.kl_before
    x = images(32, 32)
    plain_kl = float(prediction_kl(logits(model, x, 16, CPU), logits(soft, x, 16, CPU)))
    assert plain_kl == pytest.approx(rec.output_tuning.kl_after, rel=1e-4)
    assert any(not torch.equal(a.bias, b.bias) for a, b in zip(quant_layers([plain]), quant_layers([soft]),
                                                               strict=True))
    with pytest.raises(ConfigError, match="temperature"):
        CalibrationConfig(output_tuning_temperature=0.0).validate()


def test_mixing_blends_each_image_with_its_partner_as_drawn():
    gen = torch.Generator().manual_seed(0)
    mix = Mixing.build("cutmix", iters=200, batch=8, n=40, hw=(32, 32), gen=gen, device=CPU)
    x, pool = torch.zeros(8, 3, 32, 32), torch.ones(40, 3, 32, 32)
    it = torch.tensor([5])
    cut = mix.apply(pool, x, it, slice(None))
    # CutMix pastes the partner inside its box and nothing else; a box's sides are sqrt(1 - lam)
    # of the image's (to the pixel), less where the border clips them
    box = mix.boxes[5]
    areas = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    assert torch.equal(cut.sum((1, 2, 3)), 3.0 * areas)
    sides = torch.stack([mix.boxes[..., 1] - mix.boxes[..., 0], mix.boxes[..., 3] - mix.boxes[..., 2]], -1)
    assert mix.boxes.min() >= 0 and mix.boxes.max() <= 32 and sides.min() >= 0
    assert (sides <= 32 * (1 - mix.lam).sqrt().unsqueeze(-1) + 1).all()
    assert (sides.float().mean() > 0.5 * 32 * (1 - mix.lam).sqrt().mean())  # clipped, not collapsed
    # mixup's blend is lam of the image and 1 - lam of its partner; a shard takes its rows only
    up = replace(mix, kind="mixup").apply(pool, x[2:6], it, slice(2, 6))
    assert torch.allclose(up[:, 0, 0, 0], 1 - mix.lam[5, 2:6])
    assert mix.partners.min() >= 0 and mix.partners.max() < 40


def test_view_mix_blends_half_the_views_once_from_unblended_partners():
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    before = x.clone()
    assert blend_views(x, "none", 0) is x
    for kind in ("cutmix", "mixup"):
        out = blend_views(x, kind, 3)
        assert torch.equal(x, before)  # the caller's views are left as they were
        assert torch.equal(out, blend_views(x, kind, 3)) and not torch.equal(out, blend_views(x, kind, 4))
        changed = [i for i in range(24) if not torch.equal(out[i], x[i])]
        assert 9 <= len(changed) <= 12  # half of them, less any whose partner is itself or whose box is empty
        for i in changed:
            if kind == "cutmix":  # one rectangle, copied from one other unblended view
                inside = (out[i] != x[i]).any(0)
                rows, cols = inside.any(1).nonzero(), inside.any(0).nonzero()
                box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
                assert any(torch.equal(out[i][:, box[0], box[1]], x[j][:, box[0], box[1]]) for j in range(24))
            else:  # lam of the view and 1 - lam of one other unblended view
                fits = []
                for j in range(24):
                    d = x[i] - x[j]
                    lam = float((out[i] - x[j]).mul(d).sum() / d.pow(2).sum()) if j != i else 1.0
                    fits.append(0 <= lam <= 1 and torch.allclose(out[i], lam * x[i] + (1 - lam) * x[j], atol=1e-6))
                assert any(fits)


def test_view_mix_reaches_every_stage_and_is_recorded(tmp_path):
    from osqdeploy.api import calibrate, load_run

    x = images(32, 32)
    runs = {mix: calibrate(loaded_tiny("vit", depth=1), x, QuantConfig(4, 4), CalibrationConfig(
        samples=32, batch_size=16, iters=0, granularity="blocks:1", view_mix=mix), tmp_path / mix)
        for mix in ("none", "cutmix")}
    assert load_run(tmp_path / "cutmix").manifest.calibration.view_mix == "cutmix"
    steps = {mix: torch.cat([q.scale.flatten() for q in act_quantizers([run.model]) if hasattr(q, "scale")])
             for mix, run in runs.items()}
    assert not torch.equal(steps["none"], steps["cutmix"])  # the observers saw the blended views


def test_crops_resample_a_box_of_the_drawn_area_and_aspect_flipped_as_drawn():
    gen = torch.Generator().manual_seed(0)
    crops = Crops.build(0.35, iters=300, batch=8, gen=gen, device=CPU)
    w, h = crops.theta[..., 0, 0].abs(), crops.theta[..., 1, 1]
    area = w * h  # fractions of the side: a box inside the image covering 0.35..1 of it
    assert area.min() >= 0.35 - 1e-6 and area.max() <= 1 + 1e-6 and area.std() > 0.1
    assert (w <= 1).all() and (h <= 1).all()
    assert (crops.theta[..., 0, 2].abs() <= 1 - w + 1e-6).all() and (crops.theta[..., 1, 2].abs() <= 1 - h + 1e-6).all()
    flipped = crops.theta[..., 0, 0] < 0
    assert 0.4 < flipped.float().mean() < 0.6
    # the whole image unflipped is the image itself; flipped, its mirror; a shard takes its rows only
    x = torch.randn(2, 3, 16, 16)
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    whole = Crops(torch.stack([eye, eye * torch.tensor([[-1.0], [1.0]])]).unsqueeze(0))
    out = whole.apply(x, torch.tensor([0]), slice(None))
    assert torch.allclose(out[0], x[0], atol=1e-5) and torch.allclose(out[1], x[1].flip(-1), atol=1e-5)
    assert torch.allclose(whole.apply(x[1:], torch.tensor([0]), slice(1, 2))[0], x[1].flip(-1), atol=1e-5)
    # a half-width box at the left edge: its left half stretched over the whole width
    half = Crops(torch.tensor([[[[0.5, 0, -0.5], [0, 1.0, 0]]]]))
    ramp = torch.arange(16.0).expand(1, 1, 16, 16)
    left = half.apply(ramp, torch.tensor([0]), slice(None))
    assert left.max() <= 8.0 and left[0, 0, 0, 0] == 0.0 and torch.all(left[..., 1:] >= left[..., :-1])


def test_output_tuning_batch_and_crops_change_what_a_step_fits(monkeypatch):
    import osqdeploy.reconstruct.output_tuning as ot

    model = tiny_vit(depth=1)
    widths: list[int] = []
    body = ot.OutputStep.body
    monkeypatch.setattr(ot.OutputStep, "body", lambda self: (widths.append(self.batches.shape[1]), body(self)))
    settings = dict(iters=5, n=32, output_tuning_iters=20, output_tuning="steps+affine", output_tuning_mix="cutmix")
    plain, _ = _calibrate(model, **settings)
    assert set(widths) == {16}  # the reconstruction's batch
    widths.clear()
    wide, rec = _calibrate(model, **settings, output_tuning_batch=32)
    assert set(widths) == {32} and rec.output_tuning.kept
    cropped, rec = _calibrate(model, **settings, output_tuning_crop=0.35)
    assert rec.output_tuning.kept
    sp, sw, sc = plain.state_dict(), wide.state_dict(), cropped.state_dict()
    assert any(not torch.equal(sp[k], sw[k]) for k in sp) and any(not torch.equal(sp[k], sc[k]) for k in sp)
    with pytest.raises(ConfigError, match="crop"):
        CalibrationConfig(output_tuning_crop=1.5).validate()
    with pytest.raises(ConfigError, match="batch"):
        CalibrationConfig(output_tuning_batch=-1).validate()


def test_the_tuning_speed_benchmark_times_the_defaults_tuning_with_the_settings_it_is_given():
    from benchmarks.tuning_speed import tuning_config

    cfg = tuning_config("default,output_tuning_batch=128,output_tuning_crop=0.35", "deit_t", samples=4096)
    assert cfg.output_tuning_batch == 128 and cfg.output_tuning_crop == 0.35 and cfg.samples == 4096
    assert cfg.output_tuning_iters == METHODS[Method.OUTPUT_TUNED]["output_tuning_iters"]
    assert cfg.output_tuning_mix == "cutmix" and cfg.output_tuning_ema == 0.995 and cfg.output_tuning_temperature == 2.0
    for bad in ("paper", "default,output_tuning_batch", "default,no_such_setting=1", "default,output_tuning_crop=2"):
        with pytest.raises((SystemExit, ConfigError)):
            tuning_config(bad, "deit_t", samples=64)


def test_output_tuning_drop_tunes_around_partly_float_activations_and_restores_the_quantizers():
    model = tiny_vit(depth=1)
    settings = dict(iters=5, n=16, output_tuning_iters=20, output_tuning="steps+affine")
    plain, _ = _calibrate(model, **settings)
    dropped, rec = _calibrate(model, **settings, output_tuning_drop=0.5)
    assert rec.output_tuning.kept
    changed = [k for k, v in plain.state_dict().items() if not torch.equal(v, dropped.state_dict()[k])]
    assert changed  # the drop masks changed what was fitted
    # back to plain round-to-nearest for the checks after tuning, export and evaluation
    assert all(not q.training and q.drop_prob == 0.0 for q in act_quantizers([dropped]))


def test_output_tuning_average_ends_on_the_moving_average_of_the_steps(monkeypatch):
    # A decay that forgets at once is the last step itself; a slow one trails behind it.
    import osqdeploy.reconstruct.output_tuning as ot

    model = tiny_vit(depth=1)
    settings = dict(iters=5, n=16, output_tuning_iters=20, output_tuning="steps+affine", output_tuning_mix="cutmix")
    last, _ = _calibrate(model, **settings)
    instant, _ = _calibrate(model, **settings, output_tuning_ema=1e-12)
    sl, si = last.state_dict(), instant.state_dict()
    assert all(torch.allclose(sl[k].float(), si[k].float(), rtol=1e-5, atol=1e-7) for k in sl)
    # record the trajectory of one tuned tensor and average it by hand
    trail: list[torch.Tensor] = []
    step_body = ot.OutputStep.body

    def body(self):
        if not trail:
            trail.append(self.params[0].detach().clone())  # where the average starts
        step_body(self)
        trail.append(self.params[0].detach().clone())

    monkeypatch.setattr(ot.OutputStep, "body", body)
    averaged, rec = _calibrate(model, **settings, output_tuning_ema=0.8)
    assert rec.output_tuning.kept and len(trail) == 21
    expected = trail[0]
    for t in trail[1:]:
        expected = 0.8 * expected + 0.2 * t
    tuned = tuned_parameters(averaged, "steps+affine")[0][0]
    assert torch.allclose(tuned, expected, rtol=1e-5, atol=1e-8)
    assert not torch.equal(tuned, trail[-1])  # not the last step


def test_mixing_at_full_weight_tunes_as_the_fixed_views_do(monkeypatch):
    # lam = 1 leaves every image itself: the copied float teacher must then predict what the
    # precomputed float logits hold, so the two tunings end where each other ends.
    import osqdeploy.reconstruct.output_tuning as ot

    model = tiny_vit(depth=1)
    build = ot.Mixing.build
    monkeypatch.setattr(ot.Mixing, "build", classmethod(
        lambda cls, *a, **k: replace(build(*a, **k), lam=torch.ones_like(build(*a, **k).lam))))
    fixed, _ = _calibrate(model, iters=5, n=16, output_tuning_iters=20, output_tuning="steps+affine")
    mixed, rec = _calibrate(model, iters=5, n=16, output_tuning_iters=20, output_tuning="steps+affine",
                            output_tuning_mix="mixup")
    assert rec.output_tuning.kept
    sf, sm = fixed.state_dict(), mixed.state_dict()
    assert all(torch.allclose(sf[k].float(), sm[k].float(), rtol=1e-4, atol=1e-6) for k in sf)


# ----------------------------------------------------------------------- determinism and the payoff

OPTIONS = {
    "fisher": dict(loss="fisher"),
    "prediction": dict(kl_groups=1),
    "tuned_steps": dict(output_tuning_iters=100),
    "tuned_affine": dict(output_tuning_iters=100, output_tuning="steps+affine"),
    "tuned_mixup": dict(output_tuning_iters=100, output_tuning="steps+affine", output_tuning_mix="mixup"),
    "tuned_cutmix": dict(output_tuning_iters=100, output_tuning="steps+affine", output_tuning_mix="cutmix"),
    "tuned_wscale": dict(output_tuning_iters=100, output_tuning="steps+affine+wscale", output_tuning_mix="cutmix"),
    "tuned_drop": dict(output_tuning_iters=100, output_tuning="steps+affine", output_tuning_mix="cutmix",
                       output_tuning_drop=0.5),
    "tuned_ema": dict(output_tuning_iters=100, output_tuning="steps+affine", output_tuning_mix="cutmix",
                      output_tuning_ema=0.9),
    "tuned_crop": dict(output_tuning_iters=100, output_tuning="steps+affine", output_tuning_mix="cutmix",
                       output_tuning_crop=0.35, output_tuning_batch=32),
    "view_mix": dict(view_mix="cutmix"),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_repeats_itself_exactly_for_a_seed(option):
    model = tiny_vit(depth=1)
    settings = {**OPTIONS[option], "output_tuning_iters": 10} if "output_tuning_iters" in OPTIONS[option] \
        else OPTIONS[option]
    a, _ = _calibrate(model, iters=10, n=16, seed=4, **settings)
    b, _ = _calibrate(model, iters=10, n=16, seed=4, **settings)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def paper_kl():
    model = tiny_vit(depth=2)
    return model, _held_out_kl(model, _calibrate(model)[0])


@pytest.mark.slow
@pytest.mark.parametrize("option", ["prediction", "tuned_steps", "tuned_affine", "tuned_cutmix"])
def test_option_brings_held_out_predictions_closer_to_float_than_the_paper_schedule(paper_kl, option):
    # Tiny ViT, planted outliers, W4A4, blocks:1, 60 iterations a group, 64 calibration images,
    # KL on 1,024 held-out inputs: paper 0.0825; prediction 0.0795; output tuning of the steps
    # 0.0591, of steps, LayerNorms and biases 0.0348 on fixed views, 0.0351 on cutmix blends
    # (100 iterations at the default rate).
    # (Fisher-weighted MSE is not asserted: 0.0777 here, but 0.0891 against 0.0750 on the model of seed 1.)
    model, paper = paper_kl
    quantized, _ = _calibrate(model, **OPTIONS[option])
    assert _held_out_kl(model, quantized) < paper


@pytest.mark.slow
@pytest.mark.parametrize("params", ["steps+affine", "steps+affine+wscale"])
def test_output_tuned_run_exports_what_its_fake_quant_model_computes(tmp_path, params):
    import onnxruntime as ort

    from osqdeploy.api import calibrate, export, load_run

    from conftest import loaded_tiny

    ccfg = CalibrationConfig(samples=32, batch_size=16, iters=20).with_method(Method.OUTPUT_TUNED)
    ccfg.output_tuning_iters, ccfg.output_tuning = 30, params
    run = calibrate(loaded_tiny("vit"), images(32, 32), QuantConfig(4, 4), ccfg, tmp_path / "run")
    assert run.manifest.calibration.output_tuning == params
    export(tmp_path / "run", tmp_path / "model.onnx")
    x = images(128, 32, seed=11)
    with torch.no_grad():
        ref = load_run(tmp_path / "run").model(x).numpy()
    got = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x.numpy()})[0]
    # the bounds of tests/test_export.py: tuned steps, LayerNorms and biases are what the file holds
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    assert abs(got - ref).max() <= 0.03 * (ref.max() - ref.min())


def test_the_logit_scale_benchmark_separates_a_models_confidence_from_its_ranking():
    from benchmarks.logit_scale import scale_report

    g = torch.Generator().manual_seed(0)
    ref = 3 * torch.randn(64, 10, generator=g)
    labels = ref.argmax(1)
    # the same ranking at a different confidence: all of its KL is scale, none is left at the best T
    sharper = scale_report(ref, 1.6 * ref, labels)
    assert sharper["kl"] > 0.05 and sharper["agreement"] == 100.0
    assert sharper["best_temperature"] == pytest.approx(1.6, abs=0.011)
    assert sharper["kl_at_best_temperature"] < 1e-3 * sharper["kl"]
    assert sharper["logit_spread_vs_fp32"] == pytest.approx(1.6, rel=1e-5)
    # a reordering at fp32's own scale: no temperature removes its KL
    shuffled = scale_report(ref, ref[:, torch.randperm(10, generator=g)], labels)
    assert shuffled["kl_share_of_scale"] < 0.5 and shuffled["agreement"] < 50


def test_the_class_prior_benchmark_counts_predictions_and_mass_on_the_calibration_classes():
    from benchmarks.class_prior import prior_report

    calib = torch.tensor([True, True, False, False])
    labels = torch.tensor([2, 3, 2, 3])
    logits = torch.tensor([[0.0, 0.0, 5.0, 0.0], [0.0, 9.0, 0.0, 0.0], [0.0, 0.0, 7.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    r = prior_report(logits, labels, calib)
    # one of four held-out images named a calibration class, so one of four is wrong
    assert r["top1"] == 75.0 and r["predicted_calibration_class"] == 25.0
    expected_mass = float(logits.softmax(1)[:, :2].sum(1).mean())
    assert r["calibration_class_mass"] == pytest.approx(expected_mass)
    # calibration logits lead the others by (9 - 0)/2 - 0 on image 2 and trail by 2.5, 3.5, 1.5 elsewhere
    assert r["calibration_logit_lead"] == pytest.approx((-2.5 + 4.5 - 3.5 - 1.5) / 4)


def test_the_accuracy_benchmark_averages_a_run_over_float_draws_and_pairs_the_averages(tmp_path):
    import json

    from torch.utils.data import TensorDataset

    from benchmarks.accuracy_seeds import float_draws, summarize
    from osqdeploy.evaluation import TorchRuntime, evaluate, parity

    model = tiny_vit()
    quantized, _ = _calibrate(model, iters=5, n=32)
    x = images(48, 32, seed=5)
    data = TensorDataset(x, logits(model, x, 48, CPU).argmax(1))
    ref = evaluate(TorchRuntime(model), data, batch_size=16, progress=False)
    q = evaluate(TorchRuntime(quantized), data, batch_size=16, progress=False)
    drawn = float_draws(quantized, ref, q, data, "cpu", draws=3)
    # the plain evaluation, then three seeded draws: at 4 bits a one-ulp nudge moves the KL
    assert drawn["draw_top1"][0] == q.top1 and drawn["draw_kl"][0] == parity(ref, q).kl_divergence
    assert len(drawn["draw_kl"]) == 4 and len(set(drawn["draw_kl"])) > 1
    assert drawn["kl_over_draws"] == pytest.approx(sum(drawn["draw_kl"]) / 4)
    assert drawn["top1_over_draws"] == pytest.approx(sum(drawn["draw_top1"]) / 4)
    assert float_draws(quantized, ref, q, data, "cpu", draws=3) == drawn  # seeded

    # the summary pairs a tuned variant with its own runs on the averaged KL as on the plain one
    (tmp_path / "jobs").mkdir()
    for variant, kl, kl_drawn in (("r", 0.20, 0.25), ("r+tuned", 0.18, 0.20)):
        row = {"status": "ok", "variant": variant, "bits": "w4a4", "seed": 0, "job": variant, "fp32_top1": 80.0,
               "top1": 75.0, "kl": kl, "logit_mse": 0.3, "agreement": 90.0, "calib_seconds": 1.0,
               "top1_over_draws": 76.0, "kl_over_draws": kl_drawn}
        (tmp_path / "jobs" / f"{variant}.json").write_text(json.dumps(row))
    table = summarize(tmp_path)
    tuned_line = next(line for line in table.splitlines() if line.startswith("| r+tuned |"))
    assert "KL over float draws" in table
    assert "-10.0 [-10.0, -10.0] %" in tuned_line and "-20.0 [-20.0, -20.0] %" in tuned_line


def test_the_onnx_accuracy_benchmark_counts_right_answers_apart_where_fp32_is_right_and_wrong():
    from benchmarks.ort_accuracy import _right_by_fp32
    from osqdeploy.evaluation.evaluator import EvalResult

    labels = torch.tensor([0, 1, 2, 3])
    ref = EvalResult("fp32", 4, 50.0, None, 0.0, torch.eye(4)[[0, 1, 0, 0]], labels)  # right on images 0 and 1
    # draw 1 repeats fp32; draw 2 misses image 1 and gets image 2 right where fp32 is wrong
    draws = (torch.eye(4)[[0, 1, 0, 0]], torch.eye(4)[[0, 0, 2, 0]])
    counts = _right_by_fp32(ref, labels, draws)
    assert counts == {"fp32_right": 2, "right_where_fp32_right": 1.5, "right_where_fp32_wrong": 0.5}
