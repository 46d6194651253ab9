"""reference_eval's sweep: keep ratios as each method's budget, not-applicable methods, and the positions finding."""

from __future__ import annotations

import math

import pytest
import torch

import vtprune
from vtprune.evals.reference import shapes_vqa
from vtprune.evals.reference.evaluate import (
    REFERENCE_TABLE,
    TEST_SLICE,
    budget_options,
    evaluate,
    keep_count,
    load_reference_model,
    sweep,
)


@pytest.fixture(scope="module")
def reference():
    return load_reference_model()


@pytest.mark.parametrize(("ratio", "kept"), [(0.5, 72), (0.25, 36), (0.1, 14), (1.0, 144)])
def test_keep_ratio_becomes_each_methods_budget(reference, ratio, kept):
    model, _ = reference  # 96 px images, 8 px patches: 144 visual tokens; a 4-layer LLM
    assert keep_count(ratio, 144) == kept
    for method in ("fastervlm", "fopru", "random", "uniform", "globalcom2"):
        assert budget_options(model, method, ratio) == {"keep_ratio": ratio}
    assert budget_options(model, "hired", ratio) == {"budget_ratio": ratio}
    assert budget_options(model, "fastv", ratio) == {"keep_tokens": kept}
    assert budget_options(model, "prumerge_plus", ratio) == {"keep_tokens": kept}  # a token count only
    # pdrop keeps floor(144 * lam^s) after cut s: the last cut must land on the same count
    for layers, cuts in ((None, 3), ("1;3", 2), ("2", 1)):
        lam = budget_options(model, "pdrop", ratio, {} if layers is None else {"layers": layers})["lam"]
        assert 0 < lam <= 1
        assert math.floor(144 * lam**cuts) == kept


def test_methods_the_model_cannot_run_are_listed_not_errors(reference):
    model, processor = reference
    for method, options in (("hired", {"budget_ratio": 0.25}), ("globalcom2", {"keep_ratio": 0.25})):
        with pytest.raises(ValueError, match="AnyRes"):
            vtprune.patch(model, method, **options)
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration is not supported"):  # even with a scorer
        vtprune.patch(model, "quota", keep_ratio=0.25, scorer=lambda frames, prompt: torch.ones(len(frames)))
    rows = sweep(model, processor, shapes_vqa.make_split("test", 7), ["hired", "globalcom2", "quota"], log=lambda _: 0)
    assert [row["label"] for row in rows] == ["full", "hired", "globalcom2", "quota"]
    assert [("error" in row, "not_applicable" in row) for row in rows[1:]] == [(False, True)] * 3
    assert rows[1]["not_applicable"].startswith("AnyRes only")
    assert rows[3]["not_applicable"].startswith("LLaVA-OneVision and Qwen2-VL only")
    assert "not applicable: AnyRes only" in REFERENCE_TABLE.markdown(rows)


def test_location_questions_need_original_positions(reference):
    """The finding: compact positions renumber the kept tokens, and this LLM finds objects by position.

    On the test slice FasterVLM at keep 0.25 answers the location questions ("what colour is the
    object at the top left ?") near chance with its official compact positions and as well as
    the unpruned model with positions="original"; the same 36 tokens reach the LLM either way.
    """
    model, processor = reference
    records = shapes_vqa.make_split("test", TEST_SLICE)
    full = evaluate(model, processor, records)
    compact = evaluate(model, processor, records, "fastervlm", keep_ratio=0.25)
    original = evaluate(model, processor, records, "fastervlm", keep_ratio=0.25, positions="original")
    assert compact["visual_tokens_kept"] == original["visual_tokens_kept"] == 36
    assert full["location_accuracy"] >= 0.95
    assert compact["location_accuracy"] <= 0.5
    assert original["location_accuracy"] >= 0.9
    assert original["accuracy"] >= compact["accuracy"] + 0.1
