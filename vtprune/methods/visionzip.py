"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity.

Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (Yang et al.,
arXiv 2412.04467, CVPR 2025); official code dvlab-research/VisionZip (now JIA-Lab-research/VisionZip)
@ 3151f6d, ``visionzip/clip_encoder.py::CLIPVisionTower_VisionZip.forward`` (selection and merge),
``visionzip/utils.py::CLIPAttention_forward`` (the merge metric), ``visionzip/main.py::visionzip``
(``dominant``, ``contextual``).

How it follows the official code, per image, at the vision layer whose output feeds the projector
(``hidden_states[-2]`` / ``attentions[-2]`` / ``layers[-2]`` in LLaVA-1.5):
- dominant: the [CLS] token plus the ``dominant - 1`` patches with the most post-softmax [CLS]
  attention, in raster order, [CLS] first;
- contextual: the remaining tokens in raster order; ``contextual`` targets at stride
  ``max(1, R // contextual)`` among them (indices into the remaining tokens); every other remaining
  token joins the target with the largest cosine of the layer's keys (the k projection's output,
  mean over heads, L2-normalised; ties to the first target); a contextual token is its target's
  hidden state *plus* the mean of its members' (the target is not averaged in; a target without
  members stays as it is);
- the tokens ``[dominant; contextual]`` (the vision layer's hidden states, [CLS] included even
  where the model feeds no [CLS] to its LLM) go through the model's projector and replace the
  image in the prompt, in that order; positions re-compacted (LLaVA rebuilds ``arange``), so they
  take the first ``dominant + contextual`` positions of the image block. With
  ``positions="original"`` they keep the positions of the block's first columns.
- budgets: ``dominant`` and ``contextual`` as ``visionzip(model, dominant, contextual)`` takes
  them ([CLS] counted in ``dominant``), or ``keep_tokens=k`` (``keep_ratio``: k = round(ratio * N)):
  ``contextual = round(5 k / 32)``, ``dominant = k - contextual``, the paper's 54+10 / 108+20 /
  162+30 for 64 / 128 / 192 (and 27+5 per sub-image for LLaVA-NeXT's 160).

``handle.last.stages[0].merged`` says which patches each token carries (a dominant patch itself,
a contextual token its target and members); ``kept`` are the image-block columns the tokens fill.

Where it deliberately differs:
- the [CLS] row and the keys come from hooks on that one layer's q/k projections (the tower keeps
  SDPA / FlashAttention; the official code runs all layers eager with ``output_attentions``);
- the [CLS] row is the head-mean, not the head-sum (the same order up to rounding), in fp32, and
  the key metric is fp32 (the official code uses the tower dtype: fp16 near-ties may flip);
- every image has its own selection (the official code is batched the same way, batch-vectorised).

LLaVA-NeXT (:meth:`VisionZip.merge_crops`): the official NeXT path, budgets per sub-image (the
paper's 160 / 320 / 640 are 32 / 64 / 128 per sub-image of five): the base image's tokens, the
crops' dominant patches in the stitched canvas order (no unpadding, no newlines), the crops' [CLS]
tokens, then their contextual tokens; they fill the first columns of the image's packed block.

Towers without [CLS] (``variant="qwen2_5_vl"``, opt-in): the official Qwen2.5-VL variant
(``Qwen2_5_VL/qwen2_5vl_visionzip.py`` @ 68993a3: ``Qwen2_5_VisionTransformerPretrainedModel.forward``
and ``Qwen2_5_VLForConditionalGeneration.forward``): the dominant score is the attention each merged
token receives at the last vision block (head-mean, over all queries, mean over its 2 x 2 patches,
in raster order), the metric the block's rotated keys (mean over heads and the 2 x 2 patches); the
dominant tokens are the top ``dominant`` of all merged tokens (no [CLS]); the same stride targets
and assignment run on the LLM input embeddings, and each contextual token is written at its target's
column (raster order, dominant and contextual interleaved). The official ``int(0.65 Nm)`` +
``max(int(0.05 Nm), 1)`` is ``keep_ratio=0.7``; it keeps the original M-RoPE positions:
``positions="original"``. Differences: budgets per image (the official counts pool every image of the
call and assume one contiguous image span, batch 1); the attention per temporal slice as the eager
block masks it (the official FlashAttention path ignores ``cu_seqlens``); images only (the official
video path does not run); supported on Qwen2-VL, Qwen2.5-VL and Qwen3-VL (the official code is for
Qwen2.5-VL; Qwen3-VL's DeepStack features are cut with the kept tokens, not merged).

Not supported (refused at patch time): the LLaVA variant on towers without [CLS], the Qwen variant
outside the Qwen-VL families, and AnyRes packing in the original LLaVA package (LLaVA-NeXT in
transformers is supported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtprune.methods.base import Method, MethodConfig
from vtprune.registry import register_method
from vtprune.types import MergedTokens, VisualLayout

VARIANTS = ("llava", "qwen2_5_vl")


@dataclass
class VisionZipConfig(MethodConfig):
    dominant: int | None = None
    contextual: int | None = None
    keep_tokens: int | None = None
    keep_ratio: float | None = None
    variant: str = "llava"  # "qwen2_5_vl": the official [CLS]-free variant (attention received, in place)

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"visionzip: variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant == "qwen2_5_vl" and self.keep_ratio is not None and self.keep_ratio <= 0.05:
            raise ValueError(
                f"visionzip: the qwen2_5_vl variant keeps 5% contextual tokens: keep_ratio > 0.05, got "
                f"{self.keep_ratio}"
            )
        given = (self.dominant is not None or self.contextual is not None) + (self.keep_tokens is not None)
        given += self.keep_ratio is not None
        if given != 1:
            raise ValueError(
                "visionzip: give one budget: dominant and contextual (e.g. 54 and 10), or keep_tokens (64 -> 54 + 10), "
                "or keep_ratio"
            )
        if (self.dominant is None) != (self.contextual is None):
            raise ValueError("visionzip: give dominant and contextual together (e.g. dominant=54, contextual=10)")
        if self.dominant is not None and (self.dominant < 1 or self.contextual < 1):
            raise ValueError(f"visionzip: dominant and contextual must be >= 1, got {self.dominant}, {self.contextual}")
        if self.keep_tokens is not None and self.keep_tokens < 2:
            raise ValueError(
                f"visionzip: keep_tokens must be >= 2 (a dominant and a contextual token), got {self.keep_tokens}"
            )
        if self.keep_ratio is not None and not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"visionzip: keep_ratio must be in (0, 1], got {self.keep_ratio}")

    def split(self, num_tokens: int) -> tuple[int, int]:
        """(dominant, contextual) for an image of ``num_tokens`` visual tokens."""
        if self.dominant is not None:
            return self.dominant, self.contextual
        k = self.keep_tokens if self.keep_tokens is not None else math.floor(self.keep_ratio * num_tokens + 0.5)
        k = max(2, k)
        contextual = max(1, math.floor(5 * k / 32 + 0.5))
        return k - contextual, contextual

    def qwen_split(self, num_tokens: int) -> tuple[int, int]:
        """(dominant, contextual) of the qwen2_5_vl variant for ``num_tokens`` merged tokens: the
        official ``int(0.65 Nm)`` + ``max(int(0.05 Nm), 1)`` is keep_ratio=0.7 (the README's "50%":
        0.5); keep_tokens=T: ``max(1, T // 14)`` contextual (the same 1 : 13 split)."""
        if self.dominant is not None:
            return self.dominant, self.contextual
        if self.keep_tokens is not None:
            contextual = max(1, self.keep_tokens // 14)
            return max(1, self.keep_tokens - contextual), contextual
        contextual = max(int(0.05 * num_tokens), 1)
        return max(1, int(round(self.keep_ratio - 0.05, 10) * num_tokens)), contextual


@register_method
class VisionZip(Method):
    name = "visionzip"
    config_class = VisionZipConfig
    score = "cls_attention"
    paper = "VisionZip: Longer is Better but Not Necessary in Vision Language Models (arXiv 2412.04467)"
    projector: torch.nn.Module | None = None

    @property
    def merges(self) -> bool:
        """The LLaVA variant answers with MergedTokens (the engine fills each image block's first columns)."""
        return self.config.variant == "llava"

    @property
    def needs_projector(self) -> bool:
        """The LLaVA variant merges vision features: the adapter sets ``projector``."""
        return self.config.variant == "llava"

    @property
    def merges_in_place(self) -> bool:
        """The qwen2_5_vl variant rewrites kept tokens where they are (:meth:`merge_in_place`)."""
        return self.config.variant == "qwen2_5_vl"

    def vision_probes(self):
        if self.config.variant == "qwen2_5_vl":  # the last block: attention received, keys (after RoPE)
            return {"received": ("received", -1), "keys": ("keys", -1)}
        return {"cls": ("cls", "feature"), "keys": ("keys", "feature"), "hidden": ("hidden", "feature")}

    def merge_in_place(self, scores: dict, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image of the qwen2_5_vl variant (``Qwen2_5_VL/qwen2_5vl_visionzip.py``): its (n, D) LLM
        input embeddings, the attention each merged token receives and its keys. Returns the kept
        columns (K,) ascending, their values (K, D) (a contextual token at its target's column) and the
        sources (n,): the position in the kept columns of the token carrying each input token."""
        count = embeds.shape[0]
        dominant, contextual = self.config.qwen_split(count)
        if dominant + contextual >= count:  # the whole image fits the budget: kept as it is
            kept = torch.arange(count, device=embeds.device)
            return kept, embeds, kept
        tokens, sources, anchors = visionzip_tokens(
            scores["received"][None], scores["keys"][None], embeds[None], dominant, contextual, prefix=0
        )
        kept, order = anchors[0].sort()
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return kept, tokens[0, order], rank[sources[0]]

    def keeps_everything(self, layout: VisualLayout) -> bool:
        return False  # [CLS] joins the tokens and the rest is merged: never the unpruned image

    def merge(self, scores: dict, embeds: torch.Tensor, layout: VisualLayout) -> MergedTokens:
        hidden = scores["hidden"]  # (n, 1 + P, D): [CLS] then the patches, before the projector
        num_patches = layout.grid[0] * layout.grid[1]
        tokens, sources, _ = visionzip_tokens(
            scores["cls"][:, -num_patches:], scores["keys"][:, -num_patches:], hidden, *self._split(layout)
        )
        projector = self.projector
        values = projector(tokens.to(next(projector.parameters()).dtype))
        return MergedTokens(values=values, sources=sources[:, 1 - layout.num_prefix :])

    def merge_crops(
        self, scores: dict, crop_grid: tuple[int, int], layout: VisualLayout, newline: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One AnyRes image (LLaVA-NeXT) as the official NeXT path lays it out
        (``llava_arch.py::prepare_inputs_labels_for_multimodal_visionzip`` and
        ``restore_image_features_sorted``): every sub-image merged with the same (dominant,
        contextual); the base image's tokens as they are; then the crops' dominant patches in the
        raster order of the stitched crop canvas (no unpadding), the crops' [CLS] tokens, and the
        crops' contextual tokens, crop by crop. A lone base image is followed by the newline.

        Returns the tokens (K, D) and the sources (S, N): the token row carrying each sub-image token.
        """
        dominant, contextual = self._split(layout)
        num_patches = layout.grid[0] * layout.grid[1]
        tokens, sources, _ = visionzip_tokens(
            scores["cls"][:, -num_patches:], scores["keys"][:, -num_patches:], scores["hidden"], dominant, contextual
        )
        values = self.projector(tokens.to(next(self.projector.parameters()).dtype))  # (S, K0, D)
        count, per_image, width = values.shape
        device = values.device
        if count == 1:
            return torch.cat([values[0], newline[None].to(values)]), sources[:, 1:]
        rows, cols = crop_grid
        if rows * cols != count - 1:
            raise ValueError(f"visionzip: {count - 1} crops do not fill the {rows} x {cols} crop grid")
        crops = values[1:]
        side_h, side_w = layout.grid
        # each crop's dominant patches (rows 1..dominant-1, raster within the crop) on the stitched canvas
        _, order = sources[1:, 1:].sort(dim=1)  # by output row: the patch each dominant row is
        patch = order[:, : dominant - 1]  # (crops, dominant - 1)
        crop = torch.arange(count - 1, device=device)[:, None]
        canvas_row = (crop // cols) * side_h + patch // side_w
        canvas_col = (crop % cols) * side_w + patch % side_w
        rank = (canvas_row * cols * side_w + canvas_col).flatten().argsort().argsort().view_as(patch)
        stitched = torch.empty(rank.numel(), width, dtype=values.dtype, device=device)
        stitched[rank.flatten()] = crops[:, 1:dominant].reshape(-1, width)
        out = torch.cat([values[0], stitched, crops[:, 0], crops[:, dominant:].reshape(-1, width)])
        # where each sub-image's token row went
        row_map = torch.empty(count, per_image, dtype=torch.long, device=device)
        row_map[0] = torch.arange(per_image, device=device)
        after_dominant = per_image + rank.numel()
        row_map[1:, 1:dominant] = per_image + rank
        row_map[1:, 0] = after_dominant + crop[:, 0]
        row_map[1:, dominant:] = (
            after_dominant + (count - 1) + crop * contextual + torch.arange(contextual, device=device)
        )
        return out, row_map.gather(1, sources)[:, 1:]

    def _split(self, layout: VisualLayout) -> tuple[int, int]:
        dominant, contextual = self.config.split(layout.num_tokens)
        num_patches = layout.grid[0] * layout.grid[1]
        if dominant - 1 + contextual >= num_patches or dominant + contextual > layout.num_tokens:
            raise ValueError(
                f"visionzip: dominant={dominant} + contextual={contextual} does not fit an image of {num_patches} "
                f"patches (at least one patch must be left to merge into the contextual tokens)"
            )
        return dominant, contextual


def visionzip_tokens(
    scores: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, dominant: int, contextual: int, prefix: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official dominant + contextual rule on a batch of images.

    hidden: (n, T, D) the tokens, the first ``prefix`` of them ([CLS]) always dominant; scores:
    (n, T - prefix) the dominant score of the others ([CLS] attention, or the attention received);
    keys: (n, T - prefix, d) their merge metric. Returns the tokens (n, dominant + contextual, D),
    the dominant ones (prefix included) in raster order then the contextual ones; the sources
    (n, T): the token row that carries each input token; and the anchors (n, dominant + contextual):
    the input token each row stands on (itself, or its contextual target).
    """
    n, length, width = hidden.shape
    device = hidden.device
    top = scores.topk(dominant - prefix, dim=1).indices + prefix
    chosen = torch.zeros(n, length, dtype=torch.bool, device=device).scatter_(1, top, True)
    chosen[:, :prefix] = True
    order = (~chosen).to(torch.uint8).argsort(dim=1, stable=True)  # chosen then the rest, each in raster order
    dominant_index, rest_index = order[:, :dominant], order[:, dominant:]
    rest = length - dominant
    metric = keys.float().gather(1, (rest_index - prefix)[..., None].expand(-1, -1, keys.shape[-1]))
    metric = metric / metric.norm(dim=-1, keepdim=True)
    # from shapes only, the same for every image: built on the host, no device read
    targets = torch.arange(0, rest, max(1, rest // contextual))[:contextual]
    is_target = torch.zeros(rest, dtype=torch.bool)
    is_target[targets] = True
    targets, members = targets.to(device), (~is_target).nonzero().flatten().to(device)
    assign = torch.bmm(metric[:, members], metric[:, targets].transpose(1, 2)).argmax(dim=2)  # (n, M)
    one_hot = torch.zeros(n, members.numel(), contextual, dtype=hidden.dtype, device=device)
    one_hot.scatter_(2, assign[..., None], 1)
    counts = one_hot.sum(dim=1).clamp(min=1)[..., None]
    rest_hidden = hidden.gather(1, rest_index[..., None].expand(-1, -1, width))
    context = rest_hidden[:, targets] + torch.bmm(one_hot.transpose(1, 2), rest_hidden[:, members]) / counts
    tokens = torch.cat([hidden.gather(1, dominant_index[..., None].expand(-1, -1, width)), context], dim=1)

    rest_row = torch.empty(n, rest, dtype=torch.long, device=device)
    rest_row[:, targets] = dominant + torch.arange(contextual, device=device)
    rest_row[:, members] = dominant + assign
    sources = torch.empty(n, length, dtype=torch.long, device=device)
    sources.scatter_(1, dominant_index, torch.arange(dominant, device=device).expand(n, -1))
    sources.scatter_(1, rest_index, rest_row)
    return tokens, sources, torch.cat([dominant_index, rest_index[:, targets]], dim=1)
