"""osqdeploy: outlier-aware slicing PTQ for vision transformers, shipped as QDQ ONNX.

    import osqdeploy as osq
    run = osq.calibrate(model, images, osq.QuantConfig(w_bits=4, a_bits=4), osq.CalibrationConfig())
    run.save("runs/deit_t_w4a4")
    osq.export(run, "deit_t_w4a4.onnx")
    report = osq.evaluate(run, "deit_t_w4a4.onnx", data="val/")

The package is laid out in the order data flows through it:
``load`` (models, images) → ``plan`` (reconstruction granularity) → ``reconstruct``
(block/slice reconstruction) → ``run`` (the saved run directory) → ``onnx_export`` (QDQ ONNX)
→ ``evaluation`` (accuracy and parity); ``api`` joins them. ``quant`` holds the quantizer
arithmetic and the fake-quant modules every stage shares; ``adapters`` the per-architecture knowledge.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names and the module defining each. Imported on first use, so that `import osqdeploy`
# (and `osq --help`) does not pay for torch, timm and onnxscript until something needs them.
_EXPORTS = {
    "calibrate": "api",
    "calibration_config": "api",
    "calibration_images": "api",
    "export": "api",
    "evaluate": "api",
    "load_run": "api",
    "quant_config": "api",
    "Run": "api",
    "EvalReport": "api",
    "QuantConfig": "config",
    "CalibrationConfig": "config",
    "load_model": "load.models",
    "list_recipes": "load.models",
}

if TYPE_CHECKING:
    from .api import (
        EvalReport,
        Run,
        calibrate,
        calibration_config,
        calibration_images,
        evaluate,
        export,
        load_run,
        quant_config,
    )
    from .config import CalibrationConfig, QuantConfig
    from .load.models import list_recipes, load_model


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'osqdeploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "CalibrationConfig",
    "EvalReport",
    "QuantConfig",
    "Run",
    "calibrate",
    "calibration_config",
    "calibration_images",
    "evaluate",
    "export",
    "list_recipes",
    "load_model",
    "load_run",
    "quant_config",
]
