"""AnyRes helpers: images as a base image plus a grid of crops, packed into columns.

Families that pack high-resolution images (LLaVA-NeXT, LLaVA-OneVision, the original LLaVA
package's ``spatial_unpad``) describe each image by an :class:`~vtprune.types.AnyResImage`: the
packing map (which sub-image token, or newline, each packed column is) and the tokens that
exist after unpadding. The selection per image is then the same everywhere:
``method.select_crops`` over its sub-images, then the newline rule (:func:`keep_packed`).
"""

from __future__ import annotations

import torch

from vtprune.types import AnyResImage, CropLayout


def anyres_image(token_map: torch.Tensor, count: int, num_tokens: int, crop_grid) -> AnyResImage:
    """The :class:`AnyResImage` of a packing map over ``count`` sub-images of ``num_tokens`` tokens."""
    valid = torch.zeros(count * num_tokens, dtype=torch.bool)
    valid[token_map[token_map >= 0]] = True
    return AnyResImage(token_map, valid.view(count, num_tokens), tuple(crop_grid))


def keep_packed(token_map: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(n,) packing map and (S, N) keep mask -> (n,) keep over the packed columns, newline rule applied.

    A row's newline stays iff the row keeps at least one token (the base image counts as one
    row when it carries the newline): no row without kept tokens leaves a stray newline, and
    every kept row stays closed by its newline.
    """
    num_tokens = keep.shape[1]
    visual = token_map >= 0
    kept = keep.flatten()[token_map.clamp(min=0)] & visual
    newline = ~visual
    base = visual & (token_map < num_tokens)
    # a row starts after a newline, and where the crop canvas starts after the base image
    previous_newline = torch.cat([newline.new_zeros(1), newline[:-1]])
    previous_base = torch.cat([base.new_zeros(1), base[:-1]])
    starts = previous_newline | (previous_base & visual & ~base)
    row = starts.long().cumsum(dim=0)
    row_keeps = torch.zeros(token_map.numel() + 1, dtype=torch.long, device=keep.device)
    row_keeps.scatter_add_(0, row, kept.long())
    return kept | (newline & (row_keeps[row] > 0))


def select_packed(method, grid, images: list[AnyResImage], scores: dict, device, spliced=None) -> torch.Tensor:
    """Per image, ``method.select_crops`` over its sub-images and the newline rule: (columns,) bool
    over the packed columns of all images, in order.

    scores: probe name -> (sub-images of all images, N) rows; spliced: None, or a bool per image
    (False: encoded but not in the prompt, so its rows are skipped and it has no columns).
    """
    keeps, first = [], 0
    for index, image in enumerate(images):  # a few images per batch, not a loop over tokens
        count = image.valid.shape[0]
        if spliced is None or bool(spliced[index]):
            crops = CropLayout(grid, image.crop_grid, image.valid.to(device), image.valid)
            keep = method.select_crops({k: v[first : first + count] for k, v in scores.items()}, crops)
            keeps.append(keep_packed(image.token_map.to(device), keep))
        first += count
    return torch.cat(keeps) if keeps else torch.zeros(0, dtype=torch.bool, device=device)
