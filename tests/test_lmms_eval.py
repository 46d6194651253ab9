"""lmms-eval integration: `python -m lmms_eval --model vtprune` end to end, loud failures, flags."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from eval_helpers import TOKENS_PER_IMAGE, run_lmms_eval, save_tiny_llava

import vtprune
from vtprune.evals.lmms.plugin import ModelArgs, parse_model_args
from vtprune.evals.models.processors import build_tokenizer
from vtprune.evals.tasks import shapes
from vtprune.evals.tasks.make_task import make_builtin_task
from vtprune.evals.tasks.offline import process_results, write_task
from vtprune.methods.base import BudgetConfig, Method
from vtprune.registry import _METHODS

LLAVA_HF_KEYS = {"pretrained", "device", "dtype", "batch_size", "device_map", "attn_implementation"}


# -- flags: routing, coercion, validation (no model needed) ---------------------------------------
@dataclass
class ListyConfig(BudgetConfig):
    layers: list[int] | None = None
    lam: float = 0.5
    strict: bool = False


class ListyMethod(Method):
    name = "listy_test"
    config_class = ListyConfig


@pytest.fixture
def listy():
    vtprune.register_method(ListyMethod)
    yield ListyMethod
    _METHODS.pop(ListyMethod.name, None)


def test_values_are_coerced_to_the_method_config_types(listy):
    # as lmms-eval's simple_parse_args_string delivers them: "58" -> int, "0.5" -> float, "8;16;24" -> str
    args = parse_model_args(
        {"method": "listy_test", "keep_tokens": 58, "layers": "8;16;24", "lam": 1, "strict": "true", "device": "cpu"},
        "llava_hf",
        LLAVA_HF_KEYS,
    )
    assert args.method == "listy_test"
    assert args.options == {"keep_tokens": 58, "layers": [8, 16, 24], "lam": 1.0, "strict": True}
    assert isinstance(args.options["lam"], float)
    assert args.base_kwargs == {"device": "cpu"}


def test_keys_route_to_base_and_method():
    args = parse_model_args(
        {"pretrained": "/m", "method": "fastervlm", "keep_ratio": "0.25", "batch_size": 1, "stats_path": "s.json"},
        "llava_hf",
        LLAVA_HF_KEYS,
    )
    assert args.base_kwargs == {"pretrained": "/m", "batch_size": 1}
    assert args.options == {"keep_ratio": 0.25}
    assert args.stats_path == "s.json"
    assert args.label == "fastervlm:keep_ratio=0.25"


def test_unknown_key_names_the_valid_ones():
    with pytest.raises(ValueError) as info:
        parse_model_args({"method": "fastervlm", "keep_ratio": 0.5, "keep_tokenz": 3}, "llava_hf", LLAVA_HF_KEYS)
    message = str(info.value)
    assert "keep_tokenz" in message
    for valid in ("keep_tokens", "keep_ratio", "positions", "pretrained", "preset", "stats_path"):
        assert valid in message


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"method": "fastervlm", "keep_ratio": 2.0}, "keep_ratio must be in (0, 1]"),
        ({"method": "fastervlm", "keep_tokens": 5.5}, "expected an integer"),
        ({"method": "fastervlm", "keep_ratio": 0.5, "keep_tokens": 3}, "not both"),
        ({"method": "fastervln", "keep_ratio": 0.5}, "Did you mean 'fastervlm'"),
        ({"keep_ratio": 0.5}, "need method=NAME or preset=NAME"),
        ({"method": "fastervlm", "preset": "fastervlm-58"}, "not both"),
        ({"method": "none", "keep_ratio": 0.5}, "unknown model_args key(s) ['keep_ratio']"),
        ({"method": "fastervlm:keep_ratio=0.5+random:keep_ratio=0.5"}, "takes one method"),
        ({"preset": "fastervlm-57"}, "unknown preset"),
    ],
)
def test_bad_flags_fail_with_a_clear_error(kwargs, expected):
    with pytest.raises(ValueError) as info:
        parse_model_args(kwargs, "llava_hf", LLAVA_HF_KEYS)
    assert expected in str(info.value)


def test_presets_and_spec_strings_as_flags():
    by_preset = parse_model_args({"preset": "fastervlm-58"}, "llava_hf", LLAVA_HF_KEYS)
    by_method = parse_model_args({"method": "fastervlm-58", "keep_tokens": 29}, "llava_hf", LLAVA_HF_KEYS)
    by_spec = parse_model_args({"method": "random:keep_tokens=7,seed=3"}, "llava_hf", LLAVA_HF_KEYS)
    assert (by_preset.method, by_preset.options) == ("fastervlm", {"keep_tokens": 58})
    assert (by_method.method, by_method.options) == ("fastervlm", {"keep_tokens": 29})  # override wins
    assert (by_spec.method, by_spec.options) == ("random", {"keep_tokens": 7, "seed": 3})
    assert parse_model_args({"method": "none"}, "llava_hf", LLAVA_HF_KEYS).method is None
    assert ModelArgs("llava_hf", {}, None).label == "none"


def test_write_task_rejects_incomplete_records(tmp_path):
    with pytest.raises(ValueError, match="lacks \\['answer'\\]"):
        write_task([{"image": shapes.records(1)[0]["image"], "question": "q?"}], tmp_path)


def test_metric_normalises_the_first_word():
    doc = {"answer": "Red"}
    assert process_results(doc, ["red."]) == {"exact_match": 1.0}
    assert process_results(doc, [" RED, I think"]) == {"exact_match": 1.0}
    assert process_results(doc, ["blue"]) == {"exact_match": 0.0}
    assert process_results(doc, [""]) == {"exact_match": 0.0}


def test_shapes_records_are_deterministic_and_answerable():
    first, again = shapes.records(6, seed=1), shapes.records(6, seed=1)
    assert [r["question"] for r in first] == [r["question"] for r in again]
    assert all(a["image"].tobytes() == b["image"].tobytes() for a, b in zip(first, again))
    for record in first:  # the asked shape is drawn in the answer's colour
        colour = shapes.COLOURS[record["answer"]]
        assert colour in {pixel for _, pixel in record["image"].getcolors(64 * 64)}


# -- end to end through the lmms-eval CLI -----------------------------------------------------------
LIMIT = 6


def test_lmms_eval_cli_runs_vtprune_end_to_end(tmp_path):
    model_dir = save_tiny_llava(tmp_path / "model", shapes.corpus(), answer="red")
    task_dir = make_builtin_task("vtprune_shapes", tmp_path / "tasks", n=LIMIT)
    stats = tmp_path / "stats.json"
    model_args = f"base=llava_hf,pretrained={model_dir},device=cpu,method=fastervlm,keep_tokens=5,stats_path={stats}"
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
    assert 0 < expected < 1
    assert results["results"]["vtprune_shapes"]["exact_match,none"] == pytest.approx(expected)
    (samples_file,) = (tmp_path / "out").rglob("*_samples_vtprune_shapes.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert [s["filtered_resps"] for s in samples] == ["red"] * LIMIT

    payload = json.loads(stats.read_text())
    assert payload["method"] == "fastervlm:keep_tokens=5"
    assert len(payload["samples"]) == LIMIT
    assert sorted(s["doc_id"] for s in payload["samples"]) == list(range(LIMIT))
    for sample in payload["samples"]:
        assert sample["visual_tokens_in"] == TOKENS_PER_IMAGE
        assert sample["visual_tokens_kept"] == 5
        assert sample["llm_prompt_tokens"] == sample["prompt_tokens"] - (TOKENS_PER_IMAGE - 5)
        assert sample["flops_after"] < sample["flops_before"]
        assert sample["ttft_s"] > 0 and sample["new_tokens"] == 2  # "red" + EOS
    assert payload["summary"]["visual_tokens_kept"] == 5


def test_a_failing_generation_exits_non_zero_and_names_the_sample(tmp_path):
    # "zebra" is the rarest word, so it gets the highest id, which the model's vocabulary lacks:
    # the embedding lookup fails inside generate() for doc 2 only. lmms-eval's llava_hf would
    # log it, answer "" and exit 0.
    corpus = shapes.corpus() * 2 + ["zebra"]
    tokenizer = build_tokenizer(corpus)
    assert tokenizer.convert_tokens_to_ids("zebra") == len(tokenizer) - 1
    model_dir = save_tiny_llava(tmp_path / "model", corpus, vocab_size=len(tokenizer) - 1)
    images = [r["image"] for r in shapes.records(3)]
    questions = ["What colour is the square?", "What colour is the circle?", "What colour is the zebra?"]
    records = [{"image": i, "question": q, "answer": "red"} for i, q in zip(images, questions)]
    task_dir = write_task(records, tmp_path / "tasks", task_name="zebra_task").parent

    result = run_lmms_eval(
        ["--model", "vtprune", "--model_args", f"pretrained={model_dir},device=cpu,method=uniform,keep_ratio=0.5"]
        + ["--tasks", "zebra_task", "--include_path", str(task_dir), "--output_path", str(tmp_path / "out")],
        tmp_path,
    )
    assert result.returncode == 1, result.stdout[-4000:]
    assert "failed on task 'zebra_task' split 'test' doc_id 2: IndexError" in result.stdout
    assert "raised inside generate()" in result.stdout
    assert not list((tmp_path / "out").rglob("*_results.json"))


def test_an_unknown_flag_exits_non_zero(tmp_path):
    result = run_lmms_eval(
        ["--model", "vtprune", "--model_args", "pretrained=/nonexistent,method=fastervlm,keep_ratioo=0.5"]
        + ["--tasks", "mme"],
        tmp_path,
    )
    assert result.returncode == 1, result.stdout[-4000:]
    assert "unknown model_args key(s) ['keep_ratioo']" in result.stdout
    assert "keep_ratio" in result.stdout.split("keep_ratioo")[-1]


def test_a_key_both_take_goes_to_the_base_and_the_spec_reaches_the_method():
    with pytest.warns(UserWarning, match="go to base"):
        args = parse_model_args({"method": "random:seed=3,keep_tokens=2", "seed": 7}, "some_base", {"seed"})
    assert args.base_kwargs == {"seed": 7}
    assert args.options == {"seed": 3, "keep_tokens": 2}


def test_quota_gets_the_base_processor_and_each_request_as_its_query():
    from types import SimpleNamespace

    from vtprune.evals.lmms.plugin import VTPruneLMM

    processor = object()
    wrapper = SimpleNamespace(_base=SimpleNamespace(_image_processor=processor), options={}, handle=None)
    defaults = VTPruneLMM._model_defaults
    assert defaults(wrapper, "quota", {"keep_ratio": 0.5}) == {"keep_ratio": 0.5, "processor": processor}
    assert defaults(wrapper, "quota:scorer=x", {}) == {}  # a scorer of the user's own: left alone
    assert defaults(wrapper, "fastervlm", {"keep_ratio": 0.5}) == {"keep_ratio": 0.5}
    queries = []
    quota = SimpleNamespace(config=SimpleNamespace(query=None))
    wrapper.handle = SimpleNamespace(methods=[quota], set_query=queries.append)
    request = SimpleNamespace(args=("What colour is the square?", {}))
    VTPruneLMM._set_query(wrapper, request)
    wrapper.options = {"query": "fixed"}
    VTPruneLMM._set_query(wrapper, request)
    assert queries == ["What colour is the square?"]


def test_lmms_eval_runs_quota_with_the_model_scoring_its_own_images(tmp_path):
    from vtprune.evals.models.processors import build_onevision_processor
    from vtprune.evals.models.transformers_vlms import tiny_llava_onevision
    from vtprune.methods import quota

    processor = build_onevision_processor(shapes.corpus() + [quota.ENTITY_PROMPT, quota.QUESTION_PROMPT])
    model = tiny_llava_onevision(seed=0)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    task_dir = make_builtin_task("vtprune_shapes", tmp_path / "tasks", n=3)
    stats = tmp_path / "stats.json"
    model_args = f"base=llava_hf,pretrained={tmp_path / 'model'},device=cpu,method=quota,keep_ratio=0.5"
    result = run_lmms_eval(
        ["--model", "vtprune", "--model_args", f"{model_args},stats_path={stats}", "--tasks", "vtprune_shapes"]
        + ["--include_path", str(task_dir.parent), "--output_path", str(tmp_path / "out")],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    samples = json.loads(stats.read_text())["samples"]
    assert len(samples) == 3
    for sample in samples:  # one image = one frame: its 4 x 4 base view gets T = 8 -> a 3 x 2 grid, crops dropped
        assert sample["visual_tokens_kept"] == 6 and sample["visual_tokens_in"] > 16
        assert sample["scoring_s"] > 0


def test_the_generation_probe_times_a_patched_generate_and_leaves_the_model_as_loaded():
    from helpers import prompt_ids

    from vtprune.evals.lmms.measure import GenerationProbe
    from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, tiny_llava

    model = tiny_llava()
    probe = GenerationProbe(model, IMAGE_TOKEN_ID)
    probe.detach()  # vtprune wraps generate on the instance as well: it patches a probe-free model
    handle = vtprune.patch(model, "fastervlm", keep_ratio=0.5)
    probe.attach()
    inputs = {"input_ids": prompt_ids([3, 4])[None], "pixel_values": torch.randn(1, 3, 32, 32)}
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    calls, error = probe.take()
    assert error is None and len(calls) == 1
    assert calls[0].visual_tokens == [TOKENS_PER_IMAGE] and handle.last.visual_tokens_kept == [TOKENS_PER_IMAGE // 2]
    probe.detach()
    handle.remove()
    probe.close()
    assert "generate" not in vars(model)  # neither the probe's wrapper nor vtprune's is left on the instance
