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

[CLS]-scored methods raise at patch time unless they opt into a substitute
(``fastervlm`` with ``score="received"``); ``fopru`` scores by attention received natively.
``handle.last`` counts visual tokens (image and video placeholders, newlines included) in order
of appearance.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune.engine.pre_llm import TokenSelection
from vtprune.methods.base import BudgetConfig, VisualLayout
from vtprune.methods.highres import CropLayout
from vtprune.methods.quota import plan_stats
from vtprune.patches import InstanceMethodPatch, register_adapter
from vtprune.patches.llava import SCORES_ATTRIBUTE, _kwarg
from vtprune.patches.llava_next import ANYRES_ATTRIBUTE, AnyResImage, LlavaNextAdapter, keep_packed

VIDEO_ATTRIBUTE = "_vtprune_video"  # set on get_video_features' output while patched
NEWLINE = -1.0e6  # marker value of newline columns in the coordinate packing


@dataclass
class FrameSet:
    """Frames that share one QuoTA budget (a video, or one sample's images), and where they sit.

    pixels: (F, C, H, W) as the model received them; starts: each frame's first column among the
    batch's columns of its kind; grid: (h, w) of a frame's tokens. shared_fill: the resized frames
    fill the set's columns from its first one, in order (a video), else each frame fills its own
    (an image). closing: the newline columns kept with the set (a video: always) or with each
    frame (an image: while it keeps tokens; None where there is none). cap: most tokens per frame.
    """

    pixels: torch.Tensor
    starts: list[int]
    grid: tuple[int, int]
    shared_fill: bool
    closing: list[int | None]
    cap: int | None = None
    what: str = "video's"

    @property
    def frame_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def fill(self, sizes: list[int]) -> list[tuple[int, int]]:
        """(first column, count) runs that the resized frames of ``sizes`` tokens overwrite."""
        if self.shared_fill:
            return [(self.starts[0], sum(sizes))]
        return [(first, n) for first, n in zip(self.starts, sizes, strict=True) if n]

    def kept_columns(self, sizes: list[int]) -> list[int]:
        """The newline columns that stay."""
        if self.shared_fill:
            return [c for c in self.closing if c is not None]
        return [c for c, n in zip(self.closing, sizes, strict=True) if c is not None and n]


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    supports_feature_replacement = True  # quota: video frames replaced by their resized grids

    @property
    def side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    def layout(self) -> VisualLayout:
        return VisualLayout(num_tokens=self.side**2, grid=(self.side, self.side))

    def frame_layout(self) -> VisualLayout:
        pooled = math.ceil(self.side / 2)
        return VisualLayout(num_tokens=pooled * pooled, grid=(pooled, pooled))

    def install(self, handle, methods) -> None:
        if self.select_strategy != "full":
            raise ValueError(
                "vtprune's LLaVA-OneVision adapter needs vision_feature_select_strategy='full' (the SigLIP tower "
                f"has no [CLS] token; every patch is a visual token), got {self.select_strategy!r}"
            )
        super(LlavaNextAdapter, self).install(handle, methods)

    # -- selection ------------------------------------------------------------------------
    def token_selector(self, method, layout):
        if getattr(method, "replaces_features", False):
            return self._quota_selector(method)
        if isinstance(method.config, BudgetConfig):
            method.config.num_keep(layout.num_tokens)  # a budget larger than a sub-image fails now
        grid = layout.grid
        frame = self.frame_layout()

        def select(pending, device):
            context = pending.context
            if method.keeps_everything(layout) and ("video" not in context or method.keeps_everything(frame)):
                return None
            keeps = {}
            if "images" in context:
                scores = context.get("image_scores") or {}
                parts, first = [], 0
                for image in context["images"]:  # a few images per batch
                    count = image.valid.shape[0]
                    crops = CropLayout(grid, image.crop_grid, image.valid.to(device), image.valid)
                    keep = method.select_crops({k: v[first : first + count] for k, v in scores.items()}, crops)
                    parts.append(keep_packed(image.token_map.to(device), keep))
                    first += count
                keeps["image"] = torch.cat(parts)
            if "video" in context:
                keeps["video"] = self._select_video(method, context["video"], frame, device)
            masks = context["masks"]
            keep = torch.zeros_like(pending.image_token_mask, device=device)
            for kind, kind_keep in keeps.items():
                keep = keep.masked_scatter(masks[kind].to(device), kind_keep)
            return keep[pending.image_token_mask.to(device)]

        return select

    def _quota_selector(self, method):
        """QuoTA: per frame set (a video, or one sample's images), the method's :class:`FramePlan`
        replaces the frame tokens.

        Video: its columns are its frames' pooled grids, then one newline. The kept frames' resized
        grids (sum h * w <= frames * P tokens) fill the video's first columns, in order; the other
        frame columns are dropped; the trailing newline is kept as it is.
        Images: each image is a frame whose grid is its base (thumbnail) view, side x side tokens:
        an image's resized grid fills its own first columns (so it is capped at side² tokens), its
        AnyRes crop canvas is dropped (a frame has no crops), and the newline that closes a base-only
        image of a multi-image prompt is kept with the image and dropped with it.
        """
        frame = self.frame_layout()

        def select(pending, device):
            context = pending.context
            if "images" in context and "video" in context:
                raise NotImplementedError(
                    "quota on LLaVA-OneVision takes a video prompt or an image prompt (images as frames), not both "
                    "in one batch; run them separately"
                )
            kind = "video" if "video" in context else "image"
            kind_mask = context["masks"][kind].to(device)
            columns = pending.inputs_embeds[kind_mask]  # (this kind's columns in the batch, D)
            if kind == "video":
                sets = self._video_frame_sets(context["video"], frame)
            else:
                sets = self._image_frame_sets(context, kind_mask)
            keep = torch.zeros(columns.shape[0], dtype=torch.bool, device=device)
            replace = torch.zeros_like(keep)
            values, plans = [], []
            for frame_set, question in zip(sets, method.queries(len(sets)), strict=True):  # a few per batch
                features = torch.stack([columns[a : a + frame_set.frame_tokens] for a in frame_set.starts])
                plan = method.plan_video(
                    frame_set.pixels,
                    features.view(len(frame_set.starts), *frame_set.grid, -1),
                    question,
                    cap=frame_set.cap,
                    what=frame_set.what,
                )
                plans.append(plan)
                for first, count in frame_set.fill(plan.frame_sizes):
                    replace[first : first + count] = True
                keep[frame_set.kept_columns(plan.frame_sizes)] = True
                values.append(plan.features)
            keep |= replace
            stats = plan_stats(plans)
            if bool(keep.all()) and all(grid == s.grid for s, p in zip(sets, plans) for grid in p.grids):
                return TokenSelection(None, stats=stats)  # every frame as it is: bit-identical
            visual = pending.image_token_mask.to(device)
            full_keep = torch.zeros_like(visual).masked_scatter(kind_mask, keep)[visual]
            full_replace = torch.zeros_like(visual).masked_scatter(kind_mask, replace)[visual]
            return TokenSelection(full_keep, full_replace, torch.cat(values), stats)

        return select

    @staticmethod
    def _video_frame_sets(video, frame: VisualLayout) -> list:
        videos, frames = video["shape"]
        span = frames * frame.num_tokens + 1  # the frames, then the newline
        return [
            FrameSet(
                video["pixels"][v],
                starts=[v * span + f * frame.num_tokens for f in range(frames)],
                grid=frame.grid,
                shared_fill=True,
                closing=[v * span + span - 1],
                what="video's",
            )
            for v in range(videos)
        ]

    def _image_frame_sets(self, context, image_mask) -> list:
        """One frame set per sample: its images, each a frame of side x side base tokens."""
        side = self.side
        images, pixels = context["images"], context["image_pixels"]
        spans = [image.token_map.shape[0] for image in images]
        per_sample = image_mask.sum(dim=1).tolist()
        sets, image, first = [], 0, 0
        for columns in per_sample:  # a few samples
            starts, closing = [], []
            while columns > 0:
                starts.append(first)
                multi_image_newline = spans[image] == side * side + 1
                closing.append(first + side * side if multi_image_newline else None)
                columns -= spans[image]
                first += spans[image]
                image += 1
            if starts:
                sets.append(
                    FrameSet(
                        pixels[image - len(starts) : image],
                        starts,
                        (side, side),
                        shared_fill=False,
                        closing=closing,
                        cap=side * side,
                        what="images'",
                    )
                )
        return sets

    @staticmethod
    def _select_video(method, video, frame: VisualLayout, device) -> torch.Tensor:
        """Per frame, a lone-image selection on the pooled grid; one kept newline per video."""
        scores, (videos, frames) = video["scores"], video["shape"]
        valid = torch.ones(1, frame.num_tokens, dtype=torch.bool, device=device)
        crops = CropLayout(frame.grid, (0, 0), valid, valid.cpu())
        everything = method.keeps_everything(frame)
        parts = []
        for index in range(videos * frames):  # a few dozen frames
            if everything:
                parts.append(valid[0])
            else:
                parts.append(method.select_crops({k: v[index : index + 1] for k, v in scores.items()}, crops)[0])
            if index % frames == frames - 1:
                parts.append(valid[0, :1])  # the video's trailing newline
        return torch.cat(parts)

    # -- prefill wiring -------------------------------------------------------------------
    def prefill_triggers(self, pre_pruner, in_pruner, new_record) -> list:
        config = self.config

        def hook(module, args, kwargs):
            encoded = kwargs.get("mm_encoder_outputs") or {}
            given = {
                "image": _kwarg(args, kwargs, "pixel_values", 1) is not None or encoded.get("image") is not None,
                "video": kwargs.get("pixel_values_videos") is not None or encoded.get("video") is not None,
            }
            if not any(given.values()):
                for pruner in (pre_pruner, in_pruner):
                    if pruner is not None:
                        pruner.pending = None
                return None
            input_ids = _kwarg(args, kwargs, "input_ids", 0)
            if input_ids is None:
                raise ValueError("vtprune needs input_ids (to find the image and video tokens) when images are given")
            masks = {"image": input_ids == config.image_token_id, "video": input_ids == config.video_token_id}
            visual = masks["image"] | masks["video"]
            new_record()
            if pre_pruner is not None:
                context = {"masks": masks}
                for kind in ("image", "video"):
                    if encoded.get(kind) is None:
                        continue
                    info = getattr(encoded[kind], ANYRES_ATTRIBUTE if kind == "image" else VIDEO_ATTRIBUTE, None)
                    if info is None:
                        raise RuntimeError(
                            "the images were encoded before vtprune.patch was applied; encode them again after patching"
                        )
                    context.update(info)
                pre_pruner.begin_prefill(visual, int(given["image"]) + int(given["video"]), **context)
            if in_pruner is not None:
                in_pruner.begin_prefill(torch.where(visual, visual.long().cumsum(dim=1) - 1, -1))
            return None

        return [self.base.register_forward_pre_hook(hook, with_kwargs=True)]

    def prefill_patches(self, pruner) -> list:
        return [
            InstanceMethodPatch(self.base, "get_image_features", self._with_image_info(pruner)),
            InstanceMethodPatch(self.base, "get_video_features", self._with_video_info(pruner)),
        ]

    def _with_image_info(self, pruner):
        def make_wrapper(get_image_features):
            @functools.wraps(get_image_features)  # generate() reads its signature
            def wrapper(*args, **kwargs):
                output = get_image_features(*args, **kwargs)
                image_sizes = kwargs["image_sizes"] if "image_sizes" in kwargs else args[1]
                ratio = kwargs.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
                pixels = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
                info = {
                    "images": self.packing_map(image_sizes, kwargs.get("batch_num_images"), ratio),
                    "image_scores": getattr(output, SCORES_ATTRIBUTE, None) or {},
                    "image_pixels": pixels[:, 0],  # each image's base (thumbnail) view: quota's frames
                }
                setattr(output, ANYRES_ATTRIBUTE, info)
                if pruner.pending is not None and "images" not in pruner.pending.context:
                    pruner.pending.context.update(info)
                return output

            return wrapper

        return make_wrapper

    def _with_video_info(self, pruner):
        pooled = self.frame_layout().grid

        def make_wrapper(get_video_features):
            @functools.wraps(get_video_features)
            def wrapper(*args, **kwargs):
                output = get_video_features(*args, **kwargs)
                pixels = kwargs["pixel_values_videos"] if "pixel_values_videos" in kwargs else args[0]
                videos, frames = pixels.shape[:2]
                scores = {  # pooled like the features: bilinear to ceil(side / 2) per side
                    name: F.interpolate(
                        s.float().view(-1, 1, self.side, self.side), size=pooled, mode="bilinear"
                    ).flatten(1)
                    for name, s in (getattr(output, SCORES_ATTRIBUTE, None) or {}).items()
                }
                info = {"video": {"shape": (videos, frames), "scores": scores, "pixels": pixels}}
                setattr(output, VIDEO_ATTRIBUTE, info)
                if pruner.pending is not None and "video" not in pruner.pending.context:
                    pruner.pending.context.update(info)
                return output

            return wrapper

        return make_wrapper

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
            token_map = torch.where(newline, -1, token_map)
            valid = torch.zeros(count * num_tokens, dtype=torch.bool)
            valid[token_map[token_map >= 0]] = True
            images.append(AnyResImage(token_map, valid.view(count, num_tokens), (nh, nw)))
        return images
