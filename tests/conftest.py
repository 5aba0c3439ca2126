"""Shared fixtures: tiny timm models with planted outlier channels, so the paper's problem is really there
(osqdeploy.load.synthetic), and the real assets when they are at hand."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from osqdeploy.load.synthetic import (  # noqa: F401  (the fixtures and helpers the tests import from here)
    OUTLIER_CHANNELS,
    TINY_SWIN_KWARGS,
    TINY_VIT_KWARGS,
    images,
    loaded_tiny,
    plant_outliers,
    tiny_swin,
    tiny_vit,
)

# the fuzzed tests draw the same examples on every run (a failure is reproducible, CI cannot flake);
# OSQ_FUZZ=1 draws new ones
settings.register_profile("seeded", derandomize=True)
settings.load_profile("default" if os.environ.get("OSQ_FUZZ") else "seeded")

# one thread per xdist worker (the suite runs one worker per core), else all cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

# The real assets (ImageNet sample images, real DeiT-Tiny weights): OSQ_TEST_DATA, else ../shared/data
# beside the checkout. Tests that need them take the fixtures below and skip, saying where they looked.
SHARED_DATA = Path(os.environ.get("OSQ_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def _shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} not found (set OSQ_TEST_DATA to the folder holding imagenet-sample/ and weights/)")
    return path


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """500 real ImageNet images, one per even class index."""
    return _shared("imagenet-sample")


@pytest.fixture(scope="session")
def deit_tiny_weights() -> Path:
    """A real ImageNet-trained DeiT-Tiny state dict."""
    return _shared("weights/deit_tiny_patch16_224.pth")


@pytest.fixture
def vit_model():
    return tiny_vit()


@pytest.fixture
def swin_model():
    return tiny_swin()


def pytest_collection_modifyitems(config, items):
    # Files marked long_file run first: under --dist loadfile each worker takes whole files in
    # collection order (--no-loadscope-reorder), and a file of minutes started last keeps the
    # run going while the other worker has nothing left.
    items.sort(key=lambda item: item.get_closest_marker("long_file") is None)
