"""GlobalCom²: the thumbnail commands how much of each crop survives.

Paper: "Compression with Global Guidance: Towards Training-free High-Resolution MLLMs
Acceleration" (GlobalCom², arXiv 2501.05179); official code xuyang-liu16/GlobalCom2
(``llava/model/llava_arch.py``).

Our reading of the paper and the official code:
- the base image (thumbnail) keeps the top ``keep_ratio`` of its tokens by [CLS] attention
  (``compress_thumbnail``);
- each crop's retention ratio is set around the global ratio r by the thumbnail's [CLS]
  attention over the region the crop covers: with s_i that region's attention mass,
  r_i = r * (1 + softmax(s / T)_i - mean(softmax(s / T))), capped at 1 (T = ``temperature``,
  default 10, as ``generate_scale_for_crop_features``);
- within a crop, tokens are ranked by the sum of the L2-normalised [CLS] attention of the crop
  itself and the L2-normalised thumbnail attention resized onto the crop
  (``select_topk_crop_features``); kept tokens stay in original order.

Where it deliberately differs:
- budgets are exact: the image keeps round(r x visual tokens that exist after unpadding); the
  thumbnail gets round(r x its tokens) and the crops share the rest in proportion to
  r_i x (valid tokens of crop i) by largest remainder (the official int() per crop drifts);
- a crop's region is its part of the resized thumbnail map on the unpadded crop canvas (the
  official scales use a plain block split of the thumbnail grid);
- newline tokens follow vtprune's AnyRes rule (a row's newline stays iff the row keeps a
  token); the official code keeps every newline;
- attention rows come from the probe on the layer's own q/k, not from eager attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.methods.base import Method, MethodConfig
from vtprune.methods.highres import CropLayout, base_map_on_crops, keep_top
from vtprune.methods.hired import split_base_and_crops
from vtprune.registry import register_method


@dataclass
class GlobalCom2Config(MethodConfig):
    keep_ratio: float = 0.25
    temperature: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if float(self.temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def crop_retention(region_mass: torch.Tensor, ratio: float, temperature: float) -> torch.Tensor:
    """(crops,) attention mass -> (crops,) retention ratios around ``ratio``, capped at 1."""
    soft = ((region_mass - region_mass.max()) / temperature).softmax(dim=0)
    return (ratio * (1 + soft - soft.mean())).clamp(max=1.0)


@register_method
class GlobalCom2(Method):
    name = "globalcom2"
    config_class = GlobalCom2Config
    score = "cls_attention"
    multi_crop_only = True
    paper = "Compression with Global Guidance: Training-free High-Resolution MLLMs Acceleration (arXiv 2501.05179)"

    def keeps_everything(self, layout) -> bool:
        return self.config.keep_ratio >= 1.0

    def select_crops(self, scores: dict, crops: CropLayout) -> torch.Tensor:
        cls, valid = scores["cls"].float(), crops.valid
        ratio = self.config.keep_ratio
        total = (valid.sum() * ratio + 0.5).floor().long()
        base_share = torch.minimum((valid[0].sum() * ratio + 0.5).floor().long(), total)
        if crops.num_subimages == 1:
            return keep_top(cls, valid, total.view(1))
        guide = base_map_on_crops(cls[0], crops)  # (crops, N) thumbnail attention on each crop
        retention = crop_retention(guide.sum(dim=1), ratio, self.config.temperature)
        budgets = split_base_and_crops(total, base_share, retention * valid[1:].sum(dim=1), valid)
        own = F.normalize(cls[1:] * valid[1:], dim=-1)
        combined = own + F.normalize(guide, dim=-1)
        return keep_top(torch.cat([cls[:1], combined]), valid, budgets)
