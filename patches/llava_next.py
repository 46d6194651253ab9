"""Adapter for transformers ``LlavaNextForConditionalGeneration`` / ``LlavaNextModel`` (AnyRes).

What the model looks like: an image is a base image (the whole picture at the tower's
resolution) plus a grid of crops of the high-resolution canvas. The model packs them as: the
base image's N tokens, then the crop canvas row by row with the crops' padding removed
("spatial_unpad") and an ``image_newline`` token closing every row (a lone image without crops
gets one newline after the base). Otherwise as LLaVA-1.5 (CLIP tower, 1-D positions).

What the adapter computes (same hooks as :mod:`vtprune.patches.llava`):
- the packing map: which sub-image token (or newline) each packed image column is. It comes
  from the model's own ``pack_image_features`` run on index tensors on the CPU (no copied
  packing code), computed from ``image_sizes`` when ``get_image_features`` runs;
- selection per image over its sub-images (:func:`vtprune.patches._anyres.select_packed`):
  ``method.select_crops`` gets the sub-images' scores and a :class:`~vtprune.types.CropLayout`
  (which tokens exist after unpadding) and returns an (S, N) keep mask: a per-sub-image or global
  budget for fastervlm / fopru / random / uniform, HiRED's and GlobalCom²'s allocations for
  theirs; then the newline rule (:func:`vtprune.patches._anyres.keep_packed`).

Visual tokens in ``handle.last`` are the image placeholder columns, newlines included.
Reading ``image_sizes`` to the host happens once per prefill, as the model's own unpadding does.
"""

from __future__ import annotations

import torch

from vtprune.engine.pre_llm import packed_merge_selector
from vtprune.patches import register_adapter
from vtprune.patches._anyres import anyres_image, select_packed
from vtprune.patches._base import Adapter
from vtprune.types import AnyResImage, VisualInputs


@register_adapter
class LlavaNextAdapter(Adapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    has_crops = True
    merges_crops = True  # merge methods with an AnyRes rule (merge_crops): VisionZip's NeXT path

    def check_model(self) -> None:
        if self.select_strategy != "default":
            raise ValueError("LLaVA-NeXT packing needs vision_feature_select_strategy='default'")

    def visual_inputs(self, kind, arguments, scores) -> VisualInputs:
        return VisualInputs(scores=scores, packing=self.packing_map(arguments["image_sizes"]))

    def selector(self, method, layout):
        if method.merges:
            return packed_merge_selector(method, layout, self.base.image_newline)

        def select(inputs, device):
            if method.keeps_everything(layout):
                return None
            images = inputs.visual["image"]
            return select_packed(method, layout.grid, images.packing, images.scores, device)

        return select

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
            crop_grid = (
                get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
                if count > 1
                else (0, 0)
            )
            images.append(anyres_image(columns.flatten().long() - 1, count, num_tokens, crop_grid))
        return images
