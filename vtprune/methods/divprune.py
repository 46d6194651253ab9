"""DivPrune: keep the most diverse visual tokens (greedy max-min diversity) before the LLM.

Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al.,
arXiv 2503.02175, CVPR 2025); official code vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``:
``LlavaMetaForCausalLM.DivPrune`` and ``pairwise_cosine_similarity``, called at the end of
``prepare_inputs_labels_for_multimodal``.

How it follows the official code:
- features: the projected visual tokens, as the LLM receives them (the projector's output);
  distance 1 - cos between every pair of an image's tokens;
- selection, greedy max-min (farthest point), k steps: the first pick is the token whose nearest
  other token is farthest (per column, the second-smallest distance, the smallest being its own),
  each later pick the token farthest from its nearest already-picked token; ties go to the lowest
  index (``argmax``);
- budget: k = round(ratio * N) with Python's round (half to even: 576 * 0.098 -> 56), or
  ``keep_tokens``; kept tokens in original (raster) order; positions re-compacted;
- LLaVA-NeXT (AnyRes): the official code prunes each image's whole packed sequence with one budget
  (``budget="global"``, the default here): k = round(ratio * the image's tokens), chosen across the
  base image and its crops. ``budget="per_image"`` prunes each sub-image on its own
  (UniPruneBench's ``DivPrune_PreLLM``).

Where it deliberately differs:
- a picked token is never picked again, so exactly k tokens stay: the official code can re-pick
  a token (its self-distance, about 0, is then the largest score) when every remaining token
  duplicates a picked one, keeping fewer than k (k above the number of distinct tokens);
- distances are computed in fp32 (the official code uses the embedding dtype, fp16 in its
  lmms-eval run), so near-ties may pick differently;
- the running minimum over the picked rows replaces the official re-reduction over all picked rows
  each step (the same values, O(k N) instead of O(k^2 N));
- any batch size, each image on its own (the official code reads batch element 0 and a fixed
  35-token system prompt);
- at least one token is kept (``max(1, ...)``, as UniPruneBench; the official k can be 0);
- LLaVA-NeXT: newline tokens are not candidates; they follow vtprune's AnyRes rule (a row's
  newline stays iff the row keeps a token), where the official code lets them compete as tokens.

Where it runs: the tokens are the LLM input embeddings at the image's visual columns, which are the
projector's output (the visual tokens in LLM space). LLaVA-1.5, LLaVA-NeXT and the original LLaVA
package hand them over from a hook on the projector; Qwen2-VL, Qwen2.5-VL, Qwen3-VL (+ MoE),
LLaVA-OneVision, InternVL, Gemma 3, Idefics3 and SmolVLM read them off the LLM's ``inputs_embeds``
at selection (``Adapter.token_selector``). Each family's selector sets what one image is:
- one budget per image / tile (Gemma 3, Idefics3 / SmolVLM: every tile and the global image on
  its own, as those selectors treat them);
- one budget over the whole image (``budget="global"``) across its sub-images: LLaVA-OneVision's
  base image and unpadded crops (newlines as LLaVA-NeXT), InternVL's tiles (thumbnail and crops);
- videos per frame: Qwen2-VL / Qwen2.5-VL / Qwen3-VL per temporal slice, LLaVA-OneVision per
  pooled frame (its trailing newline kept); InternVL takes video frames as tiles.
The other families (LLaVA-NeXT-Video) refuse at patch time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import BudgetConfig, Method
from vtprune.methods.highres import CropLayout, subimage_budgets
from vtprune.registry import register_method


@dataclass
class DivPruneConfig(BudgetConfig):
    budget: str = "global"  # LLaVA-NeXT: one budget over the whole image, as the official code

    def num_keep(self, num_tokens: int) -> int:
        """k = round(ratio * N), Python's round as the official code (at least 1), or ``keep_tokens``."""
        if self.keep_ratio is None:
            return super().num_keep(num_tokens)
        return max(1, min(num_tokens, round(self.keep_ratio * num_tokens)))


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """(n, N, D) -> (n, N, N) fp32: 1 - cos between every pair of tokens of each row."""
    x = features.float()
    unit = x / x.norm(dim=-1, keepdim=True)
    return 1.0 - unit @ unit.transpose(-1, -2)


def max_min_picks(distance: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max-min diversity: (n, N, N) distances -> (n, k) picks, in pick order.

    valid: None, or (n, N) bool, the candidates (the others are neither picked nor counted as
    anyone's nearest token).
    """
    n, num_tokens, _ = distance.shape
    if valid is not None:
        distance = distance.masked_fill(~valid[:, :, None], float("inf"))  # an invalid row is nobody's nearest
    nearest_other = distance.topk(2, dim=1, largest=False).values[:, 1]  # per column: second-smallest over rows
    nearest_picked = torch.full_like(nearest_other, float("inf"))
    candidates = torch.ones_like(nearest_other, dtype=torch.bool) if valid is None else valid.clone()
    picks = []
    for step in range(k):
        score = nearest_other if step == 0 else nearest_picked
        pick = score.masked_fill(~candidates, float("-inf")).argmax(dim=1)  # (n,)
        candidates.scatter_(1, pick[:, None], False)
        picks.append(pick)
        row = distance.gather(1, pick.view(n, 1, 1).expand(n, 1, num_tokens)).squeeze(1)
        nearest_picked = torch.minimum(nearest_picked, row)
    return torch.stack(picks, dim=1)


def picks_to_mask(picks: torch.Tensor, num_tokens: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """(n, k) picks -> (n, N) bool; counts: None, or (n,) how many first picks of each row count (the
    picks after them may repeat, once a row ran out of candidates)."""
    used = torch.ones_like(picks)
    if counts is not None:
        used = (torch.arange(picks.shape[1], device=picks.device) < counts.to(picks.device)[:, None]).long()
    hits = torch.zeros(picks.shape[0], num_tokens, dtype=torch.long, device=picks.device)
    return hits.scatter_add_(1, picks, used) > 0


@register_method
class DivPrune(Method):
    name = "divprune"
    config_class = DivPruneConfig
    paper = "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (arXiv 2503.02175)"

    def vision_probes(self):
        return {"embeds": ("embeds", "feature")}

    def select(self, scores, num_images, layout, device):
        k = self.config.num_keep(layout.num_tokens)
        picks = max_min_picks(cosine_distance(scores), k)
        return picks.sort(dim=-1).values

    def select_crops(self, scores: dict, crops: CropLayout) -> torch.Tensor:
        features, valid, host = scores["embeds"], crops.valid, crops.host_valid
        num_subimages, num_tokens = valid.shape
        if self.config.budget == "global":
            if self.config.keep_tokens is not None:
                k = min(self.config.keep_tokens * num_subimages, int(host.sum()))
            else:
                k = max(1, round(self.config.keep_ratio * int(host.sum())))
            flat = features.reshape(1, num_subimages * num_tokens, -1)
            picks = max_min_picks(cosine_distance(flat), k, valid.reshape(1, -1))
            return picks_to_mask(picks, num_subimages * num_tokens).view_as(valid)
        host_layout = CropLayout(crops.grid, crops.crop_grid, host)
        budgets = subimage_budgets(host_layout, self.config)  # on the CPU: Python ints, no device read
        picks = max_min_picks(cosine_distance(features), max(1, int(budgets.max())), valid)
        return picks_to_mask(picks, num_tokens, budgets)
