"""The bundled sample image (evals/assets/sample.png), drawn procedurally.

A few small objects on a plain background, so a map of kept patches is easy to read.
Run ``python -m vtprune.evals.sample_image`` to redraw it.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SAMPLE_PATH = Path(__file__).parent / "assets" / "sample.png"


def draw_sample(size: int = 336) -> Image.Image:
    image = Image.new("RGB", (size, size), (236, 232, 222))
    draw = ImageDraw.Draw(image)
    s = size / 336
    draw.rectangle([40 * s, 50 * s, 110 * s, 120 * s], fill=(200, 40, 40))
    draw.ellipse([200 * s, 40 * s, 290 * s, 130 * s], fill=(40, 90, 200))
    draw.polygon([(90 * s, 300 * s), (150 * s, 190 * s), (210 * s, 300 * s)], fill=(40, 160, 70))
    draw.rectangle([250 * s, 230 * s, 300 * s, 280 * s], fill=(240, 190, 30))
    draw.text((150 * s, 150 * s), "A7", fill=(20, 20, 20))
    return image


def load_sample() -> Image.Image:
    return Image.open(SAMPLE_PATH).convert("RGB") if SAMPLE_PATH.exists() else draw_sample()


if __name__ == "__main__":
    draw_sample().save(SAMPLE_PATH)
    print(f"wrote {SAMPLE_PATH}")
