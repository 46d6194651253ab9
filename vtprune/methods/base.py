"""The method role: typed configs and pure tensor selection logic.

A method never sees a transformers class. A *pre-LLM* method gets one score row per image
(or nothing, for score-free baselines) and returns, per image, the sorted indices of the
visual tokens to keep. An *in-LLM* method (:class:`InLLMMethod`) names the decoder layers
where it scores and cuts, how many visual tokens each cut keeps, and picks them from one
score per column of the current sequence. The engine and the adapters do everything else.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtprune.methods.highres import keep_top, subimage_budgets
from vtprune.types import CropLayout, VisualLayout

POSITION_MODES = ("compact", "original")


def coerce(value, annotation):
    """Coerce a value (often a string from a spec or a CLI) to a dataclass field's type.

    Raises ValueError when the value does not fit (``2.5`` or ``"2.5"`` for an ``int``).
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        is_none = value is None or (isinstance(value, str) and value.lower() == "none")
        if is_none and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option)
            except (TypeError, ValueError) as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors))
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (object,)
        if isinstance(value, str):
            value = [part for part in value.replace(",", ";").split(";") if part.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return origin(coerce(part, item) for part in value)
    if annotation is bool:
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(f"expected a boolean, got {value!r}")
        return bool(value)
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(number)
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        return str(value)
    return value


class UnknownOptionError(TypeError, ValueError):
    """An option the method's config does not have.

    A TypeError, as for any unexpected keyword argument (``FasterVLMConfig(keep_token=5)``,
    ``dataclasses.replace``), and a ValueError, as for any other bad option in a spec string.
    """


@dataclass
class MethodConfig:
    """Options shared by every method.

    positions: "compact" renumbers positions after pruning, "original" keeps each token's
    original position id. Each method's default follows its official code.

    However a config is built (keywords, a spec string, ``dataclasses.replace``), an unknown
    option raises :class:`UnknownOptionError` listing the valid ones, and every field is
    coerced to its annotated type in ``__post_init__`` (``"58"`` -> 58 for an ``int``; ``2.5``
    for an ``int`` raises). Subclasses call ``super().__post_init__()`` first, then check values.
    """

    positions: str = "compact"

    def __new__(cls, *args, **kwargs):
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise UnknownOptionError(
                f"unknown option(s) {unknown} for {cls.__name__}; valid options: {', '.join(names)}"
            )
        return super().__new__(cls)

    def __post_init__(self):
        try:
            hints = typing.get_type_hints(type(self))
        except NameError as error:
            raise TypeError(
                f"cannot read the field types of {type(self).__name__} ({error}); define config classes where "
                "the names in their annotations are importable (at module level)"
            ) from None
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            try:
                object.__setattr__(self, field.name, coerce(value, hints[field.name]))
            except (TypeError, ValueError) as error:
                raise ValueError(f"{type(self).__name__}: option {field.name}={value!r}: {error}") from None
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")


BUDGETS = ("per_image", "global")


@dataclass
class BudgetConfig(MethodConfig):
    """A per-image budget: give ``keep_ratio`` (k = round(ratio * N)) or ``keep_tokens`` (k).

    budget (AnyRes models, where an image is a base image plus crops): "per_image" gives every
    sub-image the same k (FasterVLM's official rule); "global" gives the whole image
    round(ratio * its tokens), or k per sub-image in total, chosen across its sub-images.
    """

    keep_ratio: float | None = None
    keep_tokens: int | None = None
    budget: str = "per_image"

    def __post_init__(self):
        super().__post_init__()
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if self.keep_ratio is not None and self.keep_tokens is not None:
            raise ValueError("give keep_ratio or keep_tokens, not both")
        if self.keep_ratio is None and self.keep_tokens is None:
            raise ValueError("give a budget: keep_ratio in (0, 1] or keep_tokens >= 1")
        if self.keep_ratio is not None and not (0.0 < self.keep_ratio <= 1.0):
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.keep_tokens is not None and self.keep_tokens < 1:
            raise ValueError(f"keep_tokens must be an integer >= 1, got {self.keep_tokens}")

    def num_keep(self, num_tokens: int) -> int:
        """Tokens to keep out of ``num_tokens``; rounds half up (576 * 0.1 = 57.6 -> 58)."""
        if self.keep_tokens is not None:
            if self.keep_tokens > num_tokens:
                raise ValueError(
                    f"keep_tokens={self.keep_tokens} is larger than the {num_tokens} visual tokens per image; "
                    f"use keep_tokens <= {num_tokens} or keep_ratio"
                )
            return self.keep_tokens
        return max(1, min(num_tokens, math.floor(self.keep_ratio * num_tokens + 0.5)))


class Method:
    """Base class of a registered method.

    Subclasses set ``name``, ``config_class``, ``stage`` ("pre_llm" or "in_llm") and ``score``:
    the signal the adapter must compute for them ("cls_attention", "last_token_attention", or
    None for score-free methods).
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    stage: ClassVar[str] = "pre_llm"
    score: ClassVar[str | None] = None
    multi_crop_only: ClassVar[bool] = False  # budgets across AnyRes crops: needs a base image plus crops
    paper: ClassVar[str] = ""
    # What a method asks of the adapter beyond a keep mask; an adapter refuses at patch time what it cannot give.
    # Plain attributes, so that a method may compute one from its config (a property).
    merges: bool = False  # answers with MergedTokens: the engine fills each image block's first columns
    merges_in_place: bool = False  # rewrites kept tokens in place (VisionZip's rule for towers without [CLS])
    needs_projector: bool = False  # merges vision features before the projector: the adapter sets ``projector``
    replaces_features: bool = False  # the adapter writes resized frames, not only drops columns (quota)
    stacks_probes: bool = False  # its probes reach ``select`` as one (images, N, channels) tensor

    def __init__(self, config: MethodConfig):
        self.config = config

    def bind(self, model, handle) -> None:
        """Called once by ``vtprune.patch`` with the model being patched and its handle, before the
        adapter installs anything: what a method needs from its caller comes from here (quota scores
        with the model and suspends the pruning through ``handle.suspended``)."""

    def vision_probes(self) -> dict[str, tuple[str, int | str]]:
        """Attention rows the adapter computes in the vision tower: name -> (kind, layer).

        kind: an attention row, "cls" (the [CLS] query's row), "cls_logits" (its pre-softmax
        head-mean logits), "cls_single_head" (one head's row), "received" (attention each token
        receives, mean over queries); keys, "keys" (head-mean) or "raw_keys"; or tokens, "hidden"
        (the layer's output) or "embeds" (the projector's output). layer: "feature" (the layer
        feeding the projector) or an encoder index.
        """
        return {"cls": ("cls", "feature")} if self.score == "cls_attention" else {}

    def keeps_everything(self, layout: VisualLayout) -> bool:
        return isinstance(self.config, BudgetConfig) and self.config.num_keep(layout.num_tokens) == layout.num_tokens

    def size_budget(self, layout: VisualLayout) -> int | None:
        """Tokens an image of ``layout`` keeps, known from its size alone, before the tower runs.

        What a server that reserves each image's prompt slots up front (vLLM) sizes them by; None
        when the count is not a function of the size (it depends on the content or the prompt).
        Raises as :meth:`BudgetConfig.num_keep` does when the budget does not fit the layout.
        """
        if self.stage == "pre_llm" and isinstance(self.config, BudgetConfig):
            return self.config.num_keep(layout.num_tokens)
        return None

    def select_crops(self, scores: dict, crops: CropLayout) -> torch.Tensor:
        """AnyRes images: which tokens of a base image and its crops to keep, (S, N) bool.

        Default: the config's budget (see :class:`BudgetConfig`) filled with the top of the
        method's one score among the tokens that exist after unpadding.
        """
        (score,) = scores.values()
        if self.config.budget == "global":
            total = subimage_budgets(crops, self.config).sum().view(1)
            return keep_top(score.reshape(1, -1), crops.valid.reshape(1, -1), total).view_as(crops.valid)
        return keep_top(score, crops.valid, subimage_budgets(crops, self.config))

    def select(self, scores: torch.Tensor | None, num_images: int, layout: VisualLayout, device) -> torch.Tensor:
        """Return kept indices, shape (num_images, k), sorted ascending in each row."""
        raise NotImplementedError

    @classmethod
    def options(cls) -> dict[str, object]:
        """Option name -> default (``dataclasses.MISSING`` when required)."""
        return {
            f.name: (f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING)
            for f in dataclasses.fields(cls.config_class)
        }


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(n, N) scores -> (n, k) indices of the k largest, in ascending (original) order."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


@dataclass(frozen=True)
class CutPoint:
    """One in-LLM cut: score at ``probe_layer``, then layers ``cut_layer``.. see the reduced set.

    The score is the attention that ``probe_layer`` computes (its input norm and q/k
    projections applied to its input hidden states). ``probe_layer`` is ``cut_layer - 1``
    (the attention of the layer that just ran, FastV) or ``cut_layer`` (the attention the next
    layer would compute on the full set, PyramidDrop).
    """

    probe_layer: int
    cut_layer: int


class InLLMMethod(Method):
    """Base class of methods that drop visual tokens between decoder layers of the LLM.

    Subclasses implement :meth:`schedule` and :meth:`keep_counts`; :meth:`select` defaults to
    the top-k visual columns by score, in original order.
    """

    stage = "in_llm"
    score = "last_token_attention"

    def schedule(self, num_layers: int) -> list[CutPoint]:
        """The cuts, in layer order, for an LLM of ``num_layers`` decoder layers.

        Raises ValueError (at patch time) when the configured layers do not fit the model.
        """
        raise NotImplementedError

    def keep_counts(self, cut_index: int, visual_in: torch.Tensor) -> torch.Tensor:
        """Visual tokens each sample keeps after cut ``cut_index``.

        visual_in: (B,) long, the visual tokens each sample had when it entered the LLM.
        Returns (B,) long. The engine clamps to the visual tokens still present.
        """
        raise NotImplementedError

    def keeps_everything(self, layout: VisualLayout | None = None) -> bool:
        """True when the configuration never drops a token (the engine then leaves the model as is)."""
        return False

    def select(self, scores: torch.Tensor, visual: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Which visual columns survive the cut.

        scores: (B, T) fp32 score per column; visual: (B, T) bool, the visual columns;
        keep: (B,) long, how many visual columns each sample keeps. Returns (B, T) bool, True
        on the kept visual columns only.
        """
        return top_k_per_row(scores, visual, keep)


def top_k_per_row(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the ``k[b]`` highest-scoring candidate columns of each row.

    A batched top-k with a different k per row and no host sync: columns are ranked by score
    (candidates first; ties go to the earlier column) and the first ``k[b]`` ranks are kept.
    """
    batch, length = scores.shape
    ranked = scores.float().masked_fill(~candidates, float("-inf"))
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=scores.device).expand(batch, -1))
    return candidates & (rank < k.to(scores.device)[:, None])
