"""One adapter per architecture family, found by the model's class."""

from __future__ import annotations

from torch import nn

from .base import Adapter, ReparamSite, State, Unit
from .swin import SwinAdapter
from .vit import ViTAdapter

ADAPTERS: list[type[Adapter]] = [ViTAdapter, SwinAdapter]


class UnsupportedModelError(ValueError):
    """The model's class has no adapter."""


def adapter_for(model: nn.Module) -> Adapter:
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls()
    supported = ", ".join(c.family for c in ADAPTERS)
    raise UnsupportedModelError(f"no adapter for {type(model).__name__} (supported families: {supported})")


__all__ = ["ADAPTERS", "Adapter", "ReparamSite", "State", "Unit", "UnsupportedModelError", "adapter_for"]
