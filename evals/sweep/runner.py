"""``vtprune eval``: methods x keep ratios x tasks through lmms-eval, the model loaded once.

For each configuration the loaded model is patched (``vtprune.patch``), evaluated with
lmms-eval's ``simple_evaluate`` on every task, and unpatched. Per configuration and task it
records lmms-eval's metric, visual tokens kept, LLM prefill FLOPs, time to first token,
decode tokens/s and peak memory, then writes results.json / .csv / .md, two plots and images
of the kept patches of a few samples (:mod:`vtprune.evals.sweep.report`).

Resumable: each finished configuration is written to ``OUT/runs/<id>.json`` at once
(atomically); a restarted sweep skips those and evaluates the rest. The id hashes the
configuration, the tasks, ``limit`` and the model arguments, so changing any of them
evaluates afresh instead of mixing results.

Several GPUs: run under ``accelerate launch --num_processes N -m vtprune.cli eval ...``;
lmms-eval shards the samples over the processes, the per-sample statistics are gathered to
rank 0, which alone writes files (the output folder must be shared by all ranks).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from vtprune.config import parse_spec
from vtprune.evals.lmms.measure import peak_memory, reset_peak_memory
from vtprune.evals.lmms.stats import summarize
from vtprune.presets import get_preset, is_preset
from vtprune.registry import get_method


class SweepError(ValueError):
    """A sweep that cannot run as asked (found before anything is evaluated); the message names the fix."""


class ConfigError(SweepError):
    """A configuration that cannot be applied to the loaded model (found before evaluating any)."""


@dataclass
class SweepConfig:
    """One configuration: ``method`` with ``options`` (method None: the unpruned model)."""

    label: str  # as shown in tables, e.g. "fastervlm keep_ratio=0.25" or "fastervlm-58"
    group: str  # one line per group in the plots: the method name, "none" for the baseline
    method: str | None
    options: dict = field(default_factory=dict)


def plan(
    methods=(), ratios=(), presets=(), specs=(), baseline: bool = True, ratio_option: str = "keep_ratio"
) -> list[SweepConfig]:
    """The configurations of a sweep, validated now (an unknown method or option fails here)."""
    if ratios and not methods:
        raise ValueError("--ratios needs --methods to apply them to, e.g. --methods fastervlm --ratios 0.5 0.25")
    configs = [SweepConfig("none", "none", None)] if baseline else []
    for method in methods:
        options = get_method(method).options()
        if not ratios:
            raise ValueError(
                f"--methods {' '.join(methods)} needs --ratios to sweep (keep ratios, e.g. --ratios 0.5 0.25); "
                "for other settings give --configs (e.g. 'fastv:k=2,ratio=0.5') or --presets"
            )
        if ratio_option not in options:
            raise ValueError(
                f"method {method!r} has no {ratio_option} option (options: {', '.join(options)}); "
                f"sweep it with --configs, e.g. --configs '{method}:{next(iter(options))}=...'"
            )
        for ratio in ratios:
            configs.append(SweepConfig(f"{method} {ratio_option}={ratio:g}", method, method, {ratio_option: ratio}))
    for name in presets:
        preset = get_preset(name)
        configs.append(SweepConfig(name, preset.method, preset.method, dict(preset.options)))
    for spec in specs:
        configs.append(_config_from_spec(spec))
    for config in configs:
        if config.method is not None:
            get_method(config.method).config_class(**config.options)  # validates the options now
    labels = [c.label for c in configs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"configurations listed twice: {duplicates}")
    if not configs:
        raise ValueError("nothing to evaluate: give --methods with --ratios, --presets or --configs")
    return configs


def _config_from_spec(spec: str) -> SweepConfig:
    stages = parse_spec(spec)
    if len(stages) != 1:
        raise ValueError(f"a sweep configuration is one method; got the multi-stage spec {spec!r}")
    name, options = stages[0]
    if is_preset(name):
        preset = get_preset(name)
        return SweepConfig(spec, preset.method, preset.method, {**preset.options, **options})
    get_method(name)
    return SweepConfig(spec, name, name, options)


def config_id(config: SweepConfig, settings: dict) -> str:
    """A file-name-safe id: readable slug + hash of the configuration and the sweep settings."""
    payload = json.dumps({"config": asdict(config), "settings": settings}, sort_keys=True, default=str)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", config.label).strip("_")[:60]
    return f"{slug}-{digest}"


# -- running ----------------------------------------------------------------------------------
def _write_json(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)  # atomic: an interrupted write leaves no half file behind


def _task_manager(tasks: list[str], include_path):
    """lmms-eval's TaskManager; the ~2000 built-in tasks are indexed only when a task needs them."""
    from lmms_eval.tasks import TaskManager

    if include_path:
        manager = TaskManager("WARNING", include_path=include_path, include_defaults=False)
        if all(task in manager.all_tasks for task in tasks):
            return manager
    manager = TaskManager("WARNING", include_path=include_path)
    missing = [task for task in tasks if task not in manager.all_tasks]
    if missing:
        hints = []
        for task in missing:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            hints.append(f"{task!r} (did you mean {', '.join(close)}?)" if close else repr(task))
        raise SweepError(
            f"lmms-eval does not know task(s) {', '.join(hints)}; check --tasks and --include-path "
            "(`python -m lmms_eval tasks list` lists the installed tasks)"
        )
    return manager


def _primary_metric(task_results: dict) -> tuple[str | None, float | None, dict]:
    """(name, value, all metrics) of one task's lmms-eval results: the first numeric metric."""
    metrics = {
        key: value
        for key, value in task_results.items()
        if key != "alias" and "stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    if not metrics:
        return None, None, {}
    name = next(iter(metrics))
    return name, float(metrics[name]), metrics


def _gather(value):
    """Every rank's ``value`` on every rank (a list of one without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _is_main() -> bool:
    """Rank 0 (before the process group exists, from the launcher's RANK variable)."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _evaluate(lm, tasks, manager, limit):
    """One lmms-eval run of the (already patched) model; rank 0 gets the results."""
    from lmms_eval import evaluator

    return evaluator.simple_evaluate(
        model=lm, tasks=list(tasks), limit=limit, task_manager=manager, log_samples=False, verbosity="WARNING"
    )


def evaluate_config(lm, config: SweepConfig, tasks, manager, limit) -> dict:
    """Patch, evaluate every task, unpatch; returns the run record (tasks, samples, examples)."""
    lm.configure(config.method, config.options)
    windowed = reset_peak_memory(lm.device)
    start = time.perf_counter()
    try:
        results = _evaluate(lm, tasks, manager, limit)
    finally:
        wall = time.perf_counter() - start
        memory = peak_memory(lm.device, windowed)
        records, examples = list(lm.records), list(lm.examples)
        lm.configure(None)
    all_records = [r for part in _gather(records) for r in part]
    all_examples = [e for part in _gather(examples) for e in part]
    peak_bytes = max(m[0] for m in _gather(memory))
    task_rows = {}
    for task in tasks:
        name, value, metrics = _primary_metric(((results or {}).get("results") or {}).get(task, {}))
        task_rows[task] = {"metric": name, "accuracy": value, "metrics": metrics}
    return {
        "config": asdict(config),
        "tasks": task_rows,
        "samples": all_records,
        "examples": all_examples,
        "peak_memory_bytes": peak_bytes,
        "memory_kind": memory[1],
        "wall_s": wall,
    }


def _save_examples(run: dict, examples_dir: Path) -> None:
    """Write each example's model-view image once; keep only its file name in the run record."""
    from PIL import Image

    examples_dir.mkdir(parents=True, exist_ok=True)
    for example in run["examples"]:
        name = f"{example['task']}_doc{example['doc_id']}_input.png"
        image = example.pop("image", None)
        if image is not None and not (examples_dir / name).exists():
            Image.fromarray(image).save(examples_dir / name)
        example["image_file"] = name


def run_sweep(
    model_args: dict,
    configs: list[SweepConfig],
    tasks: list[str],
    out_dir,
    include_path=None,
    limit=None,
    examples: int = 2,
    warmup: bool = True,
) -> dict:
    """Evaluate every configuration not already in ``out_dir/runs``; write the report.

    ``model_args``: the ``vtprune`` lmms-eval model's keys for the base model (``base``,
    ``pretrained``, ``device``...), without ``method``/``preset``. Returns the report's paths.
    """
    from vtprune.evals.sweep.report import write_report

    for key in ("method", "preset"):
        if key in model_args:
            raise ValueError(f"model args must not set {key!r}: the sweep chooses the method per configuration")
    out_dir = Path(out_dir)
    runs_dir = out_dir / "runs"
    settings = {"model_args": model_args, "tasks": list(tasks), "limit": limit}
    ids = [config_id(c, settings) for c in configs]
    pending = [(c, i) for c, i in zip(configs, ids) if not (runs_dir / f"{i}.json").exists()]
    if _is_main():
        runs_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / "sweep.json", {"settings": settings, "configs": [asdict(c) for c in configs]})
    if pending:
        _run_pending(model_args, pending, tasks, out_dir, include_path, limit, examples, warmup)
    if not _is_main():
        return {}
    runs = [json.loads((runs_dir / f"{i}.json").read_text()) for i in ids]
    return write_report(runs, out_dir)


def _run_pending(model_args, pending, tasks, out_dir, include_path, limit, examples, warmup) -> None:
    from vtprune.evals.lmms.plugin import VTPruneLMM

    manager = _task_manager(list(tasks), include_path)
    lm = VTPruneLMM(**model_args, method="none", examples=examples)
    try:
        check_configs(lm, [config for config, _ in pending])
        if warmup:  # first-call costs (allocations, kernel selection) stay out of the first timing
            _evaluate(lm, tasks[:1], manager, 1)
        bar = tqdm(pending, desc="vtprune eval", unit="config", disable=not _is_main())
        for config, run_id in bar:
            bar.set_postfix_str(config.label)
            run = evaluate_config(lm, config, tasks, manager, limit)
            if _is_main():
                _save_examples(run, out_dir / "examples")
                _write_json(out_dir / "runs" / f"{run_id}.json", run)
            _barrier()
    finally:
        lm.close()


def check_configs(lm, configs: list[SweepConfig]) -> None:
    """Patch and unpatch each configuration once: patch-time errors surface before any evaluation."""
    for config in configs:
        try:
            lm.configure(config.method, config.options)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"configuration {config.label!r} does not fit this model: {error}") from error
        finally:
            lm.configure(None)


def task_rows(run: dict) -> list[dict]:
    """One row per task of a finished run: metric, tokens, FLOPs, timings, memory."""
    config = run["config"]
    rows = []
    for task, result in run["tasks"].items():
        summary = summarize([r for r in run["samples"] if r["task"] == task])
        rows.append(
            {
                "config": config["label"],
                "method": config["group"],
                "options": json.dumps(config["options"], sort_keys=True),
                "task": task,
                "metric": result["metric"],
                "accuracy": result["accuracy"],
                "samples": summary["samples"],
                "visual_tokens_in": summary["visual_tokens_in"],
                "visual_tokens_kept": summary["visual_tokens_kept"],
                "llm_prompt_tokens": summary["llm_prompt_tokens"],
                "prefill_gflops": _scaled(summary["flops_after"], 1e-9),
                "prefill_gflops_unpruned": _scaled(summary["flops_before"], 1e-9),
                "ttft_ms": _scaled(summary["ttft_s"], 1e3),
                "ttft_ms_median": _scaled(summary["ttft_s_median"], 1e3),
                "decode_tokens_per_s": summary["decode_tokens_per_s"],
                "peak_memory_mb": run["peak_memory_bytes"] / 2**20,
                "memory_kind": run["memory_kind"],
                "wall_s": run["wall_s"],
            }
        )
    return rows


def _scaled(value, factor):
    return None if value is None else value * factor
