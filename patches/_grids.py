"""Patch-grid scores mapped to LLM tokens that each stand for a block of patches.

Gemma 3's projector average-pools k x k patches into one token; Idefics3 / SmolVLM's connector
concatenates s x s patches (pixel shuffle) into one token. Either way an LLM token stands for a
square block of the tower's raster patch grid, and its score is the mean of its patches' scores:
the attention its patches receive, on average.
"""

from __future__ import annotations

import torch


def block_mean(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """(images, side * side) raster patch scores -> (images, (side / kernel) ** 2): the mean of each
    kernel x kernel block, blocks in raster order."""
    images, patches = scores.shape
    side = round(patches**0.5)
    if side * side != patches or side % kernel:
        raise ValueError(f"{patches} patch scores are not a square grid of {kernel} x {kernel} blocks")
    return torch.nn.functional.avg_pool2d(scores.view(images, 1, side, side), kernel, kernel).flatten(1)
