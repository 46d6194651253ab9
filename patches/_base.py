"""The adapter base: what every family shares, so a family file says only what its model looks like.

:class:`Adapter` owns the install template (:meth:`Adapter.install`): the patch-time method
checks, the stage stack (:mod:`vtprune.engine.stages`), the prefill trigger, the
``get_*_features`` wrappers, the vision probes, the LLM hooks and the label cut. Every hook is
an instance hook recorded in the handle; ``remove()`` takes them all away.

A family (one file, ``patches/<family>.py``) subclasses :class:`Adapter` and says:

- which classes and ``model_type`` it accepts (``family``, ``model_classes``; ``model_types`` only
  where ``config.model_type`` is not the family's name);
- where the parts are: :meth:`Adapter.find_vision_tower`, :meth:`Adapter.vision_layers`, the
  language model, :meth:`Adapter.has_cls_token`, ``vision_feature_layer`` and the select strategy;
- which visual inputs a forward carries and where their tokens sit (``visual_kinds``: kind ->
  :class:`VisualKind`: the pixel argument of the ``*Model`` forward, the config attribute of its
  placeholder id, the ``*Model`` method that encodes it);
- what an encoder call tells the selector (:meth:`Adapter.visual_inputs`, from the arguments of
  that method), how tokens are packed and selected (:meth:`Adapter.selector`, with the
  AnyRes helpers of ``patches/_anyres.py`` and the frame-set helpers of ``patches/_frames.py``);
- and, where it differs, how positions work (:meth:`Adapter.text_forward_inputs`) and the LLM
  backbone (:meth:`Adapter.backbone`).

The probes compute only the attention rows a method needs, from the layer's own q/k projections
(captured by hooks; the tower keeps its SDPA / FlashAttention kernels), into the stack's
per-thread state; the feature wrappers hand them, with what the encoder call says (image sizes,
grids, pixels), to the stack for the next prefill of the same thread.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
from typing import ClassVar, NamedTuple

import torch

from vtprune.engine.generation import continue_pruned_cache, placeholder_columns, refuse_chunked_prefill
from vtprune.engine.in_llm import InLLMStage
from vtprune.engine.pre_llm import PreLLMStage, visual_rows
from vtprune.engine.probe import (
    cls_attention_row,
    cls_logit_row,
    head_mean_keys,
    raw_keys,
    received_attention,
    single_head_cls_row,
)
from vtprune.engine.stages import StageStack
from vtprune.methods.base import BudgetConfig
from vtprune.patches import InstanceMethodPatch
from vtprune.patches._backbones import llm_backbone
from vtprune.types import PrefillInputs, VisualInputs, VisualLayout

PROBES = {
    "cls": cls_attention_row,
    "cls_logits": cls_logit_row,
    "received": received_attention,
    "keys": head_mean_keys,
    "cls_single_head": single_head_cls_row,
    "raw_keys": raw_keys,
}

# families whose probe rows reach the selector as the tower / projector gives them (one row per image or
# sub-image, its tokens in order), so token probes ("embeds") line up with the tokens; stacked probes
# (``Method.stacks_probes``) also need the encoder to go through ``Adapter._features_wrapper``
TOKEN_PROBE_FAMILIES = ("llava", "llava_next", "llava_original")
# families whose "embeds" probe is read off the LLM's input embeddings at each kind's visual columns
# (the projector's output as the LLM receives it), shaped like their probe rows (Adapter.llm_tokens)
LLM_TOKEN_FAMILIES = (
    *("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"),
    *("llava_onevision", "internvl", "gemma3", "idefics3", "smolvlm"),
)
STACKED_PROBE_FAMILIES = ("llava", "llava_next")


class VisualKind(NamedTuple):
    """One kind of visual input of a family: where its pixels and placeholders are, what encodes it."""

    pixels: str  # the pixel argument of the *Model forward
    token_id: str  # the config attribute holding its placeholder token id
    encoder: str  # the *Model method that encodes it (generate calls it ahead of the prefill)


IMAGES = {"image": VisualKind("pixel_values", "image_token_id", "get_image_features")}
IMAGES_AND_VIDEOS = {**IMAGES, "video": VisualKind("pixel_values_videos", "video_token_id", "get_video_features")}


def call_arguments(signature: inspect.Signature, args, kwargs) -> dict:
    """A call's arguments by name (extra keyword arguments included)."""
    arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def scatter_kinds(inputs: PrefillInputs, keeps: dict, device) -> torch.Tensor:
    """Per-kind keeps (each over its kind's columns) -> one keep over the batch's visual columns."""
    keep = torch.zeros_like(inputs.visual_mask, device=device)
    for kind, kind_keep in keeps.items():
        keep = keep.masked_scatter(inputs.kinds[kind].to(device), kind_keep)
    return keep[inputs.visual_mask.to(device)]


def stack_probes(scores: dict, names: list | None) -> dict:
    """A method's probes as one (images, N, channels) tensor, ``{"stacked": ...}``, for methods whose
    selector passes one probe (``Method.stacks_probes``): a score is one channel, tokens their width,
    in the order ``names`` lists them. A layer's output carries the [CLS] row in front of the N tokens
    the attention probes score, so every part keeps its last N rows. ``names`` None: ``scores`` as is."""
    if names is None or not scores:
        return scores
    parts = [scores[name].float() for name in names]
    parts = [part if part.dim() == 3 else part[..., None] for part in parts]
    count = min(part.shape[1] for part in parts)
    return {"stacked": torch.cat([part[:, part.shape[1] - count :] for part in parts], dim=-1)}


class Adapter:
    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # the config.model_type values it accepts; default (family,)
    model_classes: ClassVar[tuple[str, ...]]  # the *ForConditionalGeneration class first, then the *Model
    visual_kinds: ClassVar[dict[str, VisualKind]] = IMAGES
    supports_feature_replacement: ClassVar[bool] = False  # methods that rewrite visual tokens (quota)
    has_crops: ClassVar[bool] = False  # whether images come as a base image plus crops (AnyRes)
    merges_tokens: ClassVar[bool] = False  # whether the selector takes merged tokens (methods with merges = True)
    merges_crops: ClassVar[bool] = False  # whether it takes them on AnyRes crops (methods with merge_crops)
    merges_in_place: ClassVar[bool] = False  # whether it rewrites kept tokens in place (methods with merges_in_place)
    no_crops: ClassVar[str] = "sees single-resolution images: use fastervlm, fopru, random or uniform"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "model_types" not in vars(cls):
            cls.model_types = (cls.family,)

    def __init__(self, model):
        self.model = model
        self.base = self.find_base()
        self.config = self.base.config
        self.language_model = self.find_language_model()
        self.vision_tower = self.find_vision_tower()
        self.stack: StageStack | None = None
        self.probes_feature_layer = False  # whether a probe scores the layer config.vision_feature_layer names
        self.stacked_probes = None  # probe names handed over as one tensor (Method.stacks_probes)

    # -- what the model looks like (a family overrides what differs) ------------------------------
    def find_base(self) -> torch.nn.Module:
        """The module that merges images into the prompt (the ``*Model``)."""
        return self.model.model if type(self.model).__name__ == self.model_classes[0] else self.model

    def find_language_model(self) -> torch.nn.Module:
        return self.base.language_model

    def find_vision_tower(self) -> torch.nn.Module:
        return self.base.vision_tower

    @property
    def select_strategy(self) -> str:
        return self.config.vision_feature_select_strategy

    @property
    def vision_config(self):
        return self.config.vision_config

    @property
    def text_config(self):
        return self.config.text_config

    @property
    def vision_feature_layer(self):
        return self.config.vision_feature_layer

    def layout(self) -> VisualLayout:
        """One image (or sub-image) as visual tokens."""
        vision = self.vision_config
        side = vision.image_size // vision.patch_size
        prefix = 1 if self.select_strategy == "full" else 0
        return VisualLayout(num_tokens=side * side + prefix, grid=(side, side), num_prefix=prefix)

    def budget_layout(self) -> VisualLayout | None:
        """What a per-image budget counts (checked at patch time); None where grids vary per image."""
        return self.layout()

    def vision_layers(self) -> torch.nn.ModuleList:
        for path in ("vision_model.encoder.layers", "encoder.layers"):
            try:
                return self.vision_tower.get_submodule(path)
            except AttributeError:
                continue
        raise TypeError(f"cannot find the encoder layers of vision tower {type(self.vision_tower).__name__}")

    @staticmethod
    def layer_attention(layer: torch.nn.Module) -> torch.nn.Module:
        return layer.self_attn

    def has_cls_token(self) -> bool:
        embeddings = getattr(getattr(self.vision_tower, "vision_model", self.vision_tower), "embeddings", None)
        return hasattr(embeddings, "class_embedding")

    def feature_layer(self) -> torch.nn.Module:
        """The vision encoder layer whose output feeds the projector.

        ``vision_feature_layer`` indexes ``hidden_states`` (entry 0 = embeddings, entry i = output
        of encoder layer i - 1), so it is encoder layer ``(vision_feature_layer mod (L + 1)) - 1``;
        with a list of feature layers the deepest one.
        """
        layers = self.vision_layers()
        feature_layer = self.vision_feature_layer
        indices = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
        hidden_index = max(i % (len(layers) + 1) for i in indices)
        if hidden_index == 0:
            raise ValueError("vision_feature_layer selects the patch embeddings; there is no attention to score")
        return layers[hidden_index - 1]

    def vision_layer(self, layer) -> torch.nn.Module:
        """``"feature"`` or an encoder layer index -> that encoder layer."""
        if layer == "feature":
            return self.feature_layer()
        layers = self.vision_layers()
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"vision layer {layer} is outside the tower's {len(layers)} layers")
        return layers[layer]

    def vision_attention(self, layer) -> torch.nn.Module:
        """``"feature"`` or an encoder layer index -> that layer's attention module."""
        return self.layer_attention(self.vision_layer(layer))

    def projector(self) -> torch.nn.Module | None:
        """The module that maps vision features into the LLM (what a merge of vision features is
        projected with), or None where the family does not say."""
        return getattr(self.base, "multi_modal_projector", None)

    def backbone(self):
        """The decoder stack's helper for in-LLM stages (unsupported LLMs fail here, at patch time)."""
        return llm_backbone(self.language_model)

    def check_model(self) -> None:
        """Family-level refusals at patch time (e.g. a select strategy the packing does not follow)."""

    def selector(self, method, layout: VisualLayout):
        """``select(inputs, device)`` for a pre-LLM method: keep mask, TokenSelection, or None (keep all)."""
        raise NotImplementedError

    def visual_inputs(self, kind: str, arguments: dict, scores: dict) -> VisualInputs:
        """What one call of ``visual_kinds[kind].encoder`` tells the selector (its arguments by name)."""
        return VisualInputs(count=arguments["pixel_values"].shape[0], scores=scores)

    def text_forward_inputs(self, args, kwargs):
        """A forward without visual inputs: what the ``*Model`` pre-hook returns (None: as it is)."""
        return None

    # -- the install template ------------------------------------------------------------------
    def install(self, handle, methods) -> None:
        self.check_model()
        pre = [m for m in methods if m.stage == "pre_llm"]
        in_llm = [m for m in methods if m.stage == "in_llm"]
        if len(pre) > 1 or len(in_llm) > 1 or list(methods) != pre + in_llm:
            raise ValueError(
                f"the {self.family} adapter applies at most one pre-LLM stage followed by at most one in-LLM stage, "
                f"e.g. [('fastervlm', {{...}}), ('pdrop', {{...}})]; got {[f'{m.name} ({m.stage})' for m in methods]}"
            )
        pre_stage = llm_stage = None
        if pre:
            self.check_pre_llm(pre[0])
            pre_stage = (pre[0].name, PreLLMStage(pre[0], self.token_selector(pre[0])))
        if in_llm:
            llm_stage = (in_llm[0].name, InLLMStage(in_llm[0], self.backbone()))
        self.stack = StageStack(handle, self.text_config, pre_stage, llm_stage)
        handle._on_remove.append(self.stack.reset)
        hooks = handle.hooks
        hooks.extend(self.prefill_triggers())
        if pre:
            self.probes_feature_layer = any(layer == "feature" for _, layer in pre[0].vision_probes().values())
            self.stacked_probes = list(pre[0].vision_probes()) if pre[0].stacks_probes else None
            hooks.extend(self.feature_wrappers())
            for name, (kind, layer) in pre[0].vision_probes().items():
                if kind == "hidden":  # the layer's output, every token (VisionZip merges vision features)
                    hooks.append(self.vision_layer(layer).register_forward_hook(self._hidden_probe(name)))
                elif kind == "embeds":  # the projector's output: the visual tokens in LLM space (DivPrune)
                    if self.family in TOKEN_PROBE_FAMILIES:  # the others read them at selection (token_selector)
                        hooks.append(self.projector().register_forward_hook(self._hidden_probe(name)))
                else:
                    hooks.extend(self.probe_hooks(name, kind, self.vision_attention(layer)))
            if pre[0].needs_projector:
                pre[0].projector = self.projector()
        hooks.extend(self.stack.llm_hooks(self.language_model))
        if self.base is not self.model:
            hooks.extend(self.label_cut())
        if callable(getattr(self.model, "generate", None)):
            hooks.append(InstanceMethodPatch(self.model, "generate", refuse_chunked_prefill))
            prepare = continue_pruned_cache(self.stack.removed_tokens)
            hooks.append(InstanceMethodPatch(self.model, "prepare_inputs_for_generation", prepare))

    def check_pre_llm(self, method) -> None:
        """Every refusal a pre-LLM method can get from this family, at patch time."""
        if method.replaces_features and not self.supports_feature_replacement:
            raise ValueError(
                f"method {method.name!r} resizes frames (video frames, or images as frames) and is supported on "
                f"LLaVA-OneVision and Qwen2-VL; {type(self.model).__name__} is not supported yet"
            )
        needs_cls = any(kind in ("cls", "cls_logits", "cls_single_head") for kind, _ in method.vision_probes().values())
        if needs_cls and not self.has_cls_token():
            raise ValueError(
                f"method {method.name!r} scores by [CLS] attention, but the vision tower "
                f"{type(self.vision_tower).__name__} has no [CLS] token; "
                "use fopru or a score-free method (random, uniform), or opt into the substitute score "
                "(attention received, not the paper's [CLS] row) with fastervlm's score='received'"
            )
        for _, layer in method.vision_probes().values():
            self.vision_attention(layer)  # a layer outside the tower fails now
        embeds = any(kind == "embeds" for kind, _ in method.vision_probes().values())
        stacked = method.stacks_probes
        supported = STACKED_PROBE_FAMILIES if stacked else TOKEN_PROBE_FAMILIES + LLM_TOKEN_FAMILIES
        if (embeds or stacked) and self.family not in supported:
            raise ValueError(
                f"method {method.name!r} reads each image's tokens (vision features or projected tokens); the "
                f"{self.family} adapter does not hand them over yet (supported: {', '.join(supported)})"
            )
        takes_merges = (self.merges_crops and hasattr(method, "merge_crops")) if self.has_crops else self.merges_tokens
        if method.merges and not takes_merges:
            raise ValueError(
                f"method {method.name!r} merges tokens, which vtprune supports on single-resolution images of one "
                "fixed layout (llava; llava_original without AnyRes packing) and, for methods with an AnyRes rule "
                f"(visionzip), on LLaVA-NeXT; {type(self.model).__name__} is not supported yet"
            )
        if method.merges_in_place and not self.merges_in_place:
            raise ValueError(
                f"method {method.name!r} with this option merges tokens in place, the official rule of towers "
                f"without [CLS], which vtprune supports on Qwen2-VL and Qwen2.5-VL; {type(self.model).__name__} "
                "is not supported"
            )
        if method.needs_projector and self.projector() is None:
            raise ValueError(
                f"method {method.name!r} merges vision features before the projector; the {self.family} adapter "
                "does not say which module projects them"
            )
        if method.multi_crop_only and not self.has_crops:
            raise ValueError(
                f"method {method.name!r} splits a budget across the crops of high-resolution (AnyRes) images; "
                f"{type(self.model).__name__} {self.no_crops}"
            )
        budget = self.budget_layout()
        if budget is not None and isinstance(method.config, BudgetConfig):
            method.config.num_keep(budget.num_tokens)  # a budget larger than an image fails now, not mid-forward

    def token_selector(self, method):
        """The family's selector; on :data:`LLM_TOKEN_FAMILIES` it first gives each kind's "embeds"
        probes the LLM input embeddings at that kind's columns (:meth:`llm_tokens`)."""
        select = self.selector(method, self.layout())
        names = [name for name, (kind, _) in method.vision_probes().items() if kind == "embeds"]
        if not names or self.family in TOKEN_PROBE_FAMILIES:
            return select

        def select_on_tokens(inputs: PrefillInputs, device):
            visual = {}
            for kind, info in inputs.visual.items():
                tokens = self.llm_tokens(kind, info, inputs.kinds[kind], inputs.inputs_embeds)
                visual[kind] = dataclasses.replace(info, scores={**info.scores, **dict.fromkeys(names, tokens)})
            return select(dataclasses.replace(inputs, visual=visual), device)

        return select_on_tokens

    def llm_tokens(self, kind: str, info: VisualInputs, columns: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """A kind's visual tokens in LLM space, rows like its probe rows: ``embeds`` (B, L, D) at the
        (B, L) ``columns``, in (row, column) order. Here (fixed layouts, tiles): (images, N, D)."""
        rows = visual_rows(embeds, columns.to(embeds.device), int(columns.sum()))
        return rows.view(-1, self.layout().num_tokens, rows.shape[-1])

    # -- the prefill trigger --------------------------------------------------------------------
    def prefill_triggers(self) -> list:
        """What tells the stack a forward starts (a ``*Model`` pre-hook for transformers families)."""
        parameters = list(inspect.signature(self.base.forward).parameters)
        stack = self.stack

        def argument(args, kwargs, name):
            if name in kwargs:
                return kwargs[name]
            position = parameters.index(name)
            return args[position] if len(args) > position else None

        def trigger(module, args, kwargs):
            encoded = kwargs.get("mm_encoder_outputs") or {}
            raw = [kind for kind, spec in self.visual_kinds.items() if argument(args, kwargs, spec.pixels) is not None]
            pre_encoded = tuple(kind for kind in self.visual_kinds if encoded.get(kind) is not None)
            if not raw and not pre_encoded:
                stack.text_forward()
                return self.text_forward_inputs(args, kwargs)
            input_ids = argument(args, kwargs, "input_ids")
            if input_ids is None:
                raise ValueError("vtprune needs input_ids (to find the image and video tokens) when images are given")
            kinds = {
                kind: input_ids == getattr(self.config, spec.token_id)
                for kind, spec in self.visual_kinds.items()
                if kind in raw or kind in pre_encoded
            }
            visual_mask = functools.reduce(torch.logical_or, kinds.values())
            columns = {kind: placeholder_columns(encoded[kind]) for kind in pre_encoded}
            stack.start_prefill(PrefillInputs(visual_mask, kinds, encoded=pre_encoded, encoded_columns=columns))
            return None

        return [self.base.register_forward_pre_hook(trigger, with_kwargs=True)]

    # -- what the vision side produces -------------------------------------------------------------
    def feature_wrappers(self) -> list:
        """``get_*_features`` wrapped on this instance (``generate`` calls them before the prefill, with
        arguments no module hook sees): each call hands the stack its :class:`VisualInputs`."""
        return [
            InstanceMethodPatch(self.base, spec.encoder, self._features_wrapper(kind))
            for kind, spec in self.visual_kinds.items()
        ]

    def _features_wrapper(self, kind: str):
        stack = self.stack

        def make_wrapper(get_features):
            signature = inspect.signature(get_features)

            @functools.wraps(get_features)  # generate() reads its signature
            def wrapper(*args, **kwargs):
                if not stack.attached():  # a call inside handle.suspended(): not for this model's prefills
                    return get_features(*args, **kwargs)
                arguments = call_arguments(signature, args, kwargs)
                self.check_encoder_call(arguments)
                stack.take_scores()  # this call's probes only
                output = get_features(*args, **kwargs)
                visual = self.visual_inputs(kind, arguments, stack_probes(stack.take_scores(), self.stacked_probes))
                visual.columns = placeholder_columns(output)
                stack.add_visual(kind, visual)
                return output

            return wrapper

        return make_wrapper

    def check_encoder_call(self, arguments: dict) -> None:
        """Call-time overrides the patch did not plan for (``generate(..., vision_feature_layer=-1)``)
        fail here, naming the fix, instead of scoring one layer and feeding the LLM another."""
        overrides = {"vision_feature_select_strategy": lambda: self.select_strategy}  # sets the tokens per image
        if self.probes_feature_layer:
            overrides["vision_feature_layer"] = lambda: self.vision_feature_layer  # sets the scored layer
        for name, planned in overrides.items():
            value = arguments.get(name)
            if value is not None and value != planned():
                raise ValueError(
                    f"this call passes {name}={value!r}, but vtprune was patched for the model's "
                    f"config.{name}={planned()!r}; set model.config.{name} = {value!r} before vtprune.patch, or "
                    f"leave {name} out of the call"
                )

    def probe_hooks(self, name: str, kind: str, attention: torch.nn.Module) -> list:
        """Hooks that turn one attention layer's q/k projections into one score per visual token,
        (images, N) fp32, whenever the tower runs (CLIP / SigLIP attention with q_proj / k_proj)."""
        num_heads = attention.num_heads
        scale = getattr(attention, "scale", None) or getattr(attention, "scaling", None) or attention.head_dim**-0.5
        probe = PROBES[kind]
        first_column = 0 if self.select_strategy == "full" else 1
        captured = threading.local()  # per thread: q and k of the layer call in progress
        stack = self.stack

        def capture(part):
            def hook(module, args, output):
                setattr(captured, part, output)

            return hook

        def score(module, args, output):
            q, k = vars(captured).pop("q", None), vars(captured).pop("k", None)
            if q is not None and k is not None:
                stack.add_scores(name, probe(q, k, num_heads, scale)[:, first_column:])

        return [
            attention.q_proj.register_forward_hook(capture("q")),
            attention.k_proj.register_forward_hook(capture("k")),
            attention.register_forward_hook(score),
        ]

    def _hidden_probe(self, name: str):
        """A forward hook on a vision encoder layer: its output hidden states, every token, to the stack."""
        stack = self.stack

        def hook(module, args, output):
            stack.add_scores(name, output[0] if isinstance(output, tuple) else output)

        return hook

    # -- labels ---------------------------------------------------------------------------------
    def label_cut(self) -> list:
        """``labels`` are taken from the forward's arguments and the loss is computed on the pruned
        logits, with the labels cut like the sequence by every stage."""
        stack = self.stack

        def take_labels(module, args, kwargs):
            labels = kwargs.pop("labels", None)
            stack.state.family["labels"] = labels
            return (args, kwargs) if labels is not None else None

        def loss_on_pruned(module, args, kwargs, output):
            labels = stack.state.family.pop("labels", None)
            if labels is None:
                return None
            output["loss"] = module.loss_function(
                logits=output.logits,
                labels=self.pruned_labels(labels, output.logits),
                vocab_size=module.config.text_config.vocab_size,
            )
            return output

        return [
            self.model.register_forward_pre_hook(take_labels, with_kwargs=True),
            self.model.register_forward_hook(loss_on_pruned, with_kwargs=True),
        ]

    def pruned_labels(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(B, L) labels of the prompt -> the labels of the pruned logits (as they are if nothing was cut)."""
        labels = labels.to(logits.device)
        cut = self.stack.cut_labels(labels)
        return cut if cut.shape[1] == logits.shape[1] else labels
