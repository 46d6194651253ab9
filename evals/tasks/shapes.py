"""A procedurally drawn VQA set: two coloured shapes on grey, "what colour is the square?".

Deterministic for a given seed (Python's ``random.Random``; PIL draws without anti-aliasing).
The answer is a single colour word, so an answer is either right or wrong.
"""

from __future__ import annotations

import random

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (235, 210, 30)}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (128, 128, 128)


def _draw(draw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)


def _two_boxes(rng: random.Random, size: int) -> list[tuple[int, int, int, int]]:
    """Two non-overlapping boxes: one in the left half, one in the right half (order shuffled)."""
    side = size // 3
    boxes = []
    for half in (0, 1):
        left = rng.randint(half * size // 2, (half + 1) * size // 2 - side)
        top = rng.randint(0, size - side)
        boxes.append((left, top, left + side - 1, top + side - 1))
    rng.shuffle(boxes)
    return boxes


def records(n: int = 32, seed: int = 0, size: int = 64) -> list[dict]:
    """``n`` records ``{"image": PIL.Image, "question": str, "answer": str, "id": int}``."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for index in range(n):
        shapes = rng.sample(SHAPES, 2)
        colours = rng.sample(sorted(COLOURS), 2)
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for shape, colour, box in zip(shapes, colours, _two_boxes(rng, size)):
            _draw(draw, shape, box, COLOURS[colour])
        asked = rng.randrange(2)
        out.append(
            {"image": image, "question": f"What colour is the {shapes[asked]}?", "answer": colours[asked], "id": index}
        )
    return out


def corpus() -> list[str]:
    """Every text the task produces (for training a toy word-level tokenizer)."""
    from vtprune.evals.tasks.offline import INSTRUCTION

    return [f"What colour is the {shape}?" for shape in SHAPES] + [INSTRUCTION, " ".join(COLOURS)]
