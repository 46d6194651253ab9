"""Adapter for transformers ``LlavaNextVideoForConditionalGeneration`` / ``LlavaNextVideoModel``.

What the model looks like:
- images: exactly LLaVA-NeXT's AnyRes (a base image plus crops of the high-resolution canvas,
  unpadded, each canvas row closed by ``image_newline``), so the image path is
  :class:`vtprune.patches.llava_next.LlavaNextAdapter`'s: the packing map from the model's own
  ``pack_image_features``, selection per image over its sub-images, the newline rule;
- videos (``pixel_values_videos``, (videos, frames, 3, H, W)): every frame through the same CLIP tower
  (which has a [CLS] token, dropped with ``"default"``), its ``vision_feature_layer`` patches pooled by the
  ``vision_resampler`` (``spatial_pool_mode`` "average" or "max", kernel = stride =
  ``spatial_pool_stride``: 24 x 24 -> 12 x 12 for the 336 px checkpoints) *before* the projector; a video
  is its frames' pooled grids in order, no newlines, at the ``config.video_token_id`` placeholders;
- 1-D positions; a Llama / Mistral decoder.

Video scores are pooled as the features are: a probe's per-patch score map goes through the same
pooling (average or max, same kernel and stride), so a frame token's score is its patch block's mean
(or max). A ``"conv"`` resampler is learned and has no score counterpart: scored methods are refused on
it at patch time, as are methods that read token features (not scores) from the tower. Each frame is
selected like a lone image (``select_crops`` on one pooled grid, so the crop-budget methods, HiRED and
GlobalCom², run per frame as on a base image alone).

QuoTA (frame-replacing) runs on videos: per video, its plan's resized frames fill the video's first
columns and the other frame columns are dropped (:func:`vtprune.patches._frames.plan_frame_sets`).
An image prompt under QuoTA is refused when it arrives: AnyRes images are not frames here.
"""

from __future__ import annotations

import torch.nn.functional as F

from vtprune.patches import register_adapter
from vtprune.patches._base import IMAGES_AND_VIDEOS
from vtprune.patches._frames import FrameSet, images_and_frames_selector, plan_frame_sets
from vtprune.patches.llava_next import LlavaNextAdapter
from vtprune.types import VisualInputs, VisualLayout

POOLS = {"average": F.avg_pool2d, "max": F.max_pool2d}  # the resampler's pooling, applied to score maps
SCORE_PROBES = ("cls", "received", "cls_logits")  # probe kinds with one score per patch: pooled like the features


@register_adapter
class LlavaNextVideoAdapter(LlavaNextAdapter):
    family = "llava_next_video"
    model_classes = ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel")
    visual_kinds = IMAGES_AND_VIDEOS
    supports_feature_replacement = True  # quota: video frames replaced by their resized grids

    @property
    def side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    def frame_layout(self) -> VisualLayout:
        pooled = self.side // self.config.spatial_pool_stride
        return VisualLayout(num_tokens=pooled * pooled, grid=(pooled, pooled))

    def check_pre_llm(self, method) -> None:
        super().check_pre_llm(method)
        if method.vision_probes() and self.config.spatial_pool_mode not in POOLS:
            raise ValueError(
                f"method {method.name!r} scores tokens in the vision tower, but this model pools video frames with "
                f"a learned {self.config.spatial_pool_mode!r} resampler, which has no score counterpart; use a "
                f"score-free method (random, uniform) or an in-LLM one (fastv, pdrop)"
            )
        features = sorted(kind for kind, _ in method.vision_probes().values() if kind not in SCORE_PROBES)
        if features:
            raise ValueError(
                f"method {method.name!r} reads {', '.join(features)} from the vision tower, but video frames are "
                "pooled before the projector and vtprune pools only per-patch scores like them"
            )

    def visual_inputs(self, kind, arguments, scores) -> VisualInputs:
        if kind == "image":
            return super().visual_inputs(kind, arguments, scores)
        pixels = arguments["pixel_values_videos"]
        pool, stride, side = POOLS.get(self.config.spatial_pool_mode), self.config.spatial_pool_stride, self.side
        pooled = {  # as the resampler pools the features
            name: pool(s.float().view(-1, 1, side, side), stride, stride).flatten(1) for name, s in scores.items()
        }
        return VisualInputs(scores=pooled, pixels=pixels, frames=tuple(pixels.shape[:2]))

    def selector(self, method, layout):
        if method.replaces_features:
            return self._quota_selector(method)
        return images_and_frames_selector(method, layout, self.frame_layout(), video_newline=False)

    def _quota_selector(self, method):
        """QuoTA per video: its frames are ``frame_layout`` grids, in order (no newline); the plan's resized
        frames fill the video's first columns."""
        frame = self.frame_layout()

        def select(inputs, device):
            if "image" in inputs.visual:
                raise ValueError(
                    "quota on LLaVA-NeXT-Video takes video prompts: an AnyRes image (a base image plus crops) is "
                    "not a set of frames; run image prompts with another method"
                )
            video = inputs.visual["video"]
            videos, frames = video.frames
            span = frames * frame.num_tokens
            sets = [
                FrameSet(video.pixels[v], [v * span + f * frame.num_tokens for f in range(frames)], frame.grid, query)
                for v, query in zip(range(videos), method.queries(videos), strict=True)
            ]
            columns = inputs.inputs_embeds[inputs.kinds["video"].to(device)]  # the visual columns are the videos'
            selection, _ = plan_frame_sets(method, sets, columns)
            return selection

        return select
