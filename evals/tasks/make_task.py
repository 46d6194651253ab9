"""Write a built-in offline task to a folder: ``python -m vtprune.evals.tasks.make_task --out DIR``.

Then: ``python -m lmms_eval --model vtprune ... --include_path DIR --tasks vtprune_shapes``.

Built-in tasks:

- ``vtprune_shapes``: two coloured shapes, "What colour is the square?" (32 records by
  default, drawn from ``--seed``); the question is followed by "Answer with one word.".
- ``vtprune_shapesvqa``: the held-out test split of ShapesVQA (``vtprune.evals.reference.shapes_vqa``),
  records 0..n-1 (1400 by default, the split the reference model's accuracy is reported on),
  prompted with the bare question as the reference model was trained. The split is fixed, so
  ``--seed`` does not apply.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vtprune.evals.tasks import shapes
from vtprune.evals.tasks.offline import write_task


def _shapesvqa_test(n: int, seed: int = 0) -> list[dict]:
    from vtprune.evals.reference import shapes_vqa

    return shapes_vqa.make_split("test", n)


@dataclass(frozen=True)
class BuiltinTask:
    records: Callable[..., list[dict]]  # (n=, seed=) -> records
    default_num: int
    instruction: bool = True  # append "Answer with one word." to the question


BUILTIN_TASKS = {
    "vtprune_shapes": BuiltinTask(shapes.records, 32),
    "vtprune_shapesvqa": BuiltinTask(_shapesvqa_test, 1400, instruction=False),
}


def make_builtin_task(name: str, out_dir, n: int | None = None, seed: int = 0) -> Path:
    """Generate built-in task ``name`` into ``out_dir`` (``n`` records, default: the task's own); returns the yaml."""
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    task = BUILTIN_TASKS[name]
    records = task.records(n=task.default_num if n is None else n, seed=seed)
    return write_task(records, out_dir, task_name=name, instruction=task.instruction)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vtprune.evals.tasks.make_task",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder to write <task>.yaml and <task>.parquet into")
    parser.add_argument("--task", default="vtprune_shapes", choices=sorted(BUILTIN_TASKS))
    parser.add_argument(
        "-n", "--num", type=int, default=None, help="records (default: 32 vtprune_shapes, 1400 vtprune_shapesvqa)"
    )
    parser.add_argument("--seed", type=int, default=0, help="vtprune_shapes only")
    args = parser.parse_args(argv)
    path = make_builtin_task(args.task, args.out, n=args.num, seed=args.seed)
    print(f"wrote {path} and {path.with_suffix('.parquet').name}; use --include_path {path.parent} --tasks {args.task}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
