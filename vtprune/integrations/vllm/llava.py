"""vLLM's LLaVA-1.5 with vtprune's pre-LLM selection in its image path.

Registered by :func:`vtprune.integrations.vllm.register` under vLLM's own architecture name
``LlavaForConditionalGeneration``: a config without a ``vtprune`` entry runs exactly vLLM's model
(every override below calls the parent unchanged), one with it runs the plan of
:mod:`vtprune.integrations.vllm.plan`:

- placeholders: :class:`PrunedLlavaProcessingInfo.get_num_image_tokens` returns the method's
  ``size_budget`` of the image's token layout, so the prompt is laid out (and the KV cache sized) for
  the kept tokens only, before the tower runs; the encoder budget and the profiling run follow;
- scores: :mod:`vtprune.integrations.vllm.scores` hooks the scored CLIP layer's ``qkv_proj`` (vLLM's
  tower runs its SDPA kernel, never eager) and computes the same rows as the transformers path's
  probes (:mod:`vtprune.engine.probe`); under tensor parallelism each rank holds some heads and the
  head mean is all-reduced over the TP group, so every rank keeps the same tokens;
- selection: ``_process_image_input`` runs vLLM's tower and projector, then keeps the method's
  ``select`` indices (the same pure code as ``vtprune.patch``), sorted, so the kept tokens keep their
  order and vLLM's 1-D positions are the re-compacted ``arange`` of the shortened prompt (FasterVLM's
  official rule; a method configured with ``positions="original"`` is refused at start-up).

Checkpoints written by transformers 5.x name the CLIP tower ``vision_tower.embeddings...`` (no
``vision_model`` level); :meth:`PrunedLlava.load_weights` maps them onto vLLM's layout, pruned or not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
    _get_num_hidden_layers,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtprune.integrations.vllm.plan import serving_plan
from vtprune.integrations.vllm.scores import ScoreProbes

ARCHITECTURE = "LlavaForConditionalGeneration"


def plan_for(hf_config):
    """The validated plan of ``hf_config`` (None without a ``vtprune`` entry)."""
    return serving_plan(hf_config, ARCHITECTURE, _get_num_hidden_layers(hf_config))


class PrunedLlavaProcessingInfo(LlavaProcessingInfo):
    """vLLM's LLaVA processing info, with the placeholder count of the method's budget."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        num_tokens = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        plan = plan_for(self.get_hf_config())
        if plan is None:
            return num_tokens
        if num_tokens != plan.layout.num_tokens:
            raise ValueError(
                f"vtprune: vLLM lays an image out as {num_tokens} tokens, the plan as {plan.layout.num_tokens}"
            )
        return plan.kept_tokens


def _info(ctx):
    info = _build_llava_or_pixtral_hf_info(ctx)
    return PrunedLlavaProcessingInfo(ctx) if isinstance(info, LlavaProcessingInfo) else info


def clip_tower_keys(weights: Iterable[tuple[str, torch.Tensor]]):
    """transformers 5.x checkpoint names of the CLIP tower -> vLLM's (``vision_tower.vision_model...``)."""
    for name, tensor in weights:
        for prefix in ("model.vision_tower.", "vision_tower."):
            if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
                name = f"{prefix}vision_model.{name[len(prefix) :]}"
                break
        yield name, tensor


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunedLlava(LlavaForConditionalGeneration):
    """vLLM's ``LlavaForConditionalGeneration``; with a ``vtprune`` config entry, its images are pruned."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune = plan_for(self.config)
        self.vtprune_last_kept: torch.Tensor | None = None  # the last encoder call's kept indices (images, k)
        self._vtprune_probes = None
        if self.vtprune is not None and self.vtprune.probes:
            layers = self.vision_tower.vision_model.encoder.layers
            self._vtprune_probes = ScoreProbes(
                {name: (kind, layers[index].self_attn) for name, (kind, index) in self.vtprune.probes.items()},
                first_column=self.vtprune.first_column,
            )

    def _process_image_input(self, image_input):
        plan = self.vtprune
        if plan is None or isinstance(image_input, LlavaImageEmbeddingInputs) or plan.keeps_everything():
            return super()._process_image_input(image_input)  # given embeddings fill their own placeholders
        probes = self._vtprune_probes
        with probes.capture() if probes is not None else contextlib.nullcontext({}) as scores:
            embeds = super()._process_image_input(image_input)  # (images, N, D)
        kept = plan.select(scores, embeds.shape[0], embeds.device)  # (images, k), sorted
        self.vtprune_last_kept = kept
        return embeds.gather(1, kept[..., None].expand(-1, -1, embeds.shape[-1]))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(clip_tower_keys(weights))
