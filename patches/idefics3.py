"""Adapter for transformers ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration``
(and their ``*Model``; transformers 5.24; SmolVLM2 is the same code path).

What the model looks like:
- the language model is ``text_model`` (a Llama: SmolLM2 / Llama 3), not ``language_model``;
- ``pixel_values`` is (batch, images, C, H, W): each sample's images padded to the batch's most
  images with all-zero images, which ``get_image_features`` drops before the tower
  (``real_images_inds``); the tower (``vision_model``, SigLIP-style, no [CLS]) then sees the
  real images only, in order, and their features fill the ``image_token_id`` placeholders;
- an image split by the processor is its tiles row by row, then the global image (the whole
  picture downscaled) *last*; each tile and the global image is one square image of
  (image_size / patch_size)^2 patches; a lone image is its global image only;
- the connector's pixel shuffle turns every s x s block of patches (``scale_factor`` s, raster
  order) into one LLM token (their features concatenated), then a linear projection: a tile is
  (side / s)^2 tokens in raster order; 1-D positions.

What the adapter does (the hooks of :mod:`vtprune.patches._base`, on ``text_model``):
- every real image (tile or global image) is one fixed layout of (side / s)^2 tokens with its
  own budget (:func:`vtprune.engine.pre_llm.fixed_layout_selector`); padding images have no
  tokens and no scores (the count of real images is read once per encoding, as the model's own
  ``get_image_features`` reads it);
- scores: the tower has no [CLS], so [CLS]-scored methods are refused at patch time (fastervlm
  runs with its documented substitute ``score="received"``, fopru with its own received score).
  A token's score is the mean of its s x s patches' scores
  (:func:`vtprune.patches._grids.block_mean`). Patches the processor padded inside an image
  (``pixel_attention_mask``) are scored like the others (the checkpoints' processors resize every
  tile to the full square, so there are none);
- in-LLM methods (fastv, pdrop) on the Llama ``text_model``;
- refused at patch time: [CLS]-scored methods (hired, globalcom2: also crop budgets), quota.
"""

from __future__ import annotations

import torch

from vtprune.engine.pre_llm import fixed_layout_selector
from vtprune.patches import register_adapter
from vtprune.patches._base import Adapter
from vtprune.patches._grids import block_mean
from vtprune.types import VisualInputs, VisualLayout


@register_adapter
class Idefics3Adapter(Adapter):
    family = "idefics3"
    model_classes = ("Idefics3ForConditionalGeneration", "Idefics3Model")

    def find_language_model(self) -> torch.nn.Module:
        return self.base.text_model

    def find_vision_tower(self) -> torch.nn.Module:
        return self.base.vision_model

    @property
    def select_strategy(self) -> str:
        return "full"  # every patch goes to the connector

    @property
    def vision_feature_layer(self):
        return -1  # the last hidden state (after post_layernorm)

    def layout(self) -> VisualLayout:
        side = self.vision_config.image_size // self.vision_config.patch_size // self.config.scale_factor
        return VisualLayout(num_tokens=side * side, grid=(side, side))

    def has_cls_token(self) -> bool:
        return False

    def visual_inputs(self, kind, arguments, scores) -> VisualInputs:
        pixels = arguments["pixel_values"]
        real = pixels.flatten(2).ne(0).any(dim=2)  # the model's real_images_inds
        pooled = {name: block_mean(s, self.config.scale_factor) for name, s in scores.items()}
        return VisualInputs(count=max(int(real.sum()), 1), scores=pooled)

    def selector(self, method, layout):
        return fixed_layout_selector(method, layout)


@register_adapter
class SmolVLMAdapter(Idefics3Adapter):
    family = "smolvlm"
    model_classes = ("SmolVLMForConditionalGeneration", "SmolVLMModel")
