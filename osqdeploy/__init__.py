"""osqdeploy: outlier-aware slicing PTQ for vision transformers, shipped as QDQ ONNX.

The package is laid out in the order data flows through it:
``load`` (models, images) → ``plan`` (reconstruction granularity) → ``reconstruct``
(block/slice reconstruction) → ``run`` (the saved run directory) → ``onnx_export`` (QDQ ONNX)
→ ``evaluation`` (accuracy and parity).  ``quant`` holds the quantizer arithmetic and the
fake-quant modules every stage shares; ``adapters`` holds the per-architecture knowledge.
"""

__version__ = "0.1.0"
