"""The contract types where methods, the engine and the adapters meet.

- Layouts: what an image looks like as visual tokens (:class:`VisualLayout`), how a
  high-resolution image splits into a base image and crops (:class:`CropLayout`) and how the
  model packs them into columns (:class:`AnyResImage`).
- Prefill inputs: what an adapter found for one prefill (:class:`PrefillInputs`): where the
  visual columns are, and per kind of visual input (``"image"``, ``"video"``) what the vision
  side produced (:class:`VisualInputs`: probe scores, pixels, packing maps, grids).
- Selections: a selector's answer. A bool keep mask over the batch's visual columns (a *select*
  method), or a :class:`TokenSelection` that also rewrites the values of kept columns (a *merge*
  method: QuoTA's resized frames; VisionZip's dominant and contextual tokens, PruMerge+'s merged
  tokens, pooled grids), and may say which visual tokens each kept column carries (its merge map).

No transformers class appears here; see docs/architecture.md for the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class VisualLayout:
    """What one image looks like as visual tokens.

    ``num_tokens`` visual tokens per image, of which the last ``grid[0] * grid[1]`` are patches
    in raster order and the first ``num_prefix`` are extra tokens (the [CLS] token when the
    model feeds it to the LLM with ``vision_feature_select_strategy="full"``).
    """

    num_tokens: int
    grid: tuple[int, int]
    num_prefix: int = 0


@dataclass(frozen=True)
class CropLayout:
    """How one high-resolution image is split: ``grid`` patches per sub-image, ``crop_grid`` crops.

    ``valid`` lives on the model's device; ``valid_host`` is the same mask on the CPU, which the
    adapter builds from the image sizes anyway, for the few decisions that need Python ints.
    """

    grid: tuple[int, int]
    crop_grid: tuple[int, int]
    valid: torch.Tensor  # (S, N) bool
    valid_host: torch.Tensor | None = None

    @property
    def num_subimages(self) -> int:
        return self.valid.shape[0]

    @property
    def host_valid(self) -> torch.Tensor:
        return self.valid_host if self.valid_host is not None else self.valid.cpu()


@dataclass(frozen=True)
class AnyResImage:
    """One high-resolution image as the model packs it (CPU tensors)."""

    token_map: torch.Tensor  # (n,) s * N + p for patch p of sub-image s (0 = base), -1 for a newline
    valid: torch.Tensor  # (S, N) bool: the sub-image tokens that exist after unpadding
    crop_grid: tuple[int, int]


@dataclass
class VisualInputs:
    """What the vision side produced for one kind of visual input in one forward.

    Filled by the adapter when the model encodes its images (or videos), before the prefill
    reaches the LLM. count: images encoded (fixed-layout families). scores: probe name -> the
    probe's scores, one row per encoded image / frame (or one flat row per merged token).
    pixels: what the tower saw, for methods that look at the pictures (QuoTA's frames).
    packing: AnyRes packing of each image. grids: (t, h, w) patch grids of native-resolution
    items (Qwen2-VL). frames: (videos, frames per video). spliced: which encoded images the
    prompt splices in (the original LLaVA package consumes one for every text-only sample).
    """

    count: int | None = None
    scores: dict = field(default_factory=dict)
    pixels: torch.Tensor | None = None
    packing: list[AnyResImage] | None = None
    grids: list | None = None
    frames: tuple[int, int] | None = None
    spliced: torch.Tensor | None = None
    columns: int | None = None  # prompt columns the encoder output fills (what generate's expansion repeats)


@dataclass
class PrefillInputs:
    """One prefill as its selector sees it.

    visual_mask: (B, L) bool, the visual columns of the merged prompt (all kinds); kinds: kind ->
    (B, L) bool, the columns of that kind; visual: kind -> :class:`VisualInputs`; encoded: the
    kinds that arrived already encoded (``generate`` encodes ahead of the prefill).
    inputs_embeds (B, L, D) and position_ids ((B, L) or (R, B, L)) are the LLM's inputs, set by
    the engine just before selection.
    """

    visual_mask: torch.Tensor
    kinds: dict
    visual: dict = field(default_factory=dict)
    encoded: tuple = ()
    encoded_columns: dict = field(default_factory=dict)  # kind -> prompt columns its pre-encoded features fill
    expand: int = 1  # generate repeated every row this many times (beams, num_return_sequences)
    inputs_embeds: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None


@dataclass
class TokenSelection:
    """A selector's answer when it also rewrites token values (the *merge* form).

    keep: flat bool over the batch's visual columns (as a plain selector returns), or None to
    keep every column. replace: flat bool over the visual columns whose embedding is overwritten
    (a subset of keep); values: (replace.sum(), D) the new embeddings, in column order.
    stats: method figures for ``handle.last.extra`` (e.g. ``scoring_seconds``).
    merged_into: None, or a flat long over the visual columns: for each visual token, the flat index
    (among the batch's visual columns) of the kept column whose value carries it, -1 where none does
    (published per sample as ``handle.last.stages[0].merged``). A merge method that emits a different
    number of tokens than it keeps slots for writes its tokens into the kept slots in the order its
    official code lays them out: under ``positions="compact"`` only the number of kept columns of an
    image block sets the positions, so the sequence is the official one (VisionZip's
    [dominant; contextual] block takes the first columns of the image block).
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
    merged_into: torch.Tensor | None = None


@dataclass
class MergedTokens:
    """A merge method's answer for ``n`` images of one fixed layout of N tokens.

    values: (n, K, D) the tokens each image sends to the LLM, in LLM space and in the order its
    official code lays them out; counts: None (every image sends K), or (n,) long, how many of its
    K rows each image sends; sources: (n, N) long, for each of the image's N visual tokens the row
    of ``values`` that carries it, -1 where none does. The engine writes an image's tokens into the
    first of its columns and drops the rest (:func:`vtprune.engine.pre_llm.merged_selection`).
    """

    values: torch.Tensor
    sources: torch.Tensor
    counts: torch.Tensor | None = None
