"""CDPruner: conditional diversity (a DPP conditioned on the instruction) before the LLM.

Paper: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs" (Zhang et al., arXiv 2506.10967, NeurIPS 2025); official code Theia-4869/CDPruner,
``llava/model/llava_arch.py::LlavaMetaForCausalLM.encode_images`` (kernel and greedy MAP) and
``llava/model/multimodal_encoder/clip_encoder.py`` (``load_text_tower``, ``forward``: the
relevance signals).

What it needs from the model, and what vtprune asks of the caller:
- the projected visual tokens (the projector's output) and the vision layer's output that feeds
  the projector: vtprune's probes give both (LLaVA-1.5, LLaVA-NeXT; other families refuse at
  patch time);
- the instruction relevance comes from CLIP's *joint* space: the image side is
  ``visual_projection(post_layernorm(feature-layer tokens))`` and the text side
  ``CLIPTextModelWithProjection(instruction).text_embeds``. A transformers LLaVA holds neither the
  text tower nor ``visual_projection`` (only the vision tower), so the caller supplies the CLIP
  checkpoint the LLaVA tower came from (``openai/clip-vit-large-patch14-336`` for LLaVA-1.5 /
  1.6): ``clip="<path or hub name>"`` (loaded with transformers at patch time) or
  ``clip=ClipRelevance(clip_model, tokenizer)``. Without it, patching raises and says so;
- the instruction: ``query="..."`` (or one string per image of the batch, in order) or
  ``handle.set_query(...)`` before the forward; the official evaluation passes the raw question
  without the "Answer the question using a single word or phrase." suffix.

How it follows the official code:
- similarity: cosine of the projected tokens, S = F_n F_n^T;
- relevance: r = mean over text segments of -(cos(image embed, text embed)) (negated, as
  official), then min-max normalised: (r - min + 1e-6) / (max - min);
- kernel L = diag(r) S diag(r); greedy MAP of the DPP (Chen et al. 2018's fast update) for k
  steps, no stopping rule; the text is tokenized without truncation and, past 77 tokens, cut
  into zero-padded segments of 77 (each segment one text embedding);
- budget ``keep_tokens`` (the official ``visual_token_num``) or round-half-up(ratio * N); kept
  tokens in raster order; positions re-compacted; LLaVA-NeXT: the budget per sub-image.

Where it deliberately differs:
- the min-max normalisation of the relevance runs per image (over all its sub-images); the
  official code normalises over the whole batch jointly (batch 1 in its evaluation), which would
  make one image's selection depend on the others;
- ``post_layernorm`` and ``visual_projection`` come from the supplied CLIP checkpoint (the
  official code uses the tower's own ``post_layernorm``: the same weights when the checkpoint is
  the tower's);
- all in fp32 (the official similarity uses fp16-normalised features, the relevance fp32);
- the DPP update divides by sqrt(max(d^2, 1e-12)) so a rank-deficient kernel (k above its rank)
  picks on instead of producing NaN;
- LLaVA-NeXT: the crops are unpadded as the model packs them and only tokens that exist compete
  (the official code drops ``_unpad``); newline tokens follow vtprune's AnyRes rule;
- no CUDA streams: the text tower runs when the image is selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import BudgetConfig, Method
from vtprune.methods.highres import CropLayout, select_each_subimage
from vtprune.registry import register_method


class ClipRelevance:
    """CLIP's joint space for CDPruner's relevance: ``clip`` with ``vision_model.post_layernorm``,
    ``visual_projection``, ``text_model`` and ``text_projection`` (a transformers ``CLIPModel``) and
    its tokenizer (``tokenizer(text=..., return_tensors="pt")`` -> input_ids, attention_mask)."""

    def __init__(self, clip, tokenizer):
        self.clip, self.tokenizer = clip, tokenizer
        self.segment = clip.text_model.config.max_position_embeddings  # 77

    @property
    def vision_width(self) -> int:
        return self.clip.visual_projection.in_features

    @torch.no_grad()
    def image(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, N, vision width) feature-layer tokens -> (n, N, C) image embeddings in the joint space."""
        layer_norm, projection = self.clip.vision_model.post_layernorm, self.clip.visual_projection
        weight = projection.weight
        return projection(layer_norm(tokens.to(weight.device, weight.dtype))).float()

    @torch.no_grad()
    def text(self, query: str) -> torch.Tensor:
        """The instruction -> (M, C) text embeddings, one per zero-padded segment of 77 tokens."""
        inputs = self.tokenizer(text=query, return_tensors="pt")
        length = inputs["input_ids"].shape[1]
        padding = self.segment * ((length - 1) // self.segment + 1) - length
        device = self.clip.text_projection.weight.device
        inputs = {
            key: torch.cat([inputs[key], inputs[key].new_zeros(1, padding)], dim=1).view(-1, self.segment).to(device)
            for key in ("input_ids", "attention_mask")
        }
        pooled = self.clip.text_model(**inputs).pooler_output
        return self.clip.text_projection(pooled).float()


@dataclass
class CDPrunerConfig(BudgetConfig):
    query: object = None  # the instruction: a str, or one str per image of the batch
    clip: object = None  # a CLIP checkpoint (path / hub name) or a ClipRelevance

    def __post_init__(self):
        super().__post_init__()
        if self.clip is None:
            raise ValueError(
                "cdpruner scores the instruction's relevance in CLIP's joint space (text tower and visual_projection), "
                "which a transformers LLaVA does not hold: pass clip='<the CLIP checkpoint of the vision tower, e.g. "
                "openai/clip-vit-large-patch14-336>' or clip=ClipRelevance(clip_model, tokenizer)"
            )
        if not isinstance(self.clip, (str, ClipRelevance)):
            raise ValueError(f"cdpruner: clip must be a checkpoint path / name or a ClipRelevance, got {self.clip!r}")


def query_relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor, valid: torch.Tensor | None = None):
    """(n, N, C) image and (M, C) text embeddings -> (n, N) relevance, min-max normalised over every
    (valid) token of the n rows together (one image and its sub-images)."""
    image = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (-(image @ text.t())).mean(dim=-1)  # negated, as the official code
    valid = torch.ones_like(relevance, dtype=torch.bool) if valid is None else valid
    low = relevance.masked_fill(~valid, float("inf")).min()
    high = relevance.masked_fill(~valid, float("-inf")).max()
    return (relevance - low + 1e-6) / (high - low)


def dpp_picks(features: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP of the DPP with kernel diag(r) S diag(r), S the cosine of ``features``.

    features: (n, N, D); relevance: (n, N). Returns (n, k) picks in pick order.
    """
    unit = features.float() / features.float().norm(dim=-1, keepdim=True)
    kernel = relevance[:, :, None] * (unit @ unit.transpose(1, 2)) * relevance[:, None, :]  # (n, N, N)
    n, num_tokens = relevance.shape
    rows = torch.arange(n, device=features.device)
    directions = torch.zeros(k, n, num_tokens, device=features.device)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (n, N)
    picks = []
    for step in range(k):
        pick = gains.argmax(dim=-1)
        picks.append(pick)
        projected = torch.einsum("tb,tbn->bn", directions[:step, rows, pick], directions[:step])
        direction = (kernel[rows, pick] - projected) / gains[rows, pick].clamp_min(1e-12).sqrt()[:, None]
        directions[step] = direction
        gains = gains - direction.square()
        gains[rows, pick] = float("-inf")
    return torch.stack(picks, dim=1)


@register_method
class CDPruner(Method):
    name = "cdpruner"
    config_class = CDPrunerConfig
    stacks_probes = True  # one tensor: the projected tokens, then the feature layer's output tokens
    paper = "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs (2506.10967)"

    def __init__(self, config: CDPrunerConfig):
        super().__init__(config)
        self.relevance = config.clip if isinstance(config.clip, ClipRelevance) else None

    def bind(self, model, handle) -> None:
        if self.relevance is None:  # a checkpoint name: CLIP's text and vision towers, on the model's device
            from transformers import AutoTokenizer, CLIPModel

            try:
                clip = CLIPModel.from_pretrained(self.config.clip).to(next(model.parameters()).device).eval()
                tokenizer = AutoTokenizer.from_pretrained(self.config.clip)
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"cdpruner: cannot load the CLIP checkpoint {self.config.clip!r} ({error}); pass a local path, or "
                    "clip=ClipRelevance(clip_model, tokenizer)"
                ) from error
            self.relevance = ClipRelevance(clip, tokenizer)
        width = getattr(getattr(model.config, "vision_config", None), "hidden_size", None)
        if width is not None and width != self.relevance.vision_width:
            raise ValueError(
                f"cdpruner: the CLIP checkpoint's vision width {self.relevance.vision_width} is not the model's vision "
                f"tower width {width}; pass the CLIP checkpoint the model's vision tower came from"
            )

    def vision_probes(self):
        return {"embeds": ("embeds", "feature"), "hidden": ("hidden", "feature")}

    def queries(self, count: int) -> list[str]:
        query = self.config.query
        queries = list(query) if isinstance(query, (list, tuple)) else [query] * count
        if len(queries) != count or not all(isinstance(q, str) and q.strip() for q in queries):
            raise ValueError(
                f"cdpruner needs the instruction for each of the {count} images (non-empty text): pass query='...' "
                "(or one string per image) to vtprune.patch, or call handle.set_query(...) before the forward"
            )
        return queries

    def signals(self, stacked: torch.Tensor, query: str, valid=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, N, D + vision width) stacked probes of one image -> its projected tokens and relevance."""
        width = self.relevance.vision_width
        features, hidden = stacked[..., :-width], stacked[..., -width:]
        return features, query_relevance(self.relevance.image(hidden), self.relevance.text(query), valid)

    def select(self, scores, num_images, layout, device):
        k = self.config.num_keep(layout.num_tokens)
        picks = []
        for image, query in enumerate(self.queries(num_images)):  # one text tower call per image
            features, relevance = self.signals(scores[image : image + 1], query)
            picks.append(dpp_picks(features, relevance, k))
        return torch.cat(picks).sort(dim=-1).values

    def select_crops(self, scores: dict, crops: CropLayout) -> torch.Tensor:
        stacked, valid = scores["stacked"], crops.valid
        if isinstance(self.config.query, (list, tuple)):
            raise ValueError("cdpruner on high-resolution (AnyRes) images takes one query for the batch (a str)")
        (query,) = self.queries(1)
        features, relevance = self.signals(stacked, query, valid)

        def picks(row, tokens, budget):
            return dpp_picks(features[row, tokens][None], relevance[row, tokens][None], budget)[0]

        return select_each_subimage(crops, self.config, picks)
