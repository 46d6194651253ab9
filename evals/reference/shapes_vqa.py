"""ShapesVQA: a procedurally generated visual question-answering set where small regions matter.

Every image is 96 x 96 pixels (a 12 x 12 grid of 8-pixel patches), split into 3 x 3 cells of
4 x 4 patches. A scene holds 3-6 coloured shapes (9-24 pixels across, one per cell), one
glyph tile (a white 5 x 5 bitmap letter on a black tile) in another cell, and 10-24 pieces
of clutter (dots and thin lines in the same colours) that no question is about.

Seven kinds of questions, each answered with one lower-case word from a closed set:

======================  ====================================================  ==================
kind                    example                                               answers
======================  ====================================================  ==================
``colour_at``           what colour is the object at the top left ?           8 colours
``shape_at``            what shape is the object at the center ?              5 shapes
``shape_of_colour``     what shape is the red object ?                        5 shapes
``count``               how many circles are there ?                          zero .. three
``bigger``              is the red object bigger than the blue object ?       yes / no
``exists``              is there a green triangle ?                           yes / no
``letter``              what letter is on the tile ?                          8 letters
======================  ====================================================  ==================

Answers are balanced within each kind (the scene is drawn for its question: a count question
picks the count first, a yes/no question picks the answer first). ``exists`` questions
that are answered "no" always name a colour and a shape that are both in the image, on
different objects, so they need the binding of colour to shape.

Determinism: record ``index`` of split ``split`` is drawn from ``random.Random("shapes-vqa:
{split}:{index}")`` (a string seed is hashed with SHA-512, independent of ``PYTHONHASHSEED``)
and rendered with integer PIL drawing calls only, so the same call gives the same pixels on
every machine. The question kind of record ``index`` is ``KINDS[index % 7]``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
PATCH_SIZE = 8
CELLS = 3  # 3 x 3 cells of CELL_SIZE pixels
CELL_SIZE = IMAGE_SIZE // CELLS
SPLITS = ("train", "validation", "test")

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 205),
    "orange": (245, 140, 30),
    "cyan": (40, 215, 225),
    "pink": (250, 135, 195),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
POSITIONS = (
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)
COUNT_WORDS = ("zero", "one", "two", "three")
KINDS = ("colour_at", "shape_at", "shape_of_colour", "count", "bigger", "exists", "letter")

# 5 x 5 bitmaps, '#' = white pixel block
GLYPHS = {
    "a": (".###.", "#...#", "#####", "#...#", "#...#"),
    "e": ("#####", "#....", "####.", "#....", "#####"),
    "h": ("#...#", "#...#", "#####", "#...#", "#...#"),
    "l": ("#....", "#....", "#....", "#....", "#####"),
    "o": (".###.", "#...#", "#...#", "#...#", ".###."),
    "t": ("#####", "..#..", "..#..", "..#..", "..#.."),
    "x": ("#...#", ".#.#.", "..#..", ".#.#.", "#...#"),
    "z": ("#####", "...#.", "..#..", ".#...", "#####"),
}
LETTERS = tuple(GLYPHS)

SMALL_SIZES = (9, 13)  # inclusive pixel ranges of object sides
LARGE_SIZES = (18, 24)
ALL_SIZES = (9, 24)


@dataclass
class SceneObject:
    """A shape or the glyph tile, occupying one cell. ``box`` = (x0, y0, x1, y1), x1/y1 exclusive."""

    kind: str  # "shape" or "glyph"
    cell: int
    box: tuple[int, int, int, int]
    colour: str | None = None
    shape: str | None = None
    letter: str | None = None

    @property
    def size(self) -> int:
        return self.box[2] - self.box[0]


@dataclass
class Scene:
    background: tuple[int, int, int]
    objects: list[SceneObject]
    clutter: list[tuple] = field(default_factory=list)  # ("dot", box, rgb) / ("line", xy, rgb)

    @property
    def shapes(self) -> list[SceneObject]:
        return [o for o in self.objects if o.kind == "shape"]

    @property
    def glyph(self) -> SceneObject:
        return next(o for o in self.objects if o.kind == "glyph")

    def unique_colours(self) -> list[str]:
        colours = [o.colour for o in self.shapes]
        return [c for c in colours if colours.count(c) == 1]


# -- scene sampling ----------------------------------------------------------------------------


def _place(rng: random.Random, cell: int, size: int) -> tuple[int, int, int, int]:
    """A random ``size`` x ``size`` box inside ``cell`` with a 1-pixel margin."""
    row, col = divmod(cell, CELLS)
    x0 = col * CELL_SIZE + rng.randint(1, CELL_SIZE - size - 1)
    y0 = row * CELL_SIZE + rng.randint(1, CELL_SIZE - size - 1)
    return (x0, y0, x0 + size, y0 + size)


def _glyph(rng: random.Random, cell: int) -> SceneObject:
    scale = rng.choice((2, 3))  # pixels per bitmap cell: tile side 14 or 19
    return SceneObject("glyph", cell, _place(rng, cell, 5 * scale + 4), letter=rng.choice(LETTERS))


def _clutter(rng: random.Random) -> list[tuple]:
    """Dots (1-3 px) and thin lines (4-10 px) in object colours and greys."""
    palette = list(COLOURS.values()) + [(200, 200, 200), (120, 120, 120)]
    items = []
    for _ in range(rng.randint(10, 24)):
        rgb = rng.choice(palette)
        x, y = rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE)
        if rng.random() < 0.5:
            side = rng.randint(1, 3)
            items.append(("dot", (x, y, x + side - 1, y + side - 1), rgb))
        else:
            length = rng.randint(4, 10)
            dx, dy = rng.choice(((1, 0), (0, 1), (1, 1), (1, -1)))
            items.append(("line", (x, y, x + dx * length, y + dy * length), rgb))
    return items


def _background(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(25, 70)
    return tuple(max(0, min(255, base + rng.randint(-12, 12))) for _ in range(3))


def _random_shapes(rng: random.Random, cells: list[int], count: int, exclude=()) -> list[SceneObject]:
    """``count`` shapes in the first free ``cells``, avoiding (colour, shape) pairs in ``exclude``."""
    objects = []
    for cell in cells[:count]:
        while True:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            if (colour, shape) not in exclude:
                break
        objects.append(SceneObject("shape", cell, _place(rng, cell, rng.randint(*ALL_SIZES)), colour, shape))
    return objects


def sample_scene(rng: random.Random, kind: str) -> tuple[Scene, str, str]:
    """A scene drawn for a question of ``kind``; returns (scene, question, answer)."""
    cells = list(range(CELLS * CELLS))
    rng.shuffle(cells)
    glyph, cells = _glyph(rng, cells[0]), cells[1:]
    num_shapes = rng.randint(3, 6)
    shapes, question, answer = _SAMPLERS[kind](rng, cells, num_shapes)
    scene = Scene(_background(rng), [*shapes, glyph], _clutter(rng))
    if kind == "letter":
        question, answer = "what letter is on the tile ?", glyph.letter
    return scene, question, answer


def _sample_at(rng, cells, num_shapes, attribute):
    shapes = _random_shapes(rng, cells, num_shapes)
    target = rng.choice(shapes)
    noun = "colour" if attribute == "colour" else "shape"
    return shapes, f"what {noun} is the object at the {POSITIONS[target.cell]} ?", getattr(target, attribute)


def _sample_shape_of_colour(rng, cells, num_shapes):
    colour = rng.choice(list(COLOURS))
    target = SceneObject("shape", cells[0], _place(rng, cells[0], rng.randint(*ALL_SIZES)), colour, rng.choice(SHAPES))
    others = _random_shapes(rng, cells[1:], num_shapes - 1, exclude={(colour, s) for s in SHAPES})
    return [target, *others], f"what shape is the {colour} object ?", target.shape


def _sample_count(rng, cells, num_shapes):
    shape, count = rng.choice(SHAPES), rng.randrange(len(COUNT_WORDS))
    num_shapes = max(num_shapes, count)
    objects = []
    for index, cell in enumerate(cells[:num_shapes]):
        kind = shape if index < count else rng.choice([s for s in SHAPES if s != shape])
        objects.append(
            SceneObject("shape", cell, _place(rng, cell, rng.randint(*ALL_SIZES)), rng.choice(list(COLOURS)), kind)
        )
    rng.shuffle(objects)
    return objects, f"how many {PLURALS[shape]} are there ?", COUNT_WORDS[count]


def _sample_bigger(rng, cells, num_shapes):
    first, second = rng.sample(list(COLOURS), 2)
    sizes = [rng.randint(*SMALL_SIZES), rng.randint(*LARGE_SIZES)]
    rng.shuffle(sizes)
    pair = [
        SceneObject("shape", cells[i], _place(rng, cells[i], sizes[i]), colour, rng.choice(SHAPES))
        for i, colour in enumerate((first, second))
    ]
    others = _random_shapes(rng, cells[2:], num_shapes - 2, exclude={(c, s) for c in (first, second) for s in SHAPES})
    answer = "yes" if sizes[0] > sizes[1] else "no"
    return [*pair, *others], f"is the {first} object bigger than the {second} object ?", answer


def _sample_exists(rng, cells, num_shapes):
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    exclude = {(colour, shape)}
    if rng.random() < 0.5:  # yes: the pair is there
        first = SceneObject("shape", cells[0], _place(rng, cells[0], rng.randint(*ALL_SIZES)), colour, shape)
        objects = [first, *_random_shapes(rng, cells[1:], num_shapes - 1)]
        answer = "yes"
    else:  # no: the colour and the shape are both there, on different objects
        other_shape = rng.choice([s for s in SHAPES if s != shape])
        other_colour = rng.choice([c for c in COLOURS if c != colour])
        pair = [
            SceneObject("shape", cells[0], _place(rng, cells[0], rng.randint(*ALL_SIZES)), colour, other_shape),
            SceneObject("shape", cells[1], _place(rng, cells[1], rng.randint(*ALL_SIZES)), other_colour, shape),
        ]
        objects = [*pair, *_random_shapes(rng, cells[2:], num_shapes - 2, exclude=exclude)]
        answer = "no"
    return objects, f"is there a {colour} {shape} ?", answer


_SAMPLERS = {
    "colour_at": lambda rng, cells, n: _sample_at(rng, cells, n, "colour"),
    "shape_at": lambda rng, cells, n: _sample_at(rng, cells, n, "shape"),
    "shape_of_colour": _sample_shape_of_colour,
    "count": _sample_count,
    "bigger": _sample_bigger,
    "exists": _sample_exists,
    "letter": lambda rng, cells, n: (_random_shapes(rng, cells, n), "", ""),
}


# -- rendering ---------------------------------------------------------------------------------


def _shape_polygon(shape: str, box: tuple[int, int, int, int]):
    """Integer outline of ``shape`` in ``box`` (x1/y1 exclusive); None for circles and squares."""
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    return None


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill) -> None:
    """Draw ``obj`` with ``fill`` (an RGB colour, or an integer label on a label map)."""
    x0, y0, x1, y1 = obj.box[0], obj.box[1], obj.box[2] - 1, obj.box[3] - 1
    if obj.kind == "glyph":
        draw.rectangle((x0, y0, x1, y1), fill=fill if isinstance(fill, int) else (0, 0, 0))
        return
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        inset = max(1, obj.size // 10)
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    elif obj.shape == "cross":
        bar = max(3, obj.size // 3)
        lo = (obj.size - bar) // 2
        draw.rectangle((x0 + lo, y0, x0 + lo + bar - 1, y1), fill=fill)
        draw.rectangle((x0, y0 + lo, x1, y0 + lo + bar - 1), fill=fill)
    else:
        draw.polygon(_shape_polygon(obj.shape, obj.box), fill=fill)


def _draw_letter(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    scale = (obj.size - 4) // 5
    for row, line in enumerate(GLYPHS[obj.letter]):
        for col, bit in enumerate(line):
            if bit == "#":
                x, y = obj.box[0] + 2 + col * scale, obj.box[1] + 2 + row * scale
                draw.rectangle((x, y, x + scale - 1, y + scale - 1), fill=(255, 255, 255))


def render(scene: Scene) -> Image.Image:
    """The RGB image of ``scene``: background, then clutter, then objects."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(image)
    for kind, xy, rgb in scene.clutter:
        if kind == "dot":
            draw.rectangle(xy, fill=rgb)
        else:
            draw.line(xy, fill=rgb, width=1)
    for obj in scene.objects:
        _draw_object(draw, obj, COLOURS.get(obj.colour))
        if obj.kind == "glyph":
            _draw_letter(draw, obj)
    return image


def label_map(scene: Scene) -> np.ndarray:
    """(96, 96) uint8: 0 where no object is, else 1 + the index of the object in ``scene.objects``."""
    labels = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(labels)
    for index, obj in enumerate(scene.objects):
        _draw_object(draw, obj, index + 1)
    return np.asarray(labels)


# -- records -----------------------------------------------------------------------------------


def _rng(split: str, index: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return random.Random(f"shapes-vqa:{split}:{index}")


def make_scene(split: str, index: int) -> tuple[Scene, str, str, str]:
    """The scene, question, answer and kind of record ``index`` of ``split`` (no rendering)."""
    kind = KINDS[index % len(KINDS)]
    scene, question, answer = sample_scene(_rng(split, index), kind)
    return scene, question, answer, kind


def make_record(split: str, index: int) -> dict:
    """One record: ``{"id", "image" (PIL RGB 96x96), "question", "answer", "kind"}``."""
    scene, question, answer, kind = make_scene(split, index)
    return {"id": f"{split}-{index}", "image": render(scene), "question": question, "answer": answer, "kind": kind}


def make_split(split: str, num_samples: int, start: int = 0) -> list[dict]:
    """Records ``start .. start + num_samples - 1`` of ``split`` ("train", "validation", "test")."""
    return [make_record(split, index) for index in range(start, start + num_samples)]


def scene_questions(scene: Scene) -> list[tuple[str, str, str]]:
    """Every question the scene answers unambiguously, as (kind, question, answer).

    Training asks these besides the record's own question, so one rendered image teaches
    several facts. Order is fixed (cells, colours, shapes in their canonical order).
    """
    shapes = sorted(scene.shapes, key=lambda o: o.cell)
    out = []
    for obj in shapes:
        out.append(("colour_at", f"what colour is the object at the {POSITIONS[obj.cell]} ?", obj.colour))
        out.append(("shape_at", f"what shape is the object at the {POSITIONS[obj.cell]} ?", obj.shape))
    unique = sorted(scene.unique_colours(), key=list(COLOURS).index)
    by_colour = {o.colour: o for o in shapes}
    for colour in unique:
        out.append(("shape_of_colour", f"what shape is the {colour} object ?", by_colour[colour].shape))
    for shape in SHAPES:
        count = sum(o.shape == shape for o in shapes)
        if count < len(COUNT_WORDS):
            out.append(("count", f"how many {PLURALS[shape]} are there ?", COUNT_WORDS[count]))
    for first in unique:
        for second in unique:
            a, b = by_colour[first], by_colour[second]
            if first != second and max(a.size, b.size) >= 1.35 * min(a.size, b.size):
                answer = "yes" if a.size > b.size else "no"
                out.append(("bigger", f"is the {first} object bigger than the {second} object ?", answer))
    pairs = {(o.colour, o.shape) for o in shapes}
    colours, kinds = {o.colour for o in shapes}, {o.shape for o in shapes}
    for colour in sorted(colours, key=list(COLOURS).index):
        for shape in sorted(kinds, key=SHAPES.index):
            answer = "yes" if (colour, shape) in pairs else "no"
            out.append(("exists", f"is there a {colour} {shape} ?", answer))
    out.append(("letter", "what letter is on the tile ?", scene.glyph.letter))
    return out


def corpus() -> list[str]:
    """Every word a question or an answer can use (to build the tokenizer)."""
    words = [*COLOURS, *SHAPES, *PLURALS.values(), *POSITIONS, *COUNT_WORDS, *LETTERS, "yes", "no"]
    sentences = [
        "what colour is the object at the ?",
        "what shape is the object ?",
        "how many are there ?",
        "is the object bigger than the object ?",
        "is there a ?",
        "what letter is on the tile ?",
    ]
    return sentences + [" ".join(words)]
