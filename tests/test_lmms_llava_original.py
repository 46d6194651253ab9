"""lmms-eval's ``llava`` model (the original LLaVA package) under ``--model vtprune``, end to end on the CPU.

``base=llava`` builds the model with ``llava.model.builder.load_pretrained_model`` from a tiny
offline checkpoint folder (tokenizer, weights, ``mm_vision_tower`` pointing at a local CLIP
folder), prompts with the package's conversation template and one ``IMAGE_TOKEN_INDEX`` per
image; the wrapper loads it on the CPU (``device_map=auto``) and counts visual tokens through
the adapter's placeholder id.
"""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import run_lmms_eval, save_llava_original

pytest.importorskip("llava.model", reason="the original LLaVA package (llava-torch) is not installed here")
pytest.importorskip("lmms_eval", reason="lmms-eval is not installed here")

from vtprune.evals.lmms.plugin import _with_device_map  # noqa: E402
from vtprune.evals.tasks import shapes  # noqa: E402
from vtprune.evals.tasks.make_task import make_builtin_task  # noqa: E402

TOKENS_PER_IMAGE = 16  # the tiny CLIP tower: 32 px images, 8 px patches -> 4 x 4, [CLS] dropped ("patch")
LIMIT = 4


class CudaDefaultBase:  # the signature of lmms-eval's llava: the model goes to cuda:<rank> unless device_map=auto
    def __init__(self, pretrained="", device="cuda:0", device_map="cuda:0"):
        pass


class EmptyDefaultBase:  # lmms-eval's llava_hf
    def __init__(self, pretrained="", device="cuda", device_map=""):
        pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only rule")
def test_cuda_default_base_loads_with_device_map_auto_on_the_cpu():
    assert _with_device_map(CudaDefaultBase, {"device": "cpu"}) == {"device": "cpu", "device_map": "auto"}
    assert _with_device_map(CudaDefaultBase, {}) == {"device": "cpu", "device_map": "auto"}  # no CUDA here
    assert _with_device_map(CudaDefaultBase, {"device": "cuda:0"}) == {"device": "cuda:0"}
    assert _with_device_map(CudaDefaultBase, {"device_map": "x"}) == {"device_map": "x"}  # the user's own wins
    assert _with_device_map(EmptyDefaultBase, {"device": "cpu"}) == {"device": "cpu", "device_map": "cpu"}


def test_model_name_must_contain_llava(tmp_path):
    with pytest.raises(ValueError, match="'llava' in the model folder's name"):
        save_llava_original(tmp_path / "tiny", ["a"])


def test_lmms_eval_cli_runs_vtprune_on_the_original_llava_package(tmp_path):
    model_dir = save_llava_original(tmp_path / "tiny-llava-v1.5", shapes.corpus(), answer="red")
    task_dir = make_builtin_task("vtprune_shapes", tmp_path / "tasks", n=LIMIT)
    stats = tmp_path / "stats.json"
    model_args = f"base=llava,pretrained={model_dir},device=cpu,method=fastervlm,keep_tokens=5,stats_path={stats}"
    result = run_lmms_eval(
        ["--model", "vtprune", "--model_args", model_args, "--tasks", "vtprune_shapes"]
        + ["--include_path", str(task_dir.parent), "--output_path", str(tmp_path / "out"), "--log_samples"],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:]

    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    results = json.loads(results_file.read_text())
    # the toy model always answers "red": lmms-eval's accuracy is the share of red answers
    answers = [r["answer"] for r in shapes.records(LIMIT)]
    expected = sum(a == "red" for a in answers) / LIMIT
    assert results["results"]["vtprune_shapes"]["exact_match,none"] == pytest.approx(expected)
    (samples_file,) = (tmp_path / "out").rglob("*_samples_vtprune_shapes.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert [s["filtered_resps"] for s in samples] == ["red"] * LIMIT

    payload = json.loads(stats.read_text())
    assert payload["base"] == "llava"
    assert payload["method"] == "fastervlm:keep_tokens=5"
    assert sorted(s["doc_id"] for s in payload["samples"]) == list(range(LIMIT))
    for sample in payload["samples"]:
        assert sample["visual_tokens_in"] == TOKENS_PER_IMAGE
        assert sample["visual_tokens_kept"] == 5
        assert sample["llm_prompt_tokens"] == sample["prompt_tokens"] - (TOKENS_PER_IMAGE - 5)
        assert sample["flops_after"] < sample["flops_before"]
        assert sample["ttft_s"] > 0 and sample["new_tokens"] == 2  # "red" + EOS
    assert payload["summary"]["visual_tokens_kept"] == 5

    # method=none: the unpruned package model runs under transformers 5 (the adapter's runtime shim) and
    # its statistics count each -200 placeholder as the image's 16 tokens
    baseline = tmp_path / "baseline.json"
    model_args = f"base=llava,pretrained={model_dir},device=cpu,method=none,stats_path={baseline}"
    result = run_lmms_eval(
        ["--model", "vtprune", "--model_args", model_args, "--tasks", "vtprune_shapes", "--limit", "2"]
        + ["--include_path", str(task_dir.parent), "--output_path", str(tmp_path / "out_none")],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    pruned = {s["doc_id"]: s for s in payload["samples"]}
    for sample in json.loads(baseline.read_text())["samples"]:
        assert sample["visual_tokens_in"] == sample["visual_tokens_kept"] == TOKENS_PER_IMAGE
        assert sample["prompt_tokens"] == sample["llm_prompt_tokens"] == pruned[sample["doc_id"]]["prompt_tokens"]
        assert sample["new_tokens"] == 2
