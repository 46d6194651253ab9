"""The before-the-LLM cut, model-agnostic.

:class:`PreLLMStage` is one stage of the stack (:mod:`vtprune.engine.stages`), which calls it:

1. :meth:`PreLLMStage.prefill` when a prefill reaches the LLM: the adapter's selector turns the
   :class:`~vtprune.types.PrefillInputs` (probe scores, layouts) into the visual columns to keep
   (a bool mask, or a :class:`~vtprune.types.TokenSelection` that also rewrites some), and the
   stage removes the dropped columns from ``inputs_embeds``, ``attention_mask`` and
   ``position_ids``;
2. :meth:`PreLLMStage.decode` at later forwards on the same cache: the mask and positions
   mapped into the pruned coordinates (:func:`vtprune.engine.prompt.decode_step`).

The stage keeps no state: what a decode step needs is the :class:`PrunedPrompt` that the
prefill returned, which the stack keeps per thread with its cache.

Positions: "compact" renumbers (each kept token moves down by the number of tokens removed
before it; decode steps move down by the total removed), "original" keeps position ids; M-RoPE
rows follow :mod:`vtprune.engine.positions`. A selection that rewrites tokens may give the
rewritten columns their own M-RoPE positions. Decode steps read nothing back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vtprune.engine.generation import expand_selection, unexpanded
from vtprune.engine.positions import check_positions, cut_positions, expand_positions
from vtprune.engine.prompt import decode_step, padding_mask
from vtprune.engine.sequence import SequenceCut, plan_cut
from vtprune.methods.base import Method
from vtprune.types import MergedTokens, PrefillInputs, TokenSelection, VisualLayout


@dataclass
class PrunedPrompt:
    """What decode steps on the same cache need to stay consistent with the pruned prefill."""

    cut: SequenceCut
    original_length: int  # L
    pruned_mask: torch.Tensor  # (B, L')
    shift: torch.Tensor | None = None  # (B, 1) or (R, B, 1): what decode positions move down by


@dataclass
class PrefillResult:
    """Raw tensors of one prefill; :class:`vtprune.handle.PruneRecord` turns them into stats."""

    kept_index: torch.Tensor  # (B, L) visual-token index of each kept image column, -1 elsewhere
    visual_in: torch.Tensor  # (B,) visual tokens per sample before the cut
    real_tokens_before: torch.Tensor  # (B,)
    real_tokens_after: torch.Tensor  # (B,)
    extra: dict = field(default_factory=dict)  # method figures (TokenSelection.stats)
    prompt: PrunedPrompt | None = None  # None when nothing was cut
    # (B, L) merge map: at a visual column, the index among its sample's kept visual tokens of the one that
    # carries it (-1: none); -2 at the other columns. None: a plain selection (a kept token carries itself)
    merged: torch.Tensor | None = None


def visual_index(image_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B, L): each image column's index among its sample's visual tokens, else -1."""
    return torch.where(image_mask, image_mask.long().cumsum(dim=1) - 1, -1)


def visual_rows(values: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """(B, L, ...) values and a (B, L) mask with ``count`` True columns -> (count, ...) the values of
    those columns in (row, column) order, without reading the mask back to the host."""
    order = (~mask.flatten()).to(torch.uint8).argsort(stable=True)[:count]
    return values.flatten(0, 1)[order]


def merged_selection(merged: MergedTokens, num_columns: int) -> TokenSelection:
    """Images of ``num_columns`` columns each and their merged tokens -> the flat merge-form answer:
    each image's tokens written into its first columns, its other columns dropped."""
    num_images, rows, width = merged.values.shape
    if rows > num_columns:
        raise ValueError(f"a merge sends {rows} tokens per image, more than its {num_columns} columns")
    device = merged.values.device
    counts = merged.counts if merged.counts is not None else torch.full((num_images,), rows, device=device)
    keep = torch.arange(num_columns, device=device) < counts.to(device)[:, None]
    values = merged.values.new_zeros(num_images, num_columns, width)
    values[:, :rows] = merged.values
    first = torch.arange(num_images, device=device)[:, None] * num_columns
    sources = merged.sources.to(device)
    into = torch.where(sources >= 0, sources + first, -1)
    return TokenSelection(
        keep.flatten(), replace=torch.ones_like(keep).flatten(), values=values.flatten(0, 1), merged_into=into.flatten()
    )


def packed_merge_selector(method: Method, layout: VisualLayout, newline: torch.Tensor):
    """A merge method on AnyRes images (a base image plus crops, packed into columns with newlines).

    Per image, ``method.merge_crops(scores, crop_grid, layout, newline)`` returns its tokens in the
    official order, (K, D), and the sources (S, N) of its sub-images' tokens; the tokens fill the
    first K of the image's packed columns and the rest are dropped (as :func:`merged_selection`).
    """

    def select(inputs: PrefillInputs, device) -> TokenSelection:
        images = inputs.visual["image"]
        keeps, values, into, first, offset = [], [], [], 0, 0
        for image in images.packing:  # a few images per batch, not a loop over tokens
            count = image.valid.shape[0]
            scores = {name: value[first : first + count] for name, value in images.scores.items()}
            rows, sources = method.merge_crops(scores, image.crop_grid, layout, newline)
            columns = image.token_map.numel()
            if rows.shape[0] > columns:
                raise ValueError(f"a merge sends {rows.shape[0]} tokens for an image of {columns} packed columns")
            keeps.append(torch.arange(columns, device=device) < rows.shape[0])
            values.append(torch.cat([rows, rows.new_zeros(columns - rows.shape[0], rows.shape[1])]))
            token_map = image.token_map.to(device)
            target = sources.to(device).flatten()[token_map.clamp(min=0)]
            into.append(torch.where((token_map >= 0) & (target >= 0), target + offset, -1))
            first, offset = first + count, offset + columns
        keep = torch.cat(keeps)
        return TokenSelection(
            keep, replace=torch.ones_like(keep), values=torch.cat(values), merged_into=torch.cat(into)
        )

    return select


def fixed_layout_selector(method: Method, layout: VisualLayout):
    """Token selection for models whose images all have the same layout (LLaVA-1.5).

    Returns ``select(inputs, device)``: a flat bool over all image tokens of the batch (images
    in order), or None when the method keeps everything; for a merge method (``merges = True``)
    the :class:`~vtprune.types.TokenSelection` of its :class:`~vtprune.types.MergedTokens`, over
    the images the prompt splices in.
    """
    if method.merges:

        def merge(inputs: PrefillInputs, device) -> TokenSelection | None:
            if method.keeps_everything(layout):
                return None
            images = inputs.visual["image"]
            scores, count = images.scores, images.count
            if images.spliced is not None:  # encoded but not in the prompt (the original LLaVA package)
                scores = {name: value[images.spliced.to(value.device)] for name, value in scores.items()}
                count = int(images.spliced.sum())
            columns = count * layout.num_tokens
            embeds = visual_rows(inputs.inputs_embeds, inputs.kinds["image"].to(device), columns)
            merged = method.merge(scores, embeds.view(count, layout.num_tokens, -1), layout)
            return merged_selection(merged, layout.num_tokens)

        return merge

    def select(inputs: PrefillInputs, device) -> torch.Tensor | None:
        if method.keeps_everything(layout):
            return None
        images = inputs.visual["image"]
        score = next(iter(images.scores.values()), None)  # one probe per single-resolution method
        kept = method.select(score, images.count, layout, device)  # (num_images, k)
        keep = torch.zeros(images.count, layout.num_tokens, dtype=torch.bool, device=device)
        return keep.scatter_(1, kept, True).flatten()

    return select


def merge_map(merged_into: torch.Tensor, kept: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """A flat merge map over the visual columns (:class:`~vtprune.types.TokenSelection`) -> (B, L):
    at each visual column the index among its sample's kept visual tokens of the one that carries
    it (-1: none), -2 at the other columns."""
    kept_rank = visual_rows(visual_index(kept), image_mask, merged_into.numel())  # flat visual column -> rank
    carried = torch.where(merged_into >= 0, kept_rank[merged_into.clamp(min=0)], -1)
    return torch.full_like(kept_rank.new_empty(image_mask.shape), -2).masked_scatter(image_mask, carried)


class PreLLMStage:
    """``select(inputs, device)`` decides (see :func:`fixed_layout_selector`); this cuts."""

    def __init__(self, method: Method, select):
        self.method = method
        self.select = select
        self.positions = method.config.positions

    def prefill(self, inputs: PrefillInputs, kwargs: dict) -> tuple[dict, PrefillResult]:
        """The LLM's keyword arguments with the dropped visual columns removed, and the result."""
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        image_mask = inputs.visual_mask.to(embeds.device)
        visual = visual_index(image_mask)
        visual_in = image_mask.sum(dim=1)
        mask = kwargs.get("attention_mask")
        positions = kwargs.get("position_ids")
        inputs.inputs_embeds, inputs.position_ids = embeds, positions
        if inputs.expand > 1:  # beams / return sequences: select on the rows as encoded, repeat per row
            source = unexpanded(inputs, inputs.expand)
            selection = expand_selection(self.select(source, embeds.device), source.visual_mask, inputs.expand)
        else:
            selection = self.select(inputs, embeds.device)
        inputs.inputs_embeds = inputs.position_ids = None
        if not isinstance(selection, TokenSelection):
            selection = TokenSelection(selection)
        image_keep, replace, replaced_positions = selection.keep, None, None
        if image_keep is not None and selection.values is not None:
            replace = torch.zeros_like(image_mask).masked_scatter(image_mask, selection.replace.to(embeds.device))
            embeds = embeds.masked_scatter(
                replace[..., None].expand_as(embeds), selection.values.to(embeds.device, embeds.dtype)
            )
            replaced_positions = selection.positions
        if image_keep is None:  # nothing dropped: leave the inputs untouched, bit-identical
            real = mask.sum(dim=1) if mask is not None else torch.full((batch,), length, device=embeds.device)
            return kwargs, PrefillResult(visual, visual_in, real, real, selection.stats)
        mask2d = padding_mask(mask, batch, length, embeds.device)

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
        prompt = PrunedPrompt(cut=cut, original_length=length, pruned_mask=pruned_mask, shift=shift)
        real_before = mask2d.sum(dim=1)
        kept_index = torch.where(keep & image_mask, visual, -1)
        result = PrefillResult(kept_index, visual_in, real_before, real_before - cut.removed, selection.stats, prompt)
        if selection.merged_into is not None:
            result.merged = merge_map(selection.merged_into.to(embeds.device), keep & image_mask, image_mask)
        return kwargs, result

    def decode(self, prompt: PrunedPrompt, kwargs: dict) -> dict:
        """A later forward on the pruned cache: the mask and positions in the pruned coordinates."""
        step = decode_step(kwargs, prompt.original_length, prompt.pruned_mask.shape[1], prompt.pruned_mask.dtype)
        positions = step.positions - prompt.shift if self.positions == "compact" else step.positions
        new_mask = torch.cat([prompt.pruned_mask, step.extra_mask], dim=1)
        return dict(kwargs, attention_mask=new_mask, position_ids=positions)

    @staticmethod
    def cut_labels(prompt: PrunedPrompt, labels: torch.Tensor) -> torch.Tensor:
        """Cut (B, L) labels like the prompt (:meth:`SequenceCut.gather_labels`)."""
        if labels.shape[1] != prompt.original_length:
            return labels
        return prompt.cut.gather_labels(labels)

    @staticmethod
    def map_columns(prompt: PrunedPrompt, values: torch.Tensor, fill: int = -1) -> torch.Tensor:
        """Carry (B, L) per-column values of the prompt through its cut, for the stages after this one."""
        return prompt.cut.gather(values, fill=fill)
