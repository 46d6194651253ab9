"""QuoTA (method ``quota``): query-oriented per-frame token budgets and grid resizing.

Parts: :mod:`.plan` (budgets, grids, resizing, the plan of a frame set), :mod:`.prompts` (the
decoupling and scoring prompts), :mod:`.scorer` (a VLM as scorer and decoupler); this module holds
the config and the method.

Paper: "QuoTA: Query-oriented Token Assignment via CoT Query Decouple for Long Video
Comprehension" (arXiv 2503.08689); official code MAC-AutoML/QuoTA (``core/llava_arch.py``
``token_compress`` version v1, ``quota_pipeline.py``).

Usage::

    handle = vtprune.patch(model, "quota", processor=processor, query="What is the man holding?", keep_ratio=0.25)
    handle.set_query("another question")  # before the next forward

By default the patched model scores its own frames (:class:`ModelScorer`, run with the pruning
suspended) and, with ``decouple=True``, decouples the query itself (:class:`ModelDecoupler`);
both need the model's ``processor``. ``scorer=`` / ``decoupler=`` take any callables instead
(``scorer(frames, prompt_text) -> (num_frames,)`` yes-probabilities), e.g. a smaller VLM:
``scorer=ModelScorer(small_vlm, small_processor, source=processor)``.

Frames: the frames of a video; a one-frame video is one frame (it gets the whole budget). In an
image prompt the images of a sample play the frames (one image: one frame, which only resizes
it to the budget); an image's frame is its base (thumbnail) view, its AnyRes crops are dropped,
and it cannot grow past its own placeholders (a per-frame cap, as QuoTA's non-v1 versions have).

Qwen2-VL (native resolution, M-RoPE): every video and every image is its own frame set with its
own budget (their grids differ, so they cannot share one). A video's frames are its temporal
slices (t x h/2 x w/2 tokens; the scorer gets the first frame of each temporal pair, recovered
from the flattened patches); an image is a one-frame video. The resized frames fill the item's
first placeholders; frame i with grid (h', w') gets M-RoPE positions (s + i, s + r, s + c) from
the item's first value s, and the text after the item moves to s + its larger new side, as the
model numbers an item (see :mod:`vtprune.engine.positions`). Non-square frames keep their aspect
ratio (the official floor-sqrt grid assumes square frames), so a frame at its full share keeps
its native grid.

Rules, as in the official v1 code:
- weights: w_i = (100 p_i)^2, normalised to sum to 1 (``weight_scale=[100, 2]``);
- budget: frame i gets int(T * w_i) tokens of the total T; the sum is <= T (the official rule
  floors each share; no largest-remainder top-up); frames with 0 tokens are dropped;
- grid: h = w = floor(sqrt(n)); h += 1 when h * w < n and (h + 1) * w <= n (so the grid holds
  at most n tokens; square frames, see :func:`frame_grid` for others); no per-frame cap on video
  (v1 may up-sample a frame beyond its native grid);
- resize: "bilinear" (``F.interpolate``, align_corners=False, no antialias, the official v1),
  "pool" (adaptive average pooling, v2), "uniform" (a linspace subsample of rows and columns, v3).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch

from vtprune.methods.base import Method, MethodConfig
from vtprune.methods.quota.plan import REDUCE_MODES, FramePlan, frame_budgets, frame_grid, plan_stats, resize_frame
from vtprune.methods.quota.prompts import (
    DECOUPLE_TEMPLATE,
    ENTITY_PROMPT,
    QUESTION_PROMPT,
    chat_turn,
    parse_entities,
    scoring_prompt,
)
from vtprune.methods.quota.scorer import ModelDecoupler, ModelScorer
from vtprune.registry import register_method

__all__ = [
    "DECOUPLE_TEMPLATE",
    "ENTITY_PROMPT",
    "QUESTION_PROMPT",
    "FramePlan",
    "ModelDecoupler",
    "ModelScorer",
    "Quota",
    "QuotaConfig",
    "chat_turn",
    "frame_budgets",
    "frame_grid",
    "parse_entities",
    "resize_frame",
    "scoring_prompt",
]


def _positive_int_or_none(name, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"quota: {name} must be an integer >= 1, got {value!r}")


@dataclass
class QuotaConfig(MethodConfig):
    """QuoTA options.

    query: the user's question (str; or one str per prompt of a batch); also ``handle.set_query``.
    processor: the patched model's processor; with it the model scores its own frames
    (:class:`ModelScorer`) and decouples the query (:class:`ModelDecoupler`) by default.
    scorer: ``scorer(frames, prompt_text) -> (num_frames,)`` yes-probabilities in [0, 1]; frames
    is a (n, C, H, W) pixel tensor of one frame set, normalised as the model received them.
    budget_tokens / keep_ratio: the total T per frame set (default: the unpruned frame tokens).
    reduce: "bilinear" (official v1), "pool" (v2) or "uniform" (v3).
    decouple: run CoT query decoupling (``decoupler(prompt_text) -> generated text``, default the
    patched model, at most ``decouple_max_new_tokens`` new tokens) with ``decouple_template``.
    score_batch: frames per scorer call (official: 64).
    """

    query: object = None
    scorer: object = None
    processor: object = None
    budget_tokens: int | None = None
    keep_ratio: float | None = None
    reduce: str = "bilinear"
    decouple: bool = False
    decoupler: object = None
    decouple_template: str = DECOUPLE_TEMPLATE
    decouple_max_new_tokens: int = 256
    score_batch: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.positions != "compact":
            raise ValueError(
                "quota feeds the LLM a normal, shorter sequence (resized frames); only positions='compact' applies"
            )
        if self.reduce not in REDUCE_MODES:
            raise ValueError(f"quota: reduce must be one of {REDUCE_MODES}, got {self.reduce!r}")
        if self.scorer is not None and not callable(self.scorer):
            raise ValueError(
                "quota: scorer must be callable(frames, prompt_text) -> (num_frames,) yes-probabilities, "
                f"got {type(self.scorer).__name__}"
            )
        if self.decoupler is not None and not callable(self.decoupler):
            raise ValueError("quota: decoupler must be callable(prompt_text) -> generated text")
        needs_model = self.scorer is None or (self.decouple and self.decoupler is None)
        if needs_model and self.processor is None:
            raise ValueError(
                "quota scores frames (and decouples queries) with the patched model itself by default, which needs "
                "its processor: pass processor=<the model's processor>, or scorer=callable(frames, prompt_text) "
                "(e.g. vtprune.methods.quota.ModelScorer(small_vlm, its_processor))"
            )
        if "{question}" not in str(self.decouple_template):
            raise ValueError("quota: decouple_template must contain '{question}'")
        if self.budget_tokens is not None and self.keep_ratio is not None:
            raise ValueError("quota: give budget_tokens or keep_ratio, not both")
        _positive_int_or_none("budget_tokens", self.budget_tokens)
        _positive_int_or_none("score_batch", self.score_batch)
        _positive_int_or_none("decouple_max_new_tokens", self.decouple_max_new_tokens)
        if self.keep_ratio is not None and not (0.0 < float(self.keep_ratio) <= 1.0):
            raise ValueError(f"quota: keep_ratio must be in (0, 1], got {self.keep_ratio}")


@register_method
class Quota(Method):
    """QuoTA (arXiv 2503.08689): query-oriented per-frame token budgets before the LLM.

    Follows MAC-AutoML/QuoTA: ``quota_pipeline.py`` (CoT decoupling prompt and its regex parse,
    the two scoring prompts, yes-probability of option "A"), ``core/llava_arch.py``
    ``token_compress`` v1 (w_i = (100 p_i)^2 normalised, int(T w_i) tokens, frames with 0 dropped,
    floor-sqrt grid, bilinear ``F.interpolate`` with no per-frame cap; "pool" / "uniform" are the
    v2 / v3 reductions). Differences: the scorer defaults to the patched model itself, each frame
    as a one-frame video (official: a separate Qwen2-VL-2B, each frame as an image; any callable or
    :class:`ModelScorer` can be passed); the decoupler defaults to the patched model, greedy, 256
    new tokens (official: the LVLM, 4096), its default template paraphrases the official 3-step
    prompt with one example (official: three), and its list is read with ``ast.literal_eval``;
    unparseable output falls back to the question prompt. Layout follows the patched model, not
    ``add_token_per_grid_prune``: transformers' LLaVA-OneVision closes a video with one newline
    (kept), so no per-row newlines are added. The total budget cannot exceed the unpruned frame
    tokens (the prompt's placeholders fix the sequence; the resized tokens fill the first
    placeholders of the video, in order).
    The question reaches the method through ``query=`` or ``handle.set_query(text)``.
    Supported: LLaVA-OneVision video prompts (frames = the pooled per-frame grids) and image prompts
    (images as frames, see the module docstring); Qwen2-VL video, image and mixed prompts (each
    video / image its own frame set, M-RoPE positions for the resized frames); other adapters
    refuse the method at patch time.
    """

    name = "quota"
    config_class = QuotaConfig
    paper = "QuoTA: Query-oriented Token Assignment via CoT Query Decouple (arXiv 2503.08689)"
    replaces_features = True  # the adapter must write resized frames, not only drop columns

    def __init__(self, config):
        super().__init__(config)
        self.scorer, self.decoupler = config.scorer, config.decoupler

    def bind(self, model, handle) -> None:
        """The patched model scores its own frames (and decouples queries) unless callables were given.

        A scorer or decoupler with a ``bind(model, handle)`` method is handed the patched model's
        handle: :class:`ModelScorer` / :class:`ModelDecoupler` on the patched model itself then run
        it with its pruning suspended (``handle.suspended``)."""
        config = self.config
        if self.scorer is None:
            self.scorer = ModelScorer(model, config.processor)
        if config.decouple and self.decoupler is None:
            self.decoupler = ModelDecoupler(model, config.processor, config.decouple_max_new_tokens)
        for helper in (self.scorer, self.decoupler):
            if callable(getattr(helper, "bind", None)):  # ModelScorer, ModelDecoupler, or a user's wrapper of them
                helper.bind(model, handle)

    def plan_stats(self, plans: list[FramePlan]) -> dict:
        """``handle.last.extra`` of one prefill: the scorer's and decoupler's time, each frame set's plan."""
        return plan_stats(plans)

    def keeps_everything(self, layout=None) -> bool:
        return False

    def select(self, scores, num_images, layout, device):
        raise NotImplementedError("quota resizes video frames; its adapter calls plan_video")

    def queries(self, count: int) -> list[str]:
        query = self.config.query
        if isinstance(query, (list, tuple)):
            if len(query) != count:
                raise ValueError(f"quota: {len(query)} queries for {count} videos; give one question per video")
            queries = list(query)
        else:
            queries = [query] * count
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise ValueError(
                    "quota needs the user's question (non-empty text): pass query='...' to vtprune.patch or call "
                    "handle.set_query('...') before the forward"
                )
        return queries

    def total_budget(self, unpruned: int, frames: str = "video's") -> int:
        config = self.config
        if config.budget_tokens is not None:
            total = int(config.budget_tokens)
        elif config.keep_ratio is not None:
            total = max(1, math.floor(float(config.keep_ratio) * unpruned + 0.5))
        else:
            total = unpruned
        if total > unpruned:
            raise ValueError(
                f"quota: budget_tokens={total} exceeds the {frames} {unpruned} unpruned frame tokens; the prompt's "
                f"placeholders fix the sequence, so use budget_tokens <= {unpruned}"
            )
        return total

    def decouple(self, question: str) -> tuple[list[str] | None, float]:
        if not self.config.decouple:
            return None, 0.0
        start = time.perf_counter()
        try:
            output = self.decoupler(self.config.decouple_template.format(question=question))
            entities = parse_entities(output)
        except Exception as error:  # decoupling is an optional refinement: fall back to the question
            warnings.warn(f"quota: query decoupling failed ({error!r}); scoring with the plain question", stacklevel=2)
            entities = None
        return entities, time.perf_counter() - start

    def score_frames(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        """(n, ...) frames -> (n,) fp64 yes-probabilities, ``score_batch`` frames per scorer call."""
        parts = []
        for first in range(0, frames.shape[0], self.config.score_batch):
            chunk = frames[first : first + self.config.score_batch]
            p = torch.as_tensor(self.scorer(chunk, prompt)).detach().double().cpu().flatten()
            if p.numel() != chunk.shape[0]:
                raise ValueError(f"quota: the scorer returned {p.numel()} probabilities for {chunk.shape[0]} frames")
            parts.append(p)
        return torch.cat(parts)

    def plan_video(
        self, frames: torch.Tensor, features: torch.Tensor, question: str, cap: int | None = None, what="video's"
    ) -> FramePlan:
        """frames: (F, ...) pixels; features: (F, H, W, D) the frames' visual tokens -> :class:`FramePlan`.

        cap: at most this many tokens per frame (images, which cannot grow past their own placeholders;
        the excess is not redistributed). what: the frames' owner, for error messages.
        """
        num_frames, height, width, _ = features.shape
        if frames.shape[0] != num_frames:
            raise ValueError(f"quota: {frames.shape[0]} frames but {num_frames} frame feature grids")
        entities, decouple_seconds = self.decouple(question)
        start = time.perf_counter()
        p = self.score_frames(frames, scoring_prompt(question, entities))
        scoring_seconds = time.perf_counter() - start
        tokens = frame_budgets(p, self.total_budget(num_frames * height * width, what))
        tokens = (tokens if cap is None else tokens.clamp(max=cap)).tolist()
        if not any(tokens):
            raise ValueError(
                f"quota: the budget gives every frame 0 tokens (int(T * w_i) = 0 for all {num_frames} frames); "
                "raise budget_tokens / keep_ratio"
            )
        grids, parts = [], []
        for index, n in enumerate(tokens):
            if n <= 0:
                grids.append(None)
                continue
            grid = frame_grid(n, (height, width))
            grids.append(grid)
            if grid == (height, width):
                parts.append(features[index].reshape(height * width, -1))  # untouched, bit for bit
            else:
                parts.append(resize_frame(features[index], grid, self.config.reduce).reshape(grid[0] * grid[1], -1))
        return FramePlan(
            yes_probability=p.tolist(),
            tokens=tokens,
            grids=grids,
            features=torch.cat(parts),
            entities=entities,
            scoring_seconds=scoring_seconds,
            decouple_seconds=decouple_seconds,
        )
