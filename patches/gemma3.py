"""Adapter for transformers ``Gemma3ForConditionalGeneration`` / ``Gemma3Model`` (transformers 5.24).

What the model looks like:
- a SigLIP tower (``vision_tower``, no [CLS] token) whose last hidden state (after
  ``post_layernorm``) feeds ``Gemma3MultiModalProjector``: the side x side patch grid is
  average-pooled (``AvgPool2d``, kernel = side / sqrt(``mm_tokens_per_image``): 4 x 4 for the
  64 x 64 patches of the 896 px checkpoints) to ``mm_tokens_per_image`` LLM tokens in raster order
  (256: 16 x 16), then normed and projected. One LLM token is the *mean* of a k x k patch block.
  Every image (a Pan & Scan crop too) is one such block of tokens at the ``image_token_id``
  placeholders, between ``<start_of_image>`` and ``<end_of_image>``; 1-D positions.
- masks: ``Gemma3Model.forward`` builds the decoder's masks itself, *before* the language model,
  and passes them as a dict keyed by layer type. With ``token_type_ids`` (the processor writes 1
  at the image tokens): ``create_masks_for_vision_model``: full layers OR(causal, blockwise),
  sliding layers AND(sliding window, OR(causal, blockwise)), where each contiguous run of image
  tokens is one block (``get_block_sequence_ids_for_mask``): an image's tokens see each other
  both ways. Without them (decode steps: ``prepare_inputs_for_generation`` passes them only at
  the first iteration): causal and sliding-window causal masks.
- the decoder (``Gemma3TextModel``): q/k norms, scale ``query_pre_attn_scalar ** -0.5``, a local
  and a global rotary embedding (one per layer type), sliding layers (``layer_types``).

What the adapter does (hooks on this instance, undone by ``remove()``):
- scores: SigLIP has no [CLS], so [CLS]-scored methods are refused at patch time (fastervlm runs
  with its documented substitute ``score="received"``, fopru with its own received score). The
  probe scores every patch of the last encoder layer (the one feeding the projector); an LLM
  token scores the *mean of its k x k patches' scores*: the projector's own pooling applied to
  the score map (:func:`vtprune.patches._grids.block_mean`), so a token's score is the average
  attention its patches receive, as its embedding is the average of theirs.
- masks after a cut: the language model's pre-hook sees the dict the model built for the
  unpruned sequence. A first pre-hook (before the stage stack's) hands the stack the caller's
  2-D padding mask instead; a last one (after it) gives the decoder the masks for the sequence it
  now runs: unchanged sequence (nothing cut, or only in-LLM cuts to come): the model's own dict;
  a pruned prefill with ``token_type_ids``: ``create_masks_for_vision_model`` on the cut sequence,
  with the token types cut like it (:meth:`StageStack.prefill_columns`): exactly what the model
  builds when fed the hand-pruned sequence (each image's kept tokens remain one contiguous block;
  windows count kept columns); a decode step (and a prefill without token types): the 2-D mask,
  from which ``Gemma3TextModel`` builds the causal and sliding masks, as the model does there.
- in-LLM methods (fastv, pdrop): :class:`Gemma3Backbone` rebuilds the masks the same way at every
  cut (the blocks are the kept image columns; at decode steps plain causal / sliding, as the
  model) and gives each layer the rotary embedding of its layer type.
- refused at patch time: the [CLS]-scored methods (above; hired and globalcom2 also split budgets
  over AnyRes crops, which Gemma 3 does not have: a Pan & Scan crop is an image of its own), quota
  (no frame replacement), in-LLM methods under attention-logit soft-capping (the probe does not
  model it).
"""

from __future__ import annotations

import inspect

import torch

from vtprune.engine.pre_llm import fixed_layout_selector
from vtprune.patches import register_adapter
from vtprune.patches._backbones import LlamaStyleBackbone
from vtprune.patches._base import Adapter, call_arguments
from vtprune.patches._grids import block_mean
from vtprune.types import VisualInputs, VisualLayout


class Gemma3Backbone(LlamaStyleBackbone):
    """``Gemma3TextModel``: a Llama-style stack with a rotary embedding per layer type and, at a
    prefill that carries token types, bidirectional image blocks in its masks."""

    shared_rotary = False

    def __init__(self, language_model: torch.nn.Module, image_blocks):
        """image_blocks(): whether the prefill now running carries token types (else causal masks)."""
        config = language_model.config
        if config.model_type != "gemma3_text":
            raise TypeError(f"Gemma3Backbone expects a Gemma3TextModel, got {type(language_model).__name__}")
        if config.attn_logit_softcapping is not None or config.use_bidirectional_attention:
            raise TypeError(
                "in-LLM pruning on Gemma 3 needs the checkpoints' attention (no attn_logit_softcapping, "
                "use_bidirectional_attention=False): the last-token probe does not model either"
            )
        self.model = language_model
        self.config = config
        self.model_type = config.model_type
        self.layers = language_model.layers
        self.image_blocks = image_blocks

    def rotary(self, hidden, position_ids) -> dict:
        return {kind: self.model.rotary_emb(hidden, position_ids, kind) for kind in set(self.config.layer_types)}

    def layer_rotary(self, layer_index, embeddings):
        return embeddings[self.config.layer_types[layer_index]]

    def build_prefill_mask(self, layer_index, hidden, mask2d, cache, position_ids, visual):
        if not self.image_blocks():
            return self.build_mask(layer_index, hidden, mask2d, cache, position_ids)
        from transformers.masking_utils import (
            blockwise_overlay,
            create_causal_mask,
            maybe_pad_block_sequence_ids,
            sliding_window_overlay,
        )
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        blocks = get_block_sequence_ids_for_mask(visual.long(), device=hidden.device)
        arguments = dict(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=mask2d,
            cache=cache,
            position_ids=position_ids,
            layer_idx=layer_index,  # sized by this layer's cache (deeper layers hold fewer entries)
        )
        if not self.is_sliding(layer_index):  # OR(causal, blockwise), as create_masks_for_vision_model
            return create_causal_mask(**arguments, block_sequence_ids=blocks)
        if cache is not None:
            kv_length, kv_offset = cache.get_mask_sizes(hidden.shape[1], layer_index)
            blocks = maybe_pad_block_sequence_ids(blocks, mask2d, kv_length, kv_offset)
        return create_causal_mask(  # AND(sliding window, OR(causal, blockwise))
            **arguments,
            or_mask_function=blockwise_overlay(blocks),
            and_mask_function=sliding_window_overlay(self.config.sliding_window),
        )


@register_adapter
class Gemma3Adapter(Adapter):
    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration", "Gemma3Model")

    # -- what the model looks like ------------------------------------------------------------
    @property
    def select_strategy(self) -> str:
        return "full"  # every patch goes to the projector

    @property
    def vision_feature_layer(self):
        return -1  # the last hidden state (after post_layernorm)

    @property
    def tokens_per_image(self) -> int:
        return self.config.mm_tokens_per_image

    def layout(self) -> VisualLayout:
        side = round(self.tokens_per_image**0.5)
        return VisualLayout(num_tokens=self.tokens_per_image, grid=(side, side))

    def has_cls_token(self) -> bool:
        return False

    def backbone(self):
        return Gemma3Backbone(self.language_model, lambda: self.stack.state.family.get("token_type_ids") is not None)

    def visual_inputs(self, kind, arguments, scores) -> VisualInputs:
        kernel = self.vision_config.image_size // self.vision_config.patch_size // round(self.tokens_per_image**0.5)
        pooled = {name: block_mean(s, kernel) for name, s in scores.items()}
        return VisualInputs(count=arguments["pixel_values"].shape[0], scores=pooled)

    def selector(self, method, layout):
        return fixed_layout_selector(method, layout)

    # -- the masks ------------------------------------------------------------------------------
    def install(self, handle, methods) -> None:
        super().install(handle, methods)
        handle.hooks.extend(self.mask_hooks())

    def mask_hooks(self) -> list:
        """The ``Gemma3Model`` pre-hook keeps the caller's 2-D mask and token types; the language
        model's first pre-hook hands the stack that 2-D mask, its last one the decoder's masks."""
        stack = self.stack
        config = self.text_config
        signature = inspect.signature(self.base.forward)

        def keep_inputs(module, args, kwargs):
            arguments = call_arguments(signature, args, kwargs)
            family = stack.state.family
            family["attention_mask"] = arguments.get("attention_mask")
            family["token_type_ids"] = arguments.get("token_type_ids")

        def padding_mask_for_the_stack(module, args, kwargs):
            family = stack.state.family
            masks = kwargs.get("attention_mask")
            if not isinstance(masks, dict) or "attention_mask" not in family:
                return None
            family["model_masks"], family["entering"] = masks, family["attention_mask"]
            return args, dict(kwargs, attention_mask=family["attention_mask"])

        def masks_for_the_decoder(module, args, kwargs):
            family = stack.state.family
            if "entering" not in family:
                return None
            masks, entering = family.pop("model_masks"), family.pop("entering")
            mask = kwargs.get("attention_mask")
            if mask is entering:  # the stack left the sequence as the model built it
                return args, dict(kwargs, attention_mask=masks)
            token_types = family.get("token_type_ids")
            cut_types = stack.prefill_columns(token_types) if token_types is not None else None
            if cut_types is None:  # a decode step: Gemma3TextModel builds causal / sliding masks from 2-D
                return None
            from transformers.models.gemma3.modeling_gemma3 import (
                create_masks_for_vision_model,
                get_block_sequence_ids_for_mask,
            )

            embeds = kwargs["inputs_embeds"]
            masks = create_masks_for_vision_model(
                config=config,
                inputs_embeds=embeds,
                attention_mask=mask,
                cache=kwargs.get("cache"),
                position_ids=kwargs.get("position_ids"),
                block_sequence_ids=get_block_sequence_ids_for_mask(cut_types, device=embeds.device),
            )
            return args, dict(kwargs, attention_mask=masks)

        return [
            self.base.register_forward_pre_hook(keep_inputs, with_kwargs=True),
            self.language_model.register_forward_pre_hook(padding_mask_for_the_stack, with_kwargs=True, prepend=True),
            self.language_model.register_forward_pre_hook(masks_for_the_decoder, with_kwargs=True),
        ]
