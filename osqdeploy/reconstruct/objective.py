"""Reconstruction objectives: what "the group's output is close to full precision" means.

Pluggable so that a better objective can replace the paper's on measured accuracy; the
rounding regulariser is added by the engine, not here.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Objective(Protocol):
    #: Whether the engine must compute per-element output weights for each group (see FisherMSE).
    needs_weights: bool

    def __call__(self, out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor: ...


class ReconstructionMSE:
    """Squared error summed over channels, averaged over batch and tokens (BRECQ/QDrop ``lp_loss``).

    Summing over the channel dimension keeps the balance with AdaRound's regulariser weight that
    those methods (and the paper's 0.1) were tuned with.
    """

    needs_weights = False

    def __call__(self, out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        err = (out - target).pow(2)
        return (err if weight is None else err * weight).sum(-1).mean()


class FisherMSE(ReconstructionMSE):
    """Output error weighted by how much each output element moves the model's prediction.

    BRECQ's Fisher-diagonal objective, adapted to unlabeled calibration data: the weight of an
    element of the group's output is its squared gradient of the cross-entropy against a label
    drawn from the full-precision model's own predicted distribution (so that, in expectation,
    it is the diagonal of the Fisher information, the Hessian of the KL divergence from the float
    predictions, which is what a quantized model should keep small). The engine computes the
    weights once per group on the float model (``Reconstructor._output_weights``), normalised to
    mean 1 and mixed half and half with plain MSE (weight ``1 + g²/mean g²``) so that no element
    is ignored because one sampled label happened to make its gradient small.
    """

    needs_weights = True


OBJECTIVES: dict[str, type] = {"mse": ReconstructionMSE, "fisher": FisherMSE}


def make_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]()
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}") from None
