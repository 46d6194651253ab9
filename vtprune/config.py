"""Turning what a user writes into validated method instances.

Accepted forms (all validated by the method's config dataclass):
- ``patch(model, "fastervlm", keep_ratio=0.1)``: a name plus keyword options;
- ``"fastervlm:keep_tokens=58,positions=original"``: a string spec (lists as ``8;16;24``);
- ``{"method": "fastervlm", "keep_tokens": 58}``: a dict;
- ``FasterVLMConfig(keep_tokens=58)``: a config object;
- a list of any of these, or ``(name, options)`` pairs, or specs joined with ``+``: stages
  applied in order.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from vtprune.methods.base import Method, MethodConfig
from vtprune.registry import _METHODS, get_method


def _coerce(value, annotation):
    """Coerce a value (often a string from a spec or a CLI) to a dataclass field's type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        is_none = value is None or (isinstance(value, str) and value.lower() == "none")
        if is_none and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option)
            except (TypeError, ValueError) as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors))
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (object,)
        if isinstance(value, str):
            value = [part for part in value.replace(",", ";").split(";") if part.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(part, item) for part in value]
    if annotation is bool:
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(f"expected a boolean, got {value!r}")
        return bool(value)
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(number)
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        return str(value)
    return value


def make_config(method: type[Method], options: dict) -> MethodConfig:
    """Build and validate ``method.config_class`` from loosely typed options."""
    config_class = method.config_class
    hints = typing.get_type_hints(config_class)
    names = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method.name!r}; valid options: {', '.join(names)}")
    coerced = {}
    for key, value in options.items():
        try:
            coerced[key] = _coerce(value, hints[key])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{method.name}: option {key}={value!r}: {error}") from None
    return config_class(**coerced)


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
            method = get_method(name)
            methods.append(method(make_config(method, {**stage_options, **options})))
        return methods
    if isinstance(spec, (list, tuple)):
        if options:
            raise ValueError("keyword options are ambiguous with a list of stages; give options per stage")
        if len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
            return build_methods(spec[0], spec[1])
        return [m for stage in spec for m in build_methods(*(stage if isinstance(stage, tuple) else (stage,)))]
    raise TypeError(f"cannot build a method from {type(spec).__name__}: give a name, spec string, dict or config")
