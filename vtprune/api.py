"""The public entry points: ``patch``, ``unpatch``, ``patched``."""

from __future__ import annotations

import contextlib
import weakref

from vtprune.config import build_methods
from vtprune.handle import PruneHandle

_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> PruneHandle


def patch(model, method, **options) -> PruneHandle:
    """Prune visual tokens of a loaded model; returns a handle whose ``remove()`` undoes it.

    ``method`` is a name (``"fastervlm"``), a spec string (``"fastervlm:keep_tokens=58"``),
    a dict, a method config object, or a list of stages. Options are validated now.
    """
    from vtprune.patches import get_adapter

    if model in _ACTIVE:
        raise RuntimeError(
            f"this model is already patched ({_ACTIVE[model]!r}); call handle.remove() or vtprune.unpatch(model) first"
        )
    adapter = get_adapter(model)(model)
    methods = build_methods(method, options)
    handle = PruneHandle(model=model, methods=methods)
    for stage in methods:
        stage.bind(model, handle)
    try:
        adapter.install(handle, methods)
    except BaseException:
        handle.remove()
        raise
    _ACTIVE[model] = handle
    handle._on_remove.append(lambda: _ACTIVE.pop(model, None))
    return handle


def unpatch(model) -> None:
    """Remove vtprune from ``model`` (no-op when it is not patched)."""
    handle = _ACTIVE.get(model)
    if handle is not None:
        handle.remove()


def get_handle(model) -> PruneHandle | None:
    return _ACTIVE.get(model)


@contextlib.contextmanager
def patched(model, method, **options):
    """``with vtprune.patched(model, "fastervlm", keep_ratio=0.1) as handle: ...``"""
    handle = patch(model, method, **options)
    try:
        yield handle
    finally:
        handle.remove()
