"""A quantizer's mode, and the one place that switches it.

Every quantizer has a ``mode``. The engine, the run store, the exporter and the sensitivity
analysis change it only through :func:`set_mode` (for good) or :func:`quant_mode` (for a block,
restored after). Each quantizer class decides in :meth:`Quantizer.enter_mode` which modes it
has and what entering one prepares (the exporter's integer buffers, for instance); its own
lifecycle methods (``finish_observation``, ``init_grid``, ``init_adaround``, ``finalize``) move
it along as they create the state the next mode computes with.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import ClassVar

from torch import nn


class QuantMode(str, Enum):
    """What a quantizer does to the values that pass through it.

    The values are the strings a calibration checkpoint records per weight quantizer.
    """

    FLOAT = "fp"  # pass values through unquantized
    OBSERVE = "observe"  # activations: record ranges, pass values through
    NEAREST = "nearest"  # round to nearest on the grid: activations once calibrated, weights before AdaRound
    SOFT = "soft"  # weights: AdaRound's continuous h(V), learned during reconstruction
    HARD = "hard"  # weights: h(V) thresholded to floor or ceil
    INT = "int"  # weights: frozen integer codes, what a saved run holds
    EXPORT = "export"  # the deployed arithmetic, through the custom ops the ONNX exporter translates


class Quantizer(nn.Module):
    """Base of the fake-quant quantizers: a ``mode`` among the ``modes`` its class has."""

    modes: ClassVar[frozenset[QuantMode]]

    def __init__(self) -> None:
        super().__init__()
        self.mode = QuantMode.FLOAT

    def enter_mode(self, mode: QuantMode) -> None:
        """Switch to ``mode``; subclasses check what it needs and prepare it. Call through ``set_mode``."""
        if mode not in self.modes:
            raise ValueError(f"{type(self).__name__} has no mode {mode.value!r}")
        self.mode = mode


def quantizers(modules: nn.Module | Iterable[nn.Module]) -> list[Quantizer]:
    """Unique quantizers inside ``modules`` (each module's own included), in module order."""
    roots = [modules] if isinstance(modules, nn.Module) else modules
    seen: dict[int, Quantizer] = {}
    for root in roots:
        for m in root.modules():
            if isinstance(m, Quantizer):
                seen.setdefault(id(m), m)
    return list(seen.values())


def set_mode(modules: nn.Module | Iterable[nn.Module], mode: QuantMode) -> None:
    """Put every quantizer inside ``modules`` into ``mode``."""
    mode = QuantMode(mode)
    for q in quantizers(modules):
        q.enter_mode(mode)


@contextmanager
def quant_mode(modules: nn.Module | Iterable[nn.Module], mode: QuantMode) -> Iterator[None]:
    """Every quantizer inside ``modules`` in ``mode`` for the block; their modes are restored after.

    ``QuantMode.FLOAT`` over a model gives the full-precision network (the targets of
    reconstruction); ``QuantMode.EXPORT`` the graph the ONNX exporter traces.
    """
    saved = [(q, q.mode) for q in quantizers(modules)]
    try:
        set_mode([q for q, _ in saved], mode)
        yield
    finally:
        for q, previous in saved:
            q.mode = previous
