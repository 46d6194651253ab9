"""vtprune: training-free visual-token pruning for vision-language models.

import vtprune
handle = vtprune.patch(model, "fastervlm", keep_ratio=0.1)
model.generate(**inputs)
handle.last.stages        # what was kept
handle.remove()           # the model is exactly as before

Every built-in method's config class is importable from here: ``from vtprune import FasterVLMConfig``.
"""

from vtprune import methods as _builtin_methods  # noqa: F401  (registers the built-in methods)
from vtprune import presets
from vtprune.api import get_handle, patch, patched, unpatch
from vtprune.config import build_methods, parse_spec
from vtprune.handle import PruneHandle, PruneRecord, Stage
from vtprune.methods.base import (
    BudgetConfig,
    CutPoint,
    InLLMMethod,
    Method,
    MethodConfig,
    UnknownOptionError,
    VisualLayout,
)
from vtprune.methods.baselines import RandomConfig, UniformConfig
from vtprune.methods.cdpruner import CDPrunerConfig, ClipRelevance
from vtprune.methods.divprune import DivPruneConfig
from vtprune.methods.fastervlm import FasterVLMConfig
from vtprune.methods.fastv import FastVConfig
from vtprune.methods.fopru import FoPruConfig
from vtprune.methods.globalcom2 import GlobalCom2Config
from vtprune.methods.hired import HiREDConfig
from vtprune.methods.pdrop import PDropConfig
from vtprune.methods.pool import PoolConfig
from vtprune.methods.prumerge_plus import PruMergePlusConfig
from vtprune.methods.quota import QuotaConfig
from vtprune.methods.visionzip import VisionZipConfig
from vtprune.methods.vispruner import VisPrunerConfig
from vtprune.registry import methods, register_method

__version__ = "0.1.0"

__all__ = [
    "BudgetConfig",
    "CDPrunerConfig",
    "ClipRelevance",
    "CutPoint",
    "DivPruneConfig",
    "FastVConfig",
    "FasterVLMConfig",
    "FoPruConfig",
    "GlobalCom2Config",
    "HiREDConfig",
    "InLLMMethod",
    "Method",
    "MethodConfig",
    "PDropConfig",
    "PoolConfig",
    "PruneHandle",
    "PruMergePlusConfig",
    "PruneRecord",
    "QuotaConfig",
    "RandomConfig",
    "Stage",
    "UniformConfig",
    "UnknownOptionError",
    "VisPrunerConfig",
    "VisionZipConfig",
    "VisualLayout",
    "build_methods",
    "get_handle",
    "methods",
    "parse_spec",
    "presets",
    "patch",
    "patched",
    "register_method",
    "unpatch",
]
