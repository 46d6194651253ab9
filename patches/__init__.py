"""Model-family adapters, keyed by ``config.model_type`` (imported as ``vtprune.patches``).

An adapter is the only code that knows a model's internals: where the vision tower and its
attention layers are, where image tokens sit in the sequence, and which modules to hook.
"""

from __future__ import annotations

import importlib
import pkgutil

_ADAPTERS: dict[str, type] = {}


def register_adapter(cls):
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def supported_families() -> dict[str, list[str]]:
    """Adapter family -> model classes it accepts."""
    _register_families()
    return {cls.family: list(cls.model_classes) for cls in dict.fromkeys(_ADAPTERS.values())}


def _register_families() -> None:
    """Import every family file (``patches/<family>.py``; shared parts start with ``_``), which registers it."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


def get_adapter(model):
    """The adapter class for a loaded model, or a clear error listing what is supported."""
    _register_families()
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
    It wraps whatever the instance has now, an earlier instance-level wrapper included (ours or
    another tool's), and ``remove()`` puts exactly that back; the handle removes in reverse order.
    """

    _ABSENT = object()

    def __init__(self, obj, name: str, make_wrapper):
        self.obj, self.name = obj, name
        self.previous = vars(obj).get(name, self._ABSENT)
        self.wrapper = make_wrapper(getattr(obj, name))
        setattr(obj, name, self.wrapper)

    def remove(self) -> None:
        if vars(self.obj).get(self.name) is not self.wrapper:
            return  # already removed
        if self.previous is self._ABSENT:
            del vars(self.obj)[self.name]
        else:
            setattr(self.obj, self.name, self.previous)
