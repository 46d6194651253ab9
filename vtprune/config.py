"""Turning what a user writes into validated method instances.

Accepted forms (all validated by the method's config dataclass):
- ``patch(model, "fastervlm", keep_ratio=0.1)``: a name plus keyword options;
- ``patch(model, "fastervlm-58")``: a preset name (see :mod:`vtprune.presets`), its options
  replaced by those of the spec and then by keyword options, e.g. ``"fastervlm-58", keep_tokens=29``;
- ``"fastervlm:keep_tokens=58,positions=original"``: a string spec (lists as ``8;16;24``);
- ``{"method": "fastervlm", "keep_tokens": 58}``: a dict;
- ``FasterVLMConfig(keep_tokens=58)``: a config object;
- a list of any of these, or ``(name, options)`` pairs, or specs joined with ``+``: stages
  applied in order.
"""

from __future__ import annotations

import dataclasses

from vtprune.methods.base import Method, MethodConfig
from vtprune.presets import resolve
from vtprune.registry import _METHODS, get_method


def parse_spec(spec: str) -> list[tuple[str, dict]]:
    """``"fastervlm:keep_tokens=58+pdrop:layers=8;16;24"`` -> [(name, {option: str}), ...]."""
    stages = []
    for part in spec.split("+"):
        name, _, rest = part.strip().partition(":")
        options = {}
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"bad option {item!r} in spec {spec!r}; write key=value")
            options[key.strip()] = value.strip()
        stages.append((name.strip(), options))
    return stages


def _method_for_config(config: MethodConfig) -> type[Method]:
    for method in _METHODS.values():
        if type(config) is method.config_class:
            return method
    raise ValueError(f"no registered method uses config class {type(config).__name__}")


def build_methods(spec, options: dict | None = None) -> list[Method]:
    """Normalise any accepted spec (see module docstring) into method instances."""
    options = dict(options or {})
    if isinstance(spec, MethodConfig):
        if options:
            spec = dataclasses.replace(spec, **options)
        return [_method_for_config(spec)(spec)]
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("method", None)
        if name is None:
            raise ValueError("a dict spec needs a 'method' key, e.g. {'method': 'fastervlm', 'keep_ratio': 0.1}")
        return build_methods(name, {**spec, **options})
    if isinstance(spec, str):
        stages = parse_spec(spec)
        if len(stages) > 1 and options:
            raise ValueError("keyword options are ambiguous with a multi-stage spec; put them in the spec")
        methods = []
        for name, stage_options in stages:
            method_name, merged = resolve(name, {**stage_options, **options})
            method = get_method(method_name)
            methods.append(method(method.config_class(**merged)))
        return methods
    if isinstance(spec, (list, tuple)):
        if options:
            raise ValueError("keyword options are ambiguous with a list of stages; give options per stage")
        if len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
            return build_methods(spec[0], spec[1])
        return [m for stage in spec for m in build_methods(*(stage if isinstance(stage, tuple) else (stage,)))]
    raise TypeError(f"cannot build a method from {type(spec).__name__}: give a name, spec string, dict or config")
