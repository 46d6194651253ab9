"""Built-in methods; importing this package registers them."""

from vtprune.methods import baselines, fastervlm  # noqa: F401
from vtprune.methods.base import BudgetConfig, Method, MethodConfig, VisualLayout

__all__ = ["BudgetConfig", "Method", "MethodConfig", "VisualLayout"]
