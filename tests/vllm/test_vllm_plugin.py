"""vtprune in vLLM (vllm-cpu): the plugin against ``vtprune.patch`` on transformers, on one tiny LLaVA on disk.

Runs in the vLLM environment only (``make test-vllm``); skipped where vLLM is not installed. The
reference is the transformers path in the same environment: the model loaded from the same
directory, patched with the same spec, its greedy tokens and the kept indices of its prefill
(``handle.last``). vLLM must produce the same greedy tokens, keep the same indices (read from the
served model) and lay out a prompt shorter by exactly the pruned tokens. One LLM per spec, shared by
the tests of that spec (a vLLM start takes 30-75 s on this machine).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm.entrypoints.llm")  # tests/vllm itself would pass for a namespace package `vllm`

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: apply_model reads the model

import torch  # noqa: E402
from tiny_models import IMAGE_TOKEN_ID, pixel_values, prompt_ids, random_image, save_tiny_llava  # noqa: E402
from transformers import LlavaForConditionalGeneration  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import vtprune  # noqa: E402

NEW_TOKENS = 6
TIE = 1e-3  # a top-2 logit margin this small may flip between vLLM's and transformers' fp32 kernels
TOKENS_PER_IMAGE = 16  # the tiny tower's 4 x 4 patches
CASES = [(seed, 3 + seed, 5) for seed in range(3)]  # (image seed, text before, text after)
FULL = {"vision_feature_select_strategy": "full"}  # [CLS] is a visual token too: 17 per image
SPECS = [
    ("fastervlm:keep_tokens=5", {}),
    ("random:keep_tokens=7,seed=3", {}),
    ("uniform:keep_ratio=0.25", {}),
    ("fopru:keep_tokens=6", {}),
    ("fastervlm:keep_tokens=5", FULL),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    save_tiny_llava(path, seed=0)
    return path


def start(model_dir, spec=None, config=None):
    overrides = dict(config or {}) if spec is None else {**(config or {}), "vtprune": spec}
    return LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=2,
        hf_overrides=overrides,
        seed=0,
    )


def stop(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def served(llm, ids, image):
    """vLLM's greedy tokens, prompt length and the served model's kept indices for one request."""
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
    (output,) = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": image}}, params, use_tqdm=False)
    (kept,) = llm.apply_model(lambda model: None if model.vtprune_last_kept is None else model.vtprune_last_kept.cpu())
    return list(output.outputs[0].token_ids), len(output.prompt_token_ids), kept


def reference(model_dir, spec, ids, image, config=None):
    """The transformers path: greedy tokens, each step's top-2 logit margin and the kept indices of
    ``vtprune.patch`` (no patch for None)."""
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    for key, value in (config or {}).items():  # what hf_overrides does to vLLM's copy of the config
        setattr(model.config, key, value)
    per_image = image_tokens(config)
    expanded = [t for token in ids for t in ([token] * per_image if token == IMAGE_TOKEN_ID else [token])]
    input_ids = torch.tensor([expanded])
    pixels = pixel_values(model_dir, image)
    handle = vtprune.patch(model, spec) if spec is not None else None
    with torch.no_grad():
        kept = None
        if handle is not None:
            model(input_ids=input_ids, pixel_values=pixels)
            kept = handle.last.stages[0].kept[0]
        out = model.generate(
            input_ids=input_ids,
            pixel_values=pixels,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    margins = [float(top[0, 0] - top[0, 1]) for top in (step.topk(2).values for step in out.scores)]
    return out.sequences[0, input_ids.shape[1] :].tolist(), margins, kept


def assert_same_greedy(tokens, expected, margins, context):
    """Token for token; two engines' fp32 kernels may only part at a near tie of the reference's logits
    (top-2 margin below ``TIE``), and nothing after such a step is compared."""
    for step, (token, want) in enumerate(zip(tokens, expected, strict=True)):
        if token != want:
            assert margins[step] < TIE, f"{context}: step {step}: {tokens} != {expected} (margin {margins[step]:.4f})"
            return


def image_tokens(config) -> int:
    return TOKENS_PER_IMAGE + int((config or {}) == FULL)


@pytest.fixture(scope="module", params=SPECS, ids=lambda case: case[0] + (" full" if case[1] else ""))
def pruned(request, model_dir):
    spec, config = request.param
    llm = start(model_dir, spec, config)
    yield spec, config, llm
    stop(llm)


def test_pruned_tokens_and_indices_equal_the_transformers_path(pruned, model_dir):
    spec, config, llm = pruned
    prefix = image_tokens(config) - TOKENS_PER_IMAGE
    layout = vtprune.types.VisualLayout(image_tokens(config), (4, 4), prefix)
    budget = vtprune.config.build_methods(spec)[0].size_budget(layout)
    for seed, before, after in CASES:
        ids, image = prompt_ids(before, after, seed), random_image(seed)
        tokens, prompt_length, kept = served(llm, ids, image)
        expected_tokens, margins, expected_kept = reference(model_dir, spec, ids, image, config)
        assert kept.shape == (1, budget)
        assert kept[0].tolist() == expected_kept.tolist(), spec
        assert_same_greedy(tokens, expected_tokens, margins, spec)
        assert prompt_length == len(ids) - 1 + budget  # the prompt shrank by exactly the pruned tokens


def test_without_a_vtprune_entry_vllm_runs_its_own_llava(model_dir):
    """No ``vtprune`` entry: every image keeps its 16 tokens and the output is the unpatched model's
    (this also loads the checkpoint transformers 5.x wrote, tower keys without ``vision_model``)."""
    llm = start(model_dir)
    try:
        for seed, before, after in CASES[:2]:
            ids, image = prompt_ids(before, after, seed), random_image(seed)
            tokens, prompt_length, kept = served(llm, ids, image)
            assert kept is None
            assert prompt_length == len(ids) - 1 + TOKENS_PER_IMAGE
            expected_tokens, margins, _ = reference(model_dir, None, ids, image)
            assert_same_greedy(tokens, expected_tokens, margins, "unpruned")
    finally:
        stop(llm)


@pytest.mark.parametrize("spec", ["fastervlmm:keep_tokens=5", "fastervlm:keep_token=5", "fastervlm:keep_tokens=17"])
def test_spec_errors_fail_at_start_up_with_the_message_patch_gives(model_dir, spec):
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    with pytest.raises(ValueError) as patch_error:
        vtprune.patch(model, spec)
    with pytest.raises(ValueError) as error:  # the front end's config check, before an engine starts
        start(model_dir, spec)
    assert str(patch_error.value) in str(error.value)


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("fastv", "method 'fastv' cannot run in vLLM: it drops tokens between decoder layers"),
        ("pdrop", "method 'pdrop' cannot run in vLLM: it drops tokens between decoder layers"),
        ("hired", "method 'hired' splits a budget across the crops"),
        ("fastervlm:keep_tokens=5,positions=original", "positions='original' keeps each token's original position"),
    ],
)
def test_what_vllm_cannot_run_is_refused_at_start_up_with_the_reason(model_dir, spec, reason):
    with pytest.raises(ValueError) as error:
        start(model_dir, spec)
    assert reason in str(error.value)


CHAT_TEMPLATE = (
    "<s> {% for m in messages %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }} {% else %}<image> {% endif %}{% endfor %}{% endfor %}"
)


def test_the_openai_server_prunes_with_hf_overrides_json(model_dir, tmp_path):
    """``vllm serve DIR --hf-overrides '{"vtprune": ...}'``: vllm-cpu's ``vllm`` script cannot read its own
    version (its distribution is named vllm-cpu), so the server module is started directly with the same
    arguments. One chat request with an image: the prompt is laid out with the kept tokens only, and the
    answer is the transformers path's."""
    spec, text = "fastervlm:keep_tokens=5", [10, 11, 12, 13]
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256"]
    command += ["--enforce-eager", "--chat-template", str(template), "--hf-overrides", json.dumps({"vtprune": spec})]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start in 240 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        image = random_image(7)
        encoded = io.BytesIO()
        image.save(encoded, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(encoded.getvalue()).decode()
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": " ".join(f"t{i}" for i in text)},
        ]
        body = {"model": str(model_dir), "messages": [{"role": "user", "content": content}], "max_tokens": NEW_TOKENS}
        body.update(temperature=0.0, logprobs=True, return_tokens_as_token_ids=True)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        answer = json.load(urllib.request.urlopen(request, timeout=120))
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    ids = [1, IMAGE_TOKEN_ID, *text]  # what the template renders: <s> <image> t10 ... t13
    assert answer["usage"]["prompt_tokens"] == len(ids) - 1 + 5
    tokens = [int(step["token"].removeprefix("token_id:")) for step in answer["choices"][0]["logprobs"]["content"]]
    expected_tokens, margins, _ = reference(model_dir, spec, ids, image)
    assert_same_greedy(tokens, expected_tokens, margins, "server")


@pytest.mark.parametrize(
    "builder, spec, reason",
    [
        ("tiny_llava_next", "fastervlm:keep_tokens=5", "the packed count then depends on the content"),
        ("tiny_llava_onevision", "uniform:keep_tokens=5", "the packed count then depends on the content"),
    ],
)
def test_families_vllm_cannot_serve_pruned_refuse_a_vtprune_entry(tmp_path, builder, spec, reason):
    """A ``vtprune`` entry on a family the plugin does not serve fails at start-up with the reason (its
    config and a tokenizer are enough: the refusal comes before any weights load)."""
    from vtprune.evals.bench.vllm_serving import word_tokenizer
    from vtprune.evals.models import transformers_vlms

    model = getattr(transformers_vlms, builder)()
    config = model.config
    config.architectures = [type(model).__name__]  # as a checkpoint's config.json names it
    config.save_pretrained(tmp_path)
    word_tokenizer(config.text_config.vocab_size).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        start(tmp_path, spec)
    assert "is not served" in str(error.value) and reason in str(error.value)


@pytest.mark.parametrize("builder", ["tiny_qwen2_vl", "tiny_qwen2_5_vl"])
def test_m_rope_families_refuse_a_vtprune_entry_at_the_config_check(builder):
    """Qwen2-VL / Qwen2.5-VL: vLLM's own model files import torchvision (``smart_resize``), which this
    environment lacks, so no engine can start here; the start-up check the plugin registers for them is
    called as vLLM's ModelConfig calls it."""
    from types import SimpleNamespace

    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.plugins import load_general_plugins

    from vtprune.evals.models import transformers_vlms

    load_general_plugins()  # what every vLLM process does first (the entry point)
    model = getattr(transformers_vlms, builder)()
    check = MODELS_CONFIG_MAP[type(model).__name__]
    check.verify_and_update_model_config(SimpleNamespace(hf_config=model.config))  # no entry: nothing to refuse
    model.config.vtprune = "fastervlm:keep_ratio=0.25,score=received"
    with pytest.raises(ValueError, match="vLLM 0.32 recomputes them after pruning"):
        check.verify_and_update_model_config(SimpleNamespace(hf_config=model.config))
    model.config.vtprune = "fastervlm:keep_ratio=0.25,scor=received"
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['scor'\]"):
        check.verify_and_update_model_config(SimpleNamespace(hf_config=model.config))
