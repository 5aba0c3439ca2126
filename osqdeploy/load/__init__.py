"""Load: models by recipe or timm name, and images from folders."""

from osqdeploy.load.data import (
    DataError,
    ImageFiles,
    MemoryEstimate,
    ResourceError,
    calibration_augment,
    calibration_memory,
    calibration_tensor,
    eval_transform,
    split_files,
)
from osqdeploy.load.demo import DemoPaths, demo_paths, ensure_demo_data, ensure_demo_model
from osqdeploy.load.models import (
    CheckpointError,
    LoadedModel,
    ModelRecipe,
    ModelSpec,
    ModelSpecError,
    UnknownModelError,
    WeightsUnavailableError,
    content_fingerprint,
    list_recipes,
    load_model,
    resolve_recipe,
)

__all__ = [
    "CheckpointError",
    "DataError",
    "DemoPaths",
    "ImageFiles",
    "LoadedModel",
    "MemoryEstimate",
    "ModelRecipe",
    "ModelSpec",
    "ModelSpecError",
    "ResourceError",
    "UnknownModelError",
    "WeightsUnavailableError",
    "calibration_augment",
    "calibration_memory",
    "calibration_tensor",
    "content_fingerprint",
    "demo_paths",
    "ensure_demo_data",
    "ensure_demo_model",
    "eval_transform",
    "list_recipes",
    "load_model",
    "resolve_recipe",
    "split_files",
]
