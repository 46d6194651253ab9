"""lmms-eval glue: the ``vtprune`` lmms-eval model (``plugin``), its per-sample records and summaries
(``stats``) and the timings and peak memory measured around ``generate`` (``measure``)."""
