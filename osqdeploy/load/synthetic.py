"""Tiny timm models with planted outlier channels: the paper's problem, at a size a laptop CPU trains in seconds.

The tests and the benchmarks' synthetic modes build on these; a user can try the whole flow on
them offline (``loaded_tiny("swin")``).
"""

from __future__ import annotations

import timm
import torch

from .models import LoadedModel

OUTLIER_CHANNELS = (3, 17)


def plant_outliers(model: torch.nn.Module, channels=OUTLIER_CHANNELS, gain: float = 12.0) -> torch.nn.Module:
    """Scale a few LayerNorm gains and the residual writes of those channels.

    LayerNorm outputs then have a few channels with ~``gain``× larger ranges (what RepQ-ViT
    reparameterisation targets) and the residual stream carries the same outliers from block to
    block (what the paper's reconstruction granularity targets).
    """
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.LayerNorm) and m.weight.shape[0] > max(channels):
                m.weight[list(channels)] *= gain
            if name.endswith("mlp.fc2") and m.weight.shape[0] > max(channels):
                m.weight[list(channels)] *= gain / 2
    return model


def tiny_vit(depth: int = 6, outliers: bool = True, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth,
        embed_dim=64, num_heads=2, num_classes=10,
    ).eval()
    return plant_outliers(m) if outliers else m


def tiny_swin(outliers: bool = True, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=56, patch_size=4, embed_dim=32,
        depths=(2, 2), num_heads=(2, 4), window_size=7, num_classes=10,
    ).eval()
    return plant_outliers(m) if outliers else m


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, size, size, generator=g)
    # smooth the noise a little so images have spatial structure, as real ones do
    return torch.nn.functional.avg_pool2d(base, 3, stride=1, padding=1) * 2


# average-pooled like the embedded demo, with a data config for 32x32 images
TINY_VIT_KWARGS = dict(
    img_size=32, patch_size=8, depth=6, embed_dim=64, num_heads=2, num_classes=10, global_pool="avg",
    pretrained_cfg_overlay=dict(input_size=[3, 32, 32], crop_pct=1.0, interpolation="bilinear",
                                mean=[0.306] * 3, std=[0.324] * 3, num_classes=10),
)
TINY_SWIN_KWARGS = dict(
    img_size=56, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7, num_classes=10
)


def loaded_tiny(kind: str = "vit", seed: int = 0, **overrides) -> LoadedModel:
    """A LoadedModel (as ``load_model`` returns it) of a tiny timm model with planted outliers."""
    from .models import load_model

    torch.manual_seed(seed)
    if kind == "vit":
        loaded = load_model("vit_tiny_patch16_224", pretrained=False, model_kwargs={**TINY_VIT_KWARGS, **overrides})
    else:
        loaded = load_model(
            "swin_tiny_patch4_window7_224", pretrained=False, model_kwargs={**TINY_SWIN_KWARGS, **overrides}
        )
    plant_outliers(loaded.model)
    loaded.source = {"random_init": True, "seed": seed, "planted_outliers": list(OUTLIER_CHANNELS)}
    return loaded
