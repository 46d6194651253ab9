"""ShapesVQA generator: deterministic, well-formed, balanced, and its answers match the pixels."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from vtprune.evals.reference import shapes_vqa as sv


def fingerprint(records) -> str:
    digest = hashlib.sha256()
    for r in records:
        digest.update(r["image"].tobytes())
        digest.update(f"{r['id']}|{r['question']}|{r['answer']}|{r['kind']}".encode())
    return digest.hexdigest()


def test_same_call_same_records():
    assert fingerprint(sv.make_split("test", 21)) == fingerprint(sv.make_split("test", 21))


def test_records_depend_only_on_split_and_index():
    whole = sv.make_split("validation", 10)
    tail = sv.make_split("validation", 4, start=6)
    assert fingerprint(whole[6:]) == fingerprint(tail)


def test_splits_differ():
    images = {split: [r["image"].tobytes() for r in sv.make_split(split, 14)] for split in sv.SPLITS}
    assert not set(images["train"]) & set(images["test"])
    assert not set(images["validation"]) & set(images["test"])


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="split must be one of"):
        sv.make_record("dev", 0)


def test_record_format():
    record = sv.make_record("test", 3)
    assert record["image"].mode == "RGB" and record["image"].size == (96, 96)
    assert record["id"] == "test-3" and record["kind"] == sv.KINDS[3]
    assert record["question"].endswith("?") and " " not in record["answer"]


def test_kinds_cycle_and_answers_are_balanced():
    records = sv.make_split("test", 7 * 60)
    assert Counter(r["kind"] for r in records) == {kind: 60 for kind in sv.KINDS}
    for kind, closed_set in (("bigger", {"yes", "no"}), ("exists", {"yes", "no"}), ("count", set(sv.COUNT_WORDS))):
        answers = Counter(r["answer"] for r in records if r["kind"] == kind)
        assert set(answers) == closed_set
        # no answer is more than twice as frequent as uniform: guessing the majority does not pay
        assert max(answers.values()) <= 2 * 60 / len(closed_set)


def test_answers_come_from_the_scene():
    """Re-derive each answer from the scene description, independently of the sampler."""
    for index in range(70):
        scene, question, answer, kind = sv.make_scene("train", index)
        shapes = scene.shapes
        if kind in ("colour_at", "shape_at"):
            position = question.split(" at the ")[1].removesuffix(" ?")
            obj = next(o for o in shapes if sv.POSITIONS[o.cell] == position)
            assert answer == (obj.colour if kind == "colour_at" else obj.shape)
        elif kind == "shape_of_colour":
            colour = question.split()[4]
            (obj,) = [o for o in shapes if o.colour == colour]
            assert answer == obj.shape
        elif kind == "count":
            shape = next(s for s, plural in sv.PLURALS.items() if f" {plural} " in question)
            assert answer == sv.COUNT_WORDS[sum(o.shape == shape for o in shapes)]
        elif kind == "bigger":
            first, second = question.split()[2], question.split()[7]
            (a,), (b,) = [o for o in shapes if o.colour == first], [o for o in shapes if o.colour == second]
            assert max(a.size, b.size) >= 1.35 * min(a.size, b.size)
            assert answer == ("yes" if a.size > b.size else "no")
        elif kind == "exists":
            colour, shape = question.split()[3:5]
            assert answer == ("yes" if any(o.colour == colour and o.shape == shape for o in shapes) else "no")
            assert any(o.colour == colour for o in shapes) and any(o.shape == shape for o in shapes)
        else:
            assert answer == scene.glyph.letter


def test_objects_are_drawn_where_the_scene_says():
    """The pixels inside each object's box are mostly its colour; the objects are small."""
    for index in range(14):
        scene, *_ = sv.make_scene("test", index)
        pixels = np.asarray(sv.render(scene)).astype(int)
        for obj in scene.shapes:
            x0, y0, x1, y1 = obj.box
            region = pixels[y0:y1, x0:x1].reshape(-1, 3)
            share = (np.abs(region - np.array(sv.COLOURS[obj.colour])).sum(1) == 0).mean()
            assert share > 0.3, (index, obj)
            assert obj.size <= 24 and (x0 // sv.CELL_SIZE, y0 // sv.CELL_SIZE) == (obj.cell % 3, obj.cell // 3)


def test_glyph_bitmap_is_readable_from_the_pixels():
    for index in range(6, 70, 7):
        scene, _, answer, _ = sv.make_scene("validation", index)
        glyph = scene.glyph
        scale = (glyph.size - 4) // 5
        pixels = np.asarray(sv.render(scene))
        x0, y0 = glyph.box[0] + 2, glyph.box[1] + 2
        bits = tuple(
            "".join("#" if pixels[y0 + r * scale, x0 + c * scale, 0] == 255 else "." for c in range(5))
            for r in range(5)
        )
        assert bits == sv.GLYPHS[answer]


def test_scene_questions_are_consistent_with_the_record():
    for index in range(28):
        scene, question, answer, _ = sv.make_scene("train", index)
        asked = {q: a for _, q, a in sv.scene_questions(scene)}
        if question in asked:
            assert asked[question] == answer


def test_corpus_covers_every_word():
    vocabulary = set(" ".join(sv.corpus()).split())
    for index in range(70):
        scene, question, answer, _ = sv.make_scene("test", index)
        words = (
            question.split() + [answer] + [w for _, q, a in sv.scene_questions(scene) for w in (q + " " + a).split()]
        )
        assert set(words) <= vocabulary
