"""`make demo`: the reference model under every method; accuracy, tokens kept, tokens per layer, files."""

import json

from vtprune.evals import demo


def test_reference_demo_reports_accuracy_tokens_and_time_per_method(tmp_path):
    lines = []
    methods = ("fastervlm", "fastervlm:positions=original", "fastv", "pdrop", "hired", "quota")
    rows = demo.run(tmp_path, num=14, methods=methods, keep_ratios=(0.25,), log=lines.append)
    by_label = {row["label"]: row for row in rows}
    assert list(by_label) == ["full", "fastervlm", "fastervlm positions=original", "fastv", "pdrop", "hired", "quota"]
    # the reference model has 144 visual tokens per image and a 4-layer LLM; keep 0.25 -> 36 tokens
    assert by_label["full"]["visual_tokens_kept"] == by_label["full"]["visual_tokens_per_layer"] == 144
    assert by_label["full"]["accuracy"] >= 12 / 14
    for label in ("fastervlm", "fastervlm positions=original"):
        assert by_label[label]["visual_tokens_kept"] == by_label[label]["visual_tokens_per_layer"] == 36
    # fastv (k=2): layers 0-1 see 144, layers 2-3 see 36; pdrop (cuts before layers 1, 2, 3, int(144 lam^s)
    # reaching 36): 144, 91, 57, 36
    assert (by_label["fastv"]["visual_tokens_kept"], by_label["fastv"]["visual_tokens_per_layer"]) == (36, 90)
    assert (by_label["pdrop"]["visual_tokens_kept"], by_label["pdrop"]["visual_tokens_per_layer"]) == (36, 82)
    assert "AnyRes" in by_label["hired"]["not_applicable"] and "Qwen2-VL" in by_label["quota"]["not_applicable"]
    assert not any("error" in row for row in rows)
    assert all(row["prefill_ms"] > 0 for row in rows if "accuracy" in row)

    printed = "\n".join(lines)
    assert "hired" in printed and "not applicable: AnyRes only" in printed
    for name in ("accuracy_vs_tokens.png", "kept_patches.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert [row["label"] for row in json.loads((tmp_path / "results.json").read_text())] == list(by_label)
