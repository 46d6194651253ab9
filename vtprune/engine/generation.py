"""Where ``generate`` itself must learn that a cache was pruned, and how expanded batches map back.

0. Chunked prefill (``prefill_chunk_size``) is refused before anything runs
   (:func:`refuse_chunked_prefill`): a prompt is pruned in one prefill.

1. A returned cache continued by a second ``generate``: ``generate`` slices the new input ids by
   ``cache.get_seq_length()``, which counts the *pruned* prompt, so it would feed already-cached
   tokens again. :func:`continue_pruned_cache` wraps the instance's
   ``prepare_inputs_for_generation`` and, on the first iteration over a cache vtprune pruned,
   moves the slice by the tokens the cut removed (the unpruned model's rule: every token the
   cache stands for is consumed once).
2. Expansion (beam search, ``num_return_sequences``): ``generate`` encodes the images once, then
   repeats every row ``E`` times (``repeat_interleave``) and each sample's group of encoded
   images with it ([A, B] -> [A, B, A, B], ``GenerationMixin._expand_multimodal_outputs``).
   What the vision side told the stack describes the unexpanded batch, so the selector runs on
   the rows ``::E`` (:func:`unexpanded`) and its answer is repeated for every expanded row
   (:func:`expand_selection`): each beam and return sequence keeps its sample's tokens. ``E`` is
   read off the shapes of the encoder outputs (:func:`placeholder_columns`), with no host sync.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from vtprune.types import PrefillInputs, TokenSelection


def continue_pruned_cache(removed_tokens: Callable[[object], int]):
    """A wrapper maker for ``prepare_inputs_for_generation`` (see the module docstring, 1).

    removed_tokens(cache) -> how many fewer entries ``cache`` holds than the unpruned prompt
    would (0 for a cache vtprune did not prune).
    """

    def make_wrapper(prepare):
        @functools.wraps(prepare)  # generate() reads its signature (inputs_embeds support)
        def prepare_inputs_for_generation(input_ids, *args, next_sequence_length=None, **kwargs):
            cache = kwargs.get("cache")
            if next_sequence_length is not None and kwargs.get("is_first_iteration") and cache is not None:
                removed = removed_tokens(cache)
                if removed:  # generate sliced by the pruned length: the cut tokens were consumed too
                    next_sequence_length -= removed
                    if next_sequence_length < 1:
                        raise ValueError(
                            "generate was given a cache vtprune pruned and no new tokens; pass the sequences the "
                            "first generate returned (prompt + generated tokens) as input_ids"
                        )
            return prepare(input_ids, *args, next_sequence_length=next_sequence_length, **kwargs)

        return prepare_inputs_for_generation

    return make_wrapper


def refuse_chunked_prefill(generate):
    """``generate`` wrapped: chunked prefill (``prefill_chunk_size``) is refused before anything runs."""

    @functools.wraps(generate)
    def wrapper(*args, **kwargs):
        config = kwargs.get("generation_config") or getattr(generate.__self__, "generation_config", None)
        chunk = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
        if chunk is not None:
            raise NotImplementedError(
                f"vtprune prunes a prompt in one prefill; generate(prefill_chunk_size={chunk}) splits it into chunks "
                "that reach the LLM one by one (an image's tokens across several, the images after text already "
                "cached). Leave prefill_chunk_size unset (None) while the model is patched"
            )
        return generate(*args, **kwargs)

    return wrapper


def placeholder_columns(encoder_output) -> int:
    """Prompt columns an encoder output fills: its ``pooler_output`` rows (a (n, T, D) or (T, D)
    tensor, or a list of (T_i, D) tensors), from shapes only."""
    features = encoder_output.pooler_output
    if isinstance(features, torch.Tensor):
        return features.shape[0] * features.shape[1] if features.dim() == 3 else features.shape[0]
    return sum(feature.shape[0] for feature in features)


def expansion(inputs: PrefillInputs, llm_rows: int) -> PrefillInputs:
    """``inputs`` with ``expand`` set: how many times ``generate`` repeated each row of this prefill.

    Two ways to get there: ``generate`` expanded the prompt after encoding the images (the
    pre-encoded features fill more columns than the encoding vtprune saw), or after the merge
    (the original LLaVA package merges images into ``inputs_embeds`` before calling
    ``generate``: the LLM gets more rows than the merged prompt had, so its masks are repeated).
    """
    merged_rows = inputs.visual_mask.shape[0]
    if llm_rows != merged_rows:
        if llm_rows % merged_rows:
            raise ValueError(f"the LLM gets {llm_rows} rows for a prompt of {merged_rows}")
        factor = llm_rows // merged_rows
        return dataclasses.replace(
            inputs,
            visual_mask=inputs.visual_mask.repeat_interleave(factor, dim=0),
            kinds={kind: mask.repeat_interleave(factor, dim=0) for kind, mask in inputs.kinds.items()},
            expand=factor,
        )
    inputs.expand = _encoded_expansion(inputs)
    return inputs


def _encoded_expansion(inputs: PrefillInputs) -> int:
    factors = set()
    for kind, columns in inputs.encoded_columns.items():
        visual = inputs.visual.get(kind)
        encoded = visual.columns if visual is not None else None
        if encoded is None:  # no pre-LLM stage asked for it: nothing to expand
            continue
        if encoded == 0 or columns % encoded:
            raise ValueError(
                f"this prefill splices {columns} {kind} feature columns, but the encoding vtprune saw filled "
                f"{encoded}; encode the {kind}s of this very batch"
            )
        factors.add(columns // encoded)
    if len(factors) > 1:
        raise ValueError(f"the visual inputs of this prefill were expanded by different factors {sorted(factors)}")
    return factors.pop() if factors else 1


def unexpanded(inputs: PrefillInputs, expand: int) -> PrefillInputs:
    """The prefill as it was before ``generate`` repeated each row ``expand`` times."""
    rows = slice(None, None, expand)
    positions = inputs.position_ids
    return dataclasses.replace(
        inputs,
        visual_mask=inputs.visual_mask[rows],
        kinds={kind: mask[rows] for kind, mask in inputs.kinds.items()},
        inputs_embeds=inputs.inputs_embeds[rows] if inputs.inputs_embeds is not None else None,
        position_ids=positions[..., rows, :] if positions is not None else None,
        encoded_columns={},
    )


def expand_selection(selection, source_mask: torch.Tensor, expand: int):
    """A selector's answer on the unexpanded rows -> the same answer on every expanded row.

    source_mask: (B, L) bool, the visual columns of the unexpanded rows; a keep (or replace)
    mask is flat over them in (row, column) order, and so is the answer returned.
    """
    if selection is None:
        return None
    if not isinstance(selection, TokenSelection):
        return _repeat_rows(selection, source_mask, expand)
    if selection.keep is None:
        return selection
    repeated = dataclasses.replace(selection, keep=_repeat_rows(selection.keep, source_mask, expand))
    if selection.replace is not None:
        rank = selection.replace.long().cumsum(dim=0) - 1  # each replaced column's row in values / positions
        repeated.replace = _repeat_rows(selection.replace, source_mask, expand)
        index = _repeat_rows(rank, source_mask, expand)[repeated.replace]
        repeated.values = selection.values[index] if selection.values is not None else None
        repeated.positions = selection.positions[:, index] if selection.positions is not None else None
    if selection.merged_into is not None:  # carried as an offset within the row, which every copy keeps
        count = selection.merged_into.numel()
        none = count + 1  # no offset reaches it
        into = selection.merged_into
        offset = torch.where(into >= 0, into - torch.arange(count, device=into.device), none)
        offset = _repeat_rows(offset, source_mask, expand)
        target = torch.arange(offset.numel(), device=offset.device) + offset
        repeated.merged_into = torch.where(offset != none, target, -1)
    return repeated


def _repeat_rows(flat: torch.Tensor, source_mask: torch.Tensor, expand: int) -> torch.Tensor:
    """(n,) values over the visual columns of ``source_mask`` -> the same over its rows repeated.

    Row r's n_r values land ``expand`` times in a row, where its copies sit in the expanded batch;
    sizes come from shapes, so nothing is read back to the host.
    """
    counts = source_mask.to(flat.device).sum(dim=1)  # (B,) visual columns per row
    count = flat.numel()
    row = torch.repeat_interleave(torch.arange(len(counts), device=flat.device), counts, output_size=count)
    starts = (counts.cumsum(dim=0) - counts)[row]  # (n,) where each value's row starts
    within = torch.arange(count, device=flat.device) - starts
    copies = torch.arange(expand, device=flat.device)[None, :] * counts[row][:, None]  # (n, E)
    destination = (starts * expand + within)[:, None] + copies
    out = flat.new_empty(count * expand)
    return out.scatter_(0, destination.flatten(), flat[:, None].expand(count, expand).flatten())
