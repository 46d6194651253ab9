"""Method configs: every config coerces and validates its fields however it is built."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import pytest

import vtprune
from vtprune.methods.base import BudgetConfig, MethodConfig
from vtprune.methods.fastervlm import FasterVLMConfig
from vtprune.methods.pdrop import PDropConfig
from vtprune.registry import _METHODS

FASTERVLM_OPTIONS = "valid options: positions, keep_ratio, keep_tokens, budget, score"


@dataclass
class ThresholdConfig(MethodConfig):
    """A user's config: it gets coercion and the unknown-option check without writing them."""

    threshold: float = 0.5
    rounds: int = 1
    grid: tuple[int, int] = (1, 1)


def minimal_options(config_class) -> dict:
    """The fewest options that make a valid config: a budget, or a frame scorer, where it needs one."""
    if issubclass(config_class, BudgetConfig):
        return {"keep_ratio": 0.5}
    if "scorer" in {field.name for field in dataclasses.fields(config_class)}:
        return {"scorer": lambda frames, prompt: None}
    return {}


def typed_fields():
    """(config class, field, default) of every built-in config field whose default is a plain int, float or bool."""
    cases = []
    for config_class in {method.config_class for method in _METHODS.values()}:
        hints = typing.get_type_hints(config_class)
        for field in dataclasses.fields(config_class):
            annotation = hints[field.name]
            if annotation in (int, float, bool) and type(field.default) is annotation:
                cases.append((config_class, field.name, field.default))
    return sorted(cases, key=lambda case: (case[0].__name__, case[1]))


def test_a_config_object_refuses_a_fractional_token_count():
    with pytest.raises(ValueError, match=r"FasterVLMConfig: option keep_tokens=2.5: expected an integer"):
        FasterVLMConfig(keep_tokens=2.5)
    with pytest.raises(ValueError, match="expected an integer"):
        FasterVLMConfig(keep_tokens="2.5")


def test_strings_from_a_spec_are_coerced_to_the_field_types():
    config = FasterVLMConfig(keep_tokens="58")
    assert config.keep_tokens == 58 and type(config.keep_tokens) is int
    assert config == vtprune.build_methods("fastervlm:keep_tokens=58")[0].config
    assert FasterVLMConfig(keep_ratio="0.25").keep_ratio == 0.25
    assert FasterVLMConfig(keep_tokens=8, keep_ratio="none").keep_ratio is None
    assert PDropConfig(layers="8;16;24", lam="0.5") == PDropConfig(layers=[8, 16, 24], lam=0.5)


@pytest.mark.parametrize(
    "config_class, name, default", typed_fields(), ids=lambda case: getattr(case, "__name__", str(case))
)
def test_every_builtin_config_coerces_its_typed_fields(config_class, name, default):
    base = minimal_options(config_class)
    from_string = config_class(**base, **{name: str(default)})
    assert getattr(from_string, name) == default and type(getattr(from_string, name)) is type(default)
    if type(default) is int:
        with pytest.raises(ValueError, match=f"option {name}=0.5: expected an integer"):
            config_class(**base, **{name: 0.5})
    if type(default) is float:
        with pytest.raises(ValueError, match=f"option {name}='many': could not convert"):
            config_class(**base, **{name: "many"})


def test_the_typed_field_cases_cover_the_methods_numeric_options():
    covered = {(cls.__name__, name) for cls, name, _ in typed_fields()}
    assert {
        ("FastVConfig", "k"),
        ("PDropConfig", "lam"),
        ("HiREDConfig", "early_layer"),
        ("RandomConfig", "seed"),
    } <= covered


def test_a_user_config_is_coerced_and_checked_without_code_of_its_own():
    config = ThresholdConfig(threshold="0.25", rounds="3", grid="2;3")
    assert (config.threshold, config.rounds, config.grid) == (0.25, 3, (2, 3))
    assert ThresholdConfig(grid=[4.0, "5"]).grid == (4, 5)
    with pytest.raises(ValueError, match="ThresholdConfig: option rounds=1.5: expected an integer"):
        ThresholdConfig(rounds=1.5)
    with pytest.raises(TypeError, match="valid options: positions, threshold, rounds, grid"):
        ThresholdConfig(treshold=0.1)


def test_an_unknown_option_names_the_valid_ones_however_the_config_is_built():
    config = FasterVLMConfig(keep_tokens=5)
    with pytest.raises(
        TypeError, match=rf"unknown option\(s\) \['keep_token'\] for FasterVLMConfig; {FASTERVLM_OPTIONS}"
    ):
        FasterVLMConfig(keep_token=5)
    with pytest.raises(TypeError, match=rf"unknown option\(s\) \['bad_option'\].*{FASTERVLM_OPTIONS}"):
        dataclasses.replace(config, bad_option=1)
    with pytest.raises(ValueError, match=rf"unknown option\(s\) \['bad'\].*{FASTERVLM_OPTIONS}"):
        vtprune.build_methods(config, {"bad": 1})
    with pytest.raises(ValueError, match=rf"unknown option\(s\) \['bad'\].*{FASTERVLM_OPTIONS}"):
        vtprune.build_methods("fastervlm:keep_tokens=5,bad=1")


def test_replace_and_keyword_options_are_validated_too():
    config = FasterVLMConfig(keep_tokens=5)
    assert dataclasses.replace(config, keep_tokens="7").keep_tokens == 7
    with pytest.raises(ValueError, match="expected an integer"):
        dataclasses.replace(config, keep_tokens=7.5)
    (method,) = vtprune.build_methods(config, {"keep_tokens": "6"})
    assert method.config == FasterVLMConfig(keep_tokens=6)
