from .engine import Callbacks, GroupResult, NumericalError, Reconstructor, logits, prepare_model, resolve_device
from .objective import OBJECTIVES, FisherMSE, ReconstructionMSE, make_objective
from .step import warm_compile_workers

__all__ = [
    "Callbacks",
    "GroupResult",
    "NumericalError",
    "OBJECTIVES",
    "FisherMSE",
    "ReconstructionMSE",
    "Reconstructor",
    "logits",
    "make_objective",
    "prepare_model",
    "resolve_device",
    "warm_compile_workers",
]
