"""Built-in methods; importing this package registers them."""

from vtprune.methods import baselines, fastervlm, fastv, fopru, globalcom2, hired, pdrop, quota, visionzip  # noqa: F401
from vtprune.methods.base import BudgetConfig, CutPoint, InLLMMethod, Method, MethodConfig, VisualLayout

__all__ = ["BudgetConfig", "CutPoint", "InLLMMethod", "Method", "MethodConfig", "VisualLayout"]
