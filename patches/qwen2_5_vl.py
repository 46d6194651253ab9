"""Adapter for transformers ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2_5_VLModel`` (images and video).

Qwen2.5-VL is Qwen2-VL (:mod:`vtprune.patches.qwen2_vl`: (t, h, w) patch grids, the 2 x 2 merger,
M-RoPE, per-frame selection, quota, the M-RoPE decoder stack) but for what this file says:

- window attention in the ViT (transformers 5.24, ``Qwen2_5_VisionTransformerPretrainedModel``):
  the tower permutes its sequence into window order before the first block
  (``get_vision_window_index``: windows of ``window_size / patch_size / 2`` merged tokens a side,
  the 4 patches of a merged token kept together) and only un-permutes the merger's output. A vision
  probe therefore sees its block's patches in window order: the probe scores each merged token as
  the mean of its 4 patches' scores (consecutive in that order), and :meth:`visual_inputs` puts the
  merged tokens back in the LLM's (t, row, column) order with ``argsort(window_index)``, the index
  recomputed from the grids by the same pure function. The official VisionZip port for
  Qwen2.5-VL (``Qwen2_5_VL/qwen2_5vl_visionzip.py``) aggregates and re-orders the same way (mean
  over the 4, then ``argsort(window_index)``).
- a probe at a windowed block measures attention received within each window (the block attends
  only there); the blocks in ``fullatt_block_indexes`` attend over the whole temporal slice, and
  the default probe layer (the last block, which the merger reads) is one of them in the released
  checkpoints (7, 15, 23, 31).
- video positions: the temporal row steps by ``tokens_per_second * second_per_grid_ts`` per
  temporal slice, and the text after an image or video starts at its first value + max(h, w) / 2
  (transformers 5.24's ``get_rope_index``; with a long video this overlaps the video's temporal
  values). Every cut gathers the positions the model itself computed, so the rule is kept as the
  installed version has it; quota's resized frames take each frame's temporal value from them.
- no [CLS] token (as Qwen2-VL): fastervlm runs only with its documented substitute
  (``score="received"``), hired and globalcom2 are refused at patch time.
"""

from __future__ import annotations

import torch

from vtprune.patches import register_adapter
from vtprune.patches.qwen2_vl import Qwen2VLAdapter
from vtprune.types import VisualInputs


@register_adapter
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")

    def visual_inputs(self, kind, arguments, scores) -> VisualInputs:
        """The probes' scores (one per merged token, in the tower's window order) in the LLM's order."""
        from transformers.vision_utils import get_vision_window_index

        visual = super().visual_inputs(kind, arguments, scores)
        if scores:
            vision = self.vision_config
            window_index, _ = get_vision_window_index(
                torch.as_tensor(arguments[f"{kind}_grid_thw"]),
                spatial_merge_size=vision.spatial_merge_size,
                window_size=vision.window_size,
                patch_size=vision.patch_size,
            )
            order = window_index.argsort()
            visual.scores = {name: score[order.to(score.device)] for name, score in scores.items()}
        return visual
