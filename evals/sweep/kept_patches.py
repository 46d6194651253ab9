"""Pictures of which patches a method kept."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw


def kept_patch_overlay(image: Image.Image, kept: torch.Tensor, grid: tuple[int, int], num_prefix: int = 0):
    """Dim every patch that was pruned. ``kept`` indexes one image's visual tokens."""
    rows, cols = grid
    image = image.convert("RGB")
    width, height = image.size
    shade = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    kept_patches = {int(i) - num_prefix for i in kept.tolist() if int(i) >= num_prefix}
    for index in range(rows * cols):
        if index in kept_patches:
            continue
        r, c = divmod(index, cols)
        box = [c * width / cols, r * height / rows, (c + 1) * width / cols - 1, (r + 1) * height / rows - 1]
        draw.rectangle(box, fill=(0, 0, 0, 170))
    return Image.alpha_composite(image.convert("RGBA"), shade).convert("RGB")


def panel(images: list[Image.Image], titles: list[str], columns: int = 4, pad: int = 22) -> Image.Image:
    """Tile images with a title above each."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * width, rows * (height + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, (image, title) in enumerate(zip(images, titles, strict=True)):
        x, y = (index % columns) * width, (index // columns) * (height + pad)
        draw.text((x + 4, y + 4), title, fill=(0, 0, 0))
        sheet.paste(image.resize((width, height)), (x, y + pad))
    return sheet
