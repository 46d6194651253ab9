"""FoPru: focal pruning by the significance the vision encoder gives each patch.

Paper: "FoPru: Focal Pruning for Efficient Large Vision-Language Models" (arXiv 2411.14164).
No official code was available to us; this follows the paper's description:
- significance: the attention each patch *receives*, averaged over heads and over all queries
  ([CLS] and patches) of one vision-encoder layer; by default the layer whose output feeds the
  projector (``layer=None``; give an encoder layer index to choose another). Computed from the
  layer's own q/k in query chunks: no n x n map is kept, the tower keeps SDPA;
- ``strategy="rank"``: keep the k most significant tokens (global view);
- ``strategy="row"``: keep whole rows of the patch grid ranked by summed significance
  (continuous regions), then fill to exactly k with the most significant remaining tokens;
- kept tokens stay in their original order; positions re-compacted (as FasterVLM).
On AnyRes inputs each sub-image (base image and crops) gets the same budget over its valid
tokens (``budget="per_image"``), or ``budget="global"`` ranks all sub-images together
(rank strategy only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import BudgetConfig, Method, top_k_sorted
from vtprune.methods.highres import CropLayout, keep_rows_then_fill, mask_to_indices, subimage_budgets
from vtprune.registry import register_method

STRATEGIES = ("rank", "row")


@dataclass
class FoPruConfig(BudgetConfig):
    strategy: str = "rank"
    layer: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.budget == "global" and self.strategy == "row":
            raise ValueError("budget='global' ranks tokens across sub-images; use it with strategy='rank'")


@register_method
class FoPru(Method):
    name = "fopru"
    config_class = FoPruConfig
    score = "received_attention"
    paper = "FoPru: Focal Pruning for Efficient Large Vision-Language Models (arXiv 2411.14164)"

    def vision_probes(self):
        return {"significance": ("received", "feature" if self.config.layer is None else int(self.config.layer))}

    def select(self, scores, num_images, layout, device):
        k = self.config.num_keep(layout.num_tokens)
        if self.config.strategy == "rank":
            return top_k_sorted(scores, k)
        # row strategy: prefix tokens ([CLS] with select strategy "full") are kept first, as in `uniform`
        prefix = min(layout.num_prefix, k)
        patches = scores[:, layout.num_prefix :]
        budget = torch.full((num_images,), k - prefix, device=device)
        keep = keep_rows_then_fill(patches, torch.ones_like(patches, dtype=torch.bool), budget, layout.grid[1])
        kept_patches = mask_to_indices(keep, k - prefix) + layout.num_prefix
        return torch.cat([torch.arange(prefix, device=device).expand(num_images, -1), kept_patches], dim=1)

    def select_crops(self, scores: dict, crops: CropLayout) -> torch.Tensor:
        if self.config.strategy == "rank":  # the default: top significance under the configured budget
            return super().select_crops(scores, crops)
        budgets = subimage_budgets(crops, self.config)
        return keep_rows_then_fill(scores["significance"], crops.valid, budgets, crops.grid[1])
