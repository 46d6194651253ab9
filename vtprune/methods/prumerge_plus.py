"""PruMerge+: [CLS]-attention outliers plus spatial samples, each merged with its key neighbours.

Paper: "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models" (Shang et
al., arXiv 2403.15388, ICCV 2025); official code 42Shawn/LLaVA-PruMerge @ 097c041,
``llava/model/multimodal_encoder/clip_encoder.py::CLIPVisionTower.token_prune_merge_advanced_plus``
(with ``outlier_dectection`` and ``complement_idx``), called by ``forward`` with
``if_adaptive=True``.

How it follows the official code, per image:
- score: the last encoder layer's q and k projections (bias included, before CLIP's q scaling)
  taken as one head of the full width C: ``softmax(q k^T C^-1/2)``, the [CLS] row over the patches;
- adaptive count (IQR): the fraction r of patches whose score is above Q3 + 1.5 IQR (linear-
  interpolated quartiles, fp32 scores), k = int(N r); the k top patches in descending score;
- spatial samples: ``arange(0, N - 1, int(int(1 / r) / 3))`` less those already taken, appended in
  ascending order (N - 1 = 575 excludes the last patch, as the official bound does);
- merge: every chosen token adds the score-weighted sum (weights not normalised) of its 32 nearest
  tokens by the cosine of the layer's keys among all other patches (chosen or not), from the
  original features; one extra token, the score-weighted sum of all patches not chosen, is appended;
- the features are the projector's input (``hidden_states[-2]``, patches), and the tokens
  ``[chosen (score order, then spatial); extra]`` go through the model's projector and fill the first
  columns of the image block; positions re-compacted (LLaVA's ``arange``).

``keep_tokens=T`` (a fixed budget; the papers that compare at 64 / 128 tokens do not say how they
fixed PruMerge+'s count): r = (T - 1) / (4 N) replaces the IQR fraction (about a quarter of the
tokens by score, three quarters spatial, as the adaptive rule splits them), then the chosen list is
cut to, or filled with the next tokens by score up to, T - 1, plus the extra token.

Where it deliberately differs:
- each image gets its own count (the official code pools the whole batch into one IQR and crashes
  on a batch with ``cat(idx, filtered.unsqueeze(0))``); the count is read back to the host once per
  image (the output length depends on it);
- where the official code raises: no outlier (r = 0, a division by zero) keeps the one top patch
  (r = 1 / N), and r > 1/3 (a zero spatial stride) samples with stride 1;
- ``neighbours`` (32) is clamped to the patches there are (tiny test towers);
- q and k come from hooks on that layer's projections (the official code hooks them too), the
  score in fp32 (the official code uses the tower dtype, fp16 in its builder).

``handle.last.stages[0].merged``: a chosen patch carries itself, every other patch is in the extra
token (the 32-neighbour sets overlap and are not reported).

Not supported (refused): towers without [CLS]; [CLS] fed to the LLM (``"full"``, where the official
indices are off by one); AnyRes crops (the official repository has no LLaVA-NeXT path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.methods.base import Method, MethodConfig
from vtprune.registry import register_method
from vtprune.types import MergedTokens, VisualLayout


@dataclass
class PruMergePlusConfig(MethodConfig):
    keep_tokens: int | None = None  # None: the official adaptive (IQR) count
    neighbours: int = 32

    def __post_init__(self):
        super().__post_init__()
        if self.keep_tokens is not None and self.keep_tokens < 2:
            raise ValueError(f"prumerge_plus: keep_tokens must be >= 2 (a token and the extra), got {self.keep_tokens}")
        if self.neighbours < 1:
            raise ValueError(f"prumerge_plus: neighbours must be >= 1, got {self.neighbours}")


def outlier_fraction(scores: torch.Tensor) -> float:
    """The fraction of ``scores`` above Q3 + 1.5 IQR (linear-interpolated quartiles), as a Python float."""
    values = scores.float().double()
    q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=values.dtype, device=values.device))
    return int((values > q3 + 1.5 * (q3 - q1)).sum()) / values.numel()


def chosen_tokens(scores: torch.Tensor, keep_tokens: int | None) -> torch.Tensor:
    """(P,) scores of one image -> the chosen patch indices, in the official order."""
    patches = scores.numel()
    ratio = outlier_fraction(scores) if keep_tokens is None else (keep_tokens - 1) / (4 * patches)
    ratio = max(ratio, 1 / patches)  # the official code divides by zero without an outlier
    order = scores.argsort(descending=True, stable=True)
    top = order[: int(patches * ratio)]
    stride = max(1, int(int(1 / ratio) / 3))
    spatial = torch.arange(0, patches - 1, stride, device=scores.device)
    taken = torch.zeros(patches, dtype=torch.bool, device=scores.device)
    taken[top] = True
    chosen = torch.cat([top, spatial[~taken[spatial]]])
    if keep_tokens is not None:  # cut to, or fill by score up to, T - 1
        taken[chosen] = True
        chosen = torch.cat([chosen, order[~taken[order]]])[: keep_tokens - 1]
    return chosen


def merge_chosen(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, chosen: torch.Tensor, neighbours: int
) -> torch.Tensor:
    """One image: (P, D) features, (P,) scores, (P, C) keys, (K,) chosen -> (K + 1, D) merged tokens."""
    normed = F.normalize(keys.float(), p=2, dim=-1)
    similarity = normed[chosen] @ normed.T  # (K, P): each chosen token against every patch
    similarity[torch.arange(chosen.numel(), device=chosen.device), chosen] = float("-inf")  # not itself
    nearest = similarity.topk(min(neighbours, scores.numel() - 1), dim=1).indices  # (K, n)
    weights = scores[nearest].to(features.dtype)[..., None]
    updated = features[chosen] + (features[nearest] * weights).sum(dim=1)
    rest = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    rest[chosen] = False
    extra = (features * (scores.to(features.dtype) * rest)[:, None]).sum(dim=0, keepdim=True)
    return torch.cat([updated, extra])


@register_method
class PruMergePlus(Method):
    name = "prumerge_plus"
    config_class = PruMergePlusConfig
    score = "cls_attention"
    paper = "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models (arXiv 2403.15388)"
    merges = True  # answers with MergedTokens (the engine fills each image block's first columns)
    needs_projector = True  # merges vision features: the adapter sets ``projector``
    projector: torch.nn.Module | None = None

    def vision_probes(self):
        return {
            "cls": ("cls_single_head", -1),
            "keys": ("raw_keys", -1),
            "hidden": ("hidden", "feature"),
        }

    def keeps_everything(self, layout: VisualLayout) -> bool:
        return False  # every token is merged with its neighbours

    def merge(self, scores: dict, embeds: torch.Tensor, layout: VisualLayout) -> MergedTokens:
        if layout.num_prefix:
            raise ValueError(
                "prumerge_plus: the model feeds [CLS] to its LLM (vision_feature_select_strategy='full'); "
                "PruMerge+ prunes the patch features only: use 'default'"
            )
        features = scores["hidden"][:, 1:]  # (n, P, D) the projector's input, patches
        rows, sources = [], torch.empty(features.shape[:2], dtype=torch.long, device=features.device)
        for b in range(features.shape[0]):  # a few images; each count is the image's own
            chosen = chosen_tokens(scores["cls"][b], self.config.keep_tokens)
            rows.append(merge_chosen(features[b], scores["cls"][b], scores["keys"][b], chosen, self.config.neighbours))
            sources[b] = chosen.numel()  # the extra token
            sources[b, chosen] = torch.arange(chosen.numel(), device=chosen.device)
        counts = torch.tensor([row.shape[0] for row in rows], device=features.device)
        tokens = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        projector = self.projector
        values = projector(tokens.to(next(projector.parameters()).dtype))
        return MergedTokens(values=values, sources=sources, counts=counts)
