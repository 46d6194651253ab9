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
    from vtprune.patches import (  # noqa: F401  (registers the built-in adapters)
        llava,
        llava_next,
        llava_onevision,
        llava_original,
        qwen2_vl,
    )

    config = getattr(model, "config", None)
    adapter = _ADAPTERS.get(getattr(config, "model_type", None))
    if adapter is None or type(model).__name__ not in adapter.model_classes:
        supported = "; ".join(f"{family}: {', '.join(classes)}" for family, classes in supported_families().items())
        raise TypeError(
            f"vtprune does not support {type(model).__name__} (model_type={getattr(config, 'model_type', None)!r}). "
            f"Supported model classes: {supported}"
        )
    return adapter


class InstanceMethodPatch:
    """Wrap a bound method on one object (never its class); ``remove()`` restores it.

    For the rare input no module hook can see (e.g. ``image_sizes`` when ``generate`` encodes
    images itself): the wrapper is an attribute of this instance only, recorded in the handle.
    """

    def __init__(self, obj, name: str, make_wrapper):
        if name in vars(obj):
            raise RuntimeError(f"{type(obj).__name__}.{name} is already overridden on this instance")
        self.obj, self.name = obj, name
        setattr(obj, name, make_wrapper(getattr(obj, name)))

    def remove(self) -> None:
        vars(self.obj).pop(self.name, None)
