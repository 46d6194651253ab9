"""Theoretical LLM prefill FLOPs (2 FLOPs per multiply-add) and KV-cache bytes."""

from __future__ import annotations

import torch


def decoder_layer_flops(num_tokens: int, text_config) -> int:
    """FLOPs of one decoder layer over a causal prefill of ``num_tokens`` tokens.

    Projections (q, k, v, o with grouped-query k/v), the attention scores and weighted sum
    (causal: each query sees on average (n + 1) / 2 keys), and a gated MLP (gate, up, down).
    """
    n = num_tokens
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    m = text_config.intermediate_size
    projections = 2 * n * d * (2 * heads * head_dim + 2 * kv_heads * head_dim)
    attention = 2 * 2 * heads * head_dim * n * (n + 1) // 2
    mlp = 2 * 3 * n * d * m
    return projections + attention + mlp


def llm_prefill_flops(num_tokens: int, text_config) -> int:
    """FLOPs of the whole decoder stack for one sequence of ``num_tokens`` tokens."""
    return text_config.num_hidden_layers * decoder_layer_flops(num_tokens, text_config)


def kv_bytes_per_token(text_config, dtype: torch.dtype) -> int:
    """Bytes one token occupies in one layer's KV cache: keys and values of every KV head, in ``dtype``."""
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    return 2 * kv_heads * head_dim * dtype.itemsize
