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
  wrapper attaches the grids and the vision probes' scores to the encoder output;
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
- quota (QuoTA, :meth:`Qwen2VLAdapter._quota_selector`): every video and every image is a frame
  set with its own budget (an image: one frame); a frame is one temporal slice, (h/2, w/2) tokens,
  and the scorer sees its pixels (the first frame of each temporal pair, :func:`frames_from_patches`).
  The kept frames' resized grids fill the item's first placeholders, the rest are dropped, and
  the engine writes their M-RoPE positions (frame i, grid (h', w'): (s + i, s + r, s + c), s the
  item's first value) and moves the text after the item to s + its larger new side, as
  ``get_rope_index`` would; "compact" then closes the unused values. ``rope_deltas`` stay the
  unpruned prompt's (also when the scorer runs this model itself).

``handle.last`` counts visual tokens (image and video) in order of appearance.
"""

from __future__ import annotations

import functools

import torch

from vtprune.engine.in_llm import InLLMPruner
from vtprune.engine.pre_llm import TokenSelection
from vtprune.engine.probe import received_attention
from vtprune.methods.base import BudgetConfig, VisualLayout
from vtprune.methods.quota import plan_stats
from vtprune.patches import InstanceMethodPatch, register_adapter
from vtprune.patches.llava import LlavaAdapter, _kwarg
from vtprune.patches.llm_backbones import LlamaStyleBackbone

VISUAL_ATTRIBUTE = "_vtprune_visual"  # set on get_*_features' output while patched
KINDS = ("image", "video")


class Qwen2VLBackbone(LlamaStyleBackbone):
    """``Qwen2VLTextModel``: a Llama-style stack with M-RoPE.

    The rotary module takes the (3, B, T) M-RoPE rows; decoder layers and mask builders get the
    1-D text row of a (4, B, T) input, else None (what ``Qwen2VLTextModel.forward`` passes them).
    """

    def __init__(self, language_model: torch.nn.Module):  # the checks of the parent, for this family
        config = language_model.config
        if config.model_type != "qwen2_vl_text":
            raise TypeError(f"Qwen2VLBackbone expects a Qwen2VLTextModel, got {type(language_model).__name__}")
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


@register_adapter
class Qwen2VLAdapter(LlavaAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    supports_feature_replacement = True  # quota: frames replaced by their resized grids

    def __init__(self, model):
        self.model = model
        self.base = model.model if type(model).__name__ == self.model_classes[0] else model
        self.config = self.base.config
        self.vision_tower = self.base.visual
        self.language_model = self.base.language_model
        self.merge = self.config.vision_config.spatial_merge_size
        self._collected: dict = {}  # probe name -> merged-token scores of the ViT call in progress

    # -- what the model looks like ------------------------------------------------------------
    @property
    def select_strategy(self) -> str:
        return "full"  # every merged token goes to the LLM

    @property
    def vision_feature_layer(self):
        return -1  # the merger reads the last block's output

    def layout(self) -> VisualLayout:
        """Nominal only: grids vary per image; the selector builds each frame's layout."""
        return VisualLayout(num_tokens=1, grid=(1, 1))

    def _vision_layers(self) -> torch.nn.ModuleList:
        return self.vision_tower.blocks

    def has_cls_token(self) -> bool:
        return False

    def feature_attention(self) -> torch.nn.Module:
        return self.vision_tower.blocks[-1].attn

    def vision_attention(self, layer) -> torch.nn.Module:
        if layer == "feature":
            return self.feature_attention()
        blocks = self.vision_tower.blocks
        if not -len(blocks) <= layer < len(blocks):
            raise ValueError(f"vision layer {layer} is outside the ViT's {len(blocks)} blocks")
        return blocks[layer].attn

    # -- wiring ---------------------------------------------------------------------------
    def token_selector(self, method, layout):
        if getattr(method, "replaces_features", False):
            return self._quota_selector(method)
        if method.multi_crop_only:
            raise ValueError(
                f"method {method.name!r} splits a budget across the crops of AnyRes images; Qwen2-VL has no crops "
                "(native resolution): use fastervlm (score='received'), fopru, random or uniform"
            )
        merge = self.merge

        def select(pending, device):
            keeps, everything = {}, True
            for kind in KINDS:
                info = pending.context.get(kind)
                if info is None:
                    continue
                parts, first = [], 0
                for t, h, w in info["grids"]:  # a few images / videos per batch
                    frame = VisualLayout(num_tokens=(h // merge) * (w // merge), grid=(h // merge, w // merge))
                    count = t * frame.num_tokens
                    scores = {name: s[first : first + count].view(t, -1) for name, s in info["scores"].items()}
                    keep, kept_all = select_frames(method, scores, t, frame, device)
                    parts.append(keep)
                    everything &= kept_all
                    first += count
                keeps[kind] = torch.cat(parts)
            if everything:
                return None
            masks = pending.context["masks"]
            keep = torch.zeros_like(pending.image_token_mask, device=device)
            for kind, kind_keep in keeps.items():
                keep = keep.masked_scatter(masks[kind].to(device), kind_keep)
            return keep[pending.image_token_mask.to(device)]

        return select

    def _quota_selector(self, method):
        """QuoTA: per video (and per image, a one-frame video), the method's :class:`FramePlan`
        replaces the frame tokens, and the resized frames bring their M-RoPE positions.

        An item with grid (t, h, w) has t frames of (h/2, w/2) tokens; its budget T is its own
        (t * h/2 * w/2 unpruned tokens, or ``keep_ratio`` / ``budget_tokens`` of them). The kept
        frames' resized grids fill the item's first columns, in order; its other columns are
        dropped. Frame i (its temporal index in the item) with resized grid (h', w') gets the
        positions (s + i, s + r, s + c), r < h', c < w', s = the item's first position value (as
        ``get_rope_index`` numbers an item). The question is one per sample (``query``).
        """
        merge = self.merge
        vision = self.config.vision_config
        patch_shape = (vision.in_channels, vision.patch_size, merge, vision.temporal_patch_size)

        def select(pending, device):
            context, embeds, positions = pending.context, pending.inputs_embeds, pending.position_ids
            if positions is None or positions.dim() != 3:
                raise NotImplementedError("quota on Qwen2-VL needs the model's M-RoPE position ids (3 or 4 rows)")
            starts = positions[-3:][0].expand(embeds.shape[:2]).reshape(-1)  # (B * L,) s at an item's first column
            questions = method.queries(embeds.shape[0])
            rope_deltas = self.base.rope_deltas  # a scorer that runs this model (suspended) resets them
            items = []  # (first flat column, its flat columns, FramePlan, native frame grid)
            for kind in KINDS:  # a few images / videos per batch
                info = context.get(kind)
                if info is None:
                    continue
                mask = context["masks"][kind].to(device)
                columns = mask.flatten().nonzero().flatten()  # (N,) flat (B * L) index of this kind's columns
                features = embeds[mask]  # (N, D), items in order
                counts = [t * (h // merge) * (w // merge) for t, h, w in info["grids"]]
                firsts = torch.tensor([0, *counts[:-1]]).cumsum(0)
                first_patch = 0
                for (t, h, w), count, first, column in zip(
                    info["grids"], counts, firsts.tolist(), columns[firsts.to(device)].tolist(), strict=True
                ):
                    frames = frames_from_patches(
                        info["pixels"][first_patch : first_patch + t * h * w], (t, h, w), *patch_shape
                    )
                    first_patch += t * h * w
                    grid = features[first : first + count].view(t, h // merge, w // merge, -1)
                    plan = method.plan_video(frames, grid, questions[column // embeds.shape[1]])
                    items.append((column, columns[first : first + count], plan, (h // merge, w // merge)))
            self.base.rope_deltas = rope_deltas
            items.sort(key=lambda item: item[0])  # values and positions in column order
            plans = [plan for _, _, plan, _ in items]
            stats = plan_stats(plans)
            if all(grid == native for _, _, p, native in items for grid in p.grids):
                return TokenSelection(None, stats=stats)  # every frame as it is: bit-identical
            replaced = [columns[: plan.features.shape[0]] for _, columns, plan, _ in items]
            rows = [frame_positions(plan.grids, starts[column]) for column, _, plan, _ in items]
            replace = torch.zeros_like(starts, dtype=torch.bool)
            replace[torch.cat(replaced)] = True
            replace = replace.view_as(pending.image_token_mask)[pending.image_token_mask.to(device)]
            values = torch.cat([plan.features for plan in plans])
            return TokenSelection(replace, replace, values, positions=torch.cat(rows, dim=1), stats=stats)

        return select

    def _in_llm_pruner(self, method, pre_pruner) -> InLLMPruner:
        input_map = pre_pruner.map_prefill_columns if pre_pruner is not None else None
        return InLLMPruner(method, Qwen2VLBackbone(self.language_model), on_prefill=None, input_map=input_map)

    def prefill_triggers(self, pre_pruner, in_pruner, new_record) -> list:
        config = self.config

        def hook(module, args, kwargs):
            encoded = kwargs.get("mm_encoder_outputs") or {}
            given = {
                "image": _kwarg(args, kwargs, "pixel_values", 6) is not None or encoded.get("image") is not None,
                "video": kwargs.get("pixel_values_videos") is not None or encoded.get("video") is not None,
            }
            if not any(given.values()):
                if pre_pruner is not None:
                    pre_pruner.pending = None
                if in_pruner is not None:
                    in_pruner.pending = None
                return self._decode_positions(pre_pruner, args, kwargs)
            input_ids = _kwarg(args, kwargs, "input_ids", 0)
            if input_ids is None:
                raise ValueError("vtprune needs input_ids (to find the image and video tokens) when images are given")
            masks = {"image": input_ids == config.image_token_id, "video": input_ids == config.video_token_id}
            visual = masks["image"] | masks["video"]
            new_record()
            if pre_pruner is not None:
                context = {"masks": masks}
                for kind in KINDS:
                    info = getattr(encoded.get(kind), VISUAL_ATTRIBUTE, None)
                    if encoded.get(kind) is not None and info is None:
                        raise RuntimeError(
                            "the images were encoded before vtprune.patch was applied; encode them again after patching"
                        )
                    if info is not None:
                        context[kind] = info
                pre_pruner.begin_prefill(visual, int(given["image"]) + int(given["video"]), **context)
            if in_pruner is not None:
                in_pruner.begin_prefill(torch.where(visual, visual.long().cumsum(dim=1) - 1, -1))
            return None

        return [self.base.register_forward_pre_hook(hook, with_kwargs=True)]

    def _decode_positions(self, pre_pruner, args, kwargs):
        """A decode step on the pruned cache with no positions and no mask: the model would count
        the pruned cache; supply the unpruned model's M-RoPE positions (the engine shifts them)."""
        prompt = pre_pruner.prompt if pre_pruner is not None else None
        cache = kwargs.get("cache")
        if (
            prompt is None
            or cache is None
            or cache is not prompt.cache
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

    def prefill_patches(self, pruner) -> list:
        collected = self._collected
        return [
            InstanceMethodPatch(self.base, "get_image_features", self._with_visual_info(pruner, "image", collected)),
            InstanceMethodPatch(self.base, "get_video_features", self._with_visual_info(pruner, "video", collected)),
        ]

    def _with_visual_info(self, pruner, kind, collected):
        grid_name = f"{kind}_grid_thw"
        pixel_name = "pixel_values" if kind == "image" else "pixel_values_videos"

        def make_wrapper(get_features):
            @functools.wraps(get_features)  # generate() reads its signature
            def wrapper(*args, **kwargs):
                collected.clear()
                output = get_features(*args, **kwargs)
                grids = kwargs[grid_name] if grid_name in kwargs else args[1]
                pixels = kwargs[pixel_name] if pixel_name in kwargs else args[0]
                info = {"grids": torch.as_tensor(grids).tolist(), "scores": dict(collected), "pixels": pixels}
                collected.clear()
                setattr(output, VISUAL_ATTRIBUTE, info)
                if pruner.pending is not None and kind not in pruner.pending.context:
                    pruner.pending.context[kind] = info
                return output

            return wrapper

        return make_wrapper

    def _install_vision_probes(self, pruner):
        """Per probe: capture the block's ``qkv`` output and its rotary / ``cu_seqlens`` inputs, then
        score every merged token (mean of its merge x merge patches) when the block returns."""
        hooks = []
        merge2 = self.merge**2
        for name, (_kind, layer) in pruner.method.vision_probes().items():  # "received" only (no [CLS])
            attention = self.vision_attention(layer)
            captured = {}

            def capture_inputs(module, args, kwargs, captured=captured):
                captured["cu_seqlens"] = kwargs["cu_seqlens"]
                captured["cos_sin"] = kwargs["position_embeddings"]

            def capture_qkv(module, args, output, captured=captured):
                captured["qkv"] = output

            def score(module, args, output, captured=captured, name=name, attention=attention):
                if "qkv" not in captured:
                    return
                patches = received_per_slice(
                    captured.pop("qkv"),
                    captured.pop("cos_sin"),
                    captured.pop("cu_seqlens"),
                    attention.num_heads,
                    attention.scaling,
                )
                self._collected[name] = patches.view(-1, merge2).mean(dim=1)

            hooks += [
                attention.register_forward_pre_hook(capture_inputs, with_kwargs=True),
                attention.qkv.register_forward_hook(capture_qkv),
                attention.register_forward_hook(score),
            ]
        return hooks


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


def frame_positions(grids: list, start: torch.Tensor) -> torch.Tensor:
    """(3, sum h' * w') M-RoPE rows of an item's resized frames: frame i (None: dropped) with grid
    (h', w') gets (start + i, start + r, start + c) in raster order; start: a 0-d long tensor."""
    parts = []
    for index, grid in enumerate(grids):  # a few dozen frames
        if grid is None:
            continue
        r, c = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        parts.append(torch.stack([torch.full_like(r, index), r, c]).flatten(1))
    return torch.cat(parts, dim=1).to(start.device) + start


def select_frames(method, scores: dict, frames: int, layout: VisualLayout, device) -> tuple[torch.Tensor, bool]:
    """One image / video: the method's per-image selection on each of its ``frames`` grids.

    Returns ((frames * N,) bool keep, whether everything was kept). A ``keep_tokens`` budget larger
    than a frame keeps the whole frame (the grids of native-resolution models vary).
    """
    config = method.config
    whole = torch.ones(frames * layout.num_tokens, dtype=torch.bool, device=device)
    if isinstance(config, BudgetConfig) and config.keep_tokens is not None and config.keep_tokens >= layout.num_tokens:
        return whole, True
    if method.keeps_everything(layout):
        return whole, True
    score = next(iter(scores.values()), None)
    kept = method.select(score, frames, layout, device)  # (frames, k)
    keep = torch.zeros(frames, layout.num_tokens, dtype=torch.bool, device=device)
    return keep.scatter_(1, kept.to(device), True).flatten(), False
