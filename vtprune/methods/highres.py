"""Budgets over high-resolution inputs: a base image (thumbnail) plus a grid of crops.

Pure tensor helpers shared by the AnyRes-aware methods (HiRED, GlobalCom², FoPru and the
per-image budget of the others). Budgets stay integer tensors and "top k" is a rank
comparison, so a per-crop k never becomes a Python int.

Conventions: S sub-images, row 0 the base image, rows 1.. the crops in raster order of the
crop grid (nh, nw); N = h * w patch tokens per sub-image; ``valid`` (S, N) marks the tokens
that exist after the model unpads the crops (the base image is fully valid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtprune.types import CropLayout


def keep_top(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the ``k[s]`` highest-scoring valid tokens of each row. (S, N), (S, N), (S,) -> (S, N) bool.

    Ties break towards the lower index (stable sort), as ``topk`` on CPU does.
    """
    masked = torch.where(valid, scores.float(), float("-inf"))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)
    return (rank < k[:, None]) & valid


def allocate(total, weights: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Split ``total`` tokens into integer shares proportional to ``weights``, share i <= capacity i.

    The shares sum exactly to min(total, capacity.sum()): water-filling (shares that hit their
    capacity hand the surplus to the others), then the largest remainders get one more token.
    weights, capacity: (P,). Returns (P,) long.
    """
    capacity = capacity.long()
    weights = weights.double().clamp_min(0) + 1e-12  # every share with room can receive tokens
    total = torch.minimum(torch.as_tensor(total, device=capacity.device), capacity.sum())
    shares = torch.zeros_like(capacity)
    exact = torch.zeros_like(weights)
    for _ in range(capacity.numel()):  # each pass either fills a share to capacity or distributes all
        room = capacity - shares
        active = room > 0
        need = (total - shares.sum()).double()
        w = torch.where(active, weights, 0)
        exact = need * w / w.sum().clamp_min(1e-300)  # all full: nothing more to give
        shares = shares + torch.minimum(exact.floor().long(), room)
    room = capacity - shares
    need = total - shares.sum()
    remainder = torch.where(room > 0, exact - exact.floor() + 1.0, 0.0)  # entries with room first
    rank = remainder.argsort(descending=True, stable=True).argsort()
    return shares + ((rank < need) & (room > 0)).long()


def base_map_on_crops(base_scores: torch.Tensor, layout: CropLayout) -> torch.Tensor:
    """Project the base image's (N,) score map onto the crops: (S - 1, N), 0 where invalid.

    The base image shows the whole picture and the crops tile the (padded) high-resolution
    canvas, so the base map is resized bilinearly onto the bounding box of the valid region
    of the stitched crop canvas, then cut into crops.
    """
    (h, w), (nh, nw) = layout.grid, layout.crop_grid

    def to_canvas(crops):  # (nh * nw, h * w) -> (nh * h, nw * w)
        return crops.view(nh, nw, h, w).permute(0, 2, 1, 3).reshape(nh * h, nw * w)

    top, bottom, left, right = valid_box(to_canvas(layout.host_valid[1:]))
    resized = F.interpolate(
        base_scores.float().view(1, 1, h, w), size=(bottom - top, right - left), mode="bilinear", align_corners=False
    )[0, 0]
    canvas = torch.zeros(nh * h, nw * w, device=base_scores.device)
    canvas[top:bottom, left:right] = resized
    canvas = canvas * to_canvas(layout.valid[1:])
    return canvas.view(nh, h, nw, w).permute(0, 2, 1, 3).reshape(nh * nw, h * w)


def subimage_budgets(layout: CropLayout, config) -> torch.Tensor:
    """Tokens each sub-image keeps under a :class:`~vtprune.methods.base.BudgetConfig`. (S,) long.

    "per_image": k = keep_tokens, or round(keep_ratio * N) per sub-image (FasterVLM's official
    AnyRes rule), capped by the sub-image's valid tokens. "global": the sum of those,
    re-allocated over the sub-images in proportion to their valid tokens (exact total).
    """
    valid_counts = layout.valid.sum(dim=1)
    num_tokens = layout.valid.shape[1]
    if config.keep_tokens is not None:
        per_image = valid_counts.clamp(max=config.keep_tokens)
    else:
        k = max(1, int(config.keep_ratio * num_tokens + 0.5))
        per_image = valid_counts.clamp(max=k)
    if getattr(config, "budget", "per_image") == "global":
        return allocate(per_image.sum(), valid_counts.double(), valid_counts)
    return per_image


def select_each_subimage(crops: CropLayout, config, picks) -> torch.Tensor:
    """(S, N) bool keep over an AnyRes image's sub-images, each keeping its
    :func:`subimage_budgets` share: ``picks(row, tokens, budget)`` returns the indices (into
    ``tokens``, the sub-image's existing token columns) it keeps. Budgets are Python ints (CPU)."""
    budgets = subimage_budgets(CropLayout(crops.grid, crops.crop_grid, crops.host_valid), config).tolist()
    keep = torch.zeros_like(crops.valid)
    for row, budget in enumerate(budgets):  # a few sub-images per image
        if budget:
            tokens = crops.host_valid[row].nonzero().flatten().to(crops.valid.device)
            keep[row, tokens[picks(row, tokens, budget)]] = True
    return keep


def keep_rows_then_fill(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, width: int) -> torch.Tensor:
    """FoPru's row strategy on (S, N) grids of ``width`` columns: whole rows, then the best tokens.

    Rows are ranked by their summed score over valid tokens; whole rows are kept in that
    order while they fit in ``k[s]``; the remainder is filled with the highest-scoring valid
    tokens of the other rows, so exactly min(k, valid) tokens are kept. Returns (S, N) bool.
    """
    subimages, num_tokens = scores.shape
    rows = num_tokens // width
    masked = torch.where(valid, scores.float(), 0.0).view(subimages, rows, width)
    row_valid = valid.view(subimages, rows, width).sum(dim=-1)  # (S, rows)
    order = masked.sum(dim=-1).argsort(dim=-1, descending=True, stable=True)
    fits = row_valid.gather(1, order).cumsum(dim=-1) <= k[:, None]  # rows taken in rank order
    taken_rows = torch.zeros_like(fits).scatter(1, order, fits)
    taken = taken_rows[:, :, None].expand(-1, -1, width).reshape(subimages, num_tokens) & valid
    remaining = k - taken.sum(dim=-1)
    return taken | keep_top(scores, valid & ~taken, remaining)


def mask_to_indices(keep: torch.Tensor, count: int) -> torch.Tensor:
    """(S, N) bool with ``count`` True per row -> (S, count) their indices, ascending (no host sync)."""
    return (~keep).to(torch.uint8).argsort(dim=-1, stable=True)[:, :count]


def valid_box(valid: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, cols) bool on the CPU -> (top, bottom, left, right) of its True bounding box."""
    rows = valid.any(dim=1).nonzero().flatten()
    cols = valid.any(dim=0).nonzero().flatten()
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
