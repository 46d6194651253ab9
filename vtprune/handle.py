"""What ``vtprune.patch`` returns: the undo path and the introspection of the last prefill."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from vtprune.engine.flops import llm_prefill_flops
from vtprune.engine.pre_llm import PrefillResult


@dataclass
class Stage:
    """One pruning stage of the last prefill.

    layer: -1 before the LLM, else the first decoder layer that sees the reduced set.
    kept: one sorted 1-D LongTensor per sample, indexing that sample's visual tokens in their
    original order (several images: concatenated in order of appearance).
    """

    name: str
    layer: int
    kept: list[torch.Tensor]


class PruneRecord:
    """Statistics of the most recent prefill; decode steps do not overwrite it.

    Built from the raw tensors of the prefill and turned into Python numbers on first access,
    so the forward pass itself reads nothing back to the host.
    """

    def __init__(self, name: str, result: PrefillResult, tokens_per_image: int, text_config):
        self._name = name
        self._result = result
        self._tokens_per_image = tokens_per_image
        self._text_config = text_config

    @cached_property
    def _per_sample(self) -> dict[str, list[int]]:
        r = self._result
        return {
            "images": r.images_per_sample.tolist(),
            "before": r.real_tokens_before.tolist(),
            "after": r.real_tokens_after.tolist(),
        }

    @cached_property
    def stages(self) -> list[Stage]:
        kept_cpu = self._result.kept.cpu()
        n, k = kept_cpu.shape
        offsets = torch.arange(n)[:, None] * self._tokens_per_image
        per_sample, start = [], 0
        for count in self._per_sample["images"]:
            # image j of the sample contributes indices j * N + kept_j
            rows = kept_cpu[start : start + count] + offsets[:count]
            per_sample.append(rows.flatten())
            start += count
        return [Stage(name=self._name, layer=-1, kept=per_sample)]

    @property
    def visual_tokens_in(self) -> list[int]:
        """Visual tokens per sample before pruning."""
        return [count * self._tokens_per_image for count in self._per_sample["images"]]

    @property
    def visual_tokens_kept(self) -> list[int]:
        """Visual tokens per sample that reach the LLM."""
        return [int(kept.numel()) for kept in self.stages[-1].kept]

    @property
    def sequence_lengths(self) -> tuple[list[int], list[int]]:
        """Real (unpadded) prompt lengths per sample, before and after pruning."""
        return self._per_sample["before"], self._per_sample["after"]

    @property
    def flops_before(self) -> int:
        """LLM prefill FLOPs of the unpruned prompts, summed over the batch."""
        return sum(llm_prefill_flops(n, self._text_config) for n in self._per_sample["before"])

    @property
    def flops_after(self) -> int:
        return sum(llm_prefill_flops(n, self._text_config) for n in self._per_sample["after"])

    def summary(self) -> dict:
        return {
            "visual_tokens_in": self.visual_tokens_in,
            "visual_tokens_kept": self.visual_tokens_kept,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
        }

    def __repr__(self) -> str:
        return (
            f"PruneRecord(visual_tokens_in={self.visual_tokens_in}, visual_tokens_kept={self.visual_tokens_kept}, "
            f"flops={self.flops_after / 1e9:.2f}/{self.flops_before / 1e9:.2f} GFLOPs)"
        )


@dataclass
class PruneHandle:
    """Returned by :func:`vtprune.patch`. ``remove()`` restores the model exactly."""

    model: torch.nn.Module
    methods: list
    hooks: list = field(default_factory=list)
    last: PruneRecord | None = None
    _on_remove: list = field(default_factory=list)
    removed: bool = False

    def remove(self) -> None:
        if self.removed:
            return
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for callback in self._on_remove:
            callback()
        self._on_remove.clear()
        self.removed = True

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = "+".join(m.name for m in self.methods)
        state = "removed" if self.removed else "active"
        return f"PruneHandle({names}, {type(self.model).__name__}, {state})"
