"""Attention scores of vLLM's vision tower, from a hook on the scored layer's fused ``qkv_proj``.

vLLM's encoder attention (``MMEncoderAttention``: SDPA / FlashAttention) returns no weights. The
hook takes the layer's q and k from its ``qkv_proj`` output and computes only the rows a method
needs, with the transformers path's own probe functions (:mod:`vtprune.engine.probe`): the [CLS]
row (O(N d) per image), or the attention each token receives (in query chunks, never an N x N map),
softmax in fp32, mean over heads.

Tensor parallelism: ``qkv_proj`` is column-parallel, so a rank sees only its heads. Each rank's
mean over its heads times its head count is summed over the TP group (``all_reduce``) and divided
by the total head count: every rank gets the full head mean, bit-equal, and keeps the same tokens.
In vLLM's data-parallel encoder mode (``mm_encoder_tp_mode="data"``) every rank holds all heads and
no reduction is needed.
"""

from __future__ import annotations

import contextlib

from vtprune.engine.probe import cls_attention_row, received_attention

PROBES = {"cls": cls_attention_row, "received": received_attention}


def head_mean(kind: str, queries, keys, local_heads: int, total_heads: int, scale: float, all_reduce=None):
    """The probe's head-mean score over all ``total_heads`` from one rank's ``local_heads``.

    all_reduce: the TP group's sum (None on one rank, or when every rank holds all heads).
    """
    score = PROBES[kind](queries, keys, local_heads, scale)
    if all_reduce is None or local_heads == total_heads:
        return score
    return all_reduce(score * local_heads) / total_heads


class ScoreProbes:
    """Forward hooks on the ``qkv_proj`` of the scored attention layers.

    attentions: probe name -> (kind, vLLM ``CLIPAttention``). Within :meth:`capture` each tower call
    leaves probe name -> (images, tokens) fp32 scores, the columns from ``first_column`` on (the
    image's tokens as the projector sees them).
    """

    def __init__(self, attentions: dict, first_column: int):
        self.first_column = first_column
        self._scores: dict | None = None
        for name, (kind, attention) in attentions.items():  # the hooks live as long as the model
            attention.qkv_proj.register_forward_hook(self._hook(name, kind, attention))

    def _hook(self, name: str, kind: str, attention):
        local_heads = attention.num_heads_per_partition
        total_heads = attention.num_heads
        all_reduce = None
        if attention.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            all_reduce = tensor_model_parallel_all_reduce

        def hook(module, args, output):
            if self._scores is None:
                return
            qkv = output[0] if isinstance(output, tuple) else output
            queries, keys, _ = qkv.chunk(3, dim=-1)
            score = head_mean(kind, queries, keys, local_heads, total_heads, attention.scale, all_reduce)
            self._scores[name] = score[:, self.first_column :]

        return hook

    @contextlib.contextmanager
    def capture(self):
        """``with probes.capture() as scores:`` run the tower; ``scores`` then holds this call's rows."""
        self._scores = scores = {}
        try:
            yield scores
        finally:
            self._scores = None
