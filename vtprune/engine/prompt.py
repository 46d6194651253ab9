"""The prefill / decode protocol every stage follows.

A stage prunes a prompt once, at its prefill, and later forwards on the same cache continue
that pruned prompt. What every stage needs for that lives here, once:

- :func:`check_prefill_cache`: a pruned prefill starts from an empty, dynamic cache (a static
  cache has one length for every layer and a fixed number of slots, which a shorter prompt does
  not fit; continuing a filled cache with new images is not supported);
- :func:`padding_mask`: the 2-D padding mask of a prefill (ones when the caller gives none);
- :func:`decode_step`: at a later forward on the pruned cache, the caller's mask of the tokens
  after the prompt and its positions in the unpruned numbering (what the stage then maps into
  its own pruned coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def check_prefill_cache(cache) -> None:
    """Refuse the caches a pruned prefill cannot start from."""
    if cache is None:
        return
    if getattr(cache, "is_compileable", False):  # a static cache: fixed slots, one length for all layers
        raise NotImplementedError(
            f"vtprune does not support static caches (got {type(cache).__name__}, e.g. from "
            "cache_implementation='static'): a pruned prompt is shorter than its placeholders and in-LLM cuts give "
            "layers caches of different lengths. Use the default dynamic cache (leave cache_implementation unset)."
        )
    if cache.get_seq_length() > 0:
        raise NotImplementedError(
            "vtprune prunes a prompt at prefill; continuing an existing cache with new images is not "
            "supported. Start from an empty cache."
        )


def padding_mask(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """The (B, L) padding mask of a prefill: ``mask`` itself, or ones when the caller gave none."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.long, device=device)
    _require_2d(mask)
    return mask


def _require_2d(mask: torch.Tensor) -> None:
    if mask.dim() != 2:
        raise NotImplementedError(
            f"vtprune needs a 2-D attention mask (padding mask); got a {mask.dim()}-D mask. Pass the (batch, "
            "length) padding mask and let the model build its attention mask"
        )


@dataclass
class DecodeStep:
    """A forward that continues a pruned prompt, in the caller's (unpruned) coordinates."""

    extra_mask: torch.Tensor  # (B, n): mask of the tokens after the prompt, this forward's included
    positions: torch.Tensor  # (B, q) or (R, B, q): the caller's positions, or the unpruned model's
    query_length: int


def decode_step(kwargs: dict, prompt_length: int, cached_prompt: int, mask_dtype) -> DecodeStep:
    """What the caller passes at a forward on the pruned cache.

    prompt_length: columns of the prompt in the caller's coordinates (its attention mask
    carries them); cached_prompt: cache entries the first layer holds for the pruned prompt.
    """
    embeds = kwargs["inputs_embeds"]
    batch, query_length = embeds.shape[:2]
    cached_after_prompt = kwargs["cache"].get_seq_length() - cached_prompt  # decode tokens already cached
    mask = kwargs.get("attention_mask")
    if mask is None:
        extra = torch.ones(batch, cached_after_prompt + query_length, dtype=mask_dtype, device=embeds.device)
    else:
        _require_2d(mask)
        extra = mask[:, prompt_length:]
        if extra.shape[1] != cached_after_prompt + query_length:
            raise ValueError(
                f"attention_mask has {mask.shape[1]} columns but the pruned prompt continues with "
                f"{prompt_length} + {cached_after_prompt + query_length}; pass the mask of the full "
                "(unpruned) prompt plus the generated tokens"
            )
    positions = kwargs.get("position_ids")
    if positions is None:  # what the unpruned model would use: one column per unpruned cache entry
        offset = prompt_length + cached_after_prompt
        positions = (torch.arange(query_length, device=embeds.device) + offset).expand(batch, query_length)
    return DecodeStep(extra.to(mask_dtype), positions, query_length)
