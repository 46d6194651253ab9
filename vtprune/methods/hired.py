"""HiRED: a token budget split between the base image and the crops of an AnyRes input.

Paper: "HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution
Vision-Language Models in Resource-Constrained Environments" (arXiv 2408.10945); official
code hasanar1f/HiRED (``HiRED_token_selection`` / ``HiRED_sub_img_budgets``).

How it follows the official code:
- a total budget of ``budget_ratio`` (default 0.2) of the image's tokens, of which the base image
  gets ``alpha`` (default 0.5, at most all its tokens) and the crops the rest. With
  ``budget_base="canvas"`` (the default, as the official code) the base is every token of the
  padded canvas, P x N for P sub-images of N tokens: total = int(P * N * budget_ratio), base share
  = min(int(total * alpha), N), crops' share = min(total - base share, (P - 1) * N);
- the crops' share follows where the base image's *early-layer* (``early_layer``, default 0)
  [CLS] attention concentrates; within each part, tokens are the top-k of the [CLS] attention
  of the layer that feeds the projector (layer 22 of 24 for LLaVA-NeXT, as the official
  ``vit_bottom_layer``); kept tokens stay in original order.

Where it deliberately differs:
- only tokens that exist after unpadding compete: the crops' share is allocated by largest
  remainder with each crop's valid tokens as its capacity, so the image keeps its base share plus
  min(crops' share, the crops' valid tokens) (the official per-crop int() floors can fall short).
  The official code takes each crop's top-k over all N tokens of the padded crop, padding
  included, then unpads, so the padding tokens it picked are lost and it keeps fewer;
- a lone image or video frame (no crops) keeps the whole total; the official code, written for
  images with crops, would give it only the base share;
- ``budget_base="valid"`` (vtprune's earlier rule, an option): total = round(budget_ratio x the
  visual tokens that exist after unpadding), the base image's share as above, and whatever the
  crops cannot hold goes back to the base image. On padded images it keeps fewer tokens than the
  official base. LLaVA-NeXT (24 x 24 tokens per sub-image, the 336-px pinpoints), budget_ratio 0.2:

  ====================  =====  ==================  ===============  ==============
  image (w x h)         crops  valid / canvas      "canvas" keeps   "valid" keeps
  ====================  =====  ==================  ===============  ==============
  640x480, 800x600,     2 x 2  2304 / 2880         576              461 (-20 %)
  1024x768, 600x800
  1280x720, 1920x1080   2 x 2  1920 / 2880         576              384 (-33 %)
  1000x500, 500x1000    1 x 2  1728 / 1728         345              346
  1000x1000             2 x 2  2880 / 2880         576              576
  ====================  =====  ==================  ===============  ==============

  (The official code's own count on padded images is its canvas total minus the padding tokens
  its per-crop top-k picked, which depends on the attention there.)
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

BUDGET_BASES = ("canvas", "valid")


@dataclass
class HiREDConfig(MethodConfig):
    budget_ratio: float = 0.2
    alpha: float = 0.5
    early_layer: int = 0
    budget_base: str = "canvas"  # "valid": the tokens that exist after unpadding (vtprune's earlier rule)

    def __post_init__(self):
        super().__post_init__()
        if self.budget_base not in BUDGET_BASES:
            raise ValueError(f"hired: budget_base must be one of {BUDGET_BASES}, got {self.budget_base!r}")
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
        valid, ratio = crops.valid, self.config.budget_ratio
        subimages, num_tokens = valid.shape
        canvas = self.config.budget_base == "canvas"
        if canvas:
            total = torch.tensor(int(subimages * num_tokens * ratio), device=valid.device)
        else:
            total = (valid.sum() * ratio + 0.5).floor().long()
        base_share = torch.minimum((total * self.config.alpha).floor().long(), valid[0].sum())
        if crops.num_subimages == 1:  # a lone image or video frame: the whole total
            budgets = total.view(1)
        else:
            crop_weights = base_map_on_crops(scores["early"][0], crops).sum(dim=1)
            if canvas:  # the official shares: the base keeps its share, the crops theirs (up to their tokens)
                crop_share = (total - base_share).clamp(max=(subimages - 1) * num_tokens)
                crop_budgets = allocate(crop_share, crop_weights, valid[1:].sum(dim=1))
                budgets = torch.cat([base_share.view(1), crop_budgets])
            else:
                budgets = split_base_and_crops(total, base_share, crop_weights, valid)
        return keep_top(scores["cls"], valid, budgets)
