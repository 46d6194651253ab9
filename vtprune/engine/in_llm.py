"""The inside-the-LLM cut: drop visual tokens between decoder layers, model-agnostic.

:class:`InLLMStage` is one stage of the stack (:mod:`vtprune.engine.stages`), which registers
the hooks and keeps the per-forward state per thread:

1. :meth:`InLLMStage.start_prefill` in the decoder stack's pre-hook, with the (B, L) original
   visual-token index of every column the LLM receives (-1 for text and padding; carried
   through any pre-LLM cut): it records the sequence as the LLM receives it;
2. :meth:`InLLMStage.layer_step` in a pre-hook on every decoder layer from the first probe
   layer on: at a probe layer it scores the columns with the last-prompt-token attention probe;
   at a cut layer it drops visual tokens from the hidden states; from the first cut on it hands
   every layer the reduced ``attention_mask``, ``position_ids`` and rotary
   ``position_embeddings`` (computed once per cut, one per layer type where the backbone has
   several: Gemma 3's local and global rotary), and the masks built by the backbone from the
   kept columns (at a prefill it also gets which columns are visual: Gemma 3's image blocks);
3. :meth:`InLLMStage.finish_prefill` in the stack's forward hook: the
   :class:`PrunedPromptStages` decode steps need, and an :class:`LLMPrefillResult`;
4. :meth:`InLLMStage.start_decode` at later forwards on the pruned cache: the per-stage masks
   and positions.

The backbone helper (``vtprune.patches._backbones``) says where the layer parts are and
builds masks with transformers' own mask builders, so each attention implementation (SDPA,
eager, FlashAttention) gets the mask form it expects, sized by that layer's cache.

KV cache: each layer caches exactly the tokens it processed, so deeper layers hold shorter
caches. At decode steps every stage gets its own 2-D mask (its pruned prompt mask + the mask of
the tokens generated since) and positions: ``"original"`` keeps the model's positions,
``"compact"`` moves them down by the visual tokens removed by the cuts up to that stage.

Positions with a pre-LLM stage in front: each stage applies its own mode to the gaps it makes
(a "compact" cut closes the gaps of its own drops), so all-compact stacks renumber densely.

Output: the LLM's last hidden states (hence the logits) cover the *reduced* sequence of the
last stage at prefill; the last column is still the last prompt token, which is all
generation needs. Labels are cut the same way (:meth:`InLLMPruner.cut_labels`).

Without a KV cache (``use_cache=False``, also in ``generate``) every forward is a prefill and is
scored and pruned afresh from its own last token (FastV's "dynamic" mode); with a cache the
prompt is pruned once and decode steps reuse it ("static").

Host syncs: one per cut at prefill (the new sequence length, in ``plan_cut``); none of our own
at decode steps. The masks come from transformers' builders, which, like the model's own mask
for its first layer, may read one flag (is there padding?) to let SDPA use ``is_causal``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vtprune.engine.positions import check_positions, cut_positions, expand_positions, zero_shift
from vtprune.engine.probe import last_token_attention
from vtprune.engine.prompt import decode_step, padding_mask
from vtprune.engine.sequence import SequenceCut, plan_cut
from vtprune.methods.base import InLLMMethod


@dataclass
class Columns:
    """The sequence one stage processes at prefill (stage 0: as the LLM receives it)."""

    mask2d: torch.Tensor  # (B, T) 1 = real token, 0 = padding
    positions: torch.Tensor  # (B, T) position ids, or (R, B, T) M-RoPE rows (vtprune.engine.positions)
    visual_index: torch.Tensor  # (B, T) original visual-token index, -1 elsewhere
    removed: torch.Tensor  # (B,) visual tokens removed by the cuts so far
    cut: SequenceCut | None = None  # how this stage's columns come from the previous stage's
    shift: torch.Tensor | None = None  # (B, 1) or (R, B, 1): decode positions move down by this


@dataclass
class CutResult:
    """Raw tensors of one in-LLM cut; the record turns them into stats lazily."""

    layer: int  # the first decoder layer that sees the reduced set
    visual_index: torch.Tensor  # (B, T') original visual-token index of each column after the cut
    removed: torch.Tensor  # (B,) tokens removed by this cut


@dataclass
class LLMPrefillResult:
    visual_in: torch.Tensor  # (B,) visual tokens entering the LLM
    real_in: torch.Tensor  # (B,) real (unpadded) tokens entering the LLM
    cuts: list[CutResult]


@dataclass
class PrunedPromptStages:
    """What decode steps on the same cache need: every stage's prompt columns."""

    input_length: int  # columns of the prompt as the LLM received it
    stages: list[Columns]  # stages[s] = what layers from cut s on processed (stages[0] = input)


@dataclass
class _Forward:
    """Per-forward state, from the LLM pre-hook to the LLM forward hook."""

    prefill: bool
    stages: list[Columns] = field(default_factory=list)  # prefill: stages built so far
    scores: torch.Tensor | None = None  # prefill: probe scores awaiting their cut
    cuts: list[CutResult] = field(default_factory=list)
    base_positions: torch.Tensor | None = None  # decode: the model's positions (B, q)
    extra_mask: torch.Tensor | None = None  # decode: mask of the tokens after the prompt (B, n)
    substitute: dict = field(default_factory=dict)  # what layers of the current stage receive
    masks: dict = field(default_factory=dict)  # mask kind -> mask, for the current stage


class InLLMStage:
    def __init__(self, method: InLLMMethod, backbone):
        self.method = method
        self.backbone = backbone
        self.positions = method.config.positions
        self.schedule = method.schedule(backbone.num_layers)  # raises at patch time if it does not fit
        self.keeps_everything = method.keeps_everything()
        self.probe_at = {point.probe_layer: index for index, point in enumerate(self.schedule)}
        self.cut_at = {point.cut_layer: index for index, point in enumerate(self.schedule)}
        self.parts = {layer: backbone.attention_parts(layer) for layer in self.probe_at}

    @property
    def first_hooked_layer(self) -> int:
        """Layers before this one never need a hook."""
        return min(min(self.probe_at), min(self.cut_at))

    @staticmethod
    def cut_labels(prompt: PrunedPromptStages, labels: torch.Tensor) -> torch.Tensor:
        """Cut (B, L) labels given in the LLM's input columns like the prefill (:meth:`SequenceCut.gather_labels`)."""
        if labels.shape[1] != prompt.input_length:
            return labels
        for stage in prompt.stages[1:]:
            labels = stage.cut.gather_labels(labels)
        return labels

    def finish_prefill(self, forward: _Forward) -> tuple[PrunedPromptStages, LLMPrefillResult]:
        stage0 = forward.stages[0]
        result = LLMPrefillResult(
            visual_in=(stage0.visual_index >= 0).sum(dim=1), real_in=stage0.mask2d.sum(dim=1), cuts=forward.cuts
        )
        return PrunedPromptStages(stage0.mask2d.shape[1], forward.stages), result

    def layer_step(self, layer_index: int, forward: _Forward, prompt: PrunedPromptStages | None, args, kwargs):
        """Decoder layer ``layer_index``'s pre-hook body for this forward (None: its inputs as they are)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        if forward.prefill:
            if layer_index in self.probe_at and not self.keeps_everything:
                forward.scores = self._probe(layer_index, hidden, forward, kwargs)
            if layer_index in self.cut_at:
                hidden = self._cut(layer_index, hidden, forward, kwargs)
        elif layer_index in self.cut_at and not self.keeps_everything:
            self._enter_decode_stage(prompt.stages[self.cut_at[layer_index] + 1], hidden, forward, kwargs)
        if not forward.substitute:
            return None
        kind = self.backbone.mask_kind(layer_index)
        if kind not in forward.masks:
            substitute = forward.substitute
            mask_args = (
                layer_index,
                hidden,
                substitute["mask2d"],
                kwargs.get("cache"),
                self._layer_positions(substitute["position_ids"]),
            )
            if "visual" in substitute:  # a prefill
                forward.masks[kind] = self.backbone.build_prefill_mask(*mask_args, substitute["visual"])
            else:
                forward.masks[kind] = self.backbone.build_mask(*mask_args)
        new_kwargs = dict(
            kwargs,
            attention_mask=forward.masks[kind],
            position_ids=self._layer_positions(forward.substitute["position_ids"]),
            position_embeddings=self.backbone.layer_rotary(layer_index, forward.substitute["position_embeddings"]),
        )
        if args:
            return (hidden, *args[1:]), new_kwargs
        new_kwargs["hidden_states"] = hidden
        return args, new_kwargs

    def _layer_positions(self, positions: torch.Tensor) -> torch.Tensor | None:
        """The position ids the decoder layers (and mask builders) receive: the stack's own rule for
        multi-row (M-RoPE) positions comes from the backbone; 1-D positions as they are."""
        layer_positions = getattr(self.backbone, "layer_position_ids", None)
        return positions if layer_positions is None else layer_positions(positions)

    # -- prefill --------------------------------------------------------------------------
    def start_prefill(self, visual_index: torch.Tensor, kwargs: dict) -> _Forward:
        """visual_index: (B, L) original visual-token index of each column the LLM receives."""
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        mask = padding_mask(kwargs.get("attention_mask"), batch, length, embeds.device)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=embeds.device)[None]
        check_positions(positions)
        visual_index = visual_index.to(embeds.device)
        if visual_index.shape != (batch, length):
            raise RuntimeError(
                f"the image-token map ({tuple(visual_index.shape)}) does not match the LLM input ({batch}, {length})"
            )
        positions = expand_positions(positions, batch, length)
        stage0 = Columns(
            mask2d=mask,
            positions=positions,
            visual_index=visual_index,
            removed=torch.zeros(batch, dtype=torch.long, device=embeds.device),
            shift=zero_shift(positions),
        )
        return _Forward(prefill=True, stages=[stage0])

    def _current_embeddings(self, layer_index: int, forward: _Forward, kwargs: dict):
        embeddings = forward.substitute.get("position_embeddings")
        if embeddings is None:
            return kwargs.get("position_embeddings")
        return self.backbone.layer_rotary(layer_index, embeddings)

    def _probe(self, layer_index, hidden, forward: _Forward, kwargs) -> torch.Tensor:
        columns = forward.stages[-1]
        return last_token_attention(
            hidden,
            columns.mask2d.bool(),
            self.parts[layer_index],
            self._current_embeddings(layer_index, forward, kwargs),
        )

    def _cut(self, layer_index, hidden, forward: _Forward, kwargs) -> torch.Tensor:
        cut_index = self.cut_at[layer_index]
        columns = forward.stages[-1]
        visual = columns.visual_index >= 0
        if self.keeps_everything:  # leave the model untouched: bit-identical
            forward.cuts.append(CutResult(layer_index, columns.visual_index, torch.zeros_like(columns.removed)))
            return hidden
        scores, forward.scores = forward.scores, None
        visual_in = (forward.stages[0].visual_index >= 0).sum(dim=1)
        keep_counts = torch.minimum(self.method.keep_counts(cut_index, visual_in).to(visual.device), visual.sum(dim=1))
        selected = self.method.select(scores, visual, keep_counts)
        cut = plan_cut(~visual | selected)  # text and padding columns always stay
        mask2d = cut.gather(columns.mask2d)
        positions, shift = cut_positions(cut, columns.positions, self.positions, mask2d.bool())
        new = Columns(
            mask2d=mask2d,
            positions=positions,
            visual_index=cut.gather(columns.visual_index, fill=-1),
            removed=columns.removed + cut.removed,
            cut=cut,
            shift=columns.shift + shift,
        )
        forward.stages.append(new)
        forward.cuts.append(CutResult(layer_index, new.visual_index, cut.removed))
        hidden = cut.gather(hidden)
        forward.substitute = {
            "mask2d": new.mask2d,
            "position_ids": new.positions,
            "position_embeddings": self.backbone.rotary(hidden, new.positions),
            "visual": new.visual_index >= 0,  # for families whose prefill mask depends on it (Gemma 3's image blocks)
        }
        forward.masks = {}
        return hidden

    # -- decode ---------------------------------------------------------------------------
    def start_decode(self, prompt: PrunedPromptStages, kwargs: dict) -> _Forward | None:
        """A later forward on the pruned cache (None when the prefill cut nothing)."""
        if len(prompt.stages) == 1:
            return None
        step = decode_step(kwargs, prompt.input_length, prompt.input_length, prompt.stages[0].mask2d.dtype)
        positions, prefill_positions = step.positions, prompt.stages[0].positions
        if positions.dim() == 3 and positions.shape[0] == 1 and prefill_positions.dim() == 3:
            # Qwen2-VL's generate continues a returned cache with one row shared by the M-RoPE rows
            positions = positions.expand(prefill_positions.shape[0], -1, -1)
        check_positions(positions)
        batch = kwargs["inputs_embeds"].shape[0]
        return _Forward(
            prefill=False,
            base_positions=expand_positions(positions, batch, step.query_length),
            extra_mask=step.extra_mask,
        )

    def _enter_decode_stage(self, stage: Columns, hidden, forward: _Forward, kwargs) -> None:
        positions = forward.base_positions
        if self.positions == "compact":
            embeddings = None
            positions = positions - stage.shift
        else:
            embeddings = kwargs.get("position_embeddings") if self.backbone.shared_rotary else None
        forward.substitute = {
            "mask2d": torch.cat([stage.mask2d, forward.extra_mask.to(stage.mask2d.dtype)], dim=1),
            "position_ids": positions,
            "position_embeddings": embeddings if embeddings is not None else self.backbone.rotary(hidden, positions),
        }
        forward.masks = {}
