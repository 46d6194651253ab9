"""Adapter for transformers ``LlavaForConditionalGeneration`` / ``LlavaModel`` (LLaVA-1.5).

Hooks (all on this instance, all recorded in the handle):
- ``LlavaModel`` forward pre-hook: a forward with ``pixel_values`` starts a prefill; the image
  token positions come from ``input_ids == config.image_token_id``.
- vision tower, at each attention layer a method scores (by default the layer whose output
  feeds the projector): forward hooks on its ``q_proj`` / ``k_proj`` capture the projections
  the layer computes anyway, and a hook on the attention module turns them into the rows the
  method needs ([CLS] row, or attention received), with no eager switch.
- ``language_model`` forward pre-hook / hook: the pre-LLM engine's cut (prefill) and the mask
  and position mapping for decode steps on the pruned cache.
- in-LLM methods: a second ``language_model`` pre-hook / hook (after the pre-LLM ones, so it
  sees the sequence they cut) and a forward pre-hook on every decoder layer from the first
  probe layer on (``vtprune.engine.in_llm``); the decoder stack's internals come from
  ``vtprune.patches.llm_backbones``.
- ``LlavaForConditionalGeneration`` pre-hook / hook: ``labels`` are cut like the sequence (by
  every stage) and the loss is computed on the pruned logits.

Stacking: at most one pre-LLM stage followed by at most one in-LLM stage. The in-LLM stage
works on the tokens the pre-LLM stage kept; its kept indices are mapped back to the original
visual tokens through the pre-LLM cut.

Which vision layer: ``vision_feature_layer`` indexes ``hidden_states`` (entry 0 = embeddings,
entry i = output of encoder layer i - 1), so the attention is that of encoder layer
``(vision_feature_layer mod (L + 1)) - 1``: layer 22 of 24 for LLaVA-1.5's -2, exactly
FasterVLM's ``attentions[-2]``. With a list of feature layers the deepest one is used.
"""

from __future__ import annotations

import torch

from vtprune.engine.in_llm import InLLMPruner
from vtprune.engine.pre_llm import PreLLMPruner, fixed_layout_selector
from vtprune.engine.probe import cls_attention_row, received_attention
from vtprune.handle import PruneRecord
from vtprune.methods.base import BudgetConfig, VisualLayout
from vtprune.patches import register_adapter
from vtprune.patches.llm_backbones import llm_backbone

SCORES_ATTRIBUTE = "_vtprune_scores"  # set on the vision tower's output while patched


def _kwarg(args, kwargs, name, position):
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


@register_adapter
class LlavaAdapter:
    family = "llava"
    model_types = ("llava",)
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    supports_feature_replacement = False  # methods that rewrite visual tokens (quota) need the adapter's support

    def __init__(self, model):
        self.model = model
        self.base = model.model if type(model).__name__ == self.model_classes[0] else model  # the *Model
        self.config = self.base.config
        self.vision_tower = self.base.vision_tower
        self.language_model = self.base.language_model

    # -- what the model looks like ------------------------------------------------------------
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
        vision = self.vision_config
        side = vision.image_size // vision.patch_size
        prefix = 1 if self.select_strategy == "full" else 0
        return VisualLayout(num_tokens=side * side + prefix, grid=(side, side), num_prefix=prefix)

    def _vision_layers(self) -> torch.nn.ModuleList:
        for path in ("vision_model.encoder.layers", "encoder.layers"):
            try:
                return self.vision_tower.get_submodule(path)
            except AttributeError:
                continue
        raise TypeError(f"cannot find the encoder layers of vision tower {type(self.vision_tower).__name__}")

    def has_cls_token(self) -> bool:
        embeddings = getattr(getattr(self.vision_tower, "vision_model", self.vision_tower), "embeddings", None)
        return hasattr(embeddings, "class_embedding")

    def feature_attention(self) -> torch.nn.Module:
        """The attention module of the vision layer whose output feeds the projector."""
        layers = self._vision_layers()
        feature_layer = self.vision_feature_layer
        indices = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
        hidden_index = max(i % (len(layers) + 1) for i in indices)
        if hidden_index == 0:
            raise ValueError("vision_feature_layer selects the patch embeddings; there is no attention to score")
        return layers[hidden_index - 1].self_attn

    def vision_attention(self, layer) -> torch.nn.Module:
        """``"feature"`` or an encoder layer index -> that layer's attention module."""
        if layer == "feature":
            return self.feature_attention()
        layers = self._vision_layers()
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"vision layer {layer} is outside the tower's {len(layers)} layers")
        return layers[layer].self_attn

    # -- wiring ---------------------------------------------------------------------------
    def install(self, handle, methods) -> None:
        pre = [m for m in methods if m.stage == "pre_llm"]
        in_llm = [m for m in methods if m.stage == "in_llm"]
        if len(pre) > 1 or len(in_llm) > 1 or list(methods) != pre + in_llm:
            raise ValueError(
                f"the {self.family} adapter applies at most one pre-LLM stage followed by at most one in-LLM stage, "
                f"e.g. [('fastervlm', {{...}}), ('pdrop', {{...}})]; got {[f'{m.name} ({m.stage})' for m in methods]}"
            )
        layout = self.layout()
        text_config = self.text_config
        pre_pruner = self._pre_llm_pruner(pre[0], layout) if pre else None
        in_pruner = self._in_llm_pruner(in_llm[0], pre_pruner) if in_llm else None

        published: dict = {}
        record = {"text_config": text_config}
        if in_pruner is not None:
            record["kv_bytes_per_token"] = in_pruner.backbone.kv_bytes_per_token(self.language_model.dtype)

        def on_pre_llm(result):
            published["pre"] = (pre[0].name, result)
            if in_pruner is None:
                handle.last = PruneRecord(pre=published.pop("pre"), **record)

        def on_in_llm(result):
            handle.last = PruneRecord(pre=published.pop("pre", None), llm=(in_llm[0].name, result), **record)

        if pre_pruner is not None:
            pre_pruner.on_prefill = on_pre_llm
        if in_pruner is not None:
            in_pruner.on_prefill = on_in_llm

        hooks = handle.hooks
        hooks.extend(self.prefill_triggers(pre_pruner, in_pruner, published.clear))
        if pre_pruner is not None:
            hooks.extend(self.prefill_patches(pre_pruner))
            if pre_pruner.method.vision_probes():
                hooks.extend(self._install_vision_probes(pre_pruner))
            hooks.append(
                self.language_model.register_forward_pre_hook(pre_pruner.language_model_pre_hook, with_kwargs=True)
            )
            hooks.append(self.language_model.register_forward_hook(pre_pruner.language_model_hook, with_kwargs=True))
            handle._on_remove.append(pre_pruner.reset)
        if in_pruner is not None:  # registered after the pre-LLM hooks: it sees the sequence they cut
            hooks.append(
                self.language_model.register_forward_pre_hook(in_pruner.language_model_pre_hook, with_kwargs=True)
            )
            hooks.append(self.language_model.register_forward_hook(in_pruner.language_model_hook, with_kwargs=True))
            layers = in_pruner.backbone.layers
            for index in range(in_pruner.first_hooked_layer, len(layers)):
                hooks.append(layers[index].register_forward_pre_hook(in_pruner.layer_pre_hook(index), with_kwargs=True))
            handle._on_remove.append(in_pruner.reset)
        if self.base is not self.model:
            hooks.extend(self._install_label_cut(pre_pruner, in_pruner))

    def _pre_llm_pruner(self, method, layout) -> PreLLMPruner:
        if getattr(method, "replaces_features", False) and not self.supports_feature_replacement:
            raise ValueError(
                f"method {method.name!r} resizes frames (video frames, or images as frames) and is supported on "
                f"LLaVA-OneVision and Qwen2-VL; {type(self.model).__name__} is not supported yet"
            )
        needs_cls = any(kind == "cls" for kind, _ in method.vision_probes().values())
        if needs_cls and not self.has_cls_token():
            raise ValueError(
                f"method {method.name!r} scores by [CLS] attention, but the vision tower "
                f"{type(self.vision_tower).__name__} has no [CLS] token; "
                "use fopru or a score-free method (random, uniform), or opt into the substitute score "
                "(attention received, not the paper's [CLS] row) with fastervlm's score='received'"
            )
        for _, layer in method.vision_probes().values():
            self.vision_attention(layer)  # a layer outside the tower fails now
        return PreLLMPruner(method, self.token_selector(method, layout), on_prefill=None)

    def token_selector(self, method, layout):
        """How the image tokens to keep are chosen: one fixed layout per image (LLaVA-1.5)."""
        if method.multi_crop_only:
            raise ValueError(
                f"method {method.name!r} splits a budget across the crops of high-resolution (AnyRes) images; "
                f"{type(self.model).__name__} sees single-resolution images: use fastervlm, fopru, random or uniform"
            )
        if isinstance(method.config, BudgetConfig):
            method.config.num_keep(layout.num_tokens)  # a budget larger than the image fails now, not mid-forward
        return fixed_layout_selector(method, layout)

    def _in_llm_pruner(self, method, pre_pruner) -> InLLMPruner:
        backbone = llm_backbone(self.language_model)  # unsupported LLMs fail here, at patch time
        input_map = pre_pruner.map_prefill_columns if pre_pruner is not None else None
        return InLLMPruner(method, backbone, on_prefill=None, input_map=input_map)

    def prefill_triggers(self, pre_pruner, in_pruner, new_record) -> list:
        """What starts a prefill (finds the image tokens, calls the pruners' ``begin_prefill``)."""
        hook = self._start_prefill(pre_pruner, in_pruner, new_record)
        return [self.base.register_forward_pre_hook(hook, with_kwargs=True)]

    def _start_prefill(self, pre_pruner, in_pruner, new_record):
        """LlavaModel pre-hook: a forward that carries images (pixels or encoded) is a prefill."""
        image_token_id = self.config.image_token_id

        def hook(module, args, kwargs):
            pixel_values = _kwarg(args, kwargs, "pixel_values", 1)
            encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
            if pixel_values is None and encoded is None:
                if pre_pruner is not None:
                    pre_pruner.pending = None
                if in_pruner is not None:
                    in_pruner.pending = None
                return None
            input_ids = _kwarg(args, kwargs, "input_ids", 0)
            if input_ids is None:
                raise ValueError("vtprune needs input_ids (to find the image tokens) when images are given")
            image_mask = input_ids == image_token_id
            new_record()
            if pre_pruner is not None:
                num_images = pixel_values.shape[0] if pixel_values is not None else len(encoded.pooler_output)
                pre_pruner.begin_prefill(image_mask, num_images, **self.prefill_context(args, kwargs))
                if pixel_values is None:  # generate() encoded the images before the prefill: the scores rode along
                    scores = getattr(encoded, SCORES_ATTRIBUTE, None)
                    if pre_pruner.method.vision_probes() and scores is None:
                        raise RuntimeError(
                            "the images were encoded before vtprune.patch was applied; encode them again after patching"
                        )
                    pre_pruner.pending.scores = scores
            if in_pruner is not None:
                # original visual-token index of each column: images of a sample in order of appearance
                in_pruner.begin_prefill(torch.where(image_mask, image_mask.long().cumsum(dim=1) - 1, -1))
            return None

        return hook

    def prefill_context(self, args, kwargs) -> dict:
        """Extra inputs the token selector needs (none for LLaVA-1.5)."""
        return {}

    def prefill_patches(self, pruner) -> list:
        """Instance-level patches a family needs beyond module hooks (none for LLaVA-1.5)."""
        return []

    def _install_vision_probes(self, pruner):
        """The attention rows the method needs, computed whenever the vision tower runs.

        For each probe (name -> (kind, layer)) hooks capture that layer's q/k projections and
        turn them into one score per visual token, (num_images, N) fp32. The scores dict is
        attached to the tower's output (which becomes ``mm_encoder_outputs`` when ``generate``
        encodes images ahead of the prefill) and handed to a pending prefill.
        """
        first_column = 0 if self.select_strategy == "full" else 1
        scores, hooks = {}, []
        for name, (kind, layer) in pruner.method.vision_probes().items():
            hooks.extend(self._probe_hooks(self.vision_attention(layer), kind, name, first_column, scores))

        def attach(module, args, output):
            result = dict(scores)
            scores.clear()
            setattr(output, SCORES_ATTRIBUTE, result)
            if pruner.pending is not None and pruner.pending.scores is None:
                pruner.pending.scores = result

        return [*hooks, self.vision_tower.register_forward_hook(attach)]

    @staticmethod
    def _probe_hooks(attention, kind, name, first_column, scores):
        num_heads = attention.num_heads
        scale = getattr(attention, "scale", None) or getattr(attention, "scaling", None) or attention.head_dim**-0.5
        probe = {"cls": cls_attention_row, "received": received_attention}[kind]
        captured = {}

        def capture(part):
            def hook(module, args, output):
                captured[part] = output

            return hook

        def score(module, args, output):
            if "q" in captured and "k" in captured:
                row = probe(captured.pop("q"), captured.pop("k"), num_heads, scale)
                scores[name] = row[:, first_column:]  # (num_images, N)

        return [
            attention.q_proj.register_forward_hook(capture("q")),
            attention.k_proj.register_forward_hook(capture("k")),
            attention.register_forward_hook(score),
        ]

    def _install_label_cut(self, pre_pruner, in_pruner):
        stash = {}

        def take_labels(module, args, kwargs):
            labels = kwargs.pop("labels", None)
            stash["labels"] = labels
            return (args, kwargs) if labels is not None else None

        def loss_on_pruned(module, args, kwargs, output):
            labels = stash.pop("labels", None)
            if labels is None:
                return None
            labels = labels.to(output.logits.device)
            cut = pre_pruner.prune_labels(labels) if pre_pruner is not None else labels
            cut = in_pruner.cut_labels(cut) if in_pruner is not None else cut
            if cut.shape[1] == output.logits.shape[1]:  # else this forward was not pruned
                labels = cut
            output["loss"] = module.loss_function(
                logits=output.logits, labels=labels, vocab_size=module.config.text_config.vocab_size
            )
            return output

        return [
            self.model.register_forward_pre_hook(take_labels, with_kwargs=True),
            self.model.register_forward_hook(loss_on_pruned, with_kwargs=True),
        ]
