"""HiRED: a token budget split between the base image and the crops of an AnyRes input.

Paper: "HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution
Vision-Language Models in Resource-Constrained Environments" (arXiv 2408.10945); official
code hasanar1f/HiRED (``HiRED_token_selection`` / ``HiRED_sub_img_budgets``).

How it follows the official code:
- a total budget of ``budget_ratio`` of the image's visual tokens (default 0.2), of which the
  base image gets ``alpha`` (default 0.5, at most all its tokens) and the crops the rest;
- the crops' share follows where the base image's *early-layer* (``early_layer``, default 0)
  [CLS] attention concentrates; within each part, tokens are the top-k of the [CLS] attention
  of the layer that feeds the projector (layer 22 of 24 for LLaVA-NeXT, as the official
  ``vit_bottom_layer``); kept tokens stay in original order.

Where it deliberately differs:
- budgets are exact: the total is round(budget_ratio x visual tokens that exist after
  unpadding) and the shares are allocated by largest remainder with capacity limits, so the
  sub-images sum exactly to the total (the official flooring can fall short);
- a crop's weight is the early-layer [CLS] attention mass of the base image over the region
  the crop covers (the base map resized onto the crop canvas), where the official code counts
  top-attention tokens in contiguous row bands of the flattened base image;
- newline tokens follow vtprune's AnyRes rule (a row's newline stays iff the row keeps a
  token); the official code drops all newlines;
- the attention rows come from the probe on the layer's own q/k, not from eager attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import Method, MethodConfig
from vtprune.methods.highres import CropLayout, allocate, base_map_on_crops, keep_top
from vtprune.registry import register_method


@dataclass
class HiREDConfig(MethodConfig):
    budget_ratio: float = 0.2
    alpha: float = 0.5
    early_layer: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < float(self.budget_ratio) <= 1.0:
            raise ValueError(f"budget_ratio must be in (0, 1], got {self.budget_ratio}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def split_base_and_crops(total: torch.Tensor, base_share: torch.Tensor, crop_weights, valid: torch.Tensor):
    """Budgets (S,): the base gets ``base_share``, the crops share the rest by weight; exact sum.

    Whatever the crops cannot hold goes back to the base image (up to its tokens).
    """
    valid_counts = valid.sum(dim=1)
    crops = allocate(total - base_share, crop_weights, valid_counts[1:])
    base = torch.minimum(total - crops.sum(), valid_counts[0]).view(1)
    return torch.cat([base, crops])


@register_method
class HiRED(Method):
    name = "hired"
    config_class = HiREDConfig
    score = "cls_attention"
    multi_crop_only = True
    paper = "HiRED: Attention-Guided Token Dropping for High-Resolution VLMs (arXiv 2408.10945)"

    def keeps_everything(self, layout) -> bool:
        return self.config.budget_ratio >= 1.0

    def vision_probes(self) -> dict:
        return {"cls": ("cls", "feature"), "early": ("cls", int(self.config.early_layer))}

    def select_crops(self, scores: dict, crops: CropLayout) -> torch.Tensor:
        valid = crops.valid
        total = (valid.sum() * self.config.budget_ratio + 0.5).floor().long()
        base_share = torch.minimum((total * self.config.alpha).floor().long(), valid[0].sum())
        if crops.num_subimages == 1:
            budgets = total.view(1)
        else:
            crop_weights = base_map_on_crops(scores["early"][0], crops).sum(dim=1)
            budgets = split_base_and_crops(total, base_share, crop_weights, valid)
        return keep_top(scores["cls"], valid, budgets)
