"""The benchmark and the demo run end to end (on small models; speed is not asserted)."""

import torch

from vtprune.evals import demo
from vtprune.evals.bench.llava15 import benchmark_inputs, time_configs
from vtprune.evals.models.transformers_vlms import tiny_llava


def test_bench_rows_report_tokens_flops_and_cache():
    model = tiny_llava(seed=3, image_size=32, patch_size=8)
    inputs = benchmark_inputs(model, text_tokens=12, device="cpu")
    configs = [("full", None), ("half", "fastervlm:keep_ratio=0.5"), ("quarter", "uniform:keep_ratio=0.25")]
    rows = time_configs(model, inputs, configs, repeats=1)
    assert [row["visual_tokens"] for row in rows] == [16, 8, 4]
    assert rows[0]["llm_flops"] > rows[1]["llm_flops"] > rows[2]["llm_flops"]
    assert rows[0]["kv_cache_bytes"] > rows[1]["kv_cache_bytes"] > rows[2]["kv_cache_bytes"]
    assert all(row["llm_prefill_s"] > 0 for row in rows)


def test_speed_demo_prints_methods_and_ratios_and_draws_kept_patches(tmp_path, capsys):
    torch.manual_seed(0)
    rows = demo.run_speed(tmp_path, repeats=1, methods=("fastervlm", "uniform"), keep_ratios=(1.0, 0.25))
    assert [(row["method"], row["visual_tokens"]) for row in rows] == [
        ("fastervlm", 576),
        ("fastervlm", 144),
        ("uniform", 576),
        ("uniform", 144),
    ]
    assert rows[0]["llm_gflops"] > rows[1]["llm_gflops"]
    assert (tmp_path / "kept_patches.png").stat().st_size > 0
    assert "fastervlm" in capsys.readouterr().out


def test_video_bench_rows_follow_the_budget_arithmetic():
    from vtprune.evals.bench import video as bench_video
    from vtprune.evals.models.transformers_vlms import tiny_llava_onevision

    frames, per_frame = 6, 4  # the tiny model: 32 px, patch 8 -> 4 x 4 pooled to 2 x 2 per frame
    model = tiny_llava_onevision(seed=3)
    processor = bench_video.onevision_processor(image_size=32, patch_size=8)
    inputs = bench_video.video_inputs(processor, frames, 32, "cpu")
    rows = bench_video.measure(model, processor, inputs, frames, repeats=1, ratios=(0.5,))
    by_config = {row["config"]: row for row in rows}
    assert list(by_config) == [
        "full",
        "quota keep 0.5",
        "quota keep 0.5, stub scorer (skewed p)",
        "fastervlm keep 0.5 (received)",
        "uniform keep 0.5",
    ]
    assert by_config["full"]["visual_tokens"] == frames * per_frame + 1  # frames, then one newline
    for name in ("fastervlm keep 0.5 (received)", "uniform keep 0.5"):  # round(0.5 * 4) = 2 per frame
        assert by_config[name]["visual_tokens"] == frames * 2 + 1
        assert by_config[name]["frame_tokens_kept"] == [2] * frames
    budget = round(0.5 * frames * per_frame)
    for name in ("quota keep 0.5", "quota keep 0.5, stub scorer (skewed p)"):
        row = by_config[name]
        tokens, grids = row["extra"]["frame_tokens"][0], row["extra"]["frame_grids"][0]
        assert sum(tokens) <= budget
        assert row["frame_tokens_kept"] == [g[0] * g[1] if g else 0 for g in grids]
        assert all(kept <= n for kept, n in zip(row["frame_tokens_kept"], tokens, strict=True))
        assert row["visual_tokens"] == sum(row["frame_tokens_kept"]) + 1
    stub = by_config["quota keep 0.5, stub scorer (skewed p)"]["extra"]["frame_tokens"][0]
    assert max(stub) > min(stub)  # skewed probabilities: uneven per-frame budgets
    quota_row = by_config["quota keep 0.5"]
    assert quota_row["scorer_s"] > quota_row["scorer_decoder_s"] > 0
    assert len(quota_row["extra"]["yes_probability"][0]) == frames
    for row in rows[1:]:
        assert row["llm_flops"] < rows[0]["llm_flops"] and row["flops_ideal_speedup"] > 1 and row["llm_prefill_s"] > 0
    assert [row["config"] for row in rows if "scorer_s" in row] == ["quota keep 0.5"]
    assert "quota keep 0.5" in bench_video.format_table({"rows": rows})
