"""Adapter for transformers ``LlavaForConditionalGeneration`` / ``LlavaModel`` (LLaVA-1.5).

Hooks (all on this instance, all recorded in the handle):
- ``LlavaModel`` forward pre-hook: a forward with ``pixel_values`` starts a prefill; the image
  token positions come from ``input_ids == config.image_token_id``.
- vision tower, at the attention layer whose output feeds the projector: forward hooks on
  its ``q_proj`` / ``k_proj`` capture the projections the layer computes anyway, and a hook on
  the attention module turns them into the [CLS] attention row (no eager switch).
- ``language_model`` forward pre-hook / hook: the engine's cut (prefill) and the mask and
  position mapping for decode steps on the pruned cache.
- ``LlavaForConditionalGeneration`` pre-hook / hook: ``labels`` are cut like the sequence and
  the loss is computed on the pruned logits.

Which vision layer: ``vision_feature_layer`` indexes ``hidden_states`` (entry 0 = embeddings,
entry i = output of encoder layer i - 1), so the attention is that of encoder layer
``(vision_feature_layer mod (L + 1)) - 1``: layer 22 of 24 for LLaVA-1.5's -2, exactly
FasterVLM's ``attentions[-2]``. With a list of feature layers the deepest one is used.
"""

from __future__ import annotations

import torch

from vtprune.engine.pre_llm import PreLLMPruner
from vtprune.engine.probe import cls_attention_row
from vtprune.handle import PruneRecord
from vtprune.methods.base import BudgetConfig, VisualLayout
from vtprune.patches import register_adapter

SCORES_ATTRIBUTE = "_vtprune_scores"  # set on the vision tower's output while patched


def _kwarg(args, kwargs, name, position):
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


@register_adapter
class LlavaAdapter:
    family = "llava"
    model_types = ("llava",)
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")

    def __init__(self, model):
        self.model = model
        self.base = model.model if type(model).__name__ == "LlavaForConditionalGeneration" else model
        self.config = self.base.config
        self.vision_tower = self.base.vision_tower
        self.language_model = self.base.language_model

    # -- what the model looks like ------------------------------------------------------------
    @property
    def select_strategy(self) -> str:
        return self.config.vision_feature_select_strategy

    def layout(self) -> VisualLayout:
        vision = self.config.vision_config
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
        feature_layer = self.config.vision_feature_layer
        indices = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
        hidden_index = max(i % (len(layers) + 1) for i in indices)
        if hidden_index == 0:
            raise ValueError("vision_feature_layer selects the patch embeddings; there is no attention to score")
        return layers[hidden_index - 1].self_attn

    # -- wiring ---------------------------------------------------------------------------
    def install(self, handle, methods) -> None:
        if len(methods) != 1 or methods[0].stage != "pre_llm":
            raise ValueError(f"the {self.family} adapter supports one pre-LLM stage; got {[m.name for m in methods]}")
        method = methods[0]
        if method.score == "cls_attention" and not self.has_cls_token():
            raise ValueError(
                f"method {method.name!r} scores by [CLS] attention, but the vision tower "
                f"{type(self.vision_tower).__name__} has no [CLS] token; use a score-free method (random, uniform)"
            )
        layout = self.layout()
        if isinstance(method.config, BudgetConfig):
            method.config.num_keep(layout.num_tokens)  # a budget larger than the image fails now, not mid-forward
        text_config = self.config.text_config

        def record(result):
            handle.last = PruneRecord(method.name, result, layout.num_tokens, text_config)

        pruner = PreLLMPruner(method, layout, on_prefill=record)
        hooks = handle.hooks
        hooks.append(self.base.register_forward_pre_hook(self._start_prefill(pruner), with_kwargs=True))
        if method.score == "cls_attention":
            hooks.extend(self._install_cls_probe(pruner))
        hooks.append(self.language_model.register_forward_pre_hook(pruner.language_model_pre_hook, with_kwargs=True))
        hooks.append(self.language_model.register_forward_hook(pruner.language_model_hook, with_kwargs=True))
        if self.base is not self.model:
            hooks.extend(self._install_label_cut(pruner))
        handle._on_remove.append(pruner.reset)

    def _start_prefill(self, pruner):
        """LlavaModel pre-hook: a forward that carries images (pixels or encoded) is a prefill."""
        image_token_id = self.config.image_token_id

        def hook(module, args, kwargs):
            pixel_values = _kwarg(args, kwargs, "pixel_values", 1)
            encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
            if pixel_values is None and encoded is None:
                pruner.pending = None
                return None
            input_ids = _kwarg(args, kwargs, "input_ids", 0)
            if input_ids is None:
                raise ValueError("vtprune needs input_ids (to find the image tokens) when images are given")
            if pixel_values is not None:  # the tower runs inside this forward and delivers the scores
                pruner.begin_prefill(input_ids == image_token_id, num_images=pixel_values.shape[0])
            else:  # generate() encoded the images before the prefill: the scores rode along
                scores = getattr(encoded, SCORES_ATTRIBUTE, None)
                if pruner.method.score is not None and scores is None:
                    raise RuntimeError(
                        "the images were encoded before vtprune.patch was applied; encode them again after patching"
                    )
                pruner.begin_prefill(input_ids == image_token_id, num_images=len(encoded.pooler_output))
                pruner.pending.scores = scores
            return None

        return hook

    def _install_cls_probe(self, pruner):
        """[CLS] attention row of the feature layer, computed whenever the vision tower runs.

        The scores are attached to the tower's output (which becomes ``mm_encoder_outputs``
        when ``generate`` encodes images ahead of the prefill) and handed to a pending prefill.
        """
        attention = self.feature_attention()
        num_heads = attention.num_heads
        scale = getattr(attention, "scale", None) or getattr(attention, "scaling", None) or attention.head_dim**-0.5
        first_column = 0 if self.select_strategy == "full" else 1
        captured = {}

        def capture(name):
            def hook(module, args, output):
                captured[name] = output

            return hook

        def score(module, args, output):
            if "q" in captured and "k" in captured:
                row = cls_attention_row(captured.pop("q"), captured.pop("k"), num_heads, scale)
                captured["scores"] = row[:, first_column:]  # (num_images, N)

        def attach(module, args, output):
            scores = captured.pop("scores", None)
            setattr(output, SCORES_ATTRIBUTE, scores)
            if pruner.pending is not None and pruner.pending.scores is None:
                pruner.pending.scores = scores

        return [
            attention.q_proj.register_forward_hook(capture("q")),
            attention.k_proj.register_forward_hook(capture("k")),
            attention.register_forward_hook(score),
            self.vision_tower.register_forward_hook(attach),
        ]

    def _install_label_cut(self, pruner):
        stash = {}

        def take_labels(module, args, kwargs):
            labels = kwargs.pop("labels", None)
            stash["labels"] = labels
            return (args, kwargs) if labels is not None else None

        def loss_on_pruned(module, args, kwargs, output):
            labels = stash.pop("labels", None)
            if labels is None:
                return None
            labels = pruner.prune_labels(labels.to(output.logits.device), output.logits.shape[1])
            output["loss"] = module.loss_function(
                logits=output.logits, labels=labels, vocab_size=module.config.text_config.vocab_size
            )
            return output

        return [
            self.model.register_forward_pre_hook(take_labels, with_kwargs=True),
            self.model.register_forward_hook(loss_on_pruned, with_kwargs=True),
        ]
