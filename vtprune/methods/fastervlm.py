"""FasterVLM: [CLS]-attention pruning before the LLM.

Paper: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster" (Zhang et al., arXiv 2412.01818 v1); official code Theia-4869/FasterVLM.

How it follows the official code (``CLIPVisionTower.feature_select`` / ``encode_images``):
- score: post-softmax attention of the [CLS] query over all keys (CLS + patches) at the vision
  layer whose output feeds the projector (``vision_feature_layer``, -2 for LLaVA-1.5), the
  [CLS] key column dropped, mean over heads;
- selection: top-k per image, kept in original raster order; k is taken literally with
  ``keep_tokens`` (the paper's 432/288/144/58/29 of 576) or as round-half-up(ratio * N);
- positions: re-compacted after pruning (the official code rebuilds ``arange`` positions).

Where it deliberately differs: only the [CLS] row of that one layer is computed, from the
layer's own q/k projections captured by hooks; the tower keeps its SDPA/FlashAttention
kernels (the official code runs the whole tower in eager mode with ``output_attentions``).
Scores and softmax are computed in fp32 (the official code uses the model dtype, so fp16
ties may flip at the boundary). With ``vision_feature_select_strategy="full"`` the [CLS]
token is itself a visual token; its score is its self-attention.

Towers without a [CLS] token (SigLIP in LLaVA-OneVision, Qwen2-VL's ViT): the paper's score does
not exist there, and patching raises. ``score="received"`` opts into a documented substitute,
not the paper's method: the attention each token *receives* at the same layer, mean over heads
and over all queries (FoPru's significance), which ranks tokens the way the [CLS] row does on
CLIP towers only approximately.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtprune.methods.base import BudgetConfig, Method, top_k_sorted
from vtprune.registry import register_method

SCORES = ("cls", "received")


@dataclass
class FasterVLMConfig(BudgetConfig):
    score: str = "cls"  # "received": the opt-in substitute for towers without a [CLS] token

    def __post_init__(self):
        super().__post_init__()
        if self.score not in SCORES:
            raise ValueError(f"fastervlm: score must be one of {SCORES}, got {self.score!r}")


@register_method
class FasterVLM(Method):
    name = "fastervlm"
    config_class = FasterVLMConfig
    score = "cls_attention"
    paper = "[CLS] Attention is All You Need for Training-Free Visual Token Pruning (arXiv 2412.01818)"

    def vision_probes(self):
        if self.config.score == "received":
            return {"received": ("received", "feature")}
        return super().vision_probes()

    def select(self, scores, num_images, layout, device):
        return top_k_sorted(scores, self.config.num_keep(layout.num_tokens))
