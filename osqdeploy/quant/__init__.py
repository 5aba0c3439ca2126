"""Fake quantization: the grid arithmetic (``primitives``), its kernels, the quantizers and their
modes, the quantized layers, and RepQ-ViT's reparameterisation."""

from .mode import QuantMode, quant_mode, set_mode

__all__ = ["QuantMode", "quant_mode", "set_mode"]
