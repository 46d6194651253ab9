"""Placeholder until the OneVision adapter lands (issue 7)."""
