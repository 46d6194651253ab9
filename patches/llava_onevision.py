"""Adapter for transformers ``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel``.

Image mode (AnyRes-max-9): an image is a base image plus crops, packed like LLaVA-NeXT (base
tokens, then the unpadded crop canvas row by row, each row closed by ``image_newline``), with two
differences the packing map must follow:
- the SigLIP tower has no [CLS] token and OneVision feeds every patch (``"full"``): N = side²;
- when the unpadded canvas is larger than ``max_num_patches`` (9) base images by a factor
  > 1.1, the model *resizes* it bilinearly (``pack_image_features``). A packed canvas column is
  then a blend of tokens, not one token. The packing map still comes from the model's own packer,
  run on coordinate tensors: each canvas column's bilinear sample point (exact, since bilinear
  interpolation of a linear ramp returns it) is rounded to the nearest canvas token, and the
  column stands for that token. Downscaling spaces sample points more than one token apart, so
  the map is one-to-one; the tokens that no column samples are not ``valid``. Methods score and
  budget over the valid tokens as on LLaVA-NeXT, and a kept column carries the model's
  resized feature. Without resizing this map is exactly the index map.
- multi-image prompts (``batch_num_images`` > 1): each image is its base image only, plus one
  newline, as the model packs them.

Video mode: each frame is the tower's side x side grid, projected and pooled bilinearly to
ceil(side / 2)² tokens (``apply_pooling``); a video is its frames in order plus one trailing
``image_newline`` (transformers' packing; the original LLaVA-OneVision code adds a newline per
row or per frame depending on ``mm_newline_position``, transformers uses one per video). Each frame
is selected like a lone image (``select_crops`` on one grid, so every method, including the
crop-budget ones, works per frame); the trailing newline is always kept. Probe scores of a frame
are pooled with the same bilinear resize as its features.

QuoTA (frame-replacing): :meth:`LlavaOnevisionAdapter._quota_frame_sets` and
:func:`vtprune.patches._frames.plan_frame_sets`.

[CLS]-scored methods raise at patch time unless they opt into a substitute
(``fastervlm`` with ``score="received"``); ``fopru`` scores by attention received natively.
``handle.last`` counts visual tokens (image and video placeholders, newlines included) in order
of appearance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vtprune.engine.pre_llm import visual_rows
from vtprune.patches import register_adapter
from vtprune.patches._anyres import anyres_image
from vtprune.patches._base import IMAGES_AND_VIDEOS, Adapter
from vtprune.patches._frames import FrameSet, images_and_frames_selector, plan_frame_sets
from vtprune.types import TokenSelection, VisualInputs, VisualLayout

NEWLINE = -1.0e6  # marker value of newline columns in the coordinate packing


@register_adapter
class LlavaOnevisionAdapter(Adapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    visual_kinds = IMAGES_AND_VIDEOS
    supports_feature_replacement = True  # quota: video frames replaced by their resized grids
    has_crops = True

    @property
    def side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    def layout(self) -> VisualLayout:
        return VisualLayout(num_tokens=self.side**2, grid=(self.side, self.side))

    def frame_layout(self) -> VisualLayout:
        pooled = math.ceil(self.side / 2)
        return VisualLayout(num_tokens=pooled * pooled, grid=(pooled, pooled))

    def check_model(self) -> None:
        if self.select_strategy != "full":
            raise ValueError(
                "vtprune's LLaVA-OneVision adapter needs vision_feature_select_strategy='full' (the SigLIP tower "
                f"has no [CLS] token; every patch is a visual token), got {self.select_strategy!r}"
            )

    # -- what an encoder call tells the selector --------------------------------------------------
    def visual_inputs(self, kind, arguments, scores) -> VisualInputs:
        if kind == "image":
            ratio = arguments.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
            return VisualInputs(
                scores=scores,
                packing=self.packing_map(arguments["image_sizes"], arguments.get("batch_num_images"), ratio),
                pixels=arguments["pixel_values"][:, 0],  # each image's base (thumbnail) view: quota's frames
            )
        pixels = arguments["pixel_values_videos"]
        pooled = self.frame_layout().grid
        scores = {  # pooled like the features: bilinear to ceil(side / 2) per side
            name: F.interpolate(s.float().view(-1, 1, self.side, self.side), size=pooled, mode="bilinear").flatten(1)
            for name, s in scores.items()
        }
        return VisualInputs(scores=scores, pixels=pixels, frames=tuple(pixels.shape[:2]))

    def llm_tokens(self, kind, info, columns, embeds) -> torch.Tensor:
        """The LLM input embeddings of a kind's columns as its probe rows: per image (sub-images, N, D)
        unpacked with its packing map (tokens lost to unpadding are ones, never candidates), per video
        (frames, pooled N, D) without its trailing newline."""
        rows = visual_rows(embeds, columns.to(embeds.device), int(columns.sum()))
        if kind == "video":
            videos, frames = info.frames
            return rows.view(videos, -1, rows.shape[-1])[:, :-1].reshape(videos * frames, -1, rows.shape[-1])
        parts, first = [], 0
        for image in info.packing:  # a few images per batch
            placed = (image.token_map >= 0).nonzero().flatten()  # on the CPU, as the packing map
            tokens = rows.new_ones(image.valid.numel(), rows.shape[-1])
            tokens[image.token_map[placed].to(rows.device)] = rows[first + placed.to(rows.device)]
            parts.append(tokens.view(*image.valid.shape, -1))
            first += image.token_map.numel()
        return torch.cat(parts)

    # -- selection ------------------------------------------------------------------------
    def selector(self, method, layout):
        if method.replaces_features:
            return self._quota_selector(method)
        return images_and_frames_selector(method, layout, self.frame_layout(), video_newline=True)

    def _quota_selector(self, method):
        """QuoTA: per frame set (a video, or one sample's images), the method's plan replaces the
        frame tokens (:func:`vtprune.patches._frames.plan_frame_sets`).

        Video: its columns are its frames' pooled grids, then one newline. The kept frames' resized
        grids (sum h * w <= frames * P tokens) fill the video's first columns, in order; the other
        frame columns are dropped; the trailing newline is kept as it is.
        Images: each image is a frame whose grid is its base (thumbnail) view, side x side tokens:
        an image's resized grid fills its own first columns (so it is capped at side² tokens), its
        AnyRes crop canvas is dropped (a frame has no crops), and the newline that closes a base-only
        image of a multi-image prompt is kept with the image and dropped with it.
        """
        frame = self.frame_layout()

        def select(inputs, device):
            if "image" in inputs.visual and "video" in inputs.visual:
                raise NotImplementedError(
                    "quota on LLaVA-OneVision takes a video prompt or an image prompt (images as frames), not both "
                    "in one batch; run them separately"
                )
            kind = "video" if "video" in inputs.visual else "image"
            kind_mask = inputs.kinds[kind].to(device)
            columns = inputs.inputs_embeds[kind_mask]  # (this kind's columns in the batch, D)
            if kind == "video":
                sets = self._video_frame_sets(method, inputs.visual["video"], frame)
            else:
                sets = self._image_frame_sets(method, inputs.visual["image"], kind_mask)
            selection, _ = plan_frame_sets(method, sets, columns)
            if selection.keep is None:
                return selection
            visual = inputs.visual_mask.to(device)
            full_keep = torch.zeros_like(visual).masked_scatter(kind_mask, selection.keep)[visual]
            full_replace = torch.zeros_like(visual).masked_scatter(kind_mask, selection.replace)[visual]
            return TokenSelection(full_keep, full_replace, selection.values, selection.stats)

        return select

    @staticmethod
    def _video_frame_sets(method, video: VisualInputs, frame: VisualLayout) -> list[FrameSet]:
        videos, frames = video.frames
        span = frames * frame.num_tokens + 1  # the frames, then the newline
        return [
            FrameSet(
                video.pixels[v],
                starts=[v * span + f * frame.num_tokens for f in range(frames)],
                grid=frame.grid,
                question=question,
                closing=[v * span + span - 1],
            )
            for v, question in zip(range(videos), method.queries(videos), strict=True)
        ]

    def _image_frame_sets(self, method, images: VisualInputs, image_mask) -> list[FrameSet]:
        """One frame set per sample: its images, each a frame of side x side base tokens."""
        side = self.side
        spans = [image.token_map.shape[0] for image in images.packing]
        per_sample = [columns for columns in image_mask.sum(dim=1).tolist() if columns > 0]
        questions = method.queries(len(per_sample))
        sets, image, first = [], 0, 0
        for columns, question in zip(per_sample, questions, strict=True):  # a few samples
            starts, closing = [], []
            while columns > 0:
                starts.append(first)
                multi_image_newline = spans[image] == side * side + 1
                closing.append(first + side * side if multi_image_newline else None)
                columns -= spans[image]
                first += spans[image]
                image += 1
            sets.append(
                FrameSet(
                    images.pixels[image - len(starts) : image],
                    starts,
                    (side, side),
                    question,
                    shared_fill=False,
                    closing=closing,
                    cap=side * side,
                    what="images'",
                )
            )
        return sets

    # -- the packing map ------------------------------------------------------------------
    def packing_map(self, image_sizes, batch_num_images=None, vision_aspect_ratio="anyres_max_9") -> list:
        """How the model packs each image, from its own ``pack_image_features`` on coordinate tensors."""
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        config = self.config
        side, num_tokens = self.side, self.side**2
        sizes = torch.as_tensor(image_sizes).cpu()
        if batch_num_images is None:
            patching = [True] * len(sizes)
        else:
            patching = [int(n) == 1 for n in torch.as_tensor(batch_num_images).tolist() for _ in range(int(n))]
        counts = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if p else 1
            for size, p in zip(sizes.tolist(), patching, strict=True)
        ]
        features, grids = [], []
        for count, size in zip(counts, sizes.tolist(), strict=True):
            nh, nw = (
                get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
                if count > 1
                else (0, 0)
            )
            grids.append((int(nh), int(nw)))
            s = torch.arange(count).view(count, 1)
            p = torch.arange(num_tokens).view(1, num_tokens)
            crop = (s - 1).clamp(min=0)
            row = (crop // max(nw, 1)) * side + p // side  # position on the padded crop canvas
            col = (crop % max(nw, 1)) * side + p % side
            features.append(torch.stack([(s * num_tokens + p).double(), row.double(), col.double()], dim=-1))
        packed, _ = self.base.pack_image_features(
            features,
            sizes,
            image_newline=torch.full((3,), NEWLINE, dtype=torch.float64),
            vision_aspect_ratio=vision_aspect_ratio,
        )
        images = []
        for count, (nh, nw), columns in zip(counts, grids, packed, strict=True):
            newline = columns[:, 0] == NEWLINE
            token_map = columns[:, 0].round().long()
            if count > 1:  # canvas columns: the nearest canvas token of each (possibly resized) sample point
                canvas = torch.arange(columns.shape[0]) >= num_tokens
                r, c = columns[:, 1].round().long(), columns[:, 2].round().long()
                from_coords = (1 + (r // side) * nw + c // side) * num_tokens + (r % side) * side + c % side
                token_map = torch.where(canvas, from_coords, token_map)
            images.append(anyres_image(torch.where(newline, -1, token_map), count, num_tokens, (nh, nw)))
        return images
