"""GlobalCom²: the thumbnail commands how much of each crop survives.

Paper: "Compression with Global Guidance: Towards Training-free High-Resolution MLLMs
Acceleration" (GlobalCom², arXiv 2501.05179); official code xuyang-liu16/GlobalCom2 @ 96b2d00:
``llava/model/llava_arch.py`` (``prepare_inputs_labels_for_multimodal``, ``compress_thumbnail``,
``generate_scale_for_crop_features``, ``compress_crops``, ``select_topk_crop_features``) and
``llava/model/multimodal_encoder/apply_customvit.py`` (the score).

How it follows the official code (``score="logits"``, the default):
- the score is the head-mean of the *pre-softmax* [CLS] attention logits (q.k * scale, before
  the softmax: ``attn_weights.view(B, H, T, T).mean(1)`` in ``apply_customvit.py``) at the
  *last* encoder layer (``attn_maps[-1][:, 0, 1:]``), while the LLM's features come from the
  layer ``vision_feature_layer`` names (-2);
- the base image (thumbnail) keeps its top ``keep_ratio`` tokens by that score
  (``compress_thumbnail``);
- each crop's retention ratio is set around the global ratio r by the thumbnail's score summed
  over the block of the thumbnail grid the crop covers (a plain block split of the thumbnail
  grid, ``side // crops`` patches per block, the last block taking the rest): with s_i that sum,
  r_i = r * (1 + softmax(s / T)_i - mean(softmax(s / T))), capped at 1 (T = ``temperature``,
  default 10). Logits are unbounded: a difference of one or two units per token over a block of
  a hundred tokens makes block sums that differ by tens, so the crops' ratios spread (in the tests,
  logits 2 units higher on one quarter: the ratios span 50 % of r and more); a post-softmax row
  sums to 1 per image, so its block sums differ by well under 1, s / 10 is nearly flat and every
  r_i falls within about 1-2 % of r;
- within a crop, tokens are ranked by the sum of the L2-normalised score of the crop itself and
  the L2-normalised thumbnail score resized onto the crop (``select_topk_crop_features``);
  crop tokens stay in original order.

Where it deliberately differs:
- the thumbnail's kept tokens stay in raster order; the official code emits them in descending
  score order (``base_image_feature[sorted_indices[:top_k]]``). A keep mask cannot reorder tokens;
  the order changes the sequence the LLM sees (not which tokens it sees);
- budgets are exact: the image keeps round(r x visual tokens that exist after unpadding); the
  thumbnail gets round(r x its tokens) and the crops share the rest in proportion to
  r_i x (valid tokens of crop i) by largest remainder (the official int() per crop drifts);
- newline tokens follow vtprune's AnyRes rule (a row's newline stays iff the row keeps a
  token); the official code keeps every newline;
- the score comes from the probe on the layer's own q/k in fp32, not from an eager tower.

``score="softmax"``: vtprune's earlier reading, kept as an option: the post-softmax [CLS] row of
the feature layer, and each crop's weight is the thumbnail map resized onto the unpadded crop
canvas and summed over the crop's part. With it the retention step is nearly switched off
(every crop within about 1-2 % of r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.methods.base import Method, MethodConfig
from vtprune.methods.highres import CropLayout, base_map_on_crops, keep_top
from vtprune.methods.hired import split_base_and_crops
from vtprune.registry import register_method

SCORES = ("logits", "softmax")


@dataclass
class GlobalCom2Config(MethodConfig):
    keep_ratio: float = 0.25
    temperature: float = 10.0
    score: str = "logits"  # "softmax": the post-softmax feature-layer row (vtprune's earlier reading)

    def __post_init__(self):
        super().__post_init__()
        if self.score not in SCORES:
            raise ValueError(f"globalcom2: score must be one of {SCORES}, got {self.score!r}")
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if float(self.temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def crop_retention(region_mass: torch.Tensor, ratio: float, temperature: float) -> torch.Tensor:
    """(crops,) attention mass -> (crops,) retention ratios around ``ratio``, capped at 1."""
    soft = ((region_mass - region_mass.max()) / temperature).softmax(dim=0)
    return (ratio * (1 + soft - soft.mean())).clamp(max=1.0)


def block_mass(base_scores: torch.Tensor, grid: tuple[int, int], crop_grid: tuple[int, int]) -> torch.Tensor:
    """(N,) thumbnail scores -> (crops,) their sums over the official block split of the thumbnail grid.

    Crop (i, j) of an nh x nw grid covers thumbnail rows [i * h // nh, ...) and columns
    [j * w // nw, ...); the last block of each axis takes the rest (``generate_scale_for_crop_features``).
    """
    (h, w), (nh, nw) = grid, crop_grid
    rows = (torch.arange(h, device=base_scores.device) // max(h // nh, 1)).clamp(max=nh - 1)
    cols = (torch.arange(w, device=base_scores.device) // max(w // nw, 1)).clamp(max=nw - 1)
    block = (rows[:, None] * nw + cols[None, :]).flatten()
    return torch.zeros(nh * nw, device=base_scores.device).index_add_(0, block, base_scores.float())


@register_method
class GlobalCom2(Method):
    name = "globalcom2"
    config_class = GlobalCom2Config
    score = "cls_attention"
    multi_crop_only = True
    paper = "Compression with Global Guidance: Training-free High-Resolution MLLMs Acceleration (arXiv 2501.05179)"

    def keeps_everything(self, layout) -> bool:
        return self.config.keep_ratio >= 1.0

    def vision_probes(self) -> dict:
        if self.config.score == "softmax":
            return {"cls": ("cls", "feature")}
        return {"cls": ("cls_logits", -1)}

    def select_crops(self, scores: dict, crops: CropLayout) -> torch.Tensor:
        cls, valid = scores["cls"].float(), crops.valid
        ratio = self.config.keep_ratio
        total = (valid.sum() * ratio + 0.5).floor().long()
        base_share = torch.minimum((valid[0].sum() * ratio + 0.5).floor().long(), total)
        if crops.num_subimages == 1:
            return keep_top(cls, valid, total.view(1))
        guide = base_map_on_crops(cls[0], crops)  # (crops, N) thumbnail attention on each crop
        official = self.config.score == "logits"
        mass = block_mass(cls[0], crops.grid, crops.crop_grid) if official else guide.sum(dim=1)
        retention = crop_retention(mass, ratio, self.config.temperature)
        budgets = split_base_and_crops(total, base_share, retention * valid[1:].sum(dim=1), valid)
        own = F.normalize(cls[1:] * valid[1:], dim=-1)
        combined = own + F.normalize(guide, dim=-1)
        return keep_top(torch.cat([cls[:1], combined]), valid, budgets)
