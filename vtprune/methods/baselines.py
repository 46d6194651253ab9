"""Score-free baselines: the honest floor every scored method must beat.

- ``random``: a seeded random subset. The same subset is used for every image (it depends on
  ``seed`` and the number of tokens only), so results do not depend on batch composition.
- ``uniform``: an even lattice over the patch grid, rows and columns alike, trimmed evenly
  to exactly k tokens (on AnyRes crops: over the crop's unpadded rectangle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from vtprune.methods.base import BudgetConfig, Method, VisualLayout
from vtprune.methods.highres import subimage_budgets, valid_box
from vtprune.registry import register_method


@dataclass
class RandomConfig(BudgetConfig):
    seed: int = 0


@register_method
class RandomPrune(Method):
    name = "random"
    config_class = RandomConfig
    paper = "baseline: seeded random subset"

    def select(self, scores, num_images, layout, device):
        k = self.config.num_keep(layout.num_tokens)
        kept = self._priority(layout.num_tokens).topk(k).indices.sort().values
        return kept.to(device).expand(num_images, k)

    def _priority(self, num_tokens: int) -> torch.Tensor:
        """A seeded random score per token position (the same for every image)."""
        return torch.rand(num_tokens, generator=torch.Generator().manual_seed(int(self.config.seed)))

    def select_crops(self, scores, crops):
        priority = self._priority(crops.valid.shape[1]).to(crops.valid.device).expand_as(crops.valid)
        return super().select_crops({"random": priority}, crops)


@dataclass
class UniformConfig(BudgetConfig):
    pass


def uniform_grid_indices(layout: VisualLayout, k: int) -> torch.Tensor:
    """Exactly ``k`` indices spread evenly over the layout, prefix tokens first. Shape (k,)."""
    prefix = min(layout.num_prefix, k)
    k_grid = k - prefix
    height, width = layout.grid
    if k_grid == 0:
        return torch.arange(prefix)
    rows = max(1, min(height, round(math.sqrt(k_grid * height / width))))
    cols = min(width, math.ceil(k_grid / rows))
    rows = min(height, math.ceil(k_grid / cols))
    # centres of `rows` equal bands and `cols` equal bands
    row_idx = ((torch.arange(rows) + 0.5) * height / rows).long()
    col_idx = ((torch.arange(cols) + 0.5) * width / cols).long()
    lattice = (row_idx[:, None] * width + col_idx[None, :]).flatten()
    # drop the surplus lattice points evenly so exactly k_grid remain
    pick = torch.linspace(0, lattice.numel() - 1, k_grid).round().long()
    patches = lattice[pick] + layout.num_prefix
    return torch.cat([torch.arange(prefix), patches])


@register_method
class UniformPrune(Method):
    name = "uniform"
    config_class = UniformConfig
    paper = "baseline: even lattice over the patch grid"

    def select(self, scores, num_images, layout, device):
        kept = uniform_grid_indices(layout, self.config.num_keep(layout.num_tokens))
        return kept.to(device).expand(num_images, -1)

    def select_crops(self, scores, crops):
        """An even lattice over each sub-image's valid (unpadded) rectangle, with its budget."""
        valid = crops.host_valid
        budgets = subimage_budgets(replace(crops, valid=valid), self.config).tolist()
        height, width = crops.grid
        keep = torch.zeros_like(valid)
        for index, k in enumerate(budgets):  # a few sub-images per image
            top, bottom, left, right = valid_box(valid[index].view(height, width))
            box = VisualLayout((bottom - top) * (right - left), (bottom - top, right - left))
            picked = uniform_grid_indices(box, k)
            rows, cols = picked // (right - left), picked % (right - left)
            keep[index, (rows + top) * width + cols + left] = True
        return keep.to(crops.valid.device)
