"""Adapter for transformers ``Qwen2VLForConditionalGeneration`` / ``Qwen2VLModel`` (images and video).

What the model looks like (transformers 5.24):
- the ViT (``model.visual``) sees each image / video as a (t, h, w) grid of patches (``*_grid_thw``;
  a video's t counts temporal patches of ``temporal_patch_size`` frames), attends within each
  temporal slice (``cu_seqlens``), and its ``merger`` turns every 2 x 2 block of patches into one
  LLM token: an image is t x (h/2) x (w/2) tokens in (t, row, column) order, no [CLS] token and
  no newline tokens. Image tokens are ``image_token_id``, video tokens ``video_token_id``.
- M-RoPE: the LLM's position ids are (3, B, L) (temporal, height, width; (4, B, L) with a 1-D text
  row in front under ``generate``), computed by ``get_rope_index`` at prefill; decode steps get
  ``text position + rope_deltas`` (``generate``: the last prompt column + 1).

What this adapter does (hooks and instance-method wrappers on this model only, all undone by
``remove()``):
- ``get_image_features`` / ``get_video_features`` are wrapped (``generate`` calls them before
  the prefill and pops ``*_grid_thw`` afterwards, so no module hook would see the grids): the
  wrapper hands the stack the grids, the pixels and the vision probes' scores;
- vision probes (``fopru``; ``fastervlm`` with ``score="received"``): the attention each patch
  receives at the chosen ViT block, from the block's own fused ``qkv`` projection and rotary
  embedding, per temporal slice, in query chunks (no eager switch, no n x n map); a merged token
  scores the mean of its 2 x 2 patches;
- selection: every temporal slice of every image / video is one "frame" with grid
  (h/2, w/2), and the method's per-image budget applies per frame (``keep_tokens`` larger than a
  frame keeps the whole frame); [CLS]-scored methods raise at patch time unless the substitute
  is opted into; crop-budget methods (hired, globalcom2) are refused;
- positions: the pre-LLM and in-LLM engines cut all rows of the position ids
  (:mod:`vtprune.engine.positions`): ``"original"`` keeps each kept token's (t, h, w) position,
  ``"compact"`` closes the position values no kept token uses; ``rope_deltas`` (the model's cache
  for decode steps) is left as the unpruned model set it: decode positions arrive in the unpruned
  numbering (from ``generate``, or from ``rope_deltas`` + the full attention mask) and the engines
  shift them. A decode forward with neither ``position_ids`` nor ``attention_mask`` would make the
  model count the *pruned* cache; the ``Qwen2VLModel`` pre-hook then supplies the unpruned
  positions itself. ``mm_token_type_ids`` is only read at prefill, on the unpruned prompt, to build
  those positions; nothing downstream sees it, so it stays as the user passed it.
- in-LLM methods (fastv, pdrop): :class:`Qwen2VLBackbone` gives the engine the M-RoPE rotary
  embedding and hands the decoder layers the text row, as ``Qwen2VLTextModel`` does.
- quota (QuoTA, :meth:`Qwen2VLAdapter._quota_selector` and
  :func:`vtprune.patches._frames.plan_frame_sets`): every video and every image is a frame
  set with its own budget (an image: one frame); a frame is one temporal slice, (h/2, w/2) tokens,
  and the scorer sees its pixels (the first frame of each temporal pair, :func:`frames_from_patches`).
  The kept frames' resized grids fill the item's first placeholders, the rest are dropped, and
  the engine writes their M-RoPE positions (frame i, grid (h', w'): (s + i, s + r, s + c), s the
  item's first value; the temporal value s + i is read off the model's own positions at the frame's
  first column, so a family whose frames step by more than 1, Qwen2.5-VL's video, keeps its step)
  and moves the text after the item to s + its larger new side, as ``get_rope_index`` would;
  "compact" then closes the unused values. ``rope_deltas`` stay the
  unpruned prompt's (also when the scorer runs this model itself).

``handle.last`` counts visual tokens (image and video) in order of appearance.
"""

from __future__ import annotations

import threading

import torch

from vtprune.engine.pre_llm import visual_rows
from vtprune.engine.probe import received_attention
from vtprune.patches import register_adapter
from vtprune.patches._backbones import LlamaStyleBackbone
from vtprune.patches._base import IMAGES_AND_VIDEOS, Adapter, scatter_kinds
from vtprune.patches._frames import FrameSet, plan_frame_sets, select_frames
from vtprune.types import TokenSelection, VisualInputs, VisualLayout


class Qwen2VLBackbone(LlamaStyleBackbone):
    """``Qwen2VLTextModel`` (and the Qwen2.5-VL / Qwen3-VL text models): a Llama-style stack with M-RoPE.

    The rotary module takes the (3, B, T) M-RoPE rows; decoder layers and mask builders get the
    1-D text row of a (4, B, T) input, else None (what ``Qwen2VLTextModel.forward`` passes them).
    """

    def __init__(self, language_model: torch.nn.Module, model_type: str = "qwen2_vl_text"):
        """The checks of the parent, for a family's text model (``model_type``: its config's)."""
        config = language_model.config
        if config.model_type != model_type:
            raise TypeError(
                f"Qwen2VLBackbone expects a decoder stack with model_type={model_type!r}, got "
                f"{type(language_model).__name__} (model_type={config.model_type!r})"
            )
        self.model = language_model
        self.config = config
        self.model_type = config.model_type
        self.layers = language_model.layers

    def rotary(self, hidden, position_ids):
        rows = position_ids[-3:] if position_ids.dim() == 3 else position_ids
        return self.model.rotary_emb(hidden, rows)

    @staticmethod
    def layer_position_ids(position_ids):
        if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
            return position_ids[0]
        return None


def received_per_slice(qkv: torch.Tensor, cos_sin, cu_seqlens, num_heads: int, scale: float) -> torch.Tensor:
    """Attention each patch receives in its temporal slice, mean over heads and queries. (S,) fp32.

    qkv: (S, 3 * D) the block's fused projection; cos_sin: the block's vision rotary (cos, sin);
    cu_seqlens: (slices + 1,) slice boundaries, as the block attends.
    """
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    length = qkv.shape[0]
    q, k, _ = qkv.view(length, 3, num_heads, -1).unbind(1)
    q, k = apply_rotary_pos_emb_vision(q, k, *cos_sin)  # (S, H, hd)
    bounds = cu_seqlens.tolist()  # the block itself reads them the same way
    parts = [
        received_attention(q[None, a:b].flatten(2), k[None, a:b].flatten(2), num_heads, scale)[0]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(parts)


def keys_per_merge_unit(qkv: torch.Tensor, cos_sin, num_heads: int, merge2: int) -> torch.Tensor:
    """The block's keys after the vision rotary, mean over heads and over each merge unit of
    ``merge2`` patches: (S, 3 * D) -> (S / merge2, D / H) fp32 (VisionZip's Qwen2.5-VL metric)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    length = qkv.shape[0]
    q, k, _ = qkv.view(length, 3, num_heads, -1).unbind(1)
    _, k = apply_rotary_pos_emb_vision(q, k, *cos_sin)  # (S, H, hd)
    return k.float().mean(dim=1).view(length // merge2, merge2, -1).mean(dim=1)


@register_adapter
class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    visual_kinds = IMAGES_AND_VIDEOS
    supports_feature_replacement = True  # quota: frames replaced by their resized grids
    merges_in_place = True  # visionzip's qwen2_5_vl variant: contextual tokens at their targets' columns
    no_crops = "has no crops (native resolution): use fastervlm (score='received'), fopru, random or uniform"

    def __init__(self, model):
        super().__init__(model)
        self.merge = self.config.vision_config.spatial_merge_size

    # -- what the model looks like ------------------------------------------------------------
    def find_vision_tower(self) -> torch.nn.Module:
        return self.base.visual

    @property
    def select_strategy(self) -> str:
        return "full"  # every merged token goes to the LLM

    @property
    def vision_feature_layer(self):
        return -1  # the merger reads the last block's output

    def layout(self) -> VisualLayout:
        """Nominal only: grids vary per image; the selector builds each frame's layout."""
        return VisualLayout(num_tokens=1, grid=(1, 1))

    def budget_layout(self) -> None:
        return None  # a keep_tokens budget larger than a frame keeps the whole frame

    def vision_layers(self) -> torch.nn.ModuleList:
        return self.vision_tower.blocks

    @staticmethod
    def layer_attention(layer: torch.nn.Module) -> torch.nn.Module:
        return layer.attn

    def has_cls_token(self) -> bool:
        return False

    def backbone(self):
        return Qwen2VLBackbone(self.language_model, f"{self.config.model_type}_text")

    def visual_inputs(self, kind, arguments, scores) -> VisualInputs:
        grids = arguments[f"{kind}_grid_thw"]
        pixels = arguments["pixel_values" if kind == "image" else "pixel_values_videos"]
        return VisualInputs(scores=scores, pixels=pixels, grids=torch.as_tensor(grids).tolist())

    def llm_tokens(self, kind, info, columns, embeds) -> torch.Tensor:
        """(tokens of all items, D): one row per merged token, in the LLM's order, as the probes."""
        return visual_rows(embeds, columns.to(embeds.device), int(columns.sum()))

    # -- selection ------------------------------------------------------------------------
    def selector(self, method, layout):
        if method.replaces_features:
            return self._quota_selector(method)
        if method.merges_in_place:
            return self._in_place_selector(method)
        merge = self.merge

        def select(inputs, device):
            keeps, everything = {}, True
            for kind, info in inputs.visual.items():
                parts, first = [], 0
                for t, h, w in info.grids:  # a few images / videos per batch
                    frame = VisualLayout(num_tokens=(h // merge) * (w // merge), grid=(h // merge, w // merge))
                    count = t * frame.num_tokens
                    scores = {name: s[first : first + count].unflatten(0, (t, -1)) for name, s in info.scores.items()}
                    keep, kept_all = select_frames(method, scores, t, frame, device)
                    parts.append(keep)
                    everything &= kept_all
                    first += count
                keeps[kind] = torch.cat(parts)
            return None if everything else scatter_kinds(inputs, keeps, device)

        return select

    def _in_place_selector(self, method):
        """Per image, ``method.merge_in_place`` on its merged tokens (LLM input embeddings, probe
        scores): the kept columns, their values, and each token's carrier (images only)."""
        merge = self.merge

        def select(inputs, device):
            if "video" in inputs.visual:
                raise NotImplementedError(
                    f"{method.name}: this variant merges image tokens only (the official code's video path does "
                    "not run); pass images"
                )
            info = inputs.visual["image"]
            counts = [t * (h // merge) * (w // merge) for t, h, w in info.grids]
            embeds = visual_rows(inputs.inputs_embeds, inputs.kinds["image"].to(device), sum(counts))
            keep = torch.zeros(sum(counts), dtype=torch.bool, device=device)
            values, into, first = [], [], 0
            for count in counts:  # a few images per batch
                scores = {name: score[first : first + count] for name, score in info.scores.items()}
                kept, rows, sources = method.merge_in_place(scores, embeds[first : first + count])
                keep[first + kept] = True
                values.append(rows)
                into.append(first + kept[sources])
                first += count
            return TokenSelection(keep, replace=keep, values=torch.cat(values), merged_into=torch.cat(into))

        return select

    def _quota_selector(self, method):
        """QuoTA: per video (and per image, a one-frame video), the method's :class:`FramePlan`
        replaces the frame tokens, and the resized frames bring their M-RoPE positions.

        An item with grid (t, h, w) has t frames of (h/2, w/2) tokens; its budget T is its own
        (t * h/2 * w/2 unpruned tokens, or ``keep_ratio`` / ``budget_tokens`` of them). The kept
        frames' resized grids fill the item's first columns, in order; its other columns are
        dropped. Frame i (its temporal index in the item) with resized grid (h', w') gets the
        positions (s_i, s + r, s + c), r < h', c < w', s = the item's first position value and s_i the
        temporal value the model gave frame i (its first column's; s + i in Qwen2-VL, s + i x the
        time step in Qwen2.5-VL's video), as ``get_rope_index`` numbers an item. The question is one
        per sample (``query``).
        """
        merge = self.merge
        vision = self.config.vision_config
        patch_shape = (vision.in_channels, vision.patch_size, merge, vision.temporal_patch_size)

        def select(inputs, device):
            embeds, positions = inputs.inputs_embeds, inputs.position_ids
            if positions is None or positions.dim() != 3:
                raise NotImplementedError("quota on Qwen2-VL needs the model's M-RoPE position ids (3 or 4 rows)")
            temporal = positions[-3:][0].expand(embeds.shape[:2]).reshape(-1)  # (B * L,) temporal values
            questions = method.queries(embeds.shape[0])
            visual = inputs.visual_mask.to(device)
            rank = visual.flatten().long().cumsum(0) - 1  # flat column -> its index among the visual columns
            visual_columns = visual.flatten().nonzero().flatten()  # index among the visual columns -> flat column
            sets, frame_times = [], {}
            for kind, info in inputs.visual.items():  # a few images / videos per batch
                columns = inputs.kinds[kind].to(device).flatten().nonzero().flatten()  # flat (B * L) index
                counts = [t * (h // merge) * (w // merge) for t, h, w in info.grids]
                firsts = torch.tensor([0, *counts[:-1]]).cumsum(0)
                first_patch = 0
                for (t, h, w), column in zip(info.grids, columns[firsts.to(device)].tolist(), strict=True):
                    frames = frames_from_patches(
                        info.pixels[first_patch : first_patch + t * h * w], (t, h, w), *patch_shape
                    )
                    first_patch += t * h * w
                    grid = (h // merge, w // merge)
                    first = int(rank[column])
                    frame_starts = [first + index * grid[0] * grid[1] for index in range(t)]
                    question = questions[column // embeds.shape[1]]
                    sets.append(FrameSet(frames, frame_starts, grid, question, origin=column))
                    frame_times[column] = temporal[visual_columns[torch.tensor(frame_starts, device=device)]]
            sets.sort(key=lambda frame_set: frame_set.origin)  # values and positions in column order
            rope_deltas = self.base.rope_deltas  # a scorer that runs this model (suspended) resets them
            selection, plans = plan_frame_sets(method, sets, embeds[visual])
            self.base.rope_deltas = rope_deltas
            if selection.keep is not None:
                rows = [
                    frame_positions(plan.grids, frame_times[frame_set.origin], temporal[frame_set.origin])
                    for frame_set, plan in zip(sets, plans, strict=True)
                ]
                selection.positions = torch.cat(rows, dim=1)
            return selection

        return select

    def text_forward_inputs(self, args, kwargs):
        """A decode step on the pruned cache with no positions and no mask: the model would count
        the pruned cache; supply the unpruned model's M-RoPE positions (the engine shifts them)."""
        cache = kwargs.get("cache")
        prompt = self.stack.pruned_prompt(cache)
        if (
            prompt is None
            or kwargs.get("position_ids") is not None
            or kwargs.get("attention_mask") is not None
            or self.base.rope_deltas is None
        ):
            return None
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        batch, query = (embeds.shape[:2]) if embeds is not None else ids.shape
        device = (embeds if embeds is not None else ids).device
        cached_after_prompt = cache.get_seq_length() - prompt.pruned_mask.shape[1]
        start = prompt.original_length + cached_after_prompt
        text = torch.arange(start, start + query, device=device).expand(batch, query)
        deltas = self.base.rope_deltas.to(device)
        positions = (text + deltas.repeat_interleave(batch // deltas.shape[0], dim=0))[None].expand(3, -1, -1)
        return args, dict(kwargs, position_ids=positions)

    def probe_hooks(self, name, kind, attention) -> list:
        """Capture the block's ``qkv`` output and its rotary / ``cu_seqlens`` inputs, then score every
        merged token (mean of its merge x merge patches) when the block returns: "received" (the ViT has
        no [CLS]), or "keys" (the rotated keys, mean over heads and the merge unit)."""
        merge2 = self.merge**2
        captured = threading.local()  # per thread: the block call in progress
        stack = self.stack

        def capture_inputs(module, args, kwargs):
            captured.cu_seqlens, captured.cos_sin = kwargs["cu_seqlens"], kwargs["position_embeddings"]

        def capture_qkv(module, args, output):
            captured.qkv = output

        def score(module, args, output):
            qkv = vars(captured).pop("qkv", None)
            if qkv is None:
                return
            if kind == "keys":
                stack.add_scores(name, keys_per_merge_unit(qkv, captured.cos_sin, attention.num_heads, merge2))
                return
            patches = received_per_slice(
                qkv, captured.cos_sin, captured.cu_seqlens, attention.num_heads, attention.scaling
            )
            stack.add_scores(name, patches.view(-1, merge2).mean(dim=1))

        return [
            attention.register_forward_pre_hook(capture_inputs, with_kwargs=True),
            attention.qkv.register_forward_hook(capture_qkv),
            attention.register_forward_hook(score),
        ]


def frames_from_patches(
    patches: torch.Tensor, grid: tuple[int, int, int], channels: int, patch: int, merge: int, temporal: int
) -> torch.Tensor:
    """Undo the Qwen2-VL processor's patch flattening for one image / video: its frames as images.

    patches: (t * h * w, C * temporal * patch * patch), the rows of ``pixel_values`` /
    ``pixel_values_videos`` for one (t, h, w) patch grid, in the processor's order
    (``Qwen2VLVideoProcessor.patchify``: temporal slice, merge-block row, merge-block column, the
    merge x merge patches of the block; each row is (C, temporal, patch, patch); the image processor
    writes the same layout with t = 1 and the image repeated over ``temporal``). Returns
    (t, C, h * patch, w * patch): the first frame of each temporal slice, normalised as the model
    received it.
    """
    t, h, w = grid
    x = patches.view(t, h // merge, w // merge, merge, merge, channels, temporal, patch, patch)[:, :, :, :, :, :, 0]
    # (t, h/m, w/m, m, m, C, p, p) -> (t, C, h/m, m, p, w/m, m, p)
    return x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(t, channels, h * patch, w * patch)


def frame_positions(grids: list, times: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """(3, sum h' * w') M-RoPE rows of an item's resized frames: frame i (None: dropped) with grid
    (h', w') gets (times[i], start + r, start + c) in raster order; times: (frames,) the temporal
    value the model gave each frame; start: a 0-d long tensor, the item's first value."""
    parts = []
    for index, grid in enumerate(grids):  # a few dozen frames
        if grid is None:
            continue
        r, c = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        spatial = torch.stack([r, c]).flatten(1).to(start.device) + start
        parts.append(torch.cat([times[index].expand(1, spatial.shape[1]), spatial]))
    return torch.cat(parts, dim=1)
