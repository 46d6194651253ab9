"""Model-family adapters, keyed by ``config.model_type`` (imported as ``vtprune.patches``).

An adapter is the only code that knows a model's internals: where the vision tower and its
attention layers are, where image tokens sit in the sequence, and which modules to hook.
"""

from __future__ import annotations

_ADAPTERS: dict[str, type] = {}


def register_adapter(cls):
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def supported_families() -> dict[str, list[str]]:
    """Adapter family -> model classes it accepts."""
    return {cls.family: list(cls.model_classes) for cls in dict.fromkeys(_ADAPTERS.values())}


def get_adapter(model):
    """The adapter class for a loaded model, or a clear error listing what is supported."""
    from vtprune.patches import llava  # noqa: F401  (registers the built-in adapters)

    config = getattr(model, "config", None)
    adapter = _ADAPTERS.get(getattr(config, "model_type", None))
    if adapter is None or type(model).__name__ not in adapter.model_classes:
        supported = "; ".join(f"{family}: {', '.join(classes)}" for family, classes in supported_families().items())
        raise TypeError(
            f"vtprune does not support {type(model).__name__} (model_type={getattr(config, 'model_type', None)!r}). "
            f"Supported model classes: {supported}"
        )
    return adapter
