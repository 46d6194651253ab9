"""Named presets: lookup, validation against the registered method, and methods that arrive later."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import prompt_ids

import vtprune
from vtprune import presets
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, tiny_llava
from vtprune.methods.base import BudgetConfig, Method, top_k_sorted
from vtprune.registry import _METHODS


@pytest.fixture
def future_method():
    """A preset whose method is not registered yet, and the method to register later."""

    @dataclass
    class LaterConfig(BudgetConfig):
        pass

    class Later(Method):
        name = "later_test"
        config_class = LaterConfig

        def select(self, scores, num_images, layout, device):
            return top_k_sorted(torch.zeros(num_images, layout.num_tokens, device=device), 3)

    preset = presets.register_preset(presets.Preset("later-3", "later_test", {"keep_tokens": 3}, paper="test"))
    yield preset, Later
    presets._PRESETS.pop(preset.name, None)
    _METHODS.pop(Later.name, None)


def test_fastervlm_budgets_are_the_papers_token_counts():
    available = presets.presets()
    for budget in (432, 288, 144, 58, 29):
        preset = available[f"fastervlm-{budget}"]
        assert presets.resolve(preset.name) == ("fastervlm", {"keep_tokens": budget})
        assert preset.spec() == f"fastervlm:keep_tokens={budget}"


def test_every_available_preset_validates_against_its_method():
    for name, preset in presets.presets().items():
        assert preset.available
        method, options = presets.resolve(name)
        (built,) = vtprune.build_methods(method, options)
        assert built.name == preset.method


def test_in_llm_presets_follow_the_papers_when_their_methods_exist():
    everything = presets.presets(include_unavailable=True)
    assert everything["fastv-k2-r50"].spec() == "fastv:k=2,ratio=0.5"
    assert everything["pdrop-llava15"].spec() == "pdrop:layers=8;16;24,lam=0.5"
    for name in ("fastv-k2-r50", "pdrop-llava15"):
        assert (name in presets.presets()) == (everything[name].method in vtprune.methods())


def test_a_preset_waits_for_its_method(future_method):
    preset, later = future_method
    assert preset.name not in presets.presets()
    assert preset.name in presets.presets(include_unavailable=True)
    with pytest.raises(ValueError, match="needs method 'later_test', which is not registered"):
        presets.get_preset(preset.name)
    vtprune.register_method(later)
    assert preset.name in presets.presets()
    assert presets.resolve(preset.name, {"keep_tokens": 4}) == ("later_test", {"keep_tokens": 4})


def test_a_preset_patches_a_model_with_its_settings():
    model = tiny_llava()
    assert presets.resolve("fastervlm-58", {"keep_tokens": 5}) == ("fastervlm", {"keep_tokens": 5})
    input_ids = prompt_ids([3, 4])[None]
    with vtprune.patched(model, "fastervlm-58", keep_tokens=5) as handle, torch.no_grad():  # tiny images: 16 tokens
        model(input_ids=input_ids, pixel_values=torch.randn(1, 3, 32, 32))
    assert (input_ids == IMAGE_TOKEN_ID).sum() == 16
    assert handle.last.visual_tokens_kept == [5]


def test_bad_preset_use_fails_clearly():
    with pytest.raises(ValueError, match="unknown preset 'fastervlm-5'. Did you mean"):
        presets.get_preset("fastervlm-5")
    with pytest.raises(ValueError, match="would shadow the method"):
        presets.register_preset(presets.Preset("random", "random", {"keep_tokens": 1}))
    with pytest.raises(ValueError, match="already registered"):
        presets.register_preset(presets.Preset("fastervlm-58", "fastervlm", {"keep_tokens": 57}))
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        vtprune.build_methods("fastervlm-58", {"keep_tokens": None, "keep_ratio": 3.0})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['keep_tokenz'\] for RandomConfig"):
        vtprune.build_methods("random-58", {"keep_tokenz": 3})
    with pytest.raises(ValueError, match="Did you mean 'fastervlm'"):
        presets.resolve("fastervlmm")
