"""Evaluation around the library, installed as ``vtprune.evals``, one folder per role.

``lmms/``: the ``vtprune`` lmms-eval model and its per-sample measurements; ``tasks/``: offline
lmms-eval tasks; ``sweep/``: ``vtprune eval`` and the one table, plot and kept-patch renderer of
every sweep; ``bench/``: the prefill benchmarks (``make bench``); ``reference/``: ShapesVQA, the
reference model's training, checkpoint and fast evaluation; ``models/``: models built from
configs (random weights) for the tests, the demo and the benchmarks. ``demo`` is ``make demo``.
"""
