"""Adapter for the original LLaVA code base (PyPI ``llava-torch``): ``LlavaLlamaForCausalLM``.

Research code built on ``llava.model.builder.load_pretrained_model`` gets the same one call as
the transformers classes: ``vtprune.patch(model, "fastervlm", keep_ratio=0.1)``. What differs
from the transformers LLaVA families (the install template, probes and stages are the shared
ones of :mod:`vtprune.patches._base`):

- The model (``config.model_type == "llava_llama"``) is a ``LlamaForCausalLM`` whose inner
  ``LlavaLlamaModel`` (``model.model``) is both the decoder stack and the owner of the CLIP
  tower (``CLIPVisionTower``, wrapping a transformers ``CLIPVisionModel``) and the projector.
  The [CLS] row is scored at the tower's ``mm_vision_select_layer`` (``mm_vision_select_feature``
  ``"patch"`` drops [CLS] like transformers' ``"default"``, ``"cls_patch"`` keeps it like
  ``"full"``).
- Images reach the LLM through ``prepare_inputs_labels_for_multimodal``, which replaces each
  ``IMAGE_TOKEN_INDEX`` (-200) by the image's N features, drops and re-adds padding (right
  padding unless ``config.tokenizer_padding_side == "left"``) and hands ``inputs_embeds`` to
  the Llama forward. That method is wrapped on this instance only: it marks a prefill, and
  learns which columns of the merged sequence are image tokens by passing the method a
  *marker* in place of ``labels`` (each text token's own column index; the package labels
  image columns ``-100``, and padding shows in the merged mask). The merged sequence is then
  cut by the pre-LLM engine's pre-hook on ``model.model`` (after the features are spliced in),
  and in-LLM methods hook the Llama decoder layers as for transformers LLaVA.
- Labels: a pre-hook on the model takes ``labels``, the wrapper merges them like the package
  does (``-100`` on image columns), and the loss is computed on the pruned logits.

Two transformers eras:

- transformers 5 (the package installed ``--no-deps``): the package's ``forward`` does not
  accept transformers 5's ``cache`` argument. :func:`transformers5_compat` gives the patched
  instance (never the class) a ``forward`` with the same steps under the transformers 5
  calling convention (``cache`` / legacy ``past_key_values``, ``logits_to_keep``, extra kwargs
  passed on) and a matching ``prepare_inputs_for_generation``; ``remove()`` takes both away.
  Without vtprune the package's ``generate`` does not run on transformers 5; call
  ``transformers5_compat(model)`` yourself to use an unpatched model there.
- transformers 4.36/4.37 (the package's pins): the Llama stack passes a 4-D mask, computes
  rotary per attention layer and returns legacy tuple caches. While patched the stack gets a
  ``DynamicCache`` (so the pruned prompt is one object across decode steps; its
  ``seen_tokens`` counts the unpruned stream, which ``generate`` slices ``input_ids`` by), the
  engines see it as ``cache``, in-LLM cuts hand later layers 4-D masks built by the model's
  own mask builders, and with ``positions="original"`` each layer's rotary module returns its
  whole cos/sin table (the package's tables are indexed by position, but sliced to the
  layer's now shorter cache length).

AnyRes (``mm_patch_merge_type="spatial_unpad"`` or ``"spatial"`` with ``image_aspect_ratio="anyres"``,
the LLaVA-NeXT checkpoints of this package): ``images`` is a list (or a 5-D tensor) of crop stacks,
base image first, and the package packs each image like transformers' LLaVA-NeXT -- the base
image's N tokens, then the crop canvas row by row, unpadded, each row closed by
``image_newline`` (``"spatial"``: no unpadding, no newlines; a lone base image gets one newline).
:meth:`LlavaOriginalAdapter.packing_map` gives, per image, which sub-image token (or newline)
each packed column is, by running the package's own steps (its ``get_anyres_image_grid_shape``
and ``unpad_image``) on index features; the selection is then that of
LLaVA-NeXT (:func:`~vtprune.patches._anyres.select_packed`): ``method.select_crops`` per image (per
sub-image or global budgets, HiRED's and GlobalCom²'s allocations) and its newline rule
(:func:`~vtprune.patches._anyres.keep_packed`). Visual tokens are the image columns, newlines
included.

Not supported: ``mm_patch_merge_type="flat"`` with several crops per image (the package then
flattens all crops into one unstructured block) raises when such images arrive; the MPT and
Mistral variants of the package are other model classes.
"""

from __future__ import annotations

import inspect

import torch

from vtprune.engine.pre_llm import fixed_layout_selector
from vtprune.engine.probe import AttentionParts
from vtprune.patches import InstanceMethodPatch, register_adapter
from vtprune.patches._anyres import anyres_image, select_packed
from vtprune.patches._backbones import LlamaStyleBackbone
from vtprune.patches._base import Adapter
from vtprune.types import AnyResImage, PrefillInputs, TokenSelection, VisualInputs

IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX
IGNORE_INDEX = -100  # llava.constants.IGNORE_INDEX: the label of image and padding columns
SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> transformers' name


def _llama_for_causal_lm():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM


def legacy_transformers() -> bool:
    """True under the package's own era (transformers 4.36/4.37), False under transformers 5."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    if major >= 5:
        return False
    if (major, minor) in ((4, 36), (4, 37)):
        return True
    raise RuntimeError(
        f"vtprune supports the original LLaVA package under transformers 4.36/4.37 (its pins) or >= 5; "
        f"found transformers {transformers.__version__}"
    )


# -- transformers 5 compatibility shim (instance level) --------------------------------------
def needs_transformers5_compat(model) -> bool:
    """Whether ``model.forward`` lacks transformers 5's ``cache`` argument that ``generate`` passes."""
    llama_forward = inspect.signature(_llama_for_causal_lm().forward).parameters
    own_forward = inspect.signature(type(model).forward).parameters
    return "cache" in llama_forward and "cache" not in own_forward


def transformers5_compat(model) -> list[InstanceMethodPatch]:
    """Let a ``LlavaLlamaForCausalLM`` run (forward and ``generate``) under transformers 5.

    Sets ``forward`` and ``prepare_inputs_for_generation`` on this instance only (the class is
    untouched); returns the patches, whose ``remove()`` restores the instance. A no-op (empty
    list) where the model's own ``forward`` already takes ``cache``.

    The ``forward`` does what the package's does -- merge the images into ``inputs_embeds``
    with ``prepare_inputs_labels_for_multimodal`` (looked up on the instance, so a wrapper of it
    applies), then run the Llama forward -- under transformers 5's calling convention: ``cache``
    (or the legacy name ``past_key_values``), ``logits_to_keep`` and other keyword arguments
    are passed on, and ``None`` flags the package passes explicitly are left out.
    """
    if not needs_transformers5_compat(model):
        return []
    llama = _llama_for_causal_lm()

    def forward(
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        images=None,
        image_sizes=None,
        past_key_values=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            input_ids, position_ids, attention_mask, cache, inputs_embeds, labels = (
                model.prepare_inputs_labels_for_multimodal(
                    input_ids, position_ids, attention_mask, cache, labels, images, image_sizes
                )
            )
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        merged = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        return llama.forward(model, **merged, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, **kwargs)

    def prepare_inputs_for_generation(
        input_ids, cache=None, inputs_embeds=None, images=None, image_sizes=None, past_key_values=None, **kwargs
    ):
        cache = cache if cache is not None else past_key_values
        inputs = llama.prepare_inputs_for_generation(
            model, input_ids, cache=cache, inputs_embeds=inputs_embeds, **kwargs
        )
        if images is not None:
            inputs["images"] = images
        if image_sizes is not None:
            inputs["image_sizes"] = image_sizes
        return inputs

    return [
        InstanceMethodPatch(model, "forward", lambda _: forward),
        InstanceMethodPatch(model, "prepare_inputs_for_generation", lambda _: prepare_inputs_for_generation),
    ]


# -- the decoder stack ------------------------------------------------------------------------
class LlavaLlamaBackbone(LlamaStyleBackbone):
    """``LlavaLlamaModel`` under transformers 5: a ``LlamaModel`` whose config says ``llava_llama``."""

    def __init__(self, language_model: torch.nn.Module):
        missing = [name for name in ("layers", "rotary_emb") if not hasattr(language_model, name)]
        if missing:
            raise TypeError(f"{type(language_model).__name__} lacks {', '.join(missing)}; expected a Llama stack")
        self.model = language_model
        self.config = language_model.config
        self.model_type = "llama"
        self.layers = language_model.layers


class LegacyLlamaBackbone(LlavaLlamaBackbone):
    """``LlavaLlamaModel`` under transformers 4.36/4.37: rotary per attention layer, 4-D masks.

    ``rotary`` reads the model's own cos/sin tables at the given positions (what its
    ``apply_rotary_pos_emb`` does), so the probe sees exactly the layer's rotation; masks come
    from the model's own ``_prepare_4d_causal_attention_mask*`` builders, sized by the 2-D mask
    (pruned prompt + tokens since), which is the layer's cache length plus the query.
    """

    def __init__(self, language_model: torch.nn.Module):
        try:
            language_model.layers[0].self_attn.rotary_emb  # noqa: B018
        except (AttributeError, IndexError, TypeError):
            raise TypeError(
                f"{type(language_model).__name__} is not a transformers 4.3x Llama stack "
                "(no layers[0].self_attn.rotary_emb)"
            ) from None
        self.model = language_model
        self.config = language_model.config
        self.model_type = "llama"
        self.layers = language_model.layers

    def attention_parts(self, layer_index: int) -> AttentionParts:
        layer = self.layers[layer_index]
        attention = layer.self_attn
        return AttentionParts(
            norm=layer.input_layernorm,
            q_proj=attention.q_proj,
            k_proj=attention.k_proj,
            num_heads=attention.num_heads,
            num_kv_heads=attention.num_key_value_heads,
            head_dim=attention.head_dim,
            scaling=attention.head_dim**-0.5,
        )

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = self.layers[0].self_attn.rotary_emb
        return rotary.cos_cached[position_ids].to(hidden.dtype), rotary.sin_cached[position_ids].to(hidden.dtype)

    def build_mask(self, layer_index: int, hidden: torch.Tensor, mask2d: torch.Tensor, cache, position_ids):
        from transformers.modeling_attn_mask_utils import (
            _prepare_4d_causal_attention_mask,
            _prepare_4d_causal_attention_mask_for_sdpa,
        )

        batch, query_length = hidden.shape[:2]
        past = mask2d.shape[1] - query_length
        implementation = self.config._attn_implementation
        if implementation == "flash_attention_2":  # the model passes the 2-D mask, or None without padding
            return mask2d if (mask2d == 0).any() else None
        build = (
            _prepare_4d_causal_attention_mask_for_sdpa
            if implementation == "sdpa"
            else _prepare_4d_causal_attention_mask
        )
        return build(mask2d, (batch, query_length), hidden, past)


# -- the adapter ------------------------------------------------------------------------------
@register_adapter
class LlavaOriginalAdapter(Adapter):
    family = "llava_original"
    merges_tokens = True  # single-resolution images have one fixed layout (AnyRes packing is refused: has_crops)
    model_types = ("llava_llama",)
    model_classes = ("LlavaLlamaForCausalLM",)
    # input_ids hold one IMAGE_TOKEN_INDEX per image, which the model expands into the image's features
    # (the lmms-eval wrapper counts visual tokens with it; the config has no image token id)
    image_placeholder_id = IMAGE_TOKEN_INDEX

    @staticmethod
    def runtime_patches(model) -> list[InstanceMethodPatch]:
        """What the *unpatched* model needs to run here: :func:`transformers5_compat` (empty on 4.3x).

        For callers that run it without vtprune (the lmms-eval wrapper's ``method=none``); remove
        them before ``vtprune.patch``, which installs its own.
        """
        return transformers5_compat(model)

    visual_kinds = {}  # images arrive through prepare_inputs_labels_for_multimodal (the prefill trigger)

    def __init__(self, model):
        super().__init__(model)
        self.legacy = legacy_transformers()

    def find_base(self) -> torch.nn.Module:
        return self.model.get_model()  # LlavaLlamaModel: the Llama stack, owner of the tower and projector

    def find_language_model(self) -> torch.nn.Module:
        return self.base

    def find_vision_tower(self) -> torch.nn.Module:
        tower = self.model.get_vision_tower()
        if tower is None:
            raise TypeError(f"{type(self.model).__name__} has no vision tower (config.mm_vision_tower is not set)")
        if not getattr(tower, "is_loaded", False):
            raise ValueError(
                "the CLIP vision tower is not loaded yet (the model was built with delay_load); call "
                "model.get_vision_tower().load_model() first, as llava.model.builder.load_pretrained_model does"
            )
        self.tower_wrapper = tower  # llava's CLIPVisionTower
        return tower.vision_tower  # the transformers CLIPVisionModel inside it

    # -- what the model looks like ------------------------------------------------------------
    @property
    def select_strategy(self) -> str:
        feature = getattr(self.config, "mm_vision_select_feature", "patch")
        if feature not in SELECT_STRATEGY:
            raise ValueError(
                f"unexpected mm_vision_select_feature {feature!r}; expected one of {list(SELECT_STRATEGY)}"
            )
        return SELECT_STRATEGY[feature]

    @property
    def vision_config(self):
        return self.vision_tower.config

    @property
    def text_config(self):
        return self.config  # a LlamaConfig subclass

    @property
    def vision_feature_layer(self):
        return self.config.mm_vision_select_layer

    # -- wiring ---------------------------------------------------------------------------
    @property
    def merge_type(self) -> str:
        return getattr(self.config, "mm_patch_merge_type", "flat")

    @property
    def packs_crops(self) -> bool:
        """Whether lists / 5-D stacks of crops are packed spatially (AnyRes), not flattened."""
        return self.merge_type.startswith("spatial")

    @property
    def has_crops(self) -> bool:
        return self.packs_crops

    def check_model(self) -> None:
        merge = self.merge_type
        if merge not in ("flat", "spatial", "spatial_unpad"):
            raise NotImplementedError(
                f"unexpected mm_patch_merge_type {merge!r}; vtprune supports 'flat', 'spatial' and 'spatial_unpad'"
            )
        if self.packs_crops and self.select_strategy != "default":
            raise ValueError("AnyRes packing (mm_patch_merge_type='spatial*') needs mm_vision_select_feature='patch'")

    def install(self, handle, methods) -> None:
        self.check_model()
        handle.hooks.extend(transformers5_compat(self.model))
        super().install(handle, methods)
        if self.legacy:
            handle.hooks.extend(self._legacy_stack_hooks(methods))
        # decode steps reach the stack with input_ids; the engines read inputs_embeds (the stack's own lookup)
        handle.hooks.append(self.base.register_forward_pre_hook(_embed_tokens, with_kwargs=True, prepend=True))

    def backbone(self):
        return LegacyLlamaBackbone(self.base) if self.legacy else LlavaLlamaBackbone(self.base)

    def projector(self) -> torch.nn.Module:
        return self.base.mm_projector

    def selector(self, method, layout):
        """One fixed layout per image, as for LLaVA-1.5, or per-image AnyRes selection when the
        prefill packs crops; images the package encodes but does not splice (the one it consumes
        for each text-only sample of a batch) are left out."""
        # a crop-only method (hired, globalcom2) has no single-resolution selection
        flat = None if method.multi_crop_only else fixed_layout_selector(method, layout)

        def select(inputs, device):
            images = inputs.visual["image"]
            if images.packing is not None:
                if method.keeps_everything(layout):
                    return None
                return select_packed(method, layout.grid, images.packing, images.scores, device, images.spliced)
            if flat is None:
                raise ValueError(
                    f"method {method.name!r} splits its budget across AnyRes crops; this forward's images are "
                    "single-resolution (a 4-D tensor): pass a list of crop stacks with image_sizes"
                )
            keep = flat(inputs, device)
            if keep is None or images.spliced is None or isinstance(keep, TokenSelection):  # a merge: spliced only
                return keep
            return keep.view(images.count, -1)[images.spliced.to(device)].flatten()

        return select

    def packing_map(self, image_sizes, counts: list[int]) -> list[AnyResImage]:
        """How ``prepare_inputs_labels_for_multimodal`` packs each image of ``counts`` sub-images.

        The package's own steps (its ``get_anyres_image_grid_shape`` and ``unpad_image``, the same
        views and permutes) applied to index features: feature ``s * N + p + 1`` for patch p of
        sub-image s, ``0`` for the newline. CPU tensors; ``image_sizes`` as the package takes them
        ((width, height) per image).
        """
        from llava.mm_utils import get_anyres_image_grid_shape
        from llava.model.llava_arch import unpad_image

        side = self.tower_wrapper.num_patches_per_side
        num_tokens = side * side
        unpad = "unpad" in self.merge_type
        images = []
        for image_index, count in enumerate(counts):
            index = (torch.arange(count * num_tokens, dtype=torch.float64) + 1).view(count, num_tokens, 1)
            base = index[0]
            if count > 1:
                size = image_sizes[image_index]
                size = size.tolist() if isinstance(size, torch.Tensor) else size
                num_patch_width, num_patch_height = get_anyres_image_grid_shape(
                    size, self.config.image_grid_pinpoints, self.tower_wrapper.config.image_size
                )
                crops = index[1:].view(num_patch_height, num_patch_width, side, side, -1)
                if unpad:
                    crops = crops.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
                    crops = unpad_image(crops, size)
                    crops = torch.cat((crops, crops.new_zeros(*crops.shape[:-1], 1)), dim=-1)
                    crops = crops.flatten(1, 2).transpose(0, 1)
                else:
                    crops = crops.permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
                packed = torch.cat((base, crops), dim=0)
                crop_grid = (num_patch_height, num_patch_width)
            else:
                packed = torch.cat((base, base.new_zeros(1, 1)), dim=0) if unpad else base
                crop_grid = (0, 0)
            images.append(anyres_image(packed.flatten().long() - 1, count, num_tokens, crop_grid))
        return images

    def prefill_triggers(self) -> list:
        """``prepare_inputs_labels_for_multimodal`` wrapped: it splices the images in, so it is where a
        prefill starts and where the merged sequence shows which columns are image tokens."""
        stack = self.stack

        def make_wrapper(prepare):
            def wrapper(input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None):
                if not stack.attached():  # a call inside handle.suspended()
                    return prepare(
                        input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes
                    )
                state = stack.state.family
                if labels is None:
                    labels = state.pop("labels", None)  # taken from the forward's kwargs by the label hook
                # the package's own test for "images are spliced in now" (else it returns the inputs as they are)
                prefill = images is not None and input_ids is not None and input_ids.shape[1] != 1
                if not prefill:
                    stack.text_forward()
                    result = prepare(
                        input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes
                    )
                    if "labels_taken" in state:
                        state["merged_labels"] = result[5]
                        return (*result[:5], None)
                    return result
                return self._merge(
                    prepare, labels, input_ids, position_ids, attention_mask, past_key_values, images, image_sizes
                )

            return wrapper

        return [InstanceMethodPatch(self.model, "prepare_inputs_labels_for_multimodal", make_wrapper)]

    def _merge(self, prepare, labels, input_ids, position_ids, attention_mask, past_key_values, images, image_sizes):
        stack = self.stack
        state = stack.state.family
        packing = None
        if isinstance(images, list) or images.dim() == 5:
            crops = [image.shape[0] if image.dim() == 4 else 1 for image in images]
            if self.packs_crops:
                packing = self.packing_map(image_sizes, crops)
            elif any(count != 1 for count in crops):
                raise NotImplementedError(
                    "vtprune: with mm_patch_merge_type='flat' the package flattens an image's crops into one "
                    "block; vtprune prunes crops only when they are packed (mm_patch_merge_type='spatial_unpad')"
                )
            num_images = len(crops)
        else:
            num_images = images.shape[0]
        batch, length = input_ids.shape
        mask_in = attention_mask if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        marker = torch.arange(length, device=input_ids.device).expand(batch, length)
        stack.take_scores()  # the tower runs inside: its probes' scores only
        _, position_ids, merged_mask, past_key_values, embeds, merged = prepare(
            input_ids, position_ids, mask_in, past_key_values, marker, images, image_sizes
        )
        # merged: (B, L) source column of each text token; -100 on image features and on padding
        image_mask = (merged == IGNORE_INDEX) & merged_mask.bool()
        out_labels = None
        if labels is not None:
            out_labels = torch.where(merged >= 0, labels.gather(1, merged.clamp(min=0)), IGNORE_INDEX)
        stack.start_prefill(PrefillInputs(image_mask, {"image": image_mask}))
        if stack.pre is not None:
            spliced = None
            counts = ((input_ids == IMAGE_TOKEN_INDEX) & mask_in.bool()).sum(dim=1).tolist()
            if 0 in counts:  # the package consumes one image for every text-only sample and splices nothing
                spliced = torch.zeros(num_images, dtype=torch.bool)
                first = 0
                for count in counts:
                    spliced[first : first + count] = True
                    first += max(count, 1)
            visual = VisualInputs(count=num_images, scores=stack.take_scores(), packing=packing, spliced=spliced)
            stack.add_visual("image", visual)
        if "labels_taken" in state:
            state["merged_labels"] = out_labels
            out_labels = None
        return (
            None,
            position_ids,
            merged_mask if attention_mask is not None else None,
            past_key_values,
            embeds,
            out_labels,
        )

    # -- labels ---------------------------------------------------------------------------
    def label_cut(self) -> list:
        """A pre-hook on the model takes ``labels``; the merge wrapper merges them like the package does
        (``-100`` on image columns); the loss is computed on the pruned logits."""
        stack = self.stack

        def take_labels(module, args, kwargs):
            state = stack.state.family
            labels = kwargs.pop("labels", None)
            state.pop("merged_labels", None)
            if labels is None:
                state.pop("labels_taken", None)
                return None
            state["labels_taken"] = True
            if kwargs.get("inputs_embeds") is not None:  # no merge will run: the labels are in merged columns
                state["merged_labels"] = labels
            else:
                state["labels"] = labels
            return args, kwargs

        def loss_on_pruned(module, args, kwargs, output):
            state = stack.state.family
            if not state.pop("labels_taken", False):
                return None
            state.pop("labels", None)
            labels = state.pop("merged_labels", None)
            if labels is None:
                return None
            logits = output["logits"] if isinstance(output, dict) else output[0]
            loss = causal_lm_loss(module, logits, self.pruned_labels(labels, logits))
            if isinstance(output, dict):
                output["loss"] = loss
                return output
            return (loss, *output)

        return [
            self.model.register_forward_pre_hook(take_labels, with_kwargs=True),
            self.model.register_forward_hook(loss_on_pruned, with_kwargs=True),
        ]

    # -- transformers 4.36/4.37 -------------------------------------------------------------------
    def _legacy_stack_hooks(self, methods) -> list:
        """Hooks that give the engines transformers 5's view of a transformers 4.3x Llama stack."""
        from transformers.cache_utils import Cache, DynamicCache

        lm, stack, hooks = self.base, self.stack, []

        def cache_in(module, args, kwargs):  # first pre-hook: a Cache object the engines can follow
            cache = kwargs.get("past_key_values")
            use_cache = kwargs.get("use_cache")
            use_cache = module.config.use_cache if use_cache is None else use_cache
            if cache is None and use_cache:
                cache = DynamicCache()
            elif cache is not None and not isinstance(cache, Cache):
                cache = DynamicCache.from_legacy_cache(cache)
            embeds = kwargs.get("inputs_embeds")
            query = (embeds if embeds is not None else kwargs["input_ids"]).shape[1]
            stack.state.family["cache"] = cache
            stack.state.family["seen"] = (cache.seen_tokens if cache is not None else 0) + query
            return args, dict(kwargs, past_key_values=cache, cache=cache)

        def cache_hide(module, args, kwargs):  # last pre-hook: the 4.3x forward takes no `cache`
            kwargs = dict(kwargs)
            kwargs.pop("cache", None)
            return args, kwargs

        def cache_show(module, args, kwargs, output):  # first forward hook: the engines read kwargs["cache"]
            kwargs["cache"] = stack.state.family.get("cache")

        def count_unpruned(module, args, kwargs, output):
            # generate() slices input_ids by seen_tokens against the caller's (unpruned) mask
            cache = stack.state.family.pop("cache", None)
            if cache is not None:
                cache.seen_tokens = stack.state.family.pop("seen")

        hooks += [
            lm.register_forward_pre_hook(cache_in, with_kwargs=True, prepend=True),
            lm.register_forward_pre_hook(cache_hide, with_kwargs=True),
            lm.register_forward_hook(cache_show, with_kwargs=True, prepend=True),
            lm.register_forward_hook(count_unpruned, with_kwargs=True),
        ]
        in_llm = stack.llm
        if in_llm is not None:
            backbone = in_llm.backbone
            probes = set(in_llm.probe_at)

            def add_rotary(index):
                def hook(module, args, kwargs):  # the probe rotates q/k with (cos, sin) as a 5.x layer gets them
                    if index in probes and "position_embeddings" not in kwargs:
                        hidden = args[0] if args else kwargs["hidden_states"]
                        return args, dict(kwargs, position_embeddings=backbone.rotary(hidden, kwargs["position_ids"]))
                    return None

                return hook

            def drop_rotary(module, args, kwargs):  # 4.3x layers compute rotary themselves
                if "position_embeddings" not in kwargs:
                    return None
                kwargs = dict(kwargs)
                kwargs.pop("position_embeddings")
                return args, kwargs

            for index in range(in_llm.first_hooked_layer, len(backbone.layers)):
                layer = backbone.layers[index]
                hooks.append(layer.register_forward_pre_hook(add_rotary(index), with_kwargs=True, prepend=True))
                hooks.append(layer.register_forward_pre_hook(drop_rotary, with_kwargs=True))
        if any(method.config.positions == "original" for method in methods):

            def whole_table(module, args, output):
                # positions past this layer's (pruned) cache length index the full cos/sin tables
                dtype = args[0].dtype
                return module.cos_cached.to(dtype), module.sin_cached.to(dtype)

            for layer in lm.layers:
                hooks.append(layer.self_attn.rotary_emb.register_forward_hook(whole_table))
        return hooks


def _embed_tokens(module, args, kwargs):
    """LLM pre-hook: ``input_ids`` -> ``inputs_embeds`` with the stack's own embedding (what its forward does)."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None or kwargs.get("inputs_embeds") is not None:
        return None
    return args, dict(kwargs, input_ids=None, inputs_embeds=module.embed_tokens(input_ids))


def causal_lm_loss(model, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's own next-token loss: transformers 5's ``loss_function``, else 4.3x Llama's."""
    vocab_size = model.config.vocab_size
    if hasattr(model, "loss_function"):
        return model.loss_function(logits=logits, labels=labels, vocab_size=vocab_size)
    shift_logits = logits[..., :-1, :].contiguous().view(-1, vocab_size)
    shift_labels = labels[..., 1:].contiguous().view(-1).to(shift_logits.device)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels)
