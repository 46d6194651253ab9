"""Adapter for transformers ``InternVLForConditionalGeneration`` / ``InternVLModel`` (the HF-native ``-hf``
checkpoints of InternVL 2.5 / 3 / 3.5; the remote-code ``InternVLChatModel`` is a different class).

What the model looks like:
- an image is a sequence of 448 px *tiles* (``pixel_values`` is (tiles of all images, 3, H, W)):
  the processor's crops of the resized image in raster order of its crop grid, then, when there
  is more than one crop, the whole image as a thumbnail, *last*. A video frame is one tile. The
  tile counts and the crop grid are not inputs of the model: each image's tokens are one run of
  ``config.image_token_id`` placeholders (between the processor's ``<img>`` / ``</img>``), so an
  image has run length / tokens-per-tile tiles;
- the InternViT tower has a [CLS] token (dropped with ``vision_feature_select_strategy="default"``)
  and q / k projections followed by ``q_norm`` / ``k_norm`` (Identity unless ``use_qk_norm``): the
  probes read q and k after those norms, which is what the attention uses;
- pixel shuffle (``downsample_ratio`` 0.5): one LLM token is a 2 x 2 block of ViT patches, token
  (i, j) of a tile's 16 x 16 raster = patches (2i, 2j), (2i, 2j + 1), (2i + 1, 2j), (2i + 1, 2j + 1)
  (``InternVLModel.pixel_shuffle``), so a tile is 256 tokens in raster order;
- 1-D positions; the decoder is the text model (Qwen2 for InternVL3, Qwen3 for InternVL3.5).

Scores of a token: the *sum* of its block's four patch scores (for the [CLS] row: the attention
mass [CLS] puts on the token's content). A sum and a mean rank tokens the same; with the sum, a
region's total over its tokens is its total over its patches, as on a tower without pixel shuffle,
which the region-based allocations (HiRED's crop weights, GlobalCom²'s crop retention softmax over
the thumbnail's blocks) depend on, and the [CLS] row stays a distribution over the tile's tokens.
Only probes that give one score per patch are pooled this way; a method that reads token features
from the tower is refused at patch time. DivPrune reads the projected tokens (the LLM input
embeddings of each image's columns, :meth:`~vtprune.patches._base.Adapter.llm_tokens`), one
(tiles, N, D) row per tile like the scores.

Selection per image over its tiles (the AnyRes conventions of :mod:`vtprune.methods.highres`): the
thumbnail is the base image (row 0 of a :class:`~vtprune.types.CropLayout`; the model's last tile)
and the other tiles the crops; every token exists (no unpadding); there are no newlines. A lone
tile (an image the processor did not split, a video frame) is a lone image. ``budget="per_image"``
gives every tile the same k, ``"global"`` splits the image's budget across its tiles. HiRED and
GlobalCom² place the thumbnail's attention onto the crops and so need the crop grid, which the
model is not told: it is recovered from the pixels as the grid whose stitched crops, shrunk to one
tile (area average), are nearest to the thumbnail (mean squared difference), among the grids of
that many crops (e.g. 1 x 6, 2 x 3, 3 x 2, 6 x 1). The thumbnail is the resized image and the
crops tile the same image resized, so the true grid matches up to resampling; a wrong one
scrambles the picture. This reads one number per image back to the host per prefill, as the
tile counts do.

fastervlm, fopru, random, uniform, hired, globalcom2 and divprune run, and the in-LLM methods (fastv, pdrop) on
the Qwen2 / Qwen3 decoders; quota (frame-replacing) is refused at patch time.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from vtprune.patches import register_adapter
from vtprune.patches._base import Adapter
from vtprune.types import CropLayout, VisualInputs, VisualLayout

SCORE_PROBES = ("cls", "received", "cls_logits")  # probe kinds with one score per patch: summed per block


@register_adapter
class InternVLAdapter(Adapter):
    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration", "InternVLModel")
    has_crops = True  # tiles: crops of the image plus its thumbnail

    @property
    def block(self) -> int:
        """Side of the patch block one LLM token merges (2 for ``downsample_ratio`` 0.5)."""
        return round(1 / self.config.downsample_ratio)

    @property
    def patch_grid(self) -> tuple[int, int]:
        vision = self.vision_config
        return vision.image_size[0] // vision.patch_size[0], vision.image_size[1] // vision.patch_size[1]

    def layout(self) -> VisualLayout:
        """One tile: its pixel-shuffled token grid."""
        rows, cols = (side // self.block for side in self.patch_grid)
        return VisualLayout(num_tokens=rows * cols, grid=(rows, cols))

    def check_model(self) -> None:
        if self.select_strategy != "default":
            raise ValueError(
                "InternVL's pixel shuffle needs a square patch grid: vision_feature_select_strategy='default' "
                f"(the [CLS] token dropped), got {self.select_strategy!r}"
            )
        if not isinstance(self.vision_feature_layer, int):
            raise ValueError(f"InternVL takes one vision_feature_layer, got {self.vision_feature_layer!r}")

    def check_pre_llm(self, method) -> None:
        super().check_pre_llm(method)
        features = sorted(kind for kind, _ in method.vision_probes().values() if kind not in (*SCORE_PROBES, "embeds"))
        if features:
            raise ValueError(
                f"method {method.name!r} reads {', '.join(features)} from the vision tower, but an InternVL token is "
                "a 2 x 2 block of patches (pixel shuffle) and vtprune pools only per-patch scores over a block; "
                "use fastervlm, fopru, random, uniform, hired, globalcom2 or divprune"
            )

    # -- the tower --------------------------------------------------------------------------------
    def vision_layers(self) -> torch.nn.ModuleList:
        return self.vision_tower.encoder.layer

    @staticmethod
    def layer_attention(layer: torch.nn.Module) -> torch.nn.Module:
        return layer.attention

    def has_cls_token(self) -> bool:
        return True

    def probe_hooks(self, name, kind, attention) -> list:
        """The base probes on the q / k the attention uses: after ``q_norm`` / ``k_norm``."""
        normed = types.SimpleNamespace(
            q_proj=attention.q_norm,
            k_proj=attention.k_norm,
            num_heads=attention.num_heads,
            scale=attention.scale,
            register_forward_hook=attention.register_forward_hook,
        )
        return super().probe_hooks(name, kind, normed)

    def visual_inputs(self, kind, arguments, scores) -> VisualInputs:
        pixels = arguments["pixel_values"]
        (rows, cols), b = self.patch_grid, self.block
        merged = {  # (tiles, patches) -> (tiles, tokens): the sum over each token's patch block
            name: s.float().view(-1, rows // b, b, cols // b, b).sum(dim=(2, 4)).flatten(1)
            for name, s in scores.items()
        }
        return VisualInputs(count=pixels.shape[0], scores=merged, pixels=pixels)

    # -- selection ----------------------------------------------------------------------------------
    def selector(self, method, layout):
        def select(inputs, device):
            if method.keeps_everything(layout):
                return None
            images = inputs.visual["image"]
            tiles = image_tiles(inputs.kinds["image"], layout.num_tokens, images.count)
            grids = crop_grids(images.pixels, tiles)
            keeps, first = [], 0
            for count, crop_grid in zip(tiles, grids, strict=True):  # a few images per batch
                order = thumbnail_first(count, device)
                valid = torch.ones(count, layout.num_tokens, dtype=torch.bool)
                crops = CropLayout(layout.grid, crop_grid, valid.to(device), valid)
                scores = {k: v[first : first + count].to(device)[order] for k, v in images.scores.items()}
                keep = method.select_crops(scores, crops)
                keeps.append(torch.empty_like(keep).index_copy_(0, order, keep).flatten())
                first += count
            return torch.cat(keeps)

        return select


def image_tiles(image_mask: torch.Tensor, tokens_per_tile: int, total: int) -> list[int]:
    """Tiles of each image, in order: (B, L) placeholder mask -> one count per run of placeholders."""
    edges = F.pad(image_mask.long(), (1, 1)).diff(dim=1)
    starts, ends = (edges == 1).nonzero()[:, 1], (edges == -1).nonzero()[:, 1]
    lengths = (ends - starts).tolist()
    if any(n % tokens_per_tile for n in lengths) or sum(lengths) != total * tokens_per_tile:
        raise ValueError(
            f"InternVL prompts hold each image as one run of tiles x {tokens_per_tile} image tokens, "
            f"{total} tiles in all; got runs of {lengths} tokens. Build prompts with the InternVL processor "
            "(it writes <img> ... </img> around each image's tokens)"
        )
    return [n // tokens_per_tile for n in lengths]


def thumbnail_first(count: int, device) -> torch.Tensor:
    """The model's tile order -> the base-first order of a CropLayout (the thumbnail is the last tile)."""
    return torch.arange(-1, count - 1, device=device) % count


def crop_grids(pixels: torch.Tensor, tiles: list[int]) -> list[tuple[int, int]]:
    """Each image's crop grid (nh, nw), from its pixels (see the module docstring); (0, 0) for a lone tile."""
    errors, candidates, first = [], [], 0
    for count in tiles:
        crops, thumbnail = pixels[first : first + count - 1].float(), pixels[first + count - 1].float()
        first += count
        n = count - 1
        grids = [(h, n // h) for h in range(1, n + 1) if n % h == 0] if count > 1 else []
        candidates.append(grids)
        channels, height, width = thumbnail.shape
        for nh, nw in grids:
            canvas = crops.view(nh, nw, channels, height, width).permute(2, 0, 3, 1, 4)
            shrunk = F.interpolate(canvas.reshape(1, channels, nh * height, nw * width), (height, width), mode="area")
            errors.append((shrunk[0] - thumbnail).pow(2).mean())
    error = torch.stack(errors).tolist() if errors else []
    grids, first = [], 0
    for options in candidates:
        scores = error[first : first + len(options)]
        grids.append(options[scores.index(min(scores))] if options else (0, 0))
        first += len(options)
    return grids
