"""Attention probes: only the attention rows a method needs, from a layer's own projections.

The model keeps its attention kernel (SDPA / FlashAttention); we never ask for
``output_attentions`` and never build an n x n attention map.
"""

from __future__ import annotations

import torch


def cls_attention_row(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Post-softmax attention of token 0 ([CLS]) over all keys, mean over heads.

    queries: (n, T, D) or (n, D) -- only token 0 is used; keys: (n, T, D) with D = heads * head_dim.
    Returns (n, T) in fp32: softmax over all T keys per head, then the mean over heads.
    """
    n, num_keys, dim = keys.shape
    head_dim = dim // num_heads
    cls_query = queries[:, 0] if queries.dim() == 3 else queries
    q = cls_query.float().view(n, num_heads, 1, head_dim)
    k = keys.float().view(n, num_keys, num_heads, head_dim).transpose(1, 2)  # (n, H, T, hd)
    logits = (q @ k.transpose(-1, -2)).squeeze(2) * scale  # (n, H, T)
    return logits.softmax(dim=-1).mean(dim=1)
