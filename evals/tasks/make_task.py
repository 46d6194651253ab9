"""Write the built-in offline task to a folder: ``python -m vtprune.evals.tasks.make_task --out DIR``.

Then: ``python -m lmms_eval --model vtprune ... --include_path DIR --tasks vtprune_shapes``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vtprune.evals.tasks import shapes
from vtprune.evals.tasks.offline import write_task

BUILTIN_TASKS = {"vtprune_shapes": shapes.records}


def make_builtin_task(name: str, out_dir, n: int = 32, seed: int = 0) -> Path:
    """Generate built-in task ``name`` into ``out_dir``; returns the yaml path."""
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    return write_task(BUILTIN_TASKS[name](n=n, seed=seed), out_dir, task_name=name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtprune.evals.tasks.make_task", description=__doc__)
    parser.add_argument("--out", required=True, help="folder to write <task>.yaml and <task>.parquet into")
    parser.add_argument("--task", default="vtprune_shapes", choices=sorted(BUILTIN_TASKS))
    parser.add_argument("-n", "--num", type=int, default=32, help="number of records (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_builtin_task(args.task, args.out, n=args.num, seed=args.seed)
    print(f"wrote {path} and {path.with_suffix('.parquet').name}; use --include_path {path.parent} --tasks {args.task}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
