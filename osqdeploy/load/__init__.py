"""Load: models by recipe or timm name, and images from folders."""

from osqdeploy.load.data import (
    DataError,
    ImageFiles,
    calibration_augment,
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
    UnknownModelError,
    WeightsUnavailableError,
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
    "ModelRecipe",
    "ModelSpec",
    "UnknownModelError",
    "WeightsUnavailableError",
    "calibration_augment",
    "calibration_tensor",
    "demo_paths",
    "ensure_demo_data",
    "ensure_demo_model",
    "eval_transform",
    "list_recipes",
    "load_model",
    "resolve_recipe",
    "split_files",
]
