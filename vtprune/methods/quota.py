"""QuoTA (method ``quota``): query-oriented per-frame token budgets and grid resizing.

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

import ast
import contextlib
import math
import re
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.methods.base import Method, MethodConfig
from vtprune.registry import register_method

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


# -- the method --------------------------------------------------------------------------------

DECOUPLE_TEMPLATE = (
    "Question: {question}\n"
    "Answer in three steps.\n"
    "Step 1: is it necessary to detect specific physical entities to answer the question? Answer yes or no.\n"
    "Step 2: list the objects mentioned in the question as a Python list.\n"
    "Step 3: keep only the physical entities, as a Python list.\n"
    "Example: Question: What color is the dog chasing the ball?\n"
    "Step 1: yes\nStep 2: ['dog', 'ball', 'color']\nStep 3: ['dog', 'ball']\n"
)
ENTITY_PROMPT = (
    "Does the image contain any object of {entities}? A. yes, B. no\nAnswer with the option's letter directly."
)
QUESTION_PROMPT = (
    "{question}\nDoes the image contain sufficient information to answer the given question? A. yes, B. no\n"
    "Answer with the option's letter directly."
)


def parse_entities(output: str) -> list[str] | None:
    """The decoupler's answer -> entities, or None (no entities needed, or unparseable).

    As the official pipeline: regexes ``step 1: (yes|no)`` and ``step 3: (\\[[^\\]]*\\])`` on the
    lower-cased text; the list is read with ``ast.literal_eval`` (the official code ``eval``s it).
    """
    text = str(output).lower()
    step1 = re.search(r"step 1: (yes|no)", text)
    if step1 is None or step1.group(1) != "yes":
        return None
    step3 = re.search(r"step 3: (\[[^\]]*\])", text)
    if step3 is None:
        return None
    try:
        value = ast.literal_eval(step3.group(1))
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, (list, tuple)):
        return None
    entities = [str(item).strip() for item in value if str(item).strip()]
    return entities or None


def scoring_prompt(question: str, entities: list[str] | None) -> str:
    if entities:
        return ENTITY_PROMPT.format(entities="{" + ", ".join(entities) + "}")
    return QUESTION_PROMPT.format(question=question)


# -- the patched model (or another VLM) as scorer and decoupler ------------------------------------


def _suspended(model):
    """Inside a forward of a vtprune-patched ``model``, call it unpruned (no-op when not patched)."""
    from vtprune.api import get_handle

    handle = get_handle(model)
    return handle.suspended() if handle is not None else contextlib.nullcontext()


def _user_turn(processor, parts: list[dict]) -> str:
    messages = [{"role": "user", "content": parts}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


class ModelScorer:
    """A VLM as QuoTA's frame scorer: one forward per frame, p(yes) = softmax(logits[:, -1])[id of "A"].

    As the official ``frame_retrieve``: each frame alone with the scoring prompt in one chat turn,
    the probability of the option letter for yes over the whole vocabulary at the last position.
    ``model`` / ``processor``: any VLM its processor can feed (default: the patched model itself,
    built by quota from ``processor=``; a patched ``model`` is run with its pruning suspended).
    Frames arrive normalised as the patched model received them; they are mapped back to [0, 1]
    with ``source``'s mean and std (default: ``processor``'s video processor, else its image
    processor: right for the patched model itself; pass the patched model's processor as
    ``source`` when scoring with another VLM) and handed to ``processor`` with
    ``do_rescale=False``: as one-frame videos when the processor has a video processor
    (``as_video``; the frame costs what it costs in the video), else as images (the official
    scorer, Qwen2-VL-2B, takes each frame as an image).
    """

    def __init__(self, model, processor, source=None, as_video: bool | None = None, yes: str = "A"):
        self.model, self.processor = model, processor
        self.as_video = getattr(processor, "video_processor", None) is not None if as_video is None else as_video
        source = source if source is not None else processor
        normaliser = getattr(source, "video_processor", None) or source.image_processor
        self.mean = torch.tensor(normaliser.image_mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(normaliser.image_std, dtype=torch.float32).view(-1, 1, 1)
        ids = processor.tokenizer.encode(yes, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == processor.tokenizer.unk_token_id:
            raise ValueError(f"quota: the scorer's tokenizer has no single token for the yes option {yes!r}: {ids}")
        self.yes_id = ids[0]

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        """(n, C, H, W) normalised frames -> (n,) fp32 yes-probabilities."""
        pictures = (frames.float().cpu() * self.std + self.mean).clamp(0, 1)
        kind = "video" if self.as_video else "image"
        text = _user_turn(self.processor, [{"type": kind}, {"type": "text", "text": prompt}])
        media = {"videos": [p[None] for p in pictures]} if self.as_video else {"images": list(pictures)}
        inputs = self.processor(
            text=[text] * len(pictures), **media, return_tensors="pt", padding=True, do_rescale=False
        )
        dtype = next(self.model.parameters()).dtype
        inputs = {k: v.to(self.model.device, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        with _suspended(self.model):
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]  # the last position only
        return logits.float().softmax(dim=-1)[:, self.yes_id]


class ModelDecoupler:
    """A VLM, text only, as QuoTA's CoT query decoupler: greedy generation on the chat-formatted prompt."""

    def __init__(self, model, processor, max_new_tokens: int = 256):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens

    @torch.no_grad()
    def __call__(self, prompt: str) -> str:
        text = _user_turn(self.processor, [{"type": "text", "text": prompt}])
        inputs = self.processor.tokenizer([text], return_tensors="pt").to(self.model.device)
        with _suspended(self.model):
            output = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        return self.processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


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

    def bind(self, model) -> None:
        """The patched model scores its own frames (and decouples queries) unless callables were given."""
        config = self.config
        if self.scorer is None:
            self.scorer = ModelScorer(model, config.processor)
        if config.decouple and self.decoupler is None:
            self.decoupler = ModelDecoupler(model, config.processor, config.decouple_max_new_tokens)

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
