"""Pool: average (or max) pooling of each image's patch grid to the budget, before the LLM.

The pooling / downsample baseline of the benchmarks: UniPruneBench "Pool"
(TianfanPeng/VLMUniPruneBench @ f93768f, ``methods/Pool_PreLLM.py::pool_prune_pre_llm``, registered
as ``pool_pre_llm``) and the pooling analogue of VTC-Bench's "Downsample" (Chenfei-Liao/VTC-Bench,
``external/DART/lmms-eval/lmms_eval/models/qwen2_vl.py``, which resizes the image instead, so it
has no token-level code to follow).

How it follows UniPruneBench: the image's visual tokens as the LLM receives them (after the
projector) are laid out as their patch grid and pooled with ``adaptive_avg_pool2d``
(``mode="max"``: ``adaptive_max_pool2d``, its ``POOLING_MODE=max``) to an (h, w) grid, read out in
raster order; the pooled tokens take the first columns of the image block and the rest are
dropped (``selected[image_start + keep_num:] = False``); positions re-compacted.

Where it deliberately differs:
- the output grid: UniPruneBench pools to s x s with s^2 = ``POOL_TARGET_TOKENS`` (4, 16, 25); here
  ``keep_tokens`` / ``keep_ratio`` give k and the grid is (h, w) = (round(sqrt(k H / W)) clamped to
  [1, H], min(W, ceil(k / h))): exactly k on a square grid when k is a square (576 -> 144 = 12 x 12,
  64 = 8 x 8; UniPruneBench's 4 / 16 / 25), else the nearest grid (``handle.last`` reports what was kept);
- prefix tokens (the [CLS] token that ``vision_feature_select_strategy="full"`` feeds the LLM) are
  kept as they are, in front of the pooled grid (UniPruneBench's InternVL tiles have none);
- each image is pooled on its own patch grid (UniPruneBench guesses H x W from the token count).

``handle.last.stages[0].merged`` gives each patch's pooling bin (adaptive bins overlap when the grid
does not divide: a patch in two bins is reported in the later one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.methods.base import BudgetConfig, Method
from vtprune.registry import register_method
from vtprune.types import MergedTokens, VisualLayout

MODES = ("average", "max")


@dataclass
class PoolConfig(BudgetConfig):
    mode: str = "average"

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"pool: mode must be one of {MODES}, got {self.mode!r}")


def pooled_grid(grid: tuple[int, int], k: int) -> tuple[int, int]:
    """The (h, w) output grid for about ``k`` tokens from an (H, W) patch grid."""
    height, width = grid
    rows = max(1, min(height, round(math.sqrt(k * height / width))))
    return rows, max(1, min(width, math.ceil(k / rows)))


def pool_bins(size: int, out: int) -> torch.Tensor:
    """(size,) the last adaptive-pooling bin each input index falls in (bin i covers
    [floor(i size / out), ceil((i + 1) size / out)): the last bin that starts at or before it)."""
    return torch.div((torch.arange(size) + 1) * out - 1, size, rounding_mode="floor")  # ceil((j + 1) out / size) - 1


@register_method
class Pool(Method):
    name = "pool"
    config_class = PoolConfig
    paper = "baseline: pooling of the patch grid (UniPruneBench Pool_PreLLM; VTC-Bench downsample)"
    merges = True  # answers with MergedTokens (the engine fills each image block's first columns)

    def output_grid(self, layout: VisualLayout) -> tuple[int, int]:
        patches = layout.grid[0] * layout.grid[1]
        k = self.config.num_keep(layout.num_tokens) - layout.num_prefix
        return pooled_grid(layout.grid, max(1, min(patches, k)))

    def keeps_everything(self, layout: VisualLayout) -> bool:
        return self.output_grid(layout) == tuple(layout.grid)

    def merge(self, scores: dict, embeds: torch.Tensor, layout: VisualLayout) -> MergedTokens:
        n, _, width = embeds.shape
        prefix = layout.num_prefix
        (height, cols), out = layout.grid, self.output_grid(layout)
        grid = embeds[:, prefix:].transpose(1, 2).reshape(n, width, height, cols)
        pool = F.adaptive_max_pool2d if self.config.mode == "max" else F.adaptive_avg_pool2d
        pooled = pool(grid, out).flatten(2).transpose(1, 2)  # (n, h * w, D), raster order
        bins = pool_bins(height, out[0])[:, None] * out[1] + pool_bins(cols, out[1])[None, :]
        sources = torch.cat([torch.arange(prefix), bins.flatten() + prefix]).to(embeds.device)
        return MergedTokens(values=torch.cat([embeds[:, :prefix], pooled], dim=1), sources=sources.expand(n, -1))
