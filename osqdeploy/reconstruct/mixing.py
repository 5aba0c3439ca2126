"""Blends and crops of calibration images, drawn up front so a captured step stays host-free.

A blend mixes each image with (mixup) or patches it from (cutmix) a partner. Two stages draw
them. Output tuning blends every batch afresh (``output_tuning_mix``), so it fits
the float function around the images rather than a thousand fixed predictions. Before any
reconstruction, ``view_mix`` blends half of the calibration views once, so block reconstruction
sees inputs that are not crops of the same few hundred pictures. DeiT itself was trained on both
kinds of blend, so they stay inputs the float model has a considered answer for. Output tuning
may also re-crop every image each step (``output_tuning_crop``, :class:`Crops`), as DeiT's
training did with random resized crops and flips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

VIEW_MIX_CHUNK = 256  # views blended at a time: bounds the temporary copies, not the result


@dataclass
class Mixing:
    """Every step's blend of each batch image with a partner image, drawn up front (host-free steps).

    timm's ``Mixup`` draws on the host per batch from numpy's global generator; a captured step
    needs every draw on the device beforehand, from the run's seeded generator.
    """

    kind: str  # "mixup" | "cutmix"
    partners: torch.Tensor  # [iters, batch] image index blended into each batch position
    lam: torch.Tensor  # [iters, batch] mixup: weight of the batch image (uniform in [0, 1])
    boxes: torch.Tensor  # [iters, batch, 4] cutmix: rows y0, y1 and columns x0, x1 pasted from the partner

    @classmethod
    def build(cls, kind: str, iters: int, batch: int, n: int, hw: tuple[int, int], gen: torch.Generator,
              device: torch.device) -> Mixing:
        partners = torch.randint(n, (iters, batch), generator=gen)
        lam = torch.rand(iters, batch, generator=gen)
        # CutMix's box: a fraction 1 - lam of the image around a uniform centre, clipped at the border
        size = torch.tensor(hw, dtype=torch.float32) * (1 - lam).sqrt().unsqueeze(-1)  # [iters, batch, 2]
        centre = torch.rand(iters, batch, 2, generator=gen) * torch.tensor(hw, dtype=torch.float32)
        lo = (centre - size / 2).round().clamp(min=0)
        hi = torch.minimum((centre + size / 2).round(), torch.tensor(hw, dtype=torch.float32))
        boxes = torch.stack([lo[..., 0], hi[..., 0], lo[..., 1], hi[..., 1]], -1).long()
        return cls(kind, partners.to(device), lam.to(device), boxes.to(device))

    def apply(self, images: torch.Tensor, x: torch.Tensor, it: torch.Tensor, shard: slice) -> torch.Tensor:
        """The batch ``x`` of step ``it`` (a device scalar index) blended with its partners."""
        other = images.index_select(0, self.partners.index_select(0, it).squeeze(0)[shard])
        if self.kind == "mixup":
            lam = self.lam.index_select(0, it).squeeze(0)[shard].view(-1, 1, 1, 1)
            return lam * x + (1 - lam) * other
        box = self.boxes.index_select(0, it).squeeze(0)[shard]  # [b, 4]
        rows = torch.arange(x.shape[-2], device=x.device).view(1, -1, 1)
        cols = torch.arange(x.shape[-1], device=x.device).view(1, 1, -1)
        inside = ((rows >= box[:, 0, None, None]) & (rows < box[:, 1, None, None])
                  & (cols >= box[:, 2, None, None]) & (cols < box[:, 3, None, None]))
        return torch.where(inside.unsqueeze(1), other, x)


@dataclass
class Crops:
    """Every step's random resized crop and flip of each batch image, as sampling grids' affine maps.

    timm's ``RandomResizedCropAndInterpolation`` draws on the host per picture; here each step's
    boxes are drawn beforehand from the run's seeded generator and applied on the device with
    ``F.affine_grid`` / ``F.grid_sample``, one bilinear resampling of the whole batch.
    """

    theta: torch.Tensor  # [iters, batch, 2, 3] output → input coordinates, in [-1, 1] units

    @classmethod
    def build(cls, scale: float, iters: int, batch: int, gen: torch.Generator, device: torch.device) -> Crops:
        area = scale + (1 - scale) * torch.rand(iters, batch, generator=gen)
        log_ratio = math.log(3 / 4) + math.log(16 / 9) * torch.rand(iters, batch, generator=gen)
        ratio = log_ratio.exp()  # width / height
        w = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the image's width and height
        h = (area / ratio).sqrt().clamp(max=1.0)
        cx = (1 - w) * (2 * torch.rand(iters, batch, generator=gen) - 1)  # centre, box inside the image
        cy = (1 - h) * (2 * torch.rand(iters, batch, generator=gen) - 1)
        flip = torch.where(torch.rand(iters, batch, generator=gen) < 0.5, -1.0, 1.0)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([w * flip, zero, cx], -1), torch.stack([zero, h, cy], -1)], -2)
        return cls(theta.to(device))

    def apply(self, x: torch.Tensor, it: torch.Tensor, shard: slice) -> torch.Tensor:
        """The batch ``x`` of step ``it`` (a device scalar index), each image cropped, resized and maybe flipped."""
        theta = self.theta.index_select(0, it).squeeze(0)[shard].to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def blend_views(images: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """``images`` with half of them, drawn by ``seed``, blended with a partner view (``kind``: mixup or cutmix).

    "none" returns ``images`` itself. Otherwise a new tensor: the caller's views are not changed,
    partners are drawn from the unblended views, and the same arguments give the same tensor.
    """
    if kind == "none":
        return images
    n = images.shape[0]
    gen = torch.Generator().manual_seed(seed * 100_003 + 99_989)  # a stream apart from the groups' and tuning's
    chosen = torch.randperm(n, generator=gen)[: n // 2]
    mixing = Mixing.build(kind, 1, len(chosen), n, tuple(images.shape[-2:]), gen, images.device)
    out = images.clone()
    first = torch.zeros(1, dtype=torch.long, device=images.device)
    for start in range(0, len(chosen), VIEW_MIX_CHUNK):
        part = slice(start, start + VIEW_MIX_CHUNK)
        idx = chosen[part].to(images.device)
        out[idx] = mixing.apply(images, images.index_select(0, idx), first, part)
    return out
