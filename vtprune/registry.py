"""Name -> method class registry (in the spirit of timm's model registry)."""

from __future__ import annotations

import difflib

from vtprune.methods.base import InLLMMethod, Method

STAGES = ("pre_llm", "in_llm")  # before the LLM / between its decoder layers
_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a :class:`Method` subclass under ``cls.name``; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError("register_method expects a subclass of vtprune.Method")
    for attr in ("name", "config_class"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} must define {attr!r}")
    if cls.stage not in STAGES:
        raise ValueError(f"{cls.__name__}.stage must be one of {STAGES}, got {cls.stage!r}")
    if cls.stage == "in_llm" and not issubclass(cls, InLLMMethod):
        raise TypeError(f"{cls.__name__} has stage 'in_llm' and must subclass vtprune.methods.base.InLLMMethod")
    existing = _METHODS.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({existing.__qualname__})")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        if name.lower() == "none":
            raise ValueError(
                "'none' is not a method: to run a model unpruned, do not patch it (or remove its handle). "
                "method=none is how the lmms-eval model and `vtprune eval` name the unpruned baseline"
            ) from None
        known = sorted(_METHODS)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Known methods: {', '.join(known)}") from None


def methods() -> dict[str, dict[str, object]]:
    """Registered methods: name -> {"paper", "stage", "options": {option: default}}."""
    return {
        name: {"paper": cls.paper, "stage": cls.stage, "options": cls.options()}
        for name, cls in sorted(_METHODS.items())
    }
