"""Evaluate: accuracy, throughput and logit parity of runtimes (PyTorch, ONNX Runtime)."""

from osqdeploy.evaluation.evaluator import (
    EvalResult,
    ParityReport,
    evaluate,
    kl_divergence,
    parity,
    write_report,
)
from osqdeploy.evaluation.runtimes import OnnxRuntime, Runtime, RuntimeLoadError, TorchRuntime, UlpPerturbed

__all__ = [
    "EvalResult",
    "OnnxRuntime",
    "ParityReport",
    "Runtime",
    "RuntimeLoadError",
    "TorchRuntime",
    "UlpPerturbed",
    "evaluate",
    "kl_divergence",
    "parity",
    "write_report",
]
