"""Named presets: each paper's headline settings under one name.

    vtprune.patch(model, "fastervlm-58")                  # the preset's options
    vtprune.patch(model, "fastervlm-58", keep_tokens=29)  # keywords replace them
    python -m lmms_eval --model vtprune --model_args base=llava_hf,pretrained=...,preset=fastervlm-58

A preset names a registered method and its options. Presets may be defined for methods that
are not registered yet (``fastv``, ``pdrop``): such a preset is *unavailable* — it is not
listed by :func:`presets` and :func:`get_preset` refuses it with an error that says which
method is missing — until the method registers. Options are validated against the method's
config at lookup time, so a preset can never silently drift from its method.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from vtprune.registry import _METHODS, get_method

# The token budgets FasterVLM reports for LLaVA-1.5 (576 visual tokens): 25/50/75/90/95 % pruned.
FASTERVLM_BUDGETS = (432, 288, 144, 58, 29)


@dataclass(frozen=True)
class Preset:
    """``method`` with ``options``, as published in ``paper``."""

    name: str
    method: str
    options: dict = field(default_factory=dict)
    paper: str = ""
    note: str = ""

    @property
    def available(self) -> bool:
        """True when ``method`` is registered (in-LLM methods register later)."""
        return self.method in _METHODS

    def spec(self) -> str:
        """The equivalent spec string, e.g. ``fastervlm:keep_tokens=58``."""
        parts = [f"{key}={_format(value)}" for key, value in self.options.items()]
        return f"{self.method}:{','.join(parts)}" if parts else self.method


def _format(value) -> str:
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return str(value)


_PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Add a preset; its method need not be registered yet (see the module docstring)."""
    existing = _PRESETS.get(preset.name)
    if existing is not None and existing != preset:
        raise ValueError(f"a preset named {preset.name!r} is already registered: {existing}")
    if preset.name in _METHODS:
        raise ValueError(f"preset name {preset.name!r} would shadow the method of the same name")
    _PRESETS[preset.name] = preset
    return preset


def presets(include_unavailable: bool = False) -> dict[str, Preset]:
    """Preset name -> :class:`Preset`, only those whose method is registered unless asked."""
    return {name: p for name, p in sorted(_PRESETS.items()) if include_unavailable or p.available}


def get_preset(name: str) -> Preset:
    """The preset ``name``, validated against its method's config now."""
    preset = _PRESETS.get(name)
    if preset is None:
        known = sorted(presets())
        close = difflib.get_close_matches(name, sorted(_PRESETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown preset {name!r}.{hint} Available presets: {', '.join(known) or '(none)'}")
    if not preset.available:
        raise ValueError(
            f"preset {name!r} needs method {preset.method!r}, which is not registered in this installation "
            f"(registered methods: {', '.join(sorted(_METHODS))}); pick another preset or method"
        )
    get_method(preset.method).config_class(**preset.options)
    return preset


def is_preset(name: str) -> bool:
    return name in _PRESETS


def resolve(name: str, overrides: dict | None = None) -> tuple[str, dict]:
    """``name`` (a preset or a registered method) plus option overrides -> (method, options).

    A preset's options come first and ``overrides`` replace them (the precedence of
    ``vtprune.patch`` and of the lmms-eval model); a method name passes through. The options are
    validated when the method's config is built from them (``vtprune.patch``, ``build_methods``).
    """
    overrides = dict(overrides or {})
    if is_preset(name):
        preset = get_preset(name)
        return preset.method, {**preset.options, **overrides}
    get_method(name)  # an unknown name: the error suggests the closest method
    return name, overrides


def _builtin() -> None:
    fastervlm = "FasterVLM, arXiv 2412.01818, Table 1 (LLaVA-1.5, 576 visual tokens)"
    for budget in FASTERVLM_BUDGETS:
        register_preset(Preset(f"fastervlm-{budget}", "fastervlm", {"keep_tokens": budget}, paper=fastervlm))
    # In-LLM methods: available once `fastv` / `pdrop` are registered by vtprune.methods.
    register_preset(
        Preset(
            "fastv-k2-r50",
            "fastv",
            {"k": 2, "ratio": 0.5},
            paper="FastV, arXiv 2403.06764 (K=2, R=50%)",
            note="prune after layer K=2, dropping R=50% of the visual tokens",
        )
    )
    register_preset(
        Preset(
            "pdrop-llava15",
            "pdrop",
            {"layers": [8, 16, 24], "lam": 0.5},
            paper="PyramidDrop, arXiv 2410.17247 (LLaVA-1.5: layers 8/16/24, lambda=0.5)",
        )
    )
    # Score-free baselines at FasterVLM's 58-token budget: the floor a scored method must beat.
    for method in ("random", "uniform"):
        register_preset(Preset(f"{method}-58", method, {"keep_tokens": 58}, paper="baseline at 58 of 576 tokens"))


_builtin()


def _merging() -> None:
    visionzip = "VisionZip, arXiv 2412.04467, Table 1 (LLaVA-1.5: dominant + contextual tokens per image)"
    for dominant, contextual in ((54, 10), (108, 20), (162, 30)):
        options = {"dominant": dominant, "contextual": contextual}
        register_preset(Preset(f"visionzip-{dominant + contextual}", "visionzip", options, paper=visionzip))
    next_paper = "VisionZip, arXiv 2412.04467, Table 9 (LLaVA-NeXT: totals over 5 sub-images, budgets per sub-image)"
    for total, (dominant, contextual) in ((160, (27, 5)), (320, (54, 10)), (640, (108, 20))):
        options = {"dominant": dominant, "contextual": contextual}
        note = f"{dominant} + {contextual} per sub-image"
        register_preset(Preset(f"visionzip-next-{total}", "visionzip", options, paper=next_paper, note=note))
    for percent, ratio in ((70, 0.7), (50, 0.5)):
        register_preset(
            Preset(
                f"visionzip-qwen-{percent}",
                "visionzip",
                {"keep_ratio": ratio, "variant": "qwen2_5_vl", "positions": "original"},
                paper="VisionZip, Qwen2_5_VL/README.md (Qwen2.5-VL: 70% = 65% + 5% contextual; 50% = 45% + 5%)",
                note="the [CLS]-free variant: contextual tokens at their targets, original M-RoPE positions",
            )
        )
    register_preset(
        Preset(
            "prumerge_plus-adaptive",
            "prumerge_plus",
            {},
            paper="PruMerge+, arXiv 2403.15388 (official forward: adaptive IQR count, about 144 of 576 tokens)",
        )
    )
    for tokens, side in ((144, 12), (64, 8)):
        register_preset(
            Preset(
                f"pool-{tokens}",
                "pool",
                {"keep_tokens": tokens},
                paper="pooling baseline (UniPruneBench Pool_PreLLM; VTC-Bench downsample), LLaVA-1.5 24 x 24 grid",
                note=f"average pooling of the 24 x 24 patch grid to {side} x {side}",
            )
        )


_merging()


def _diversity() -> None:
    divprune = "DivPrune, arXiv 2503.02175 (official SUBSET_RATIO=0.098: 56 of LLaVA-1.5's 576 tokens)"
    register_preset(Preset("divprune-56", "divprune", {"keep_ratio": 0.098}, paper=divprune))
    for tokens in (128, 64):
        register_preset(
            Preset(
                f"divprune-{tokens}",
                "divprune",
                {"keep_tokens": tokens},
                paper="DivPrune at the token budgets CDPruner's and VisPruner's tables compare it at (LLaVA-1.5)",
            )
        )
    vispruner = "VisPruner, arXiv 2412.01818 v2 (official README: 128 = 64 + 64, 64 = 48 + 16)"
    for tokens, ratio in ((128, 0.5), (64, 0.75)):
        options = {"keep_tokens": tokens, "important_ratio": ratio}
        register_preset(Preset(f"vispruner-{tokens}", "vispruner", options, paper=vispruner))
    cdpruner = "CDPruner, arXiv 2506.10967 (visual_token_num 128 / 64 / 32 on LLaVA-1.5)"
    for tokens in (128, 64, 32):
        register_preset(
            Preset(
                f"cdpruner-{tokens}",
                "cdpruner",
                {"keep_tokens": tokens, "clip": "openai/clip-vit-large-patch14-336"},
                paper=cdpruner,
                note="the CLIP checkpoint of LLaVA-1.5's tower (its text tower scores the instruction); give query=",
            )
        )
    register_preset(
        Preset(
            "globalcom2-25",
            "globalcom2",
            {"keep_ratio": 0.25},
            paper="GlobalCom2, arXiv 2501.05179 (official retention_ratio=0.25, temperature 10; LLaVA-NeXT)",
        )
    )
    register_preset(
        Preset(
            "hired-20",
            "hired",
            {"budget_ratio": 0.2, "alpha": 0.5},
            paper="HiRED, arXiv 2408.10945 (official accuracy_benchmarks: token_budget_rate=0.2, alpha=0.5)",
        )
    )


_diversity()
