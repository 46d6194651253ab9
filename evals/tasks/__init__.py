"""Offline lmms-eval tasks: a parquet of {image, question, answer} records plus a task yaml.

``offline.write_task(records, out_dir)`` writes any list of records as an lmms-eval task. Built-in
tasks (``make_task.BUILTIN_TASKS``): ``vtprune_shapes`` (``shapes.records()``, coloured shapes,
"what colour is the square?") and ``vtprune_shapesvqa`` (the ShapesVQA held-out test split that
the reference model is scored on). ``python -m vtprune.evals.tasks.make_task --out DIR [--task
NAME]`` writes one to disk.
"""
