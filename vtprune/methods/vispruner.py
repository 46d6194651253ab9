"""VisPruner: important tokens by [CLS] attention, then diverse tokens by removing duplicates.

Paper: "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs"
(Zhang et al., arXiv 2412.01818 v2+, ICCV 2025; the successor of FasterVLM); official code
Theia-4869/VisPruner, ``llava/model/llava_arch.py::LlavaMetaForCausalLM.encode_images`` (signals
from ``llava/model/multimodal_encoder/clip_encoder.py::CLIPVisionTower.feature_select``).

How it follows the official code:
- signals, both at the vision layer that feeds the projector (``vision_feature_layer``, layer 22
  of 24 for LLaVA-1.5): the post-softmax attention of the [CLS] query over the patch tokens, mean
  over heads, and that layer's output tokens (the pre-projector features);
- budget: T = ``keep_tokens`` (or round-half-up(ratio * N)); T_imp = int(T * ``important_ratio``)
  important tokens, T_div = T - T_imp diverse ones (paper / README settings: 128 = 64 + 64 with
  ratio 0.5, 64 = 48 + 16 with 0.75);
- important tokens: the first T_imp of the attention order (``argsort`` descending); the others,
  in that order, are the residual;
- diverse tokens: rounds of duplicate removal on the L2-normalised features until T_div remain:
  the residual splits into even and odd positions, each even token is scored by its best cosine
  match among the odd ones, the r = min(8, R - T_div) best-matched even tokens are dropped, and
  the residual becomes the kept even tokens (in descending order of their score) followed by the
  odd ones -- the order the next round splits;
- kept tokens in original (raster) order; positions re-compacted;
- LLaVA-NeXT: T per sub-image (the official code applies its budget per crop).

Where it deliberately differs:
- **the official loop crashes when the residual has an odd length R**: it indexes the ceil(R/2)
  even tokens with a batch index of R // 2 - r rows (``IndexError: shape mismatch``). R is odd
  from the start whenever N - T_imp is odd (T_imp odd on 576 tokens, e.g. T = 58 with ratio 0.5),
  and becomes odd after a round that must drop r > ceil(R/2) even tokens (it drops them all and
  keeps the floor(R/2) odd ones; e.g. 64 tokens, T = 24, ratio 0.75: 46 -> ... -> 14 -> 7). Here
  the kept even tokens are gathered with their own count, which is what the loop means; while R
  stays even the picks are the official ones;
- signals in fp32 (the official features are in the model dtype); the loop is chaotic at that
  precision (a 1e-6 change of a feature moves picks), so picks match the official code only on
  inputs whose similarity margins are wide;
- the attention row comes from the probe on the layer's own q/k (SDPA stays on), not from eager
  attention with ``output_attentions``;
- any batch size (the official code flattens masks across the batch, so batch 1);
- LLaVA-NeXT: the crops are unpadded as the model packs them and only tokens that exist compete
  (the official code drops ``_unpad`` and keeps 5 x 576 tokens); newline tokens follow vtprune's
  AnyRes rule (a row's newline stays iff the row keeps a token);
- towers without [CLS] (SigLIP, Qwen2-VL's ViT) refuse at patch time; the official SigLIP
  variant (attention received at the last layer) is not implemented. It runs on LLaVA-1.5 and
  LLaVA-NeXT, whose adapters hand over the feature layer's tokens with the [CLS] row; the other
  families refuse at patch time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import BudgetConfig, Method
from vtprune.methods.highres import CropLayout, select_each_subimage
from vtprune.registry import register_method

MAX_DROPPED_PER_ROUND = 8


@dataclass
class VisPrunerConfig(BudgetConfig):
    important_ratio: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.important_ratio <= 1.0:
            raise ValueError(f"vispruner: important_ratio must be in [0, 1], got {self.important_ratio}")


def vispruner_picks(attention: torch.Tensor, features: torch.Tensor, keep: int, important_ratio: float):
    """(n, N) [CLS] attention and (n, N, C) features -> (n, keep) kept indices, important ones first.

    Returns ``cat(important, residual)`` in the official code's order (residual as the last round
    left it).
    """
    important_count = int(keep * important_ratio)
    diverse_count = keep - important_count
    order = attention.argsort(dim=-1, descending=True)
    important, residual = order[:, :important_count], order[:, important_count:]
    if diverse_count == 0:
        return important
    unit = features / features.norm(dim=-1, keepdim=True)
    width = unit.shape[-1]
    while True:
        remaining = residual.shape[1]
        dropped = min(MAX_DROPPED_PER_ROUND, remaining - diverse_count)
        if dropped <= 0:
            break
        tokens = unit.gather(1, residual[:, :, None].expand(-1, -1, width))
        even, odd = tokens[:, ::2], tokens[:, 1::2]
        best_match = (even @ odd.transpose(-1, -2)).max(dim=-1).values  # (n, ceil(R / 2))
        distinct = best_match.argsort(dim=-1, descending=True)[:, dropped:]
        # the official code indexes with R // 2 - r batch rows here, which fails when R is odd
        residual = torch.cat([residual[:, ::2].gather(1, distinct), residual[:, 1::2]], dim=-1)
    return torch.cat([important, residual], dim=-1)


@register_method
class VisPruner(Method):
    name = "vispruner"
    config_class = VisPrunerConfig
    score = "cls_attention"
    stacks_probes = True  # one tensor: channel 0 the [CLS] row, then the layer's output tokens
    paper = (
        "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs (arXiv 2412.01818)"
    )

    def vision_probes(self):
        return {"cls": ("cls", "feature"), "features": ("hidden", "feature")}

    def select(self, scores, num_images, layout, device):
        k = self.config.num_keep(layout.num_tokens)
        kept = vispruner_picks(scores[..., 0], scores[..., 1:], k, self.config.important_ratio)
        return kept.sort(dim=-1).values

    def select_crops(self, scores: dict, crops: CropLayout) -> torch.Tensor:
        stacked = scores["stacked"]

        def picks(row, tokens, budget):
            sub = stacked[row, tokens][None]
            return vispruner_picks(sub[..., 0], sub[..., 1:], budget, self.config.important_ratio)[0]

        return select_each_subimage(crops, self.config, picks)
