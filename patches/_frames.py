"""Frame-set helpers: videos (and images taken as frames) selected frame by frame.

- :func:`select_frames`: a per-image selection on each frame of one grid (every method's
  ``select`` on a fixed layout, e.g. Qwen2-VL's temporal slices);
- :func:`select_lone_frames`: a lone-image ``select_crops`` on each frame (LLaVA-OneVision's
  pooled video frames, where the crop-budget methods work per frame too);
- :class:`FrameSet` and :func:`plan_frame_sets`: frame-replacing methods (QuoTA). A frame set
  shares one budget; the method plans it (``method.plan_video``: per-frame tokens and resized
  grids) and the resized frames overwrite the set's first columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import BudgetConfig
from vtprune.patches._anyres import select_packed
from vtprune.patches._base import scatter_kinds
from vtprune.types import CropLayout, TokenSelection, VisualLayout


def select_frames(method, scores: dict, frames: int, layout: VisualLayout, device) -> tuple[torch.Tensor, bool]:
    """One image / video: the method's per-image selection on each of its ``frames`` grids.

    Returns ((frames * N,) bool keep, whether everything was kept). A ``keep_tokens`` budget larger
    than a frame keeps the whole frame (the grids of native-resolution models vary).
    """
    config = method.config
    whole = torch.ones(frames * layout.num_tokens, dtype=torch.bool, device=device)
    if isinstance(config, BudgetConfig) and config.keep_tokens is not None and config.keep_tokens >= layout.num_tokens:
        return whole, True
    if method.keeps_everything(layout):
        return whole, True
    score = next(iter(scores.values()), None)
    kept = method.select(score, frames, layout, device)  # (frames, k)
    keep = torch.zeros(frames, layout.num_tokens, dtype=torch.bool, device=device)
    return keep.scatter_(1, kept.to(device), True).flatten(), False


def select_lone_frames(method, scores: dict, frames: int, layout: VisualLayout, device) -> list[torch.Tensor]:
    """Per frame, a lone-image ``select_crops`` on one grid: one (N,) bool per frame."""
    valid = torch.ones(1, layout.num_tokens, dtype=torch.bool, device=device)
    if method.keeps_everything(layout):
        return [valid[0]] * frames
    crops = CropLayout(layout.grid, (0, 0), valid, valid.cpu())
    return [method.select_crops({k: v[i : i + 1] for k, v in scores.items()}, crops)[0] for i in range(frames)]


@dataclass
class FrameSet:
    """Frames that share one budget (a video, or one sample's images), and where they sit.

    pixels: (F, C, H, W) as the model received them; starts: each frame's first column among the
    columns the selection covers; grid: (h, w) of a frame's tokens; question: the user's question
    for this set. shared_fill: the resized frames fill the set's columns from its first one, in
    order (a video), else each frame fills its own (an image). closing: the newline columns kept
    with the set (shared_fill: always) or with each frame (while it keeps tokens; None where there
    is none). cap: most tokens per frame. what: the frames' owner, for messages. origin: the
    family's own reference (e.g. where the set's positions start).
    """

    pixels: torch.Tensor
    starts: list[int]
    grid: tuple[int, int]
    question: str
    shared_fill: bool = True
    closing: list = ()
    cap: int | None = None
    what: str = "video's"
    origin: object = None

    @property
    def frame_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def fill(self, sizes: list[int]) -> list[tuple[int, int]]:
        """(first column, count) runs that the resized frames of ``sizes`` tokens overwrite."""
        if self.shared_fill:
            return [(self.starts[0], sum(sizes))]
        return [(first, n) for first, n in zip(self.starts, sizes, strict=True) if n]

    def kept_columns(self, sizes: list[int]) -> list[int]:
        """The newline columns that stay."""
        if self.shared_fill:
            return [c for c in self.closing if c is not None]
        return [c for c, n in zip(self.closing, sizes, strict=True) if c is not None and n]


def plan_frame_sets(method, sets: list[FrameSet], columns: torch.Tensor) -> tuple[TokenSelection, list]:
    """The method's plan of every frame set, as a selection over ``columns`` ((N, D) the covered columns).

    Sets in column order. Returns (selection with keep / replace over the covered columns and the
    resized frames' values, the plans); ``selection.keep`` is None when every frame keeps its grid
    and every column stays (bit-identical).
    """
    keep = torch.zeros(columns.shape[0], dtype=torch.bool, device=columns.device)
    replace = torch.zeros_like(keep)
    values, plans = [], []
    for frame_set in sets:  # a few per batch
        features = torch.stack([columns[a : a + frame_set.frame_tokens] for a in frame_set.starts])
        plan = method.plan_video(
            frame_set.pixels,
            features.view(len(frame_set.starts), *frame_set.grid, -1),
            frame_set.question,
            cap=frame_set.cap,
            what=frame_set.what,
        )
        plans.append(plan)
        for first, count in frame_set.fill(plan.frame_sizes):
            replace[first : first + count] = True
        keep[frame_set.kept_columns(plan.frame_sizes)] = True
        values.append(plan.features)
    keep |= replace
    stats = method.plan_stats(plans)
    if bool(keep.all()) and all(grid == s.grid for s, p in zip(sets, plans) for grid in p.grids):
        return TokenSelection(None, stats=stats), plans
    return TokenSelection(keep, replace, torch.cat(values), stats), plans


def images_and_frames_selector(method, layout: VisualLayout, frame: VisualLayout, video_newline: bool):
    """``select(inputs, device)`` for AnyRes images (``layout``, their packing) and videos of pooled
    ``frame`` grids, each frame selected like a lone image; ``video_newline``: each video's columns end
    with one newline, always kept (LLaVA-OneVision), or none (LLaVA-NeXT-Video)."""

    def select(inputs, device):
        visual = inputs.visual
        if method.keeps_everything(layout) and ("video" not in visual or method.keeps_everything(frame)):
            return None
        keeps = {}
        if "image" in visual:
            images = visual["image"]
            keeps["image"] = select_packed(method, layout.grid, images.packing, images.scores, device)
        if "video" in visual:
            video = visual["video"]
            videos, frames = video.frames
            parts = select_lone_frames(method, video.scores, videos * frames, frame, device)
            if video_newline:
                newline = parts[0][:1].new_ones(1)
                parts = [c for v in range(videos) for c in (*parts[v * frames : (v + 1) * frames], newline)]
            keeps["video"] = torch.cat(parts)
        return scatter_kinds(inputs, keeps, device)

    return select
