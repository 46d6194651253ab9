"""What ``vtprune.patch`` returns: the undo path and the introspection of the last prefill."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch.utils.hooks import RemovableHandle

from vtprune.engine.flops import decoder_layer_flops, llm_prefill_flops
from vtprune.engine.in_llm import LLMPrefillResult
from vtprune.engine.pre_llm import PrefillResult


@dataclass
class Stage:
    """One pruning stage of the last prefill.

    layer: -1 before the LLM, else the first decoder layer that sees the reduced set.
    kept: one sorted 1-D LongTensor per sample, indexing that sample's visual tokens in their
    original order (several images: concatenated in order of appearance).
    merged: None for a plain selection (each kept token is itself); for a merge method, one 1-D
    LongTensor per sample: for each of its visual tokens, the position in ``kept`` of the token
    that carries it (its merge group), -1 where none does. A merge method's tokens fill the first
    columns of each image block (``kept`` are those columns; ``merged`` says what each holds).
    """

    name: str
    layer: int
    kept: list[torch.Tensor]
    merged: list[torch.Tensor] | None = None


class PruneRecord:
    """Statistics of the most recent prefill; decode steps do not overwrite it.

    A text-only prompt is a prefill too: its record has no stages and 0 visual tokens, and its
    FLOPs are those of the text prompt (``text_tokens``: its real tokens per sample).

    Built from the raw tensors of the prefill (the pre-LLM cut's :class:`PrefillResult`, the
    in-LLM cuts' :class:`LLMPrefillResult`) and turned into Python numbers on first access,
    so the forward pass itself reads nothing back to the host.

    Per-layer figures count real (unpadded) tokens: ``layer_tokens[b][i]`` is what decoder
    layer i processed for sample b at prefill, which is also what layer i's KV cache holds.
    """

    def __init__(
        self,
        *,
        text_config,
        pre: tuple[str, PrefillResult] | None = None,
        llm: tuple[str, LLMPrefillResult] | None = None,
        text_tokens: torch.Tensor | None = None,
        kv_bytes_per_token: int | None = None,
    ):
        if (pre is None and llm is None) == (text_tokens is None):
            raise ValueError("a PruneRecord needs a pre-LLM or an in-LLM result, or (a text-only prompt) text_tokens")
        self._pre = pre
        self._llm = llm
        self._text_tokens = text_tokens
        self._text_config = text_config
        self._kv_bytes_per_token = kv_bytes_per_token

    @cached_property
    def _per_sample(self) -> dict[str, list[int]]:
        if self._pre is not None:
            r = self._pre[1]
            visual, before, after = r.visual_in, r.real_tokens_before, r.real_tokens_after
        elif self._llm is not None:
            r = self._llm[1]
            visual, before, after = r.visual_in, r.real_in, r.real_in
        else:
            visual, before, after = torch.zeros_like(self._text_tokens), self._text_tokens, self._text_tokens
        return {"visual": visual.tolist(), "before": before.tolist(), "after": after.tolist()}

    @cached_property
    def stages(self) -> list[Stage]:
        stages = []
        if self._pre is not None:
            name, result = self._pre
            kept = [row[row >= 0] for row in result.kept_index.cpu()]
            merged = [row[row >= -1] for row in result.merged.cpu()] if result.merged is not None else None
            stages.append(Stage(name=name, layer=-1, kept=kept, merged=merged))
        if self._llm is not None:
            name, result = self._llm
            for cut in result.cuts:
                index = cut.visual_index.cpu()
                stages.append(Stage(name=name, layer=cut.layer, kept=[row[row >= 0] for row in index]))
        return stages

    @property
    def extra(self) -> dict:
        """Method-specific figures of the pre-LLM stage (e.g. QuoTA's per-frame tokens), else {}."""
        return self._pre[1].extra if self._pre is not None else {}

    @property
    def scoring_seconds(self) -> float | None:
        """Time spent scoring frames outside the LVLM's own prefill (QuoTA's scorer), else None."""
        return self.extra.get("scoring_seconds")

    @property
    def visual_tokens_in(self) -> list[int]:
        """Visual tokens per sample before pruning."""
        return self._per_sample["visual"]

    @property
    def visual_tokens_kept(self) -> list[int]:
        """Visual tokens per sample that survive the last stage (all of them when there is none)."""
        if not self.stages:
            return self.visual_tokens_in
        return [int(kept.numel()) for kept in self.stages[-1].kept]

    @cached_property
    def layer_tokens(self) -> list[list[int]]:
        """Real tokens each decoder layer processes at prefill, per sample: ``[b][layer]``."""
        num_layers = self._text_config.num_hidden_layers
        rows = []
        removed = [(cut.layer, cut.removed.tolist()) for cut in self._llm[1].cuts] if self._llm is not None else []
        for b, entering in enumerate(self._per_sample["after"]):
            counts, current = [], entering
            cuts = {layer: values[b] for layer, values in removed}
            for layer in range(num_layers):
                current -= cuts.get(layer, 0)
                counts.append(current)
            rows.append(counts)
        return rows

    @property
    def sequence_lengths(self) -> tuple[list[int], list[int]]:
        """Real (unpadded) prompt lengths per sample: before pruning, and at the last decoder layer."""
        return self._per_sample["before"], [counts[-1] for counts in self.layer_tokens]

    @property
    def flops_before(self) -> int:
        """LLM prefill FLOPs of the unpruned prompts, summed over the batch."""
        return sum(llm_prefill_flops(n, self._text_config) for n in self._per_sample["before"])

    @property
    def flops_after(self) -> int:
        """LLM prefill FLOPs with pruning: every decoder layer at its own token count."""
        return sum(decoder_layer_flops(n, self._text_config) for counts in self.layer_tokens for n in counts)

    @property
    def kv_cache_bytes(self) -> tuple[int, int] | None:
        """Bytes of the prefill's KV cache over all layers and samples: (unpruned, pruned).

        Real tokens only (padding columns of a batch are not counted); a sliding-window layer's dynamic
        cache keeps at most its last window - 1 entries (Gemma 3's local layers); None when unknown.
        """
        if self._kv_bytes_per_token is None:
            return None
        limits = self._cache_limits
        before = sum(min(n, limit) for n in self._per_sample["before"] for limit in limits)
        after = sum(min(n, limit) for counts in self.layer_tokens for n, limit in zip(counts, limits, strict=True))
        return before * self._kv_bytes_per_token, after * self._kv_bytes_per_token

    @cached_property
    def _cache_limits(self) -> list[float]:
        """Per decoder layer, the most prompt entries its dynamic cache keeps (``DynamicSlidingWindowLayer``:
        the last sliding_window - 1; otherwise every entry, inf)."""
        num_layers = self._text_config.num_hidden_layers
        try:  # transformers 5 (the original LLaVA package's 4.3x era has no sliding-window cache layers)
            from transformers.cache_utils import get_layer_types_and_kwargs
        except ImportError:
            return [float("inf")] * num_layers
        layer_types, options = get_layer_types_and_kwargs(self._text_config)
        return [
            option["sliding_window"] - 1 if kind == "sliding_attention" else float("inf")
            for kind, option in zip(layer_types[:num_layers], options[:num_layers], strict=True)
        ]

    def summary(self) -> dict:
        kv = self.kv_cache_bytes
        return {
            "stages": [
                {"name": s.name, "layer": s.layer, "kept": [int(k.numel()) for k in s.kept]} for s in self.stages
            ],
            "visual_tokens_in": self.visual_tokens_in,
            "visual_tokens_kept": self.visual_tokens_kept,
            "layer_tokens": self.layer_tokens,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "kv_cache_bytes_before": kv[0] if kv else None,
            "kv_cache_bytes_after": kv[1] if kv else None,
        }

    def __repr__(self) -> str:
        return (
            f"PruneRecord(stages={[(s.name, s.layer) for s in self.stages]}, visual_tokens_in={self.visual_tokens_in}, "
            f"visual_tokens_kept={self.visual_tokens_kept}, "
            f"flops={self.flops_after / 1e9:.2f}/{self.flops_before / 1e9:.2f} GFLOPs)"
        )


@dataclass
class PruneHandle:
    """Returned by :func:`vtprune.patch`. ``remove()`` restores the model exactly.

    ``hooks`` holds what the adapter installed: torch ``RemovableHandle``s, and instance-method
    wrappers (objects with ``obj`` and ``name``: the wrapper is ``vars(obj)[name]``) that
    ``remove()`` restores.
    """

    model: torch.nn.Module
    methods: list
    hooks: list = field(default_factory=list)
    last: PruneRecord | None = None
    _on_remove: list = field(default_factory=list)
    _copy_guards: list = field(default_factory=list)  # modules given an instance __deepcopy__ (guard_copies)
    removed: bool = False

    def remove(self) -> None:
        if self.removed:
            return
        for module in self._copy_guards:
            vars(module).pop("__deepcopy__", None)
        self._copy_guards.clear()
        for hook in reversed(self.hooks):  # last in, first out: stacked instance wrappers unwind exactly
            hook.remove()
        self.hooks.clear()
        for callback in self._on_remove:
            callback()
        self._on_remove.clear()
        self.removed = True

    @contextlib.contextmanager
    def suspended(self):
        """Run the model unpruned inside this block: vtprune's hooks are detached, then put back in place.

        For code that calls the patched model from inside one of its own forwards (quota's
        self-scorer and query decoupler): the inner call must neither prune nor touch the state of
        the prefill in progress. Hook order on every module is restored exactly; instance-method
        wrappers stay (they only annotate outputs, or are compatibility shims the model needs).
        """
        with self._detached(instance_attributes=False):
            yield self

    def guard_copies(self) -> None:
        """Make ``copy.deepcopy`` of the model, or of a module holding vtprune's hooks, an unpatched copy.

        Called by :func:`vtprune.patch` once the adapter installed everything. Without it a copy
        would carry the hooks (bound to this handle's state, and out of reach of any handle) and
        the instance-method wrappers. Each such module gets an instance ``__deepcopy__`` that
        copies it with all of vtprune detached (as :meth:`suspended`, wrappers and these guards
        included), then puts everything back; ``remove()`` takes the guards away. A forward that
        another thread runs during the copy runs unpruned.
        """
        tables = {id(table) for table, _ in self._hook_tables()}
        wrapped = {id(obj) for obj, _ in self._instance_attributes()}
        for module in self.model.modules():
            ours = id(module) in wrapped or any(id(value) in tables for value in vars(module).values())
            if module is not self.model and not ours:
                continue
            if "__deepcopy__" in vars(module):
                raise RuntimeError(f"{type(module).__name__}.__deepcopy__ is already overridden on this instance")
            vars(module)["__deepcopy__"] = self._unpatched_copier(module)
            self._copy_guards.append(module)

    def _unpatched_copier(self, module):
        def deepcopy_unpatched(memo):
            with self._detached(instance_attributes=True):
                return copy.deepcopy(module, memo)

        return deepcopy_unpatched

    def _hook_tables(self) -> list[tuple[dict, list]]:
        """Every hook dict that holds one of this handle's hooks, with its ordered contents."""
        saved = {}  # id(dict) -> (hook dict of a module, its ordered contents)
        for hook in self.hooks:
            if isinstance(hook, RemovableHandle):
                for ref in (hook.hooks_dict_ref, *hook.extra_dict_ref):
                    table = ref()
                    if table is not None and id(table) not in saved:
                        saved[id(table)] = (table, list(table.items()))
        return list(saved.values())

    def _instance_attributes(self) -> list[tuple[object, str]]:
        """(object, attribute) of every instance-method wrapper and copy guard of this handle."""
        wrappers = [(hook.obj, hook.name) for hook in self.hooks if not isinstance(hook, RemovableHandle)]
        return wrappers + [(module, "__deepcopy__") for module in self._copy_guards]

    @contextlib.contextmanager
    def _detached(self, instance_attributes: bool):
        """Take this handle's hooks (and, if asked, its instance attributes) off the model, then put them back."""
        ours = {hook.id for hook in self.hooks if isinstance(hook, RemovableHandle)}
        saved = self._hook_tables()
        for table, _ in saved:
            for key in ours & table.keys():
                del table[key]
        popped = []
        if instance_attributes:
            popped = [
                (obj, name, vars(obj).pop(name)) for obj, name in self._instance_attributes() if name in vars(obj)
            ]
        try:
            yield
        finally:
            for table, items in saved:
                before = dict(items)
                added = [(k, v) for k, v in table.items() if k not in before]  # hooks registered meanwhile
                table.clear()
                table.update(items)
                table.update(added)
            for obj, name, value in popped:
                vars(obj)[name] = value

    def set_query(self, text) -> None:
        """Give query-aware methods (quota) the user's question for the next forwards.

        ``text``: a str, or one str per video of the next batch.
        """
        targets = [m for m in self.methods if hasattr(m.config, "query")]
        if not targets:
            raise ValueError(f"no method of {self!r} takes a query")
        for method in targets:
            method.config.query = text

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = "+".join(m.name for m in self.methods)
        state = "removed" if self.removed else "active"
        return f"PruneHandle({names}, {type(self.model).__name__}, {state})"
