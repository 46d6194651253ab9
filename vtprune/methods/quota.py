"""QuoTA building blocks: per-frame budgets and grid resizing (not yet a registered method).

Paper: "QuoTA: Query-oriented Token Assignment via CoT Query Decouple for Long Video
Comprehension" (arXiv 2503.08689); official code MAC-AutoML/QuoTA (``core/llava_arch.py``
``token_compress`` version v1, ``quota_pipeline.py``).

Status: only the pure tensor rules below exist. The method itself (scorer protocol, CoT query
decoupling, and a pre-LLM cut that *replaces* each frame's features by its resized grid) is not
implemented yet, so ``quota`` is not registered; see evals/README_VIDEO.md.

Rules, as in the official v1 code:
- weights: w_i = (100 p_i)^2, normalised to sum to 1 (``weight_scale=[100, 2]``);
- budget: frame i gets int(T * w_i) tokens of the total T; the sum is <= T (the official rule
  floors each share; no largest-remainder top-up); frames with 0 tokens are dropped;
- grid: h = w = floor(sqrt(n)); h += 1 when h * w < n and (h + 1) * w <= n (so the grid holds
  at most n tokens); no per-frame cap (v1 may up-sample a frame beyond its native grid);
- resize: "bilinear" (``F.interpolate``, align_corners=False, no antialias, the official v1),
  "pool" (adaptive average pooling, v2), "uniform" (a linspace subsample of rows and columns, v3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

REDUCE_MODES = ("bilinear", "pool", "uniform")


def frame_budgets(yes_probability: torch.Tensor, total: int) -> torch.Tensor:
    """(F,) yes-probabilities in [0, 1] and the total budget T -> (F,) long tokens per frame, sum <= T.

    All-zero probabilities (no frame relevant) fall back to equal weights.
    """
    if total < 0:
        raise ValueError(f"quota: the total budget must be >= 0, got {total}")
    p = yes_probability.double()
    if p.numel() == 0:
        raise ValueError("quota: no frames to assign a budget to")
    if bool(((p < 0) | (p > 1) | p.isnan()).any()):
        raise ValueError("quota: yes-probabilities must lie in [0, 1]")
    weights = (100.0 * p) ** 2
    if float(weights.sum()) == 0.0:
        weights = torch.ones_like(weights)
    weights = weights / weights.sum()
    return (total * weights).floor().long()


def frame_grid(tokens: int) -> tuple[int, int]:
    """The official v1 grid for ``tokens`` (> 0) tokens: (h, w) with h * w <= tokens."""
    h = w = math.isqrt(tokens)
    if h * w < tokens and (h + 1) * w <= tokens:
        h += 1
    return h, w


def resize_frame(features: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(H, W, D) frame features -> (h, w, D) by the chosen reduction."""
    if mode not in REDUCE_MODES:
        raise ValueError(f"quota: reduce must be one of {REDUCE_MODES}, got {mode!r}")
    grid = features.permute(2, 0, 1)[None]  # (1, D, H, W)
    if mode == "bilinear":
        out = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    elif mode == "pool":
        out = F.adaptive_avg_pool2d(grid, size)
    else:
        rows = torch.linspace(0, features.shape[0] - 1, size[0]).round().long()
        cols = torch.linspace(0, features.shape[1] - 1, size[1]).round().long()
        out = grid[:, :, rows][:, :, :, cols]
    return out[0].permute(1, 2, 0)
