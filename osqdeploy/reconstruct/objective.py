"""Reconstruction objectives: what "the group's output is close to full precision" means.

Pluggable so that a better objective can replace the paper's on measured accuracy; the
rounding regulariser is added by the engine, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F


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


def prediction_kl(fp_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(float prediction ‖ quantized prediction), summed over classes, averaged over images.

    With ``temperature`` T both predictions are softened (T > 1) or sharpened (T < 1) first and
    the KL is scaled by T², Hinton's distillation loss: T < 1 weighs the top classes more.
    """
    t = temperature  # dividing and multiplying by 1 are exact: T = 1 is the plain KL, bit for bit
    return F.kl_div((q_logits.float() / t).log_softmax(-1), (fp_logits.float() / t).log_softmax(-1),
                    log_target=True, reduction="batchmean") * t * t


class PredictionAwareMSE(ReconstructionMSE):
    """Block-output error plus the KL divergence of the predictions it leads to (PD-Quant's idea).

    The block-output MSE treats every channel of every token alike, though the class token's
    channels near the head decide the prediction; the KL term asks the group for what is
    measured at the end, while the MSE term keeps the features close enough for the groups after
    it. ``head`` maps the group's output to logits (the rest of the quantized network); the
    per-sample data the engine indexes alongside the target are the float model's logits.
    ``kl_scale`` is the absolute weight of the KL term (``balanced`` sets it from a relative one).
    """

    needs_weights = True  # its per-sample tensor is the float logits, not element weights

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor], kl_scale: float = 1.0):
        self.head, self.kl_scale = head, kl_scale

    # Eager even inside the step's compiled loss: the head is a module of its own, with quantizers
    # whose kernels are compiled (or not) on their own.
    @torch.compiler.disable
    def __call__(self, out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError("the prediction-aware objective needs the float logits of the batch")
        return super().__call__(out, target) + self.kl_scale * prediction_kl(weight, self.head(out))

    @torch.no_grad()
    def balanced(self, out: torch.Tensor, target: torch.Tensor, fp_logits: torch.Tensor,
                 kl_weight: float) -> PredictionAwareMSE:
        """Itself with ``kl_scale`` such that the KL term is ``kl_weight`` × the MSE term on ``out``."""
        mse = float(super().__call__(out.float(), target.float()))
        kl = float(prediction_kl(fp_logits, self.head(out.float())))
        self.kl_scale = kl_weight * mse / max(kl, 1e-12)
        return self


OBJECTIVES: dict[str, type] = {"mse": ReconstructionMSE, "fisher": FisherMSE}


def make_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]()
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}") from None
