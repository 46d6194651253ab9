import pytest
import torch
from transformers import LlamaForCausalLM, SiglipVisionConfig

import vtprune
from vtprune.evals.models.transformers_vlms import llava_config, text_config, tiny_llava
from vtprune.methods.base import BudgetConfig, Method, top_k_sorted
from vtprune.methods.fastervlm import FasterVLMConfig


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def test_spec_forms_build_the_same_config(model):
    expected = FasterVLMConfig(keep_tokens=5)
    for spec, options in [
        ("fastervlm", {"keep_tokens": 5}),
        ("fastervlm:keep_tokens=5", {}),
        ({"method": "fastervlm", "keep_tokens": "5"}, {}),
        (FasterVLMConfig(keep_tokens=5), {}),
        ([("fastervlm", {"keep_tokens": 5})], {}),
    ]:
        with vtprune.patched(model, spec, **options) as handle:
            assert handle.methods[0].config == expected


def test_unknown_method_suggests_the_closest(model):
    with pytest.raises(ValueError, match=r"Did you mean 'fastervlm'.*Known methods: fastervlm, .*random, uniform"):
        vtprune.patch(model, "fastervlmm", keep_ratio=0.5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\]"),
        ({"keep_ratio": 1.5}, r"keep_ratio must be in \(0, 1\]"),
        ({"keep_tokens": 0}, "keep_tokens must be an integer >= 1"),
        ({"keep_tokens": 17}, "keep_tokens=17 is larger than the 16 visual tokens"),
        ({}, "give a budget"),
        ({"keep_ratio": 0.5, "keep_tokens": 3}, "not both"),
        ({"keep_ratio": 0.5, "positions": "shifted"}, "positions must be one of"),
        ({"keep_ratio": 0.5, "layer": 3}, r"unknown option\(s\) \['layer'\].*valid options: positions, keep_ratio"),
        ({"keep_tokens": "2.5"}, "expected an integer"),
    ],
)
def test_bad_options_fail_at_patch_time(model, options, message):
    with pytest.raises(ValueError, match=message):
        vtprune.patch(model, "fastervlm", **options)
    assert vtprune.get_handle(model) is None


def test_patching_twice_is_an_error_and_unpatch_allows_again(model):
    handle = vtprune.patch(model, "random", keep_ratio=0.5)
    with pytest.raises(RuntimeError, match="already patched"):
        vtprune.patch(model, "uniform", keep_ratio=0.5)
    vtprune.unpatch(model)
    assert handle.removed and vtprune.get_handle(model) is None
    vtprune.patch(model, "uniform", keep_ratio=0.5).remove()


def test_unsupported_model_lists_supported_classes():
    llm = LlamaForCausalLM(text_config())
    with pytest.raises(TypeError, match="does not support LlamaForCausalLM.*LlavaForConditionalGeneration"):
        vtprune.patch(llm, "fastervlm", keep_ratio=0.5)


def test_cls_method_on_a_tower_without_cls_is_refused():
    config = llava_config()
    config.vision_config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="has no \\[CLS\\] token; use fopru or a score-free method"):
        vtprune.patch(model, "fastervlm", keep_ratio=0.5)
    vtprune.patch(model, "uniform", keep_ratio=0.5).remove()  # score-free methods still work


def test_methods_lists_options():
    listed = vtprune.methods()
    assert {"fastervlm", "random", "uniform"} <= set(listed)
    assert set(listed["random"]["options"]) == {"positions", "keep_ratio", "keep_tokens", "budget", "seed"}
    assert listed["fastervlm"]["stage"] == "pre_llm"


def test_register_a_user_method_end_to_end(model):
    class LastK(Method):
        name = "test_last_k"
        config_class = BudgetConfig
        paper = "test: keep the last k patches"

        def select(self, scores, num_images, layout, device):
            k = self.config.num_keep(layout.num_tokens)
            return top_k_sorted(torch.arange(layout.num_tokens, device=device).float().expand(num_images, -1), k)

    vtprune.register_method(LastK)
    assert "test_last_k" in vtprune.methods()
    ids = torch.tensor([[5, 6] + [3] * 16 + [7]])
    with vtprune.patched(model, "test_last_k", keep_tokens=3) as handle, torch.no_grad():
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
    assert handle.last.stages[0].kept[0].tolist() == [13, 14, 15]
    with pytest.raises(ValueError, match="already registered"):

        class Other(LastK):
            pass

        vtprune.register_method(Other)


def test_parse_spec_with_lists_and_stages():
    assert vtprune.parse_spec("fastervlm:keep_tokens=144+pdrop:layers=8;16;24,lam=0.5") == [
        ("fastervlm", {"keep_tokens": "144"}),
        ("pdrop", {"layers": "8;16;24", "lam": "0.5"}),
    ]
