"""Granularity plans: the paper's plans for ViT-S, DeiT-T and Swin (Algorithm 1, Tables 2-3)."""

import pytest
import timm
import torch

from osqdeploy.adapters import adapter_for
from osqdeploy.config import QuantConfig
from osqdeploy.plan import PlanError, build_plan
from osqdeploy.reconstruct import prepare_model


def _units(name, **kw):
    with torch.device("meta"):  # structure only: no memory, no weights
        model = timm.create_model(name, pretrained=False, **kw)
        adapter = prepare_model(model, QuantConfig(4, 4), adapter_for)
        return adapter.units(model)


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_tiny_patch16_224"])
def test_auto_plan_for_vit_and_deit_is_four_groups_of_three_blocks(name):
    plan = build_plan("auto", _units(name))
    assert plan.spec == "blocks:3"
    assert len(plan.groups) == 4
    for g, group in enumerate(plan.groups):
        blocks = sorted({int(n.split(".")[1]) for n in group})
        assert blocks == [3 * g, 3 * g + 1, 3 * g + 2]
        assert len(group) == 9  # A, B, C of three blocks


def test_auto_plan_for_swin_is_finest_slicing_without_crossing_stages():
    units = _units("swin_tiny_patch4_window7_224")
    plan = build_plan("auto", units)
    assert plan.spec == "slices:A-B-C"
    n_blocks = 2 + 2 + 6 + 2
    assert len(plan.groups) == 3 * n_blocks
    stage_of = {u.name: u.stage for u in units}
    for group in plan.groups:
        assert len({stage_of[n] for n in group}) == 1
        slices = [n for n in group if not n.endswith(".D")]
        assert len(slices) == 1
    downsampling = [g for g in plan.groups if any(n.endswith(".D") for n in g)]
    assert len(downsampling) == 3 and all(g[1].endswith(".A") for g in downsampling)


def test_block_plans_respect_stages_unless_allowed_to_cross():
    units = _units("swin_tiny_patch4_window7_224")
    inside = build_plan("blocks:4", units)
    stage_of = {u.name: u.stage for u in units}
    assert all(len({stage_of[n] for n in g}) == 1 for g in inside.groups)
    crossing = build_plan("blocks:4", units, cross_stage=True)
    assert len(crossing.groups) == 3
    assert any(len({stage_of[n] for n in g}) > 1 for g in crossing.groups)


@pytest.mark.parametrize(
    "spec, sizes",
    [("slices:A-B-C", [1, 1, 1]), ("slices:AB-C", [2, 1]), ("slices:A-BC", [1, 2]), ("slices:ABC", [3])],
)
def test_slicings_of_a_block(spec, sizes):
    plan = build_plan(spec, _units("deit_tiny_patch16_224"))
    assert [len(g) for g in plan.groups] == sizes * 12


@pytest.mark.parametrize("n, groups", [(1, 12), (2, 6), (4, 3), (5, 3), (12, 1)])
def test_blocks_n(n, groups):
    assert len(build_plan(f"blocks:{n}", _units("deit_tiny_patch16_224")).groups) == groups


@pytest.mark.parametrize("spec", ["blocks:0", "slices:AC-B", "coarse", "blocks:x"])
def test_bad_specs_are_refused_with_the_options(spec):
    with pytest.raises(PlanError, match="blocks|slic|granularity"):
        build_plan(spec, _units("deit_tiny_patch16_224"))


def test_whole_block_slicing_is_one_block_per_group_on_deit():
    """Table 2's ABC and Table 3's 1 block per group are one plan on a ViT (no downsampling)."""
    units = _units("deit_tiny_patch16_224")
    assert build_plan("slices:ABC", units).groups == build_plan("blocks:1", units).groups
    assert build_plan("slices:A-BC", units).groups != build_plan("blocks:1", units).groups
