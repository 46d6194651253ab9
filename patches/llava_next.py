"""Adapter for transformers ``LlavaNextForConditionalGeneration`` / ``LlavaNextModel`` (AnyRes).

An image is a base image (the whole picture at the tower's resolution) plus a grid of crops of
the high-resolution canvas. The model packs them as: the base image's N tokens, then the crop
canvas row by row with the crops' padding removed ("spatial_unpad") and an ``image_newline``
token closing every row (a lone image without crops gets one newline after the base).

What this adapter adds to :class:`~vtprune.patches.llava.LlavaAdapter` (same hooks otherwise):
- the packing map: which sub-image token (or newline) each packed image column is. It comes
  from the model's own ``pack_image_features`` run on index tensors on the CPU (no copied
  packing code), computed from ``image_sizes`` when ``get_image_features`` runs: that method is
  wrapped on this instance only (``generate`` calls it directly, so no module hook sees
  ``image_sizes``), and ``remove()`` restores it;
- selection per image over its sub-images: ``method.select_crops`` gets the sub-images'
  scores and a :class:`~vtprune.methods.highres.CropLayout` (which tokens exist after
  unpadding) and returns an (S, N) keep mask: a per-sub-image or global budget for
  fastervlm / fopru / random / uniform, HiRED's and GlobalCom²'s allocations for theirs;
- the newline rule: a row's ``image_newline`` stays iff the row keeps at least one token (the
  base image counts as one row when it carries the newline), so no row with no kept token
  leaves a stray newline, and every kept row stays closed by its newline.

Visual tokens in ``handle.last`` are the image placeholder columns, newlines included.
Reading ``image_sizes`` to the host happens once per prefill, as the model's own unpadding does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vtprune.methods.base import BudgetConfig
from vtprune.methods.highres import CropLayout
from vtprune.patches import InstanceMethodPatch, register_adapter
from vtprune.patches.llava import LlavaAdapter

ANYRES_ATTRIBUTE = "_vtprune_anyres"  # set on get_image_features' output while patched


@dataclass(frozen=True)
class AnyResImage:
    """One image as packed by the model (CPU tensors)."""

    token_map: torch.Tensor  # (n,) s * N + p for patch p of sub-image s (0 = base), -1 for a newline
    valid: torch.Tensor  # (S, N) bool: the sub-image tokens that exist after unpadding
    crop_grid: tuple[int, int]


def keep_packed(token_map: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(n,) packing map and (S, N) keep mask -> (n,) keep over the packed columns, newline rule applied."""
    num_tokens = keep.shape[1]
    visual = token_map >= 0
    kept = keep.flatten()[token_map.clamp(min=0)] & visual
    newline = ~visual
    base = visual & (token_map < num_tokens)
    # a row starts after a newline, and where the crop canvas starts after the base image
    previous_newline = torch.cat([newline.new_zeros(1), newline[:-1]])
    previous_base = torch.cat([base.new_zeros(1), base[:-1]])
    starts = previous_newline | (previous_base & visual & ~base)
    row = starts.long().cumsum(dim=0)
    row_keeps = torch.zeros(token_map.numel() + 1, dtype=torch.long, device=keep.device)
    row_keeps.scatter_add_(0, row, kept.long())
    return kept | (newline & (row_keeps[row] > 0))


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")

    def install(self, handle, methods) -> None:
        if self.select_strategy != "default":
            raise ValueError("LLaVA-NeXT packing needs vision_feature_select_strategy='default'")
        super().install(handle, methods)

    def token_selector(self, method, layout):
        if isinstance(method.config, BudgetConfig):
            method.config.num_keep(layout.num_tokens)  # a budget larger than a sub-image fails now
        grid = layout.grid

        def select(pending, device):
            if method.keeps_everything(layout):
                return None
            scores = pending.scores or {}
            keeps, first = [], 0
            for image in pending.context["images"]:  # a few images per batch, not a loop over tokens
                count = image.valid.shape[0]
                crops = CropLayout(grid, image.crop_grid, image.valid.to(device), image.valid)
                keep = method.select_crops({k: v[first : first + count] for k, v in scores.items()}, crops)
                keeps.append(keep_packed(image.token_map.to(device), keep))
                first += count
            return torch.cat(keeps)

        return select

    def prefill_context(self, args, kwargs) -> dict:
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        images = getattr(encoded, ANYRES_ATTRIBUTE, None)
        return {"images": images} if images is not None else {}

    def prefill_patches(self, pruner) -> list:
        return [InstanceMethodPatch(self.base, "get_image_features", self._with_packing_map(pruner))]

    def _with_packing_map(self, pruner):
        def make_wrapper(get_image_features):
            @functools.wraps(get_image_features)  # generate() reads its signature
            def wrapper(*args, **kwargs):
                output = get_image_features(*args, **kwargs)
                image_sizes = kwargs["image_sizes"] if "image_sizes" in kwargs else args[1]
                images = self.packing_map(image_sizes)
                setattr(output, ANYRES_ATTRIBUTE, images)
                if pruner.pending is not None and "images" not in pruner.pending.context:
                    pruner.pending.context["images"] = images
                return output

            return wrapper

        return make_wrapper

    def packing_map(self, image_sizes) -> list[AnyResImage]:
        """How the model packs each image, from the model's own ``pack_image_features``."""
        # imported here, not at module level: LLaVA-NeXT is not in every transformers version
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        config = self.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        num_tokens = side * side
        sizes = torch.as_tensor(image_sizes).cpu()
        counts = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in sizes.tolist()
        ]
        index_features = [(torch.arange(count * num_tokens) + 1.0).view(count, num_tokens, 1) for count in counts]
        packed, _ = self.base.pack_image_features(index_features, sizes, "default", image_newline=torch.zeros(1))
        images = []
        for count, size, columns in zip(counts, sizes.tolist(), packed, strict=True):
            token_map = columns.flatten().long() - 1
            valid = torch.zeros(count * num_tokens, dtype=torch.bool)
            valid[token_map[token_map >= 0]] = True
            crop_grid = (
                get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
                if count > 1
                else (0, 0)
            )
            images.append(AnyResImage(token_map, valid.view(count, num_tokens), tuple(crop_grid)))
        return images
