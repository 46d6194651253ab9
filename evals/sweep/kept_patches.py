"""Pictures of which patches a method kept: the one renderer of ``make demo`` and ``vtprune eval``."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

DROPPED_SHADE = (0, 0, 0, 170)  # a dropped patch: black at 2/3 opacity over the image


def kept_patch_overlay(image: Image.Image, kept, grid: tuple[int, int], num_prefix: int = 0) -> Image.Image:
    """Dim every patch that was pruned.

    ``kept`` (a tensor or a list of ints) indexes one image's visual tokens, the first
    ``num_prefix`` of which (such as [CLS]) are not patches; ``grid`` is (rows, columns) of patches.
    """
    rows, cols = grid
    image = image.convert("RGB")
    width, height = image.size
    shade = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    indices = kept.tolist() if hasattr(kept, "tolist") else kept
    kept_patches = {int(i) - num_prefix for i in indices if int(i) >= num_prefix}
    for index in range(rows * cols):
        if index in kept_patches:
            continue
        r, c = divmod(index, cols)
        box = [c * width / cols, r * height / rows, (c + 1) * width / cols - 1, (r + 1) * height / rows - 1]
        draw.rectangle(box, fill=DROPPED_SHADE)
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
            kept = example["stages"][-1]["kept"]
            pictures.append(kept_patch_overlay(image, kept, tuple(example["grid"]), example["num_prefix"]))
            titles.append(f"{example['method']} ({len(kept)}/{example['num_tokens']})"[: max(8, image.width // 6)])
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{task}_doc{doc_id}.png"
        panel(pictures, titles, columns=len(pictures)).save(path)
        written.append(path)
    return written
