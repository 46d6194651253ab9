"""FastV: drop the least-attended visual tokens once, after decoder layer K.

Paper: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
Large Vision-Language Models" (Chen et al., arXiv 2403.06764, ECCV 2024); official code
pkunlp-icler/FastV.

How it follows the official code (``LlamaModel.forward`` of the vendored transformers, inplace
mode, and the HF LLaVA port ``fastv_forward`` with KV cache):
- score: the post-softmax attention of layer K-1 (0-indexed; the layer that ran just before
  the cut), query row = the last prompt token, mean over heads, read at the visual columns;
- layer: layers 0..K-1 see every token, layers K.. see only the kept visual tokens
  (``k=2``: the attention of the 2nd layer ranks, the 3rd layer onwards is pruned);
- rounding: ``ratio`` R is the fraction dropped, kept = round(N * (1 - R)) as in the HF port
  (Python/torch round, half to even); ``keep_tokens`` gives the kept count directly, like the
  vendored path's ``ATTENTION_RANK``; top-k, then sorted so the original order is kept;
- positions: ``"original"`` by default, as the inplace code keeps ``position_ids = keep_indexs``;
- KV cache: pruned once at prefill; decode steps reuse the pruned cache ("static" FastV, the
  HF port's behaviour with ``use_cache=True``).

Where it deliberately differs:
- the attention row is computed by a probe from layer K-1's own norm, q/k projections and
  rotary embedding (softmax in fp32); the model keeps SDPA/FlashAttention, nothing runs
  eagerly and no ``output_attentions`` map is built;
- batches: every sample is scored with its own last prompt token and its own padding
  (official: batch element 0 only, batch size 1);
- N is all visual tokens of the sample (several images: their tokens together, as the
  maintainers advise in FastV issue #19), not a fixed ``IMAGE_TOKEN_LENGTH`` window, so the
  off-by-one ``SYS_LENGTH`` question (issue #16) does not arise; ``keep_tokens`` larger than a
  sample's visual tokens keeps them all;
- K = 0 (the official random-mask ablation) is not offered: use the ``random`` method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import CutPoint, InLLMMethod, MethodConfig
from vtprune.registry import register_method

DEFAULT_RATIO = 0.5  # the paper's R = 50%


@dataclass
class FastVConfig(MethodConfig):
    """k: the first decoder layer that sees the reduced set (the attention of layer k-1 scores).

    ratio: fraction R of the visual tokens dropped (default 0.5 when ``keep_tokens`` is not
    given); keep_tokens: visual tokens kept per sample instead of a ratio.
    """

    positions: str = "original"
    k: int = 2
    ratio: float | None = None
    keep_tokens: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.k, bool) or int(self.k) < 1:
            raise ValueError(f"fastv: k must be a decoder layer index >= 1 (layers k.. are pruned), got {self.k}")
        if self.ratio is not None and self.keep_tokens is not None:
            raise ValueError("fastv: give ratio or keep_tokens, not both")
        if self.ratio is not None and not (0.0 <= float(self.ratio) <= 1.0):
            raise ValueError(
                f"fastv: ratio is the fraction of visual tokens dropped and must be in [0, 1], got {self.ratio}"
            )
        if self.keep_tokens is not None and (isinstance(self.keep_tokens, bool) or int(self.keep_tokens) < 0):
            raise ValueError(f"fastv: keep_tokens must be an integer >= 0, got {self.keep_tokens}")

    @property
    def drop_ratio(self) -> float:
        """R, the fraction of visual tokens dropped: ``ratio``, else 0.5 (unused with ``keep_tokens``)."""
        return DEFAULT_RATIO if self.ratio is None else float(self.ratio)


@register_method
class FastV(InLLMMethod):
    name = "fastv"
    config_class = FastVConfig
    paper = "An Image is Worth 1/2 Tokens After Layer 2 (arXiv 2403.06764)"

    def schedule(self, num_layers: int) -> list[CutPoint]:
        k = int(self.config.k)
        if not 1 <= k < num_layers:
            raise ValueError(
                f"fastv: k={k} is outside the LLM's {num_layers} decoder layers; k must be in 1..{num_layers - 1} "
                "(layers 0..k-1 see every token, layers k.. the kept ones)"
            )
        return [CutPoint(probe_layer=k - 1, cut_layer=k)]

    def keeps_everything(self, layout=None) -> bool:
        return self.config.keep_tokens is None and self.config.drop_ratio == 0.0

    def keep_counts(self, cut_index: int, visual_in: torch.Tensor) -> torch.Tensor:
        if self.config.keep_tokens is not None:
            return visual_in.clamp(max=int(self.config.keep_tokens))
        return torch.round(visual_in.double() * (1.0 - self.config.drop_ratio)).long()
