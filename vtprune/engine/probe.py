"""Attention probes: only the attention rows a method needs, from a layer's own projections.

The model keeps its attention kernel (SDPA / FlashAttention); we never ask for
``output_attentions`` and never build an n x n attention map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def cls_logits(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Scaled attention logits of token 0 ([CLS]) over all keys, per head: (n, H, T) fp32.

    queries: (n, T, D) or (n, D) -- only token 0 is used; keys: (n, T, D) with D = heads * head_dim.
    """
    n, num_keys, dim = keys.shape
    head_dim = dim // num_heads
    cls_query = queries[:, 0] if queries.dim() == 3 else queries
    q = cls_query.float().view(n, num_heads, 1, head_dim)
    k = keys.float().view(n, num_keys, num_heads, head_dim).transpose(1, 2)  # (n, H, T, hd)
    return (q @ k.transpose(-1, -2)).squeeze(2) * scale


def cls_attention_row(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Post-softmax attention of token 0 ([CLS]) over all keys, mean over heads.

    Returns (n, T) in fp32: softmax over all T keys per head, then the mean over heads.
    """
    return cls_logits(queries, keys, num_heads, scale).softmax(dim=-1).mean(dim=1)


def cls_logit_row(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Pre-softmax attention of token 0 ([CLS]) over all keys, mean over heads: (n, T) fp32.

    The scaled logits q.k * scale before the softmax (GlobalCom²'s score), averaged over heads.
    """
    return cls_logits(queries, keys, num_heads, scale).mean(dim=1)


def received_attention(
    queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float, chunk: int = 256
) -> torch.Tensor:
    """Attention each key receives, averaged over heads and over all queries. (n, T, D) x 2 -> (n, T).

    Post-softmax rows, fp32, computed ``chunk`` queries at a time: at most n x H x chunk x T
    weights exist at once, never the full T x T map.
    """
    n, num_tokens, dim = keys.shape
    head_dim = dim // num_heads
    k = keys.float().view(n, num_tokens, num_heads, head_dim).transpose(1, 2)  # (n, H, T, hd)
    total = torch.zeros(n, num_heads, num_tokens, device=keys.device)
    for start in range(0, num_tokens, chunk):  # a few chunks per image, not a loop over tokens
        q = queries[:, start : start + chunk].float().view(n, -1, num_heads, head_dim).transpose(1, 2)
        total += ((q @ k.transpose(-1, -2)) * scale).softmax(dim=-1).sum(dim=2)
    return total.mean(dim=1) / num_tokens


def head_mean_keys(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """A layer's keys as its k projection gives them (unscaled), mean over heads: (n, T, D) -> (n, T, D / H)
    fp32 (VisionZip's merge metric; ``queries`` and ``scale`` unused)."""
    n, num_tokens, dim = keys.shape
    return keys.float().view(n, num_tokens, num_heads, dim // num_heads).mean(dim=2)


def single_head_cls_row(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """[CLS]'s attention with the projections taken as one head of their full width D: softmax over all
    keys of q_0 . k / sqrt(D) (PruMerge's score; ``num_heads`` and ``scale`` unused). (n, T) fp32."""
    cls_query = (queries[:, 0] if queries.dim() == 3 else queries).float()
    logits = (cls_query[:, None] @ keys.float().transpose(1, 2))[:, 0] * keys.shape[-1] ** -0.5
    return logits.softmax(dim=-1)


def raw_keys(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """A layer's keys as its k projection gives them, all heads together: (n, T, D) fp32 (PruMerge's metric)."""
    return keys.float()


@dataclass(frozen=True)
class AttentionParts:
    """What the LLM probe needs from one decoder layer (filled in by a backbone helper).

    norm: the layer's input norm; q_proj / k_proj: its projections; q_norm / k_norm: per-head
    norms applied before the rotary embedding, when the family has them (else None);
    scaling: the softmax scale; sliding_window: the layer's window, or None for full attention.
    """

    norm: Callable[[torch.Tensor], torch.Tensor]
    q_proj: Callable[[torch.Tensor], torch.Tensor]
    k_proj: Callable[[torch.Tensor], torch.Tensor]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    q_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    k_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    sliding_window: int | None = None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split layout: x * cos + (-x2, x1) * sin."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def last_token_attention(
    hidden: torch.Tensor,
    key_mask: torch.Tensor,
    parts: AttentionParts,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Post-softmax attention of each sample's last prompt token over all keys, mean over heads.

    What the decoder layer would compute for that one query row, from its own input norm,
    q/k projections (+ per-head norms), rotary ``(cos, sin)``, grouped-query head sharing and
    scale; the key padding (and the sliding window, if any) is masked, the softmax runs in
    fp32. Only one query row per sample is built, never an n x n map; the cost is one input
    norm and one k projection over the sequence.

    hidden: (B, T, D) the layer's input hidden states; key_mask: (B, T) bool, real tokens
    (the query is the last True column of each row); position_embeddings: (cos, sin), each
    (B or 1, T, head_dim), as the model passes them to the layer. Returns (B, T) fp32.
    """
    batch, length, width = hidden.shape
    heads, kv_heads, head_dim = parts.num_heads, parts.num_kv_heads, parts.head_dim
    columns = torch.arange(length, device=hidden.device)
    query_index = torch.where(key_mask, columns, -1).amax(dim=1).clamp(min=0)  # (B,)

    normed = parts.norm(hidden)
    query_in = normed.gather(1, query_index.view(batch, 1, 1).expand(batch, 1, width))
    q = parts.q_proj(query_in).view(batch, 1, heads, head_dim)
    k = parts.k_proj(normed).view(batch, length, kv_heads, head_dim)
    if parts.q_norm is not None:
        q = parts.q_norm(q)
    if parts.k_norm is not None:
        k = parts.k_norm(k)

    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)  # (B, T, hd)
    row = query_index.view(batch, 1, 1).expand(batch, 1, cos.shape[-1])
    q = _rotate(q, cos.gather(1, row)[:, :, None], sin.gather(1, row)[:, :, None])  # (B, 1, H, hd)
    k = _rotate(k, cos[:, :, None], sin[:, :, None])  # (B, T, Hkv, hd)

    # grouped-query attention: query head h reads key head h // (H / Hkv), as repeat_kv does
    q = q.float().view(batch, kv_heads, heads // kv_heads, head_dim)  # (B, Hkv, G, hd)
    k = k.float().permute(0, 2, 3, 1)  # (B, Hkv, hd, T)
    logits = (q @ k).view(batch, heads, length) * parts.scaling  # (B, H, T)

    allowed = key_mask & (columns <= query_index[:, None])
    if parts.sliding_window is not None:
        allowed = allowed & (columns > query_index[:, None] - parts.sliding_window)
    logits = logits.masked_fill(~allowed[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)
