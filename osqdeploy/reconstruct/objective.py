"""Reconstruction objectives: what "the group's output is close to full precision" means.

Pluggable so that a better objective can replace the paper's on measured accuracy; the
rounding regulariser is added by the engine, not here.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Objective(Protocol):
    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


class ReconstructionMSE:
    """Squared error summed over channels, averaged over batch and tokens (BRECQ/QDrop ``lp_loss``).

    Summing over the channel dimension keeps the balance with AdaRound's regulariser weight that
    those methods (and the paper's 0.1) were tuned with.
    """

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out - target).pow(2).sum(-1).mean()


OBJECTIVES: dict[str, type] = {"mse": ReconstructionMSE}


def make_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]()
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}") from None
