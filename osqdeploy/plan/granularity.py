"""Reconstruction granularity: which units are reconstructed jointly (Section 3.3, Algorithm 1).

A plan is an ordered list of groups; a group is a list of consecutive unit names. Specs:

* ``auto`` — Algorithm 1: a model with downsampling layers gets the finest slicing
  (``slices:A-B-C``); otherwise ``blocks:3`` (the paper's ViT/DeiT setting).
* ``blocks:N`` — N consecutive whole blocks per group.
* ``slices:A-B-C | AB-C | A-BC | ABC`` — how each block's slices are grouped (Table 2).

A downsampling unit (Swin's patch merging, "D") joins the group of the unit after it: the paper
reconstructs blocks only and is silent on the merging layer; keeping it with the next stage's
first unit means no group spans two stages. ``cross_stage=True`` lets ``blocks:N`` groups run
across stage boundaries (the paper's "global search", Section 3.3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..adapters.base import Unit

SLICINGS = ("A-B-C", "AB-C", "A-BC", "ABC")


class PlanError(ValueError):
    """A granularity spec that cannot be built."""


@dataclass
class Plan:
    spec: str
    groups: list[list[str]] = field(default_factory=list)
    cross_stage: bool = False

    def to_dict(self) -> dict:
        return {"spec": self.spec, "cross_stage": self.cross_stage, "groups": self.groups}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(spec=d["spec"], groups=[list(g) for g in d["groups"]], cross_stage=d.get("cross_stage", False))


def resolve_spec(spec: str, has_downsampling: bool) -> str:
    if spec == "auto":
        return "slices:A-B-C" if has_downsampling else "blocks:3"
    return spec


def build_plan(spec: str, units: list[Unit], cross_stage: bool = False) -> Plan:
    has_ds = any(u.part == "D" for u in units)
    resolved = resolve_spec(spec.strip(), has_ds)
    blocks = re.fullmatch(r"blocks:(\d+)", resolved)
    slices = re.fullmatch(r"slices:([ABC-]+)", resolved)
    if blocks:
        n = int(blocks.group(1))
        if n < 1:
            raise PlanError(f"blocks:N needs N ≥ 1, got {n}")
        chunks = _block_chunks(units, n, cross_stage)
    elif slices:
        pattern = slices.group(1)
        if pattern not in SLICINGS:
            raise PlanError(f"unknown slicing {pattern!r}; choose one of {', '.join(SLICINGS)}")
        chunks = _slice_chunks(units, pattern)
    else:
        raise PlanError(f"unknown granularity {spec!r}; use auto, blocks:N or slices:{'|'.join(SLICINGS)}")
    return Plan(spec=resolved, groups=[[u.name for u in c] for c in chunks], cross_stage=cross_stage)


def _blocks(units: list[Unit]) -> list[list[Unit]]:
    """Units grouped by block; a downsampling unit is prefixed to the block after it."""
    blocks: list[list[Unit]] = []
    pending: list[Unit] = []
    for u in units:
        if u.part == "D":
            pending.append(u)
        elif blocks and not pending and blocks[-1][-1].block == u.block:
            blocks[-1].append(u)
        else:
            blocks.append(pending + [u])
            pending = []
    if pending:
        blocks.append(pending)
    return blocks


def _block_chunks(units: list[Unit], n: int, cross_stage: bool) -> list[list[Unit]]:
    chunks: list[list[Unit]] = []
    count = 0
    for blk in _blocks(units):
        new_stage = bool(chunks) and blk[-1].stage != chunks[-1][-1].stage
        if not chunks or count == n or (new_stage and not cross_stage):
            chunks.append([])
            count = 0
        chunks[-1].extend(blk)
        count += 1
    return chunks


def _slice_chunks(units: list[Unit], pattern: str) -> list[list[Unit]]:
    together = [set(p) for p in pattern.split("-")]
    chunks: list[list[Unit]] = []
    for blk in _blocks(units):
        current: list[Unit] = []
        for u in blk:
            prev = current[-1] if current else None
            joins = prev is None or prev.part == "D" or any(u.part in s and prev.part in s for s in together)
            if not joins:
                chunks.append(current)
                current = []
            current.append(u)
        chunks.append(current)
    return chunks
