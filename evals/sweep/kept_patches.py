"""Pictures of which patches a method kept: the one renderer of ``make demo`` and ``vtprune eval``."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

DROPPED_SHADE = (0, 0, 0, 170)  # a dropped patch: black at 2/3 opacity over the image
# a merged group's tint (colour-blind-safe Okabe-Ito hues), by group index
GROUP_COLOURS = [
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
]


def kept_patch_overlay(
    image: Image.Image, kept, grid: tuple[int, int], num_prefix: int = 0, merged=None
) -> Image.Image:
    """Dim every patch that was pruned; with a merge map, tint each merged group in its own colour.

    ``kept`` (a tensor or a list of ints) indexes one image's visual tokens, the first
    ``num_prefix`` of which (such as [CLS]) are not patches; ``grid`` is (rows, columns) of patches.
    ``merged`` (``handle.last.stages[i].merged[b]`` of a merge method, or None): for each visual
    token the kept token that carries it, -1 for none. A patch no kept token carries is dimmed, a
    patch in a group of several (VisionZip's contextual tokens, a pooling bin, PruMerge+'s extra
    token) is tinted with its group's colour and outlined, a patch kept as itself is left as it is.
    """
    rows, cols = grid
    image = image.convert("RGB")
    width, height = image.size
    shade = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    if merged is not None:
        groups = [int(g) for g in (merged.tolist() if hasattr(merged, "tolist") else merged)][num_prefix:]
        sizes = defaultdict(int)
        for group in groups:
            sizes[group] += 1
    else:
        indices = kept.tolist() if hasattr(kept, "tolist") else kept
        kept_patches = {int(i) - num_prefix for i in indices if int(i) >= num_prefix}
        groups = [0 if index in kept_patches else -1 for index in range(rows * cols)]
        sizes = {0: 1}
    for index in range(rows * cols):
        group = groups[index]
        r, c = divmod(index, cols)
        box = [c * width / cols, r * height / rows, (c + 1) * width / cols - 1, (r + 1) * height / rows - 1]
        if group < 0:
            draw.rectangle(box, fill=DROPPED_SHADE)
        elif sizes[group] > 1:
            colour = GROUP_COLOURS[group % len(GROUP_COLOURS)]
            draw.rectangle(box, fill=(*colour, 110), outline=(*colour, 255))
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


def draw_kept_patches(runs: list[dict], examples_dir: Path, out_dir: Path, size: int = 192) -> list[Path]:
    """``vtprune eval``: one picture per (task, sample), the model's input then each configuration's kept patches.

    ``runs``' examples name the saved model-view image (``image_file`` in ``examples_dir``) and
    the kept indices of the last stage; the image is drawn ``size`` pixels wide or more.
    """
    by_sample = defaultdict(list)
    for run in runs:
        for example in run.get("examples", []):
            by_sample[(example["task"], example["doc_id"])].append(example)
    written = []
    for (task, doc_id), examples in sorted(by_sample.items(), key=lambda item: (item[0][0], str(item[0][1]))):
        source = examples_dir / examples[0]["image_file"]
        if not source.exists():
            continue
        image = Image.open(source).convert("RGB")
        scale = max(1, size // max(image.size))
        image = image.resize((image.width * scale, image.height * scale), resample=Image.Resampling.NEAREST)
        pictures, titles = [image], ["input"]
        for example in examples:
            kept, merged = example["stages"][-1]["kept"], example["stages"][-1].get("merged")
            pictures.append(kept_patch_overlay(image, kept, tuple(example["grid"]), example["num_prefix"], merged))
            titles.append(f"{example['method']} ({len(kept)}/{example['num_tokens']})"[: max(8, image.width // 6)])
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{task}_doc{doc_id}.png"
        panel(pictures, titles, columns=len(pictures)).save(path)
        written.append(path)
    return written
