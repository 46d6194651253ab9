"""Sweeps of methods x keep ratios and their outputs.

``runner``: ``vtprune eval`` (configurations through lmms-eval, resumable); ``report``: the tables
and files of a sweep; ``plots``: accuracy (or time) against the visual tokens kept;
``kept_patches``: the pictures of which patches a method kept. The reference-model sweep
(:mod:`vtprune.evals.reference.evaluate`, ``make demo``) writes its table, plot and pictures with
the same modules.
"""
