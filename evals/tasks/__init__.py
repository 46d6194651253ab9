"""Offline lmms-eval tasks: a parquet of {image, question, answer} records plus a task yaml.

``offline.write_task(records, out_dir)`` writes any list of records as an lmms-eval task;
``shapes.records()`` is the built-in procedurally drawn set (coloured shapes, "what colour is
the square?"). ``python -m vtprune.evals.tasks.make_task --out DIR`` writes it to disk.
"""
