"""Built-in methods; importing this package registers them."""

from vtprune.methods import (  # noqa: F401
    baselines,
    cdpruner,
    divprune,
    fastervlm,
    fastv,
    fopru,
    globalcom2,
    hired,
    pdrop,
    pool,
    prumerge_plus,
    quota,
    visionzip,
    vispruner,
)
from vtprune.methods.base import BudgetConfig, CutPoint, InLLMMethod, Method, MethodConfig, VisualLayout

__all__ = ["BudgetConfig", "CutPoint", "InLLMMethod", "Method", "MethodConfig", "VisualLayout"]
