"""The stage stack: the stages of one patched model, in order, and the per-forward state.

A patched model has at most one pre-LLM stage (:class:`~vtprune.engine.pre_llm.PreLLMStage`,
before the LLM, on the merged sequence) followed by at most one in-LLM stage
(:class:`~vtprune.engine.in_llm.InLLMStage`, between decoder layers). The stack registers the
LLM hooks (one pre-hook and one forward hook on the decoder stack, a pre-hook on the decoder
layers the in-LLM stage needs), runs the stages in order, carries each stage's view of the
prompt to the next (the in-LLM stage gets the original visual index through the pre-LLM cut),
and publishes ``handle.last``.

The adapter tells the stack what happens in the model, through methods only:

- :meth:`StageStack.add_scores` from the vision probes and :meth:`StageStack.add_visual` from
  the ``get_*_features`` wrappers: what the vision side produced (scores, pixels, layouts);
- :meth:`StageStack.start_prefill` when a forward carries visual inputs (the visual columns of
  the merged prompt), :meth:`StageStack.text_forward` when it carries none;
- :meth:`StageStack.cut_labels` for the loss on the pruned logits.

Per-forward state (:class:`ForwardState`) is per thread: what the vision side produced, the
prefill on its way to the LLM, and the pruned prompt that later forwards on the same cache
continue. Two threads generating on one patched model each see only their own; the vision
side's output reaches the prefill of the same thread whether or not ``generate`` encoded the
images ahead of it, and whatever object accelerate's hooks or chunked prefill rebuild.

``handle.last`` describes the last prefill: after an image prompt its stages, after a
text-only prompt no stages and 0 visual tokens; later forwards on the same cache (decode steps)
leave it as it is.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from vtprune.engine.flops import kv_bytes_per_token
from vtprune.engine.generation import expansion
from vtprune.engine.in_llm import LLMPrefillResult, PrunedPromptStages
from vtprune.engine.pre_llm import PrefillResult, PrunedPrompt, visual_index
from vtprune.engine.prompt import check_prefill_cache
from vtprune.handle import PruneRecord
from vtprune.types import PrefillInputs, VisualInputs


@dataclass
class _Prompt:
    """The last pruned prefill of a thread: each stage's decode state and the cache that holds it."""

    cache: object
    pre: PrunedPrompt | None = None
    llm: PrunedPromptStages | None = None
    pre_result: PrefillResult | None = None  # published with the in-LLM result once the LLM ran


class ForwardState(threading.local):
    """One thread's per-forward state (a fresh one on every thread that uses the model)."""

    def __init__(self):
        self.scores: dict = {}  # probe name -> scores of the vision-tower call in progress
        self.visual: dict[str, VisualInputs] = {}  # kind -> what the vision side produced since the last text forward
        self.inputs: PrefillInputs | None = None  # a prefill whose visual columns were found, on its way to the LLM
        self.prompt: _Prompt | None = None  # the last pruned prefill, continued by forwards on its cache
        self.filling: _Prompt | None = None  # the prefill the LLM is running now
        self.forward = None  # the in-LLM stage's state, from the LLM pre-hook to its forward hook
        self.family: dict = {}  # the adapter's own values within one forward (labels on their way to the loss)


class StageStack:
    def __init__(self, handle, text_config, pre=None, llm=None):
        """pre / llm: (method name, stage) or None."""
        self.handle = handle
        self.text_config = text_config
        self.pre_name, self.pre = pre if pre is not None else (None, None)
        self.llm_name, self.llm = llm if llm is not None else (None, None)
        self.state = ForwardState()
        self._prompts = weakref.WeakKeyDictionary()  # cache -> the pruned prompt it holds (any thread's)
        self._pre_hook = None

    def attached(self) -> bool:
        """Whether the stack's hooks are in place now (False inside ``handle.suspended()``)."""
        table = self._pre_hook.hooks_dict_ref() if self._pre_hook is not None else None
        return table is not None and self._pre_hook.id in table

    def reset(self) -> None:
        self.state = ForwardState()
        self._prompts = weakref.WeakKeyDictionary()

    # -- what the adapter reports ---------------------------------------------------------------
    def add_scores(self, name: str, scores: torch.Tensor) -> None:
        """A vision probe's scores for the tower call in progress."""
        self.state.scores[name] = scores

    def take_scores(self) -> dict:
        """The probes' scores since the last call (one tower call's worth)."""
        scores, self.state.scores = self.state.scores, {}
        return scores

    def add_visual(self, kind: str, visual: VisualInputs) -> None:
        """What the vision side produced for ``kind`` ("image", "video"), for the prefills that follow
        (``use_cache=False`` runs several on one encoding) until a forward without visual inputs."""
        self.state.visual[kind] = visual

    def start_prefill(self, inputs: PrefillInputs) -> None:
        """This forward carries visual inputs: ``inputs.visual_mask`` says where they sit.

        The kinds not in ``inputs.encoded`` are encoded within this forward: what an earlier
        encoding left is dropped now.
        """
        state = self.state
        state.visual = {kind: visual for kind, visual in state.visual.items() if kind in inputs.encoded}
        state.inputs = inputs

    def text_forward(self) -> None:
        """This forward carries no visual inputs (a decode step, or a text-only prompt)."""
        self.state.inputs = None
        self.state.visual = {}

    def pruned_prompt(self, cache) -> PrunedPrompt | None:
        """The pre-LLM stage's pruned prompt that a forward on ``cache`` continues, else None."""
        prompt = self._prompts.get(cache) if cache is not None else None
        return prompt.pre if prompt is not None else None

    def prefill_columns(self, values: torch.Tensor, fill=0) -> torch.Tensor | None:
        """(B, L) per-column values of the prompt now entering the LLM (e.g. the token types a family's
        mask reads), cut like the prompt by the pre-LLM stage; None when no pruned prefill is entering."""
        prompt = self.state.filling
        if prompt is None or prompt.pre is None:
            return None
        return self.pre.map_columns(prompt.pre, values.to(prompt.pre.cut.source.device), fill=fill)

    def removed_tokens(self, cache) -> int:
        """How many fewer entries ``cache`` holds than the unpruned prompt would (0: not pruned by us).

        ``generate`` slices a continued prompt by the cache length (the first layer's, which only a
        pre-LLM cut shortens)."""
        prompt = self.pruned_prompt(cache)
        return prompt.original_length - prompt.pruned_mask.shape[1] if prompt is not None else 0

    def cut_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, L) labels of this thread's last prefill, cut like its prompt by every stage."""
        prompt = self.state.prompt
        if prompt is None:
            return labels
        if prompt.pre is not None:
            labels = self.pre.cut_labels(prompt.pre, labels)
        if prompt.llm is not None:
            labels = self.llm.cut_labels(prompt.llm, labels)
        return labels

    # -- the hooks --------------------------------------------------------------------------------
    def llm_hooks(self, language_model: torch.nn.Module) -> list:
        """Hooks on the decoder stack (and the decoder layers the in-LLM stage needs)."""
        self._pre_hook = language_model.register_forward_pre_hook(self._llm_pre_hook, with_kwargs=True)
        hooks = [self._pre_hook, language_model.register_forward_hook(self._llm_hook, with_kwargs=True)]
        if self.llm is not None:
            layers = self.llm.backbone.layers
            for index in range(self.llm.first_hooked_layer, len(layers)):
                hooks.append(layers[index].register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
        return hooks

    def _llm_pre_hook(self, module, args, kwargs):
        state = self.state
        state.forward = state.filling = None
        inputs, state.inputs = state.inputs, None
        cache = kwargs.get("cache")
        if inputs is not None:
            return self._prefill(inputs, args, kwargs)
        prompt = self._prompts.get(cache) if cache is not None else None
        if prompt is not None:  # a forward on a cache a prefill here pruned: this thread continues it
            state.prompt = prompt
            return self._decode(prompt, args, kwargs)
        if cache is None or cache.get_seq_length() == 0:  # a text-only prompt
            state.prompt = None
            self._publish_text(module, kwargs)
        return None

    def _prefill(self, inputs: PrefillInputs, args, kwargs):
        _keyword_only(args)
        cache = kwargs.get("cache")
        check_prefill_cache(cache)
        state = self.state
        missing = [kind for kind in inputs.encoded if kind not in state.visual] if self.pre is not None else []
        if missing:
            raise RuntimeError(
                f"this prefill's {' and '.join(missing)} features were encoded where vtprune did not see it (before "
                "vtprune.patch was applied, or in another thread): encode them after patching, in the thread that "
                "runs the prefill (generate() does), or pass the pixels"
            )
        inputs.visual = {kind: state.visual[kind] for kind in inputs.kinds if kind in state.visual}
        inputs = expansion(inputs, kwargs["inputs_embeds"].shape[0])
        prompt = _Prompt(cache)
        new_kwargs = kwargs
        if self.pre is not None:
            new_kwargs, prompt.pre_result = self.pre.prefill(inputs, kwargs)
            prompt.pre = prompt.pre_result.prompt
        if self.llm is not None:
            columns = visual_index(inputs.visual_mask.to(kwargs["inputs_embeds"].device))
            if prompt.pre is not None:
                columns = self.pre.map_columns(prompt.pre, columns)
            state.forward = self.llm.start_prefill(columns, new_kwargs)
        state.prompt = state.filling = prompt
        return args, new_kwargs

    def _decode(self, prompt: _Prompt, args, kwargs):
        _keyword_only(args)
        new_kwargs = kwargs
        if prompt.pre is not None:
            new_kwargs = self.pre.decode(prompt.pre, kwargs)
        if prompt.llm is not None:
            self.state.forward = self.llm.start_decode(prompt.llm, new_kwargs)
        return args, new_kwargs

    def _llm_hook(self, module, args, kwargs, output):
        state = self.state
        forward, state.forward = state.forward, None
        prompt, state.filling = state.filling, None
        if prompt is None:
            return None
        if prompt.cache is None:
            prompt.cache = getattr(output, "cache", None)
        if prompt.cache is not None:
            self._prompts[prompt.cache] = prompt
        llm_result = None
        if self.llm is not None:
            prompt.llm, llm_result = self.llm.finish_prefill(forward)
        self._publish(module, prompt.pre_result, llm_result)
        return None

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs):
            state = self.state
            if state.forward is None:
                return None
            prompt = state.prompt
            return self.llm.layer_step(index, state.forward, prompt.llm if prompt is not None else None, args, kwargs)

        return hook

    # -- handle.last ------------------------------------------------------------------------------
    def _publish(self, module, pre_result: PrefillResult | None, llm_result: LLMPrefillResult | None) -> None:
        self.handle.last = PruneRecord(
            text_config=self.text_config,
            pre=(self.pre_name, pre_result) if pre_result is not None else None,
            llm=(self.llm_name, llm_result) if llm_result is not None else None,
            kv_bytes_per_token=self._kv_bytes_per_token(module),
        )

    def _kv_bytes_per_token(self, language_model) -> int:
        """In the dtype the LLM runs in now (the model may have been cast after patching)."""
        return kv_bytes_per_token(self.text_config, next(language_model.parameters()).dtype)

    def _publish_text(self, module, kwargs) -> None:
        tokens = kwargs.get("inputs_embeds")
        tokens = tokens if tokens is not None else kwargs.get("input_ids")
        if tokens is None:
            return
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            real = mask[:, -tokens.shape[1] :].sum(dim=1)
        else:
            real = torch.full((tokens.shape[0],), tokens.shape[1], device=tokens.device)
        self.handle.last = PruneRecord(
            text_config=self.text_config, text_tokens=real, kv_bytes_per_token=self._kv_bytes_per_token(module)
        )


def _keyword_only(args) -> None:
    if args:
        raise TypeError("vtprune expects the language model to be called with keyword arguments")
