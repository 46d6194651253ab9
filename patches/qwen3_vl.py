"""Adapter for transformers ``Qwen3VLForConditionalGeneration`` / ``Qwen3VLModel`` and the MoE twin
``Qwen3VLMoeForConditionalGeneration`` / ``Qwen3VLMoeModel`` (images and video; one code path).

Qwen3-VL is Qwen2-VL (:mod:`vtprune.patches.qwen2_vl`: (t, h, w) patch grids, the 2 x 2 merger,
M-RoPE, per-frame selection, the M-RoPE decoder stack) but for what this file says (transformers 5.24):

- no window attention, no [CLS] token: probes score as in Qwen2-VL (received attention per temporal
  slice, a merged token the mean of its 4 patches); fastervlm runs only with ``score="received"``,
  hired and globalcom2 are refused at patch time.
- DeepStack: the ViT's blocks ``deepstack_visual_indexes`` each give one more feature per visual
  token (``deepstack_visual_embeds``: one (N, D) tensor per level, rows in the order of
  ``visual_pos_masks.nonzero()``, batch-major) that ``Qwen3VLTextModel`` adds to the hidden states
  at ``visual_pos_masks`` after decoder layers 0, 1, 2, ... (``_deepstack_process``). Every cut
  keeps exactly the rows of the tokens it keeps:
  - before the LLM: a pre-hook on the language model, after the stack's (hooks run in order of
    registration), cuts ``visual_pos_masks`` with the pre-LLM cut (re-aligned padding included)
    and every level's tensor to the kept visual tokens' rows, in the same order;
  - inside the LLM (fastv, pdrop): ``_deepstack_process`` is wrapped on this instance; after an
    in-LLM cut at a layer before the last injection it gets the mask and rows through every cut
    made so far in this forward.
- video: the processor writes each temporal slice as its own block (``<t seconds>`` text, then
  vision start, the slice's tokens, vision end) and ``get_rope_index`` numbers each slice as an
  image; the per-frame budgets are per slice already. Positions are gathered from the model's own.
- ``get_video_features`` encodes through ``get_image_features``: the image wrapper stands aside
  inside a video call (what a video's encoder call says is the video's only).
- quota is refused: a resized frame would need its own deepstack features, and a video's frames
  are separate blocks between timestamp texts (the frame-replacing path fills one contiguous block).
"""

from __future__ import annotations

import functools
import threading

import torch

from vtprune.patches import InstanceMethodPatch, register_adapter
from vtprune.patches.qwen2_vl import Qwen2VLAdapter


def deepstack_cut(visual_pos_masks: torch.Tensor, cut) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence cut applied to DeepStack's inputs: the (B, L') mask after ``cut`` and, per visual
    column it keeps, its row in the (N, D) level tensors (whose rows follow the mask batch-major)."""
    rank = (visual_pos_masks.flatten().long().cumsum(0) - 1).view_as(visual_pos_masks)
    mask = cut.gather(visual_pos_masks, fill=False)
    return mask, cut.gather(rank)[mask]


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    supports_feature_replacement = False

    def check_pre_llm(self, method) -> None:
        if method.replaces_features:
            raise ValueError(
                f"method {method.name!r} replaces frames by resized ones; on {type(self.model).__name__} a resized "
                "frame would need its own DeepStack features and each video frame is its own block between "
                "timestamp texts: not supported (use a per-frame method: fopru, uniform, random, or fastv / pdrop)"
            )
        super().check_pre_llm(method)

    def feature_wrappers(self) -> list:
        """``get_video_features`` encodes by calling ``get_image_features`` (one tower for both): inside a
        video call the image wrapper stands aside, so the video's grids and scores go to "video" only."""
        in_video = threading.local()
        image_wrapper, video_wrapper = self._features_wrapper("image"), self._features_wrapper("video")

        def make_image(get_image_features):
            wrapped = image_wrapper(get_image_features)

            @functools.wraps(get_image_features)
            def wrapper(*args, **kwargs):
                return (get_image_features if getattr(in_video, "on", False) else wrapped)(*args, **kwargs)

            return wrapper

        def make_video(get_video_features):
            wrapped = video_wrapper(get_video_features)

            @functools.wraps(get_video_features)
            def wrapper(*args, **kwargs):
                in_video.on = True
                try:
                    return wrapped(*args, **kwargs)
                finally:
                    in_video.on = False

            return wrapper

        return [
            InstanceMethodPatch(self.base, "get_image_features", make_image),
            InstanceMethodPatch(self.base, "get_video_features", make_video),
        ]

    def install(self, handle, methods) -> None:
        super().install(handle, methods)
        handle.hooks.append(self.language_model.register_forward_pre_hook(self._cut_deepstack, with_kwargs=True))
        if self.stack.llm is not None:
            handle.hooks.append(InstanceMethodPatch(self.language_model, "_deepstack_process", self._follow_cuts))

    def _cut_deepstack(self, module, args, kwargs):
        """After the stack's pre-hook: DeepStack's mask and rows cut like the sequence."""
        prompt = self.stack.state.filling
        masks = kwargs.get("visual_pos_masks")
        if prompt is None or prompt.pre is None or masks is None:
            return None
        mask, rows = deepstack_cut(masks.to(prompt.pre.cut.source.device), prompt.pre.cut)
        levels = [level[rows.to(level.device)] for level in kwargs["deepstack_visual_embeds"]]
        return args, dict(kwargs, visual_pos_masks=mask, deepstack_visual_embeds=levels)

    def _follow_cuts(self, deepstack_process):
        stack = self.stack

        def process(hidden_states, visual_pos_masks, visual_embeds):
            forward = stack.state.forward
            if forward is not None and forward.prefill:
                for stage in forward.stages[1:]:  # the in-LLM cuts made so far in this forward
                    visual_pos_masks, rows = deepstack_cut(visual_pos_masks.to(stage.cut.source.device), stage.cut)
                    visual_embeds = visual_embeds[rows.to(visual_embeds.device)]
            return deepstack_process(hidden_states, visual_pos_masks, visual_embeds)

        return process


@register_adapter
class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_classes = ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel")
