"""The public entry points: ``patch``, ``unpatch``, ``patched``."""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
import transformers
from packaging.version import Version

from vtprune.config import build_methods
from vtprune.handle import PruneHandle

_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> PruneHandle

# The transformers versions vtprune supports (setup.cfg's install_requires says the same), tested on 5.24.0.
# The original LLaVA package's adapter also runs in that package's own era, transformers 4.36/4.37
# (tested on 4.37.2; the adapter itself refuses other 4.x versions).
TRANSFORMERS_SUPPORTED = (Version("5"), Version("6"))  # [lower, upper)
TRANSFORMERS_RANGE = f"transformers>={TRANSFORMERS_SUPPORTED[0]},<{TRANSFORMERS_SUPPORTED[1]}"
LEGACY_ERA_FAMILIES = ("llava_original",)


def patch(model, method, **options) -> PruneHandle:
    """Prune visual tokens of a loaded model; returns a handle whose ``remove()`` undoes it.

    ``method`` is a name (``"fastervlm"``), a preset name (``"fastervlm-58"``: its options,
    replaced by ``options``), a spec string (``"fastervlm:keep_tokens=58"``), a dict, a method
    config object, or a list of stages. Options are validated now.
    """
    from vtprune.patches import get_adapter

    _refuse_compiled(model)
    if model in _ACTIVE:
        raise RuntimeError(
            f"this model is already patched ({_ACTIVE[model]!r}); call handle.remove() or vtprune.unpatch(model) first"
        )
    _refuse_nested(model)
    adapter_class = get_adapter(model)
    check_transformers(adapter_class.family)
    adapter = adapter_class(model)
    methods = build_methods(method, options)
    if not methods:
        raise ValueError(
            f"no method to apply (got {method!r}): give at least one, e.g. vtprune.patch(model, 'fastervlm', "
            "keep_ratio=0.25). To run the model unpruned, do not patch it (the lmms-eval model and `vtprune eval` "
            "spell that method=none)"
        )
    handle = PruneHandle(model=model, methods=methods)
    for stage in methods:
        stage.bind(model, handle)
    try:
        adapter.install(handle, methods)
        handle.guard_copies()
    except BaseException:
        handle.remove()
        raise
    _ACTIVE[model] = handle
    handle._on_remove.append(lambda: _ACTIVE.pop(model, None))
    return handle


def check_transformers(family: str, version: str | None = None) -> None:
    """Refuse a transformers version known not to work for ``family``; warn above the supported range.

    ``version``: the installed transformers by default.
    """
    version = version or transformers.__version__
    lower, upper = TRANSFORMERS_SUPPORTED
    if Version(version) < lower and family not in LEGACY_ERA_FAMILIES:
        raise RuntimeError(
            f"vtprune's {family} adapter needs {TRANSFORMERS_RANGE} (the model classes it hooks are laid out as "
            f"in transformers 5); found transformers {version}. Upgrade: pip install '{TRANSFORMERS_RANGE}'"
        )
    if Version(version) >= upper:
        warnings.warn(
            f"vtprune supports {TRANSFORMERS_RANGE} (tested on 5.24.0); found transformers {version}, outside "
            f"that range: patching may fail or prune wrongly. Supported: pip install '{TRANSFORMERS_RANGE}'",
            stacklevel=3,
        )


def _refuse_compiled(model) -> None:
    """``torch.compile(model)`` returns a wrapper (OptimizedModule) around the model vtprune hooks."""
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, torch.nn.Module):
        raise TypeError(
            f"this {type(model).__name__} is the torch.compile wrapper of a {type(original).__name__}; vtprune hooks "
            "the model's own modules. Patch before compiling (handle = vtprune.patch(model, ...), then "
            "torch.compile(model)), or patch the model the wrapper compiles: vtprune.patch(compiled._orig_mod, ...)"
        )


def _refuse_nested(model) -> None:
    """Patching a module inside a patched model (or around one) stacks two pruners on one forward."""
    for other, handle in list(_ACTIVE.items()):
        inside = next((name for name, module in model.named_modules() if module is other), None)
        around = next((name for name, module in other.named_modules() if module is model), None)
        if inside is None and around is None:
            continue
        if inside is not None:
            where = f"its submodule {inside!r} ({type(other).__name__}) is already patched"
        else:
            where = f"it is the submodule {around!r} of a {type(other).__name__} that is already patched"
        raise RuntimeError(
            f"cannot patch this {type(model).__name__}: {where} ({handle!r}), and two patches would prune one "
            "forward twice. Remove that patch first (its handle.remove(), or vtprune.unpatch(<that module>)), "
            "then patch one of the two"
        )


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
