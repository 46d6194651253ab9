"""Tensor parallelism of the vLLM score hook, without vLLM: heads split over ranks as vLLM splits them.

vLLM's ``QKVParallelLinear`` gives rank r the contiguous block of heads [r H/P, (r + 1) H/P) of q, k
and v. Each rank's hook computes its heads' mean, the group sums mean x local heads, and every rank
divides by H: the result must be the one-rank head mean over all H heads, the same on every rank.
(A real TP group is not started here: two vLLM ranks do not fit this machine's test budget.)
"""

from __future__ import annotations

import pytest
import torch

from vtprune.engine.probe import cls_attention_row, received_attention
from vtprune.integrations.vllm.scores import head_mean

HEADS, HEAD_DIM, TOKENS = 4, 8, 17


def shard(x: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
    width = HEADS // ranks * HEAD_DIM
    return x[..., rank * width : (rank + 1) * width]


@pytest.mark.parametrize("kind, probe", [("cls", cls_attention_row), ("received", received_attention)])
@pytest.mark.parametrize("ranks", [2, 4])
def test_all_reduced_head_mean_equals_the_full_head_mean_on_every_rank(kind, probe, ranks):
    generator = torch.Generator().manual_seed(0)
    queries, keys = (torch.randn(3, TOKENS, HEADS * HEAD_DIM, generator=generator) for _ in range(2))
    scale = HEAD_DIM**-0.5
    full = probe(queries, keys, HEADS, scale)  # one rank holding every head
    local = HEADS // ranks
    contributions = [probe(shard(queries, r, ranks), shard(keys, r, ranks), local, scale) * local for r in range(ranks)]

    def all_reduce(mine):  # the group's sum: every rank receives the same tensor
        assert any(torch.equal(mine, c) for c in contributions)
        return torch.stack(contributions).sum(dim=0)

    per_rank = [
        head_mean(kind, shard(queries, r, ranks), shard(keys, r, ranks), local, HEADS, scale, all_reduce)
        for r in range(ranks)
    ]
    for result in per_rank:
        assert torch.equal(result, per_rank[0])
        torch.testing.assert_close(result, full, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(contributions[0] / local, full)  # one rank's heads alone would differ


def test_one_rank_or_data_parallel_encoder_needs_no_reduction():
    queries, keys = torch.randn(2, TOKENS, HEADS * HEAD_DIM), torch.randn(2, TOKENS, HEADS * HEAD_DIM)

    def never(_):
        raise AssertionError("no all-reduce when a rank holds every head")

    result = head_mean("cls", queries, keys, HEADS, HEADS, HEAD_DIM**-0.5, never)
    assert torch.equal(result, cls_attention_row(queries, keys, HEADS, HEAD_DIM**-0.5))
