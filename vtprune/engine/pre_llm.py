"""The before-the-LLM cut, model-agnostic.

An adapter wires these callbacks to hooks on a loaded model:

1. ``begin_prefill(image_token_mask, num_images)`` when a forward carries images;
2. the adapter fills ``pending.scores`` from its probe in the vision tower (scored methods),
   and its ``select_tokens`` callable turns them into the image tokens to keep;
3. ``language_model_pre_hook`` on the LLM module: at prefill it removes the pruned image
   tokens from ``inputs_embeds``, ``attention_mask`` and ``position_ids``; at later decode
   steps on the same cache it maps the mask and positions into the pruned coordinates;
4. ``language_model_hook`` (forward hook) remembers which cache holds the pruned prompt.

Positions: "compact" renumbers (each kept token moves down by the number of tokens removed
before it; decode steps move down by the total removed), "original" keeps position ids; M-RoPE
rows follow :mod:`vtprune.engine.positions`. A selector that rewrites tokens
(:class:`TokenSelection`) may give the rewritten columns their own M-RoPE positions.
Decode steps read nothing back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vtprune.engine.positions import check_positions, cut_positions, expand_positions
from vtprune.engine.sequence import SequenceCut, plan_cut
from vtprune.methods.base import Method, VisualLayout


@dataclass
class PendingPrefill:
    image_token_mask: torch.Tensor  # (B, L) bool
    num_images: int
    scores: torch.Tensor | dict | None = None  # from the adapter's probes, e.g. (num_images, N) fp32
    context: dict = field(default_factory=dict)  # what else the adapter's selector needs (image sizes, ...)
    inputs_embeds: torch.Tensor | None = None  # (B, L, D) the merged prompt, set just before selection
    position_ids: torch.Tensor | None = None  # (B, L) or (R, B, L) its position ids, set with inputs_embeds


@dataclass
class TokenSelection:
    """A selector's answer when it also rewrites token values (QuoTA's resized frames).

    keep: flat bool over the batch's image columns (as a plain selector returns), or None to
    keep every column. replace: flat bool over the image columns whose embedding is overwritten
    (a subset of keep); values: (replace.sum(), D) the new embeddings, in column order.
    stats: method figures for ``handle.last.extra`` (e.g. ``scoring_seconds``).
    positions: None, or (3, replace.sum()) long M-RoPE rows (temporal, height, width) of the
    replaced columns, in column order, in the unpruned prompt's numbering; the cut writes them
    into the last three rows of the position ids (a 4-row input's 1-D text row is untouched) and
    moves the columns after each rewritten block to follow its new extent
    (:func:`vtprune.engine.positions.write_replaced`).
    """

    keep: torch.Tensor | None
    replace: torch.Tensor | None = None
    values: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    positions: torch.Tensor | None = None


@dataclass
class PrunedPrompt:
    """What decode steps on the same cache need to stay consistent with the pruned prefill."""

    cut: SequenceCut
    original_length: int  # L
    pruned_mask: torch.Tensor  # (B, L')
    cache: object = None
    shift: torch.Tensor | None = None  # (B, 1) or (R, B, 1): what decode positions move down by


@dataclass
class PrefillResult:
    """Raw tensors of one prefill; :class:`vtprune.handle.PruneRecord` turns them into stats."""

    kept_index: torch.Tensor  # (B, L) visual-token index of each kept image column, -1 elsewhere
    visual_in: torch.Tensor  # (B,) visual tokens per sample before the cut
    real_tokens_before: torch.Tensor  # (B,)
    real_tokens_after: torch.Tensor  # (B,)
    extra: dict = field(default_factory=dict)  # method figures (TokenSelection.stats)


def visual_index(image_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B, L): each image column's index among its sample's visual tokens, else -1."""
    return torch.where(image_mask, image_mask.long().cumsum(dim=1) - 1, -1)


def fixed_layout_selector(method: Method, layout: VisualLayout):
    """Token selection for models whose images all have the same layout (LLaVA-1.5).

    Returns ``select(pending, device)``: a flat bool over all image tokens of the batch (images
    in order), or None when the method keeps everything.
    """

    def select(pending: PendingPrefill, device) -> torch.Tensor | None:
        if method.keeps_everything(layout):
            return None
        scores = pending.scores
        if isinstance(scores, dict):  # one probe per single-resolution method
            scores = next(iter(scores.values()), None)
        kept = method.select(scores, pending.num_images, layout, device)  # (num_images, k)
        keep = torch.zeros(pending.num_images, layout.num_tokens, dtype=torch.bool, device=device)
        return keep.scatter_(1, kept, True).flatten()

    return select


class PreLLMPruner:
    """``select_tokens(pending, device)`` decides (see :func:`fixed_layout_selector`); this cuts."""

    def __init__(self, method: Method, select_tokens, on_prefill):
        self.method = method
        self.select_tokens = select_tokens
        self.positions = method.config.positions
        self.on_prefill = on_prefill  # callback(PrefillResult)
        self.pending: PendingPrefill | None = None
        self.prompt: PrunedPrompt | None = None

    # -- called by the adapter --------------------------------------------------------------
    def begin_prefill(self, image_token_mask: torch.Tensor, num_images: int, **context) -> None:
        self.pending = PendingPrefill(image_token_mask, num_images, context=context)
        self.prompt = None

    def reset(self) -> None:
        self.pending = None
        self.prompt = None

    # -- hooks on the language model ----------------------------------------------------------
    def language_model_pre_hook(self, module, args, kwargs):
        if args:
            raise TypeError("vtprune expects the language model to be called with keyword arguments")
        if self.pending is not None:
            pending, self.pending = self.pending, None
            return args, self._prune_prefill(pending, kwargs)
        if self.prompt is not None and kwargs.get("cache") is not None and kwargs["cache"] is self.prompt.cache:
            return args, self._continue_decode(self.prompt, kwargs)
        return None

    def language_model_hook(self, module, args, kwargs, output):
        if self.prompt is not None and self.prompt.cache is None:
            self.prompt.cache = getattr(output, "cache", None)

    def prune_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Cut (B, L) labels like the prompt the last prefill pruned; -100 on added padding."""
        prompt = self.prompt
        if prompt is None or labels.shape[1] != prompt.original_length:
            return labels
        return prompt.cut.gather(labels, fill=-100)

    def map_prefill_columns(self, values: torch.Tensor, fill: int = -1) -> torch.Tensor:
        """Carry (B, L) per-column values of this forward's prompt through its cut (identity if
        nothing was cut); for the stages that run after this one."""
        prompt = self.prompt
        if prompt is None or values.shape[1] != prompt.original_length:
            return values
        return prompt.cut.gather(values, fill=fill)

    # -- internals ------------------------------------------------------------------------
    def _prune_prefill(self, pending: PendingPrefill, kwargs: dict) -> dict:
        cache = kwargs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError(
                "vtprune prunes a prompt at prefill; continuing an existing cache with new images is not "
                "supported. Start from an empty cache."
            )
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        image_mask = pending.image_token_mask.to(embeds.device)
        visual = visual_index(image_mask)
        visual_in = image_mask.sum(dim=1)
        mask = kwargs.get("attention_mask")
        positions = kwargs.get("position_ids")
        pending.inputs_embeds, pending.position_ids = embeds, positions
        image_keep = self.select_tokens(pending, embeds.device)
        pending.inputs_embeds = pending.position_ids = None
        extra, replace, replaced_positions = {}, None, None
        if isinstance(image_keep, TokenSelection):
            selection, image_keep, extra = image_keep, image_keep.keep, image_keep.stats
            if image_keep is not None and selection.values is not None:
                replace = torch.zeros_like(image_mask).masked_scatter(image_mask, selection.replace.to(embeds.device))
                embeds = embeds.masked_scatter(
                    replace[..., None].expand_as(embeds), selection.values.to(embeds.device, embeds.dtype)
                )
                replaced_positions = selection.positions
        if image_keep is None:  # nothing dropped: leave the inputs untouched, bit-identical
            real = mask.sum(dim=1) if mask is not None else torch.full((batch,), length, device=embeds.device)
            self.on_prefill(PrefillResult(visual, visual_in, real, real, extra))
            return kwargs
        if mask is not None and mask.dim() != 2:
            raise NotImplementedError("vtprune needs a 2-D attention mask (padding mask); got a 4-D mask")
        mask2d = mask if mask is not None else torch.ones(batch, length, dtype=torch.long, device=embeds.device)

        keep = (~image_mask).masked_scatter(image_mask, image_keep)
        cut = plan_cut(keep)

        if positions is None:
            positions = torch.arange(length, device=embeds.device).expand(batch, length)
        check_positions(positions)
        positions = expand_positions(positions, batch, length)
        pruned_mask = cut.gather(mask2d)
        if replaced_positions is not None:
            replaced_positions = (cut.gather(replace, fill=False), replaced_positions.to(embeds.device))
        new_positions, shift = cut_positions(cut, positions, self.positions, pruned_mask.bool(), replaced_positions)

        kwargs = dict(kwargs, inputs_embeds=cut.gather(embeds), attention_mask=pruned_mask, position_ids=new_positions)
        self.prompt = PrunedPrompt(cut=cut, original_length=length, pruned_mask=pruned_mask, cache=cache, shift=shift)
        real_before = mask2d.sum(dim=1)
        kept_index = torch.where(keep & image_mask, visual, -1)
        self.on_prefill(PrefillResult(kept_index, visual_in, real_before, real_before - cut.removed, extra))
        return kwargs

    def _continue_decode(self, prompt: PrunedPrompt, kwargs: dict) -> dict:
        embeds = kwargs["inputs_embeds"]
        batch, query_length = embeds.shape[:2]
        pruned_length = prompt.pruned_mask.shape[1]
        cached_after_prompt = kwargs["cache"].get_seq_length() - pruned_length  # decode tokens already cached
        mask = kwargs.get("attention_mask")
        if mask is None:
            extra = torch.ones(
                batch, cached_after_prompt + query_length, dtype=prompt.pruned_mask.dtype, device=embeds.device
            )
        else:
            if mask.dim() != 2:
                raise NotImplementedError("vtprune needs a 2-D attention mask (padding mask); got a 4-D mask")
            extra = mask[:, prompt.original_length :]
            if extra.shape[1] != cached_after_prompt + query_length:
                raise ValueError(
                    f"attention_mask has {mask.shape[1]} columns but the pruned prompt continues with "
                    f"{prompt.original_length} + {cached_after_prompt + query_length}; pass the mask of the full "
                    "(unpruned) prompt plus the generated tokens"
                )
        positions = kwargs.get("position_ids")
        if positions is None:
            # what the unpruned model would use: one column per unpruned cache entry
            offset = prompt.original_length + cached_after_prompt
            positions = (torch.arange(query_length, device=embeds.device) + offset).expand(batch, query_length)
        if self.positions == "compact":
            positions = positions - prompt.shift
        new_mask = torch.cat([prompt.pruned_mask, extra.to(prompt.pruned_mask.dtype)], dim=1)
        return dict(kwargs, attention_mask=new_mask, position_ids=positions)
