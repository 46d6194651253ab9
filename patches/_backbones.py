"""Llama-style decoder stacks the in-LLM engine understands, and where their parts are.

The in-LLM engine (:mod:`vtprune.engine.in_llm`) is model-agnostic; this helper is the only
code that knows what a decoder stack looks like inside: the ``layers`` list, the shared
``rotary_emb``, each layer's ``input_layernorm`` and ``self_attn`` (``q_proj``, ``k_proj``,
optional per-head ``q_norm`` / ``k_norm``, ``num_key_value_groups``, ``scaling``), and which
mask builder of ``transformers.masking_utils`` each layer's attention mask comes from
(full causal, or sliding window for Mistral and Qwen2 sliding layers).

Supported families (``config.model_type`` of the language model): see ``SUPPORTED``.
"""

from __future__ import annotations

import torch

from vtprune.engine.probe import AttentionParts

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class LlamaStyleBackbone:
    """A loaded ``LlamaModel`` / ``MistralModel`` / ``Qwen2Model`` / ``Qwen3Model`` decoder stack."""

    def __init__(self, language_model: torch.nn.Module):
        config = getattr(language_model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED:
            raise TypeError(
                f"in-LLM pruning does not support the language model {type(language_model).__name__} "
                f"(model_type={model_type!r}); supported LLM backbones: {', '.join(SUPPORTED)}. "
                "Pre-LLM methods (fastervlm, random, uniform) work with any LLM."
            )
        missing = [
            name
            for name in ("layers", "rotary_emb")
            if not isinstance(getattr(language_model, name, None), torch.nn.Module)
        ]
        for name in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj"):
            try:
                language_model.layers[0].get_submodule(name)
            except (AttributeError, IndexError, TypeError):
                missing.append(f"layers[0].{name}")
        if missing:
            raise TypeError(
                f"{type(language_model).__name__} (model_type={model_type!r}) lacks {', '.join(missing)}; "
                "vtprune's in-LLM engine expects a transformers Llama-style decoder stack"
            )
        self.model = language_model
        self.config = config
        self.model_type = model_type
        self.layers = language_model.layers

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def is_sliding(self, layer_index: int) -> bool:
        """Whether layer ``layer_index`` attends within a sliding window (as the model builds its mask)."""
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            return layer_types[layer_index] == "sliding_attention"
        return getattr(self.config, "sliding_window", None) is not None

    def attention_parts(self, layer_index: int) -> AttentionParts:
        layer = self.layers[layer_index]
        attention = layer.self_attn
        heads = self.config.num_attention_heads
        return AttentionParts(
            norm=layer.input_layernorm,
            q_proj=attention.q_proj,
            k_proj=attention.k_proj,
            num_heads=heads,
            num_kv_heads=heads // attention.num_key_value_groups,
            head_dim=attention.head_dim,
            scaling=attention.scaling,
            q_norm=getattr(attention, "q_norm", None),
            k_norm=getattr(attention, "k_norm", None),
            sliding_window=self.config.sliding_window if self.is_sliding(layer_index) else None,
        )

    shared_rotary = True  # every layer takes the same rotary embeddings (the model's own can be reused)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for ``position_ids`` (B, T), from the model's own rotary module."""
        return self.model.rotary_emb(hidden, position_ids)

    def layer_rotary(self, layer_index: int, embeddings):
        """What layer ``layer_index`` takes of :meth:`rotary`'s output (all of it: one for every layer)."""
        return embeddings

    def mask_kind(self, layer_index: int) -> str:
        return "sliding" if self.is_sliding(layer_index) else "full"

    def build_prefill_mask(self, layer_index: int, hidden, mask2d, cache, position_ids, visual: torch.Tensor):
        """:meth:`build_mask` at a prefill, where ``visual`` (B, q) marks the visual columns (a causal
        Llama-style mask does not depend on them; Gemma 3's image blocks do)."""
        return self.build_mask(layer_index, hidden, mask2d, cache, position_ids)

    def build_mask(self, layer_index: int, hidden: torch.Tensor, mask2d: torch.Tensor, cache, position_ids):
        """The attention mask layer ``layer_index`` gets for ``hidden`` (B, q, D) and the 2-D
        padding mask ``mask2d`` (B, keys): built by transformers' own mask builders for this
        model's attention implementation, sized by that layer's cache."""
        # imported here: transformers.masking_utils is transformers 5 only, and vtprune must import
        # under older transformers too (the original LLaVA package's pinned era)
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        build = create_sliding_window_causal_mask if self.is_sliding(layer_index) else create_causal_mask
        return build(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=mask2d,
            cache=cache,
            position_ids=position_ids,
            layer_idx=layer_index,
        )


def llm_backbone(language_model: torch.nn.Module) -> LlamaStyleBackbone:
    """The backbone helper for a loaded decoder stack, or a TypeError listing the supported ones."""
    return LlamaStyleBackbone(language_model)
