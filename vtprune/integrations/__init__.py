"""Integrations with serving engines, each an optional extra; ``import vtprune`` imports none of them."""
