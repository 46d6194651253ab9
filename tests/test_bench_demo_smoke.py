"""The benchmark and the demo run end to end (on small models; speed is not asserted)."""

import torch

from vtprune.evals import demo
from vtprune.evals.bench import benchmark_inputs, time_configs
from vtprune.evals.toy_models import tiny_llava


def test_bench_rows_report_tokens_flops_and_cache():
    model = tiny_llava(seed=3, image_size=32, patch_size=8)
    inputs = benchmark_inputs(model, text_tokens=12, device="cpu")
    configs = [("full", None), ("half", "fastervlm:keep_ratio=0.5"), ("quarter", "uniform:keep_ratio=0.25")]
    rows = time_configs(model, inputs, configs, repeats=1)
    assert [row["visual_tokens"] for row in rows] == [16, 8, 4]
    assert rows[0]["llm_flops"] > rows[1]["llm_flops"] > rows[2]["llm_flops"]
    assert rows[0]["kv_cache_bytes"] > rows[1]["kv_cache_bytes"] > rows[2]["kv_cache_bytes"]
    assert all(row["llm_prefill_s"] > 0 for row in rows)


def test_demo_prints_methods_and_ratios_and_draws_kept_patches(tmp_path, capsys):
    torch.manual_seed(0)
    rows = demo.run(tmp_path, repeats=1, methods=("fastervlm", "uniform"), keep_ratios=(1.0, 0.25))
    assert [(row["method"], row["visual_tokens"]) for row in rows] == [
        ("fastervlm", 576),
        ("fastervlm", 144),
        ("uniform", 576),
        ("uniform", 144),
    ]
    assert rows[0]["llm_gflops"] > rows[1]["llm_gflops"]
    assert (tmp_path / "kept_patches.png").stat().st_size > 0
    assert "fastervlm" in capsys.readouterr().out
