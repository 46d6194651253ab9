"""The method role: typed configs and pure tensor selection logic.

A method never sees a transformers class. A *pre-LLM* method gets one score row per image
(or nothing, for score-free baselines) and returns, per image, the sorted indices of the
visual tokens to keep. The engine and the adapters do everything else.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

POSITION_MODES = ("compact", "original")


@dataclass(frozen=True)
class VisualLayout:
    """What one image looks like as visual tokens.

    ``num_tokens`` visual tokens per image, of which the last ``grid[0] * grid[1]`` are patches
    in raster order and the first ``num_prefix`` are extra tokens (the [CLS] token when the
    model feeds it to the LLM with ``vision_feature_select_strategy="full"``).
    """

    num_tokens: int
    grid: tuple[int, int]
    num_prefix: int = 0


@dataclass
class MethodConfig:
    """Options shared by every method.

    positions: "compact" renumbers positions after pruning, "original" keeps each token's
    original position id. Each method's default follows its official code.
    """

    positions: str = "compact"

    def __post_init__(self):
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")


@dataclass
class BudgetConfig(MethodConfig):
    """A per-image budget: give ``keep_ratio`` (k = round(ratio * N)) or ``keep_tokens`` (k)."""

    keep_ratio: float | None = None
    keep_tokens: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.keep_ratio is not None and self.keep_tokens is not None:
            raise ValueError("give keep_ratio or keep_tokens, not both")
        if self.keep_ratio is None and self.keep_tokens is None:
            raise ValueError("give a budget: keep_ratio in (0, 1] or keep_tokens >= 1")
        if self.keep_ratio is not None and not (0.0 < float(self.keep_ratio) <= 1.0):
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.keep_tokens is not None and (isinstance(self.keep_tokens, bool) or int(self.keep_tokens) < 1):
            raise ValueError(f"keep_tokens must be an integer >= 1, got {self.keep_tokens}")

    def num_keep(self, num_tokens: int) -> int:
        """Tokens to keep out of ``num_tokens``; rounds half up (576 * 0.1 = 57.6 -> 58)."""
        if self.keep_tokens is not None:
            if self.keep_tokens > num_tokens:
                raise ValueError(
                    f"keep_tokens={self.keep_tokens} is larger than the {num_tokens} visual tokens per image; "
                    f"use keep_tokens <= {num_tokens} or keep_ratio"
                )
            return int(self.keep_tokens)
        return max(1, min(num_tokens, math.floor(self.keep_ratio * num_tokens + 0.5)))


class Method:
    """Base class of a registered method.

    Subclasses set ``name``, ``config_class``, ``stage`` ("pre_llm") and ``score``: the signal
    the adapter must compute for them ("cls_attention", or None for score-free methods).
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    stage: ClassVar[str] = "pre_llm"
    score: ClassVar[str | None] = None
    paper: ClassVar[str] = ""

    def __init__(self, config: MethodConfig):
        self.config = config

    def keeps_everything(self, layout: VisualLayout) -> bool:
        return isinstance(self.config, BudgetConfig) and self.config.num_keep(layout.num_tokens) == layout.num_tokens

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
