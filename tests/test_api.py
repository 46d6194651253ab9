import copy
import re
import warnings
from configparser import ConfigParser
from pathlib import Path

import pytest
import torch
import transformers
from conftest import hook_counts
from helpers import prompt_ids
from transformers import LlamaForCausalLM, SiglipVisionConfig

import vtprune
from vtprune import api
from vtprune.evals.models.transformers_vlms import build_llava, llava_config, text_config, tiny_llava, tiny_llava_next
from vtprune.methods.base import BudgetConfig, Method, top_k_sorted
from vtprune.methods.fastervlm import FasterVLMConfig
from vtprune.registry import _METHODS


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
    with pytest.raises(ValueError, match=r"Did you mean 'fastervlm'.*Known methods: .*fastervlm, .*random, uniform"):
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
    try:
        assert "test_last_k" in vtprune.methods()
        ids = torch.tensor([[5, 6] + [3] * 16 + [7]])
        with vtprune.patched(model, "test_last_k", keep_tokens=3) as handle, torch.no_grad():
            model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
        assert handle.last.stages[0].kept[0].tolist() == [13, 14, 15]
        with pytest.raises(ValueError, match="already registered"):

            class Other(LastK):
                pass

            vtprune.register_method(Other)
    finally:
        _METHODS.pop(LastK.name)  # the registry as the other tests (every method has a contract case) expect it


def test_parse_spec_with_lists_and_stages():
    assert vtprune.parse_spec("fastervlm:keep_tokens=144+pdrop:layers=8;16;24,lam=0.5") == [
        ("fastervlm", {"keep_tokens": "144"}),
        ("pdrop", {"layers": "8;16;24", "lam": "0.5"}),
    ]


def module_structure(model: torch.nn.Module) -> dict:
    """Per module: the size of every hook dict and the names of its instance attributes."""
    return {
        path: (sorted(vars(module)), [n for (p, _), n in hook_counts(model).items() if p == path])
        for path, module in model.named_modules()
    }


def test_patch_refuses_an_empty_list_of_methods(model):
    before = module_structure(model)
    with pytest.raises(ValueError, match=r"no method to apply \(got \[\]\): give at least one.*do not patch it"):
        vtprune.patch(model, [])
    assert vtprune.get_handle(model) is None and module_structure(model) == before


def test_none_is_not_a_method_and_says_how_to_run_unpruned(model):
    with pytest.raises(ValueError, match="'none' is not a method: to run a model unpruned, do not patch it"):
        vtprune.patch(model, "none")


def test_a_compiled_model_is_refused_with_the_fix(model):
    compiled = torch.compile(model, backend="eager")
    message = r"torch.compile wrapper of a LlavaForConditionalGeneration.*Patch before compiling.*compiled._orig_mod"
    with pytest.raises(TypeError, match=message):
        vtprune.patch(compiled, "fastervlm", keep_tokens=4)
    vtprune.patch(compiled._orig_mod, "fastervlm", keep_tokens=4).remove()  # the named fix is accepted


@pytest.mark.parametrize("first, second", [("model", "inner"), ("inner", "model")])
def test_patching_a_model_and_its_submodule_is_refused(model, first, second):
    modules = {"model": model, "inner": model.model}
    handle = vtprune.patch(modules[first], "uniform", keep_tokens=4)
    named = "its submodule 'model' \\(LlavaModel\\)" if first == "inner" else "it is the submodule 'model' of a Llava"
    with pytest.raises(RuntimeError, match=rf"{named}.*already patched.*Remove that patch first"):
        vtprune.patch(modules[second], "uniform", keep_tokens=4)
    handle.remove()
    vtprune.patch(modules[second], "uniform", keep_tokens=4).remove()  # once removed, the other one patches


@pytest.mark.parametrize("build", [tiny_llava, tiny_llava_next], ids=["llava", "llava_next"])
def test_deepcopy_of_a_patched_model_is_a_clean_unpatched_model(build):
    model = build()
    unpatched_copy = copy.deepcopy(model)
    handle = vtprune.patch(model, "uniform", keep_tokens=4)
    patched_structure = module_structure(model)
    clone = copy.deepcopy(model)
    assert module_structure(clone) == module_structure(unpatched_copy)
    assert module_structure(model) == patched_structure  # the original keeps its patch, in order
    for (name, value), (_, expected) in zip(clone.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(value, expected), name
    assert vtprune.get_handle(clone) is None
    vtprune.patch(clone, "fastervlm", keep_tokens=3).remove()  # the copy patches and unpatches like any model
    assert module_structure(clone) == module_structure(unpatched_copy)
    handle.remove()
    assert module_structure(model) == module_structure(unpatched_copy)


def test_a_deepcopy_runs_unpruned_and_the_original_still_prunes(model):
    ids, pixels = prompt_ids([3, 4])[None], torch.randn(1, 3, 32, 32)
    unpatched = copy.deepcopy(model)
    with torch.no_grad():
        reference = model(input_ids=ids, pixel_values=pixels).logits
        with vtprune.patched(model, "uniform", keep_tokens=4) as handle:
            pruned = model(input_ids=ids, pixel_values=pixels).logits
            clone = copy.deepcopy(model.model)  # a submodule holding hooks copies clean too
            assert module_structure(clone) == module_structure(copy.deepcopy(unpatched.model))
            clone = copy.deepcopy(model)
            assert torch.equal(clone(input_ids=ids, pixel_values=pixels).logits, reference)
            assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, pruned)
            assert handle.last.visual_tokens_kept == [4]
    assert pruned.shape[1] == reference.shape[1] - 12


@pytest.mark.parametrize("num_layers", [2, 3, 4])
def test_pdrop_hint_on_a_shallow_model_suggests_layers_it_accepts(num_layers):
    model = build_llava(llava_config(text=text_config(layers=num_layers)))
    with pytest.raises(ValueError, match="pdrop: layers") as refused:
        vtprune.patch(model, "pdrop", layers=[8, 16, 24])
    suggested = [int(layer) for layer in re.search(r"layers=\[([\d, ]+)\]", str(refused.value)).group(1).split(",")]
    assert suggested == sorted(set(suggested)) and all(1 <= layer < num_layers for layer in suggested)
    assert len(suggested) == min(3, num_layers - 1)
    if num_layers - 1 < 3:
        assert f"too shallow for 3 cuts: {num_layers} decoder layers fit at most {num_layers - 1}" in str(refused.value)
    ids, pixels = prompt_ids([3, 4])[None], torch.randn(1, 3, 32, 32)
    with vtprune.patched(model, "pdrop", layers=suggested) as handle, torch.no_grad():
        model(input_ids=ids, pixel_values=pixels)
    assert [stage.layer for stage in handle.last.stages] == suggested


def test_a_preset_name_patches_with_the_lmms_eval_precedence(model):
    """The preset's options, replaced by the spec's, replaced by keyword options (as method=... in lmms-eval)."""
    cases = [
        (("fastervlm-58",), {}, FasterVLMConfig(keep_tokens=58)),
        (("fastervlm-58",), {"keep_tokens": 5}, FasterVLMConfig(keep_tokens=5)),
        (("fastervlm-58:keep_tokens=3",), {}, FasterVLMConfig(keep_tokens=3)),
        (("fastervlm-58:keep_tokens=3",), {"keep_tokens": 4}, FasterVLMConfig(keep_tokens=4)),
        (("fastervlm-58",), {"keep_tokens": None, "keep_ratio": 0.5}, FasterVLMConfig(keep_ratio=0.5)),
    ]
    for args, options, expected in cases:
        assert vtprune.build_methods(*args, options)[0].config == expected
    ids, pixels = prompt_ids([3, 4])[None], torch.randn(1, 3, 32, 32)
    with vtprune.patched(model, "fastervlm-58", keep_tokens=5) as handle, torch.no_grad():
        model(input_ids=ids, pixel_values=pixels)
    assert handle.last.visual_tokens_kept == [5]


@pytest.mark.parametrize("version", ["4.37.2", "4.57.1"])
def test_transformers_known_not_to_work_is_refused_with_the_range(version):
    with pytest.raises(RuntimeError, match=rf"llava adapter needs transformers>=5,<6.*found transformers {version}"):
        api.check_transformers("llava", version)
    api.check_transformers("llava_original", version)  # the original LLaVA package's own era: its adapter checks


def test_transformers_above_the_range_warns():
    with pytest.warns(UserWarning, match=r"supports transformers>=5,<6 .*found transformers 6.0.0, outside that range"):
        api.check_transformers("qwen2_vl", "6.0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        api.check_transformers("qwen2_vl", "5.24.0")


def test_patch_checks_the_installed_transformers_before_touching_the_model(model, monkeypatch):
    before = module_structure(model)
    monkeypatch.setattr(api, "TRANSFORMERS_SUPPORTED", (api.Version("99"), api.Version("100")))
    with pytest.raises(RuntimeError, match=rf"found transformers {transformers.__version__}"):
        vtprune.patch(model, "uniform", keep_tokens=4)
    assert vtprune.get_handle(model) is None and module_structure(model) == before


def test_setup_cfg_states_the_supported_range_and_make_install_pins_a_tested_version():
    root = Path(__file__).resolve().parents[1]
    setup = ConfigParser()
    setup.read(root / "setup.cfg")
    requires = [line.strip() for line in setup["options"]["install_requires"].splitlines() if line.strip()]
    assert api.TRANSFORMERS_RANGE in requires
    pinned = re.search(r"^transformers==(\S+)$", (root / "requirements-dev.txt").read_text(), re.MULTILINE).group(1)
    lower, upper = api.TRANSFORMERS_SUPPORTED
    assert lower <= api.Version(pinned) < upper
    assert not any(line.startswith(("torch==", "transformers==")) for line in requires)  # a user's own torch stays


README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_imports_work_and_name_every_config_class():
    text = README.read_text()
    imports = [line.strip() for line in text.splitlines() if line.strip().startswith("from vtprune")]
    assert imports
    for line in imports:
        exec(line, {})
    for method in vtprune.registry._METHODS.values():
        if method.__module__.startswith("vtprune."):
            assert getattr(vtprune, method.config_class.__name__) is method.config_class


def test_the_readme_preset_line_is_the_form_that_works(model):
    text = README.read_text()
    assert 'vtprune.patch(model, "fastervlm-58")' in text and "presets.resolve" not in text
    vtprune.patch(model, "fastervlm-58", keep_tokens=4).remove()


def test_the_readme_links_only_to_files_in_the_repository():
    root = README.parent
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    local = [target for target in targets if not target.startswith(("http://", "https://"))]
    assert local and all((root / target).exists() for target in local), [t for t in local if not (root / t).exists()]
    assert "shared/" not in README.read_text()
