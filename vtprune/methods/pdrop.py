"""PyramidDrop: drop visual tokens in stages inside the LLM, a pyramid of shrinking sets.

Paper: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction" (Xing et al., arXiv 2410.17247, CVPR 2025); official code
Cooperx521/PyramidDrop (``LlamaModel.pdrop_forward`` / ``pdrop_rank_drop``).

How it follows the official code (inference path):
- layers: cuts before layers ``layers`` (default 8, 16, 24 for a 32-layer LLM); layers
  0..7 see all N visual tokens, 8..15 see int(N * lam), 16..23 int(N * lam^2), 24.. int(N * lam^3);
- score: at each cut, the *next* layer's ``input_layernorm`` and q/k projections applied to the
  current hidden states, rotary at the current positions, query = the last prompt token,
  softmax over all keys in fp32, mean over heads, read at the visual columns;
- rounding: stage s keeps int(N * lam^s) (floored, relative to the original N, not stage by
  stage); top-k then sorted, so the original order is kept;
- positions: ``"compact"`` by default: positions are renumbered after every cut and decode
  positions move down by the tokens removed up to each stage, as the official code does;
- KV cache: each layer caches the tokens it processed; decode steps drop nothing.

Where it deliberately differs:
- ``layers`` may be given as fractions of depth (0.25 -> round(0.25 * L)); the default is the
  paper's 8/16/24 expressed as 1/4, 1/2, 3/4 of depth, which is exactly 8/16/24 on 32 layers and
  follows the model's depth on others (6/12/18 on 24 layers);
- grouped-query attention is handled (key heads shared as the model does; the official code
  assumes as many key heads as query heads);
- batches: each sample is scored with its own last prompt token and padding, and masks are
  rebuilt for padded batches and for eager attention (the official code is batch size 1 and
  breaks under eager attention);
- N is all visual tokens of the sample as they enter the LLM (several images together; after
  a pre-LLM stage, the tokens that stage kept). The official code tracks one image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtprune.methods.base import CutPoint, InLLMMethod, MethodConfig
from vtprune.registry import register_method

DEFAULT_DEPTH_FRACTIONS = (0.25, 0.5, 0.75)  # the paper's [8, 16, 24] of 32 layers


@dataclass
class PDropConfig(MethodConfig):
    """layers: the first decoder layer of each new stage, as layer indices (>= 1) or fractions
    of depth in (0, 1); None = the paper's 8/16/24 of 32 scaled to the model's depth.
    lam: the ratio lambda kept at each stage, in (0, 1].
    """

    positions: str = "compact"
    layers: list[float] | None = None
    lam: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.lam, bool) or not (0.0 < float(self.lam) <= 1.0):
            raise ValueError(f"pdrop: lam (the ratio kept per stage) must be in (0, 1], got {self.lam}")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not self.layers:
                raise ValueError(
                    "pdrop: layers must be a non-empty list such as [8, 16, 24] or [0.25, 0.5, 0.75]; "
                    f"got {self.layers!r}"
                )
            normalised = []
            for value in self.layers:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"pdrop: layers must be numbers, got {value!r}")
                if float(value).is_integer() and value >= 1:
                    normalised.append(int(value))
                elif 0.0 < float(value) < 1.0:
                    normalised.append(float(value))
                else:
                    raise ValueError(
                        "pdrop: each layer is a decoder layer index >= 1 or a fraction of depth in (0, 1); "
                        f"got {value!r}"
                    )
            self.layers = normalised

    def resolve_layers(self, num_layers: int) -> list[int]:
        values = self.layers if self.layers is not None else list(DEFAULT_DEPTH_FRACTIONS)
        return [value if isinstance(value, int) else math.floor(value * num_layers + 0.5) for value in values]


@register_method
class PDrop(InLLMMethod):
    name = "pdrop"
    config_class = PDropConfig
    paper = (
        "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction "
        "(arXiv 2410.17247)"
    )

    def schedule(self, num_layers: int) -> list[CutPoint]:
        layers = self.config.resolve_layers(num_layers)
        given = self.config.layers if self.config.layers is not None else "default fractions 0.25, 0.5, 0.75"
        if any(not 1 <= layer < num_layers for layer in layers) or any(a >= b for a, b in zip(layers, layers[1:])):
            raise ValueError(
                f"pdrop: layers ({given}) resolve to {layers} for an LLM with {num_layers} decoder layers; cut layers "
                f"must be strictly increasing and within 1..{num_layers - 1}. {_layers_hint(len(layers), num_layers)}"
            )
        return [CutPoint(probe_layer=layer, cut_layer=layer) for layer in layers]

    def keeps_everything(self, layout=None) -> bool:
        return float(self.config.lam) == 1.0

    def keep_counts(self, cut_index: int, visual_in: torch.Tensor) -> torch.Tensor:
        ratio = float(self.config.lam) ** (cut_index + 1)
        return torch.floor(visual_in.double() * ratio).long()


def _layers_hint(cuts: int, num_layers: int) -> str:
    """A setting that fits: ``cuts`` (or as many as fit) cut layers spread evenly over the depth."""
    if num_layers < 2:
        return f"An LLM with {num_layers} decoder layer has no layer to cut before; pdrop needs at least 2"
    fitting = min(cuts, num_layers - 1)  # cuts go before layers 1..num_layers-1
    # i * L / (n + 1) steps by at least 1 when n < L, so the floors are distinct, increasing and in 1..L-1
    layers = [i * num_layers // (fitting + 1) for i in range(1, fitting + 1)]
    if fitting < cuts:
        return (
            f"The model is too shallow for {cuts} cuts: {num_layers} decoder layers fit at most {fitting}. "
            f"Pass layers with at most {fitting} entries, e.g. layers={layers}"
        )
    return f"Pass layers explicitly, e.g. layers={layers}"
