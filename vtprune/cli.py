"""The ``vtprune`` command.

    vtprune eval --model-args base=llava_hf,pretrained=PATH --methods fastervlm random \\
                 --ratios 0.25 0.1 --tasks vtprune_shapes --out sweep_out
    vtprune methods | vtprune presets           what can be swept
    vtprune make-task --out DIR                 write the built-in offline lmms-eval task
    vtprune bench ... | vtprune demo ...        vtprune.evals.bench.llava15 / vtprune.evals.demo
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from pathlib import Path

# subcommands that hand their arguments to another module's main(argv)
DELEGATED = {
    "bench": "vtprune.evals.bench.llava15",
    "demo": "vtprune.evals.demo",
    "make-task": "vtprune.evals.tasks.make_task",
}


def _eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="sweep methods x keep ratios x tasks through lmms-eval",
        description="Evaluate configurations with lmms-eval, the model loaded once; resumable.",
    )
    p.add_argument(
        "--model-args",
        required=True,
        help="the vtprune lmms-eval model's base keys, e.g. base=llava_hf,pretrained=PATH,device=cuda",
    )
    p.add_argument("--tasks", nargs="+", required=True, help="lmms-eval task names (also comma-separated)")
    p.add_argument("--methods", nargs="*", default=[], help="methods to sweep over --ratios (both needed)")
    p.add_argument("--ratios", nargs="*", type=float, default=[], help="keep ratios for --methods, e.g. 0.5 0.25 0.1")
    p.add_argument("--presets", nargs="*", default=[], help="preset names (see `vtprune presets`)")
    p.add_argument(
        "--configs", nargs="*", default=[], help="spec strings, e.g. 'fastv:k=2,ratio=0.5' 'pdrop:layers=8;16;24'"
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the unpruned model")
    p.add_argument("--include-path", default=None, help="folder of extra lmms-eval task yamls")
    p.add_argument("--limit", type=float, default=None, help="samples per task (lmms-eval --limit)")
    p.add_argument("--examples", type=int, default=2, help="samples per configuration to draw kept patches of")
    p.add_argument(
        "--task-size",
        type=int,
        default=None,
        help="records of a generated built-in task (default: 32 vtprune_shapes, 1400 vtprune_shapesvqa)",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the one-sample warm-up run")
    p.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")


def _split_tasks(values: list[str]) -> list[str]:
    return [task for value in values for task in value.split(",") if task]


def _defines_task(folder: str, task: str) -> bool:
    pattern = re.compile(rf"^task:\s*{re.escape(task)}\s*$", re.MULTILINE)
    return any(pattern.search(path.read_text(errors="ignore")) for path in Path(folder).rglob("*.yaml"))


def _builtin_task_paths(tasks: list[str], include_path: str | None, out: Path, size: int | None) -> list[str]:
    """Generate requested built-in offline tasks into OUT/tasks unless an include path has them."""
    from vtprune.evals.tasks.make_task import BUILTIN_TASKS, make_builtin_task

    paths = [include_path] if include_path else []
    for task in tasks:
        if task in BUILTIN_TASKS and not (include_path and _defines_task(include_path, task)):
            folder = out / "tasks"
            _ensure_task(task, folder, size, make_builtin_task)
            if str(folder) not in paths:
                paths.append(str(folder))
    return paths


def _ensure_task(task: str, folder: Path, size: int | None, make, timeout_s: float = 300) -> None:
    """Rank 0 writes the task (parquet first, yaml last); other ranks wait for its yaml."""
    yaml_path = folder / f"{task}.yaml"
    if yaml_path.exists():
        return
    if int(os.environ.get("RANK", "0")) == 0:
        make(task, folder, n=size)
        return
    deadline = time.monotonic() + timeout_s
    while not yaml_path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not write {yaml_path} within {timeout_s:.0f} s")
        time.sleep(0.5)


def _quiet_lmms_eval_logs() -> None:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def run_eval(args) -> int:
    from lmms_eval.utils import simple_parse_args_string

    from vtprune.evals.lmms.plugin import EvalAbort
    from vtprune.evals.sweep.runner import SweepError, plan, run_sweep

    try:  # bad flags: a one-line error, exit status 2
        configs = plan(args.methods, args.ratios, args.presets, args.configs, baseline=not args.no_baseline)
        model_args = simple_parse_args_string(args.model_args)
        if "method" in model_args or "preset" in model_args:
            raise ValueError("--model-args must not set method/preset: use --methods, --presets or --configs")
    except ValueError as error:
        print(f"vtprune eval: {error}", file=sys.stderr)
        return 2
    tasks = _split_tasks(args.tasks)
    out = Path(args.out)
    include = _builtin_task_paths(tasks, args.include_path, out, args.task_size)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    _quiet_lmms_eval_logs()
    try:
        paths = run_sweep(
            model_args,
            configs,
            tasks,
            out,
            include_path=include or None,
            limit=limit,
            examples=args.examples,
            warmup=not args.no_warmup,
        )
    except SweepError as error:  # a task or configuration the run cannot have: found before evaluating
        print(f"vtprune eval: {error}", file=sys.stderr)
        return 2
    except EvalAbort as error:  # the model could not be set up, or a sample failed: the message says which
        print(error, file=sys.stderr)
        return 1
    if paths:
        print(Path(paths["markdown"]).read_text())
        print(f"wrote {', '.join(str(p) for k, p in paths.items() if k != 'kept_patches')}")
    return 0


def list_methods(_args) -> int:
    import vtprune

    for name, info in vtprune.methods().items():
        options = ", ".join(f"{k}={v!r}" for k, v in info["options"].items())
        print(f"{name:<10} {info['stage']:<8} {options}\n{'':<10} {info['paper']}")
    return 0


def list_presets(args) -> int:
    from vtprune.presets import presets

    for name, preset in presets(include_unavailable=args.all).items():
        state = "" if preset.available else f"  (needs method {preset.method!r})"
        print(f"{name:<16} {preset.spec():<40} {preset.paper}{state}")
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    module_name = DELEGATED[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        print(f"vtprune {command}: {module_name} is not part of this installation", file=sys.stderr)
        return 2
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="vtprune", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _eval_parser(sub)
    sub.add_parser("methods", help="registered methods and their options").set_defaults(func=list_methods)
    presets = sub.add_parser("presets", help="named paper settings")
    presets.add_argument("--all", action="store_true", help="also presets whose method is not registered")
    presets.set_defaults(func=list_presets)
    for command, module in DELEGATED.items():
        sub.add_parser(command, help=f"run {module} (arguments passed through)", add_help=False)
    args = parser.parse_args(argv)
    if args.command == "eval":
        return run_eval(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
