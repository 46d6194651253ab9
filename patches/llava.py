"""Adapter for transformers ``LlavaForConditionalGeneration`` / ``LlavaModel`` (LLaVA-1.5).

What the model looks like: a CLIP tower (``vision_tower``) whose ``vision_feature_layer`` output
feeds the projector; every image is the tower's side x side patch grid (plus [CLS] with
``vision_feature_select_strategy="full"``), N tokens in raster order, placed at the
``config.image_token_id`` placeholders of ``input_ids``; 1-D positions.

Hooks (all on this instance, all recorded in the handle; see :mod:`vtprune.patches._base`):
the ``LlavaModel`` pre-hook starts a prefill when a forward carries images (pixels or
``generate``'s pre-encoded ``mm_encoder_outputs``); ``get_image_features`` is wrapped to hand the
stack each encoding's probe scores; the probes hook the q/k projections of the scored tower
layer (by default the layer feeding the projector: layer 22 of 24 for LLaVA-1.5's -2, exactly
FasterVLM's ``attentions[-2]``); the stage stack hooks the language model and, for in-LLM
methods, its decoder layers (``vtprune.patches._backbones``); ``labels`` are cut like the
sequence and the loss is computed on the pruned logits.

Selection: one fixed layout per image (:func:`vtprune.engine.pre_llm.fixed_layout_selector`).
"""

from __future__ import annotations

from vtprune.engine.pre_llm import fixed_layout_selector
from vtprune.patches import register_adapter
from vtprune.patches._base import Adapter


@register_adapter
class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    merges_tokens = True  # one fixed layout per image: merged tokens fill each image block

    def selector(self, method, layout):
        return fixed_layout_selector(method, layout)
