"""QuoTA's planning: per-frame budgets from yes-probabilities, frame grids, resizing, the plan of a frame set."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def frame_grid(tokens: int, native: tuple[int, int] | None = None) -> tuple[int, int]:
    """The grid for ``tokens`` (> 0) tokens: (h, w) with h * w <= tokens.

    Square frames (``native`` None or H == W): the official v1 rule. A non-square native (H, W)
    grid (Qwen2-VL's native resolution; the official code only meets square SigLIP frames) keeps
    its aspect ratio: h = floor(sqrt(n H / W)) (1 <= h <= n), w = floor(n / h); n = H W gives (H, W).
    """
    if native is not None and native[0] != native[1]:
        height, width = native
        h = max(1, min(tokens, math.isqrt(tokens * height // width)))
        return h, tokens // h
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


@dataclass
class FramePlan:
    """QuoTA's decision for one video: per-frame tokens and grids, and the new frame tokens."""

    yes_probability: list[float]
    tokens: list[int]  # int(T * w_i) per frame; 0 = dropped
    grids: list[tuple[int, int] | None]  # (h, w) per frame, None when dropped
    features: torch.Tensor  # (sum h * w, D): the kept frames' resized grids, raster order, frames in order
    entities: list[str] | None
    scoring_seconds: float
    decouple_seconds: float

    @property
    def frame_sizes(self) -> list[int]:
        """Tokens each frame brings after resizing: h * w, 0 when dropped."""
        return [grid[0] * grid[1] if grid else 0 for grid in self.grids]


def plan_stats(plans: list[FramePlan]) -> dict:
    """``handle.last.extra`` of one prefill: the scorer's and decoupler's time, each frame set's plan."""
    return {
        "scoring_seconds": sum(p.scoring_seconds for p in plans),
        "decouple_seconds": sum(p.decouple_seconds for p in plans),
        "frame_tokens": [p.tokens for p in plans],
        "frame_grids": [p.grids for p in plans],
        "yes_probability": [p.yes_probability for p in plans],
        "entities": [p.entities for p in plans],
    }
