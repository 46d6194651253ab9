"""`vtprune eval`: a sweep of methods x ratios writes its report, and resumes after an interruption."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from eval_helpers import TOKENS_PER_IMAGE, save_tiny_llava
from PIL import Image

from vtprune.cli import main as vtprune_main
from vtprune.evals.sweep import kept_patches, plots
from vtprune.evals.sweep import runner as sweep
from vtprune.evals.tasks import shapes
from vtprune.evals.tasks.make_task import make_builtin_task

LIMIT = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved always-"red" tiny LLaVA, the offline task, and an offline datasets cache."""
    root = tmp_path_factory.mktemp("sweep")
    model_dir = save_tiny_llava(root / "model", shapes.corpus(), answer="red")
    task_dir = make_builtin_task("vtprune_shapes", root / "tasks", n=LIMIT).parent
    expected = sum(r["answer"] == "red" for r in shapes.records(LIMIT)) / LIMIT
    model_args = {"base": "llava_hf", "pretrained": str(model_dir), "device": "cpu"}
    return {"root": root, "model_args": model_args, "include": str(task_dir), "accuracy": expected}


@pytest.fixture(autouse=True)
def _offline_datasets_cache(setup, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(setup["root"] / "hf_datasets"))


def _sweep(setup, out, configs, examples=0):
    return sweep.run_sweep(
        setup["model_args"],
        configs,
        ["vtprune_shapes"],
        out,
        include_path=setup["include"],
        limit=LIMIT,
        examples=examples,
        warmup=False,
    )


def test_plan_validates_methods_and_options():
    configs = sweep.plan(
        ["fastervlm", "random"], [0.5, 0.25], presets=["fastervlm-58"], specs=["uniform:keep_tokens=3"]
    )
    assert [c.label for c in configs] == [
        "none",
        "fastervlm keep_ratio=0.5",
        "fastervlm keep_ratio=0.25",
        "random keep_ratio=0.5",
        "random keep_ratio=0.25",
        "fastervlm-58",
        "uniform:keep_tokens=3",
    ]
    assert configs[5].options == {"keep_tokens": 58}
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        sweep.plan(["fastervlm"], [1.5])
    with pytest.raises(ValueError, match="unknown method"):
        sweep.plan(["fastervlmm"], [0.5])
    with pytest.raises(ValueError, match="listed twice"):
        sweep.plan([], [], presets=["fastervlm-58", "fastervlm-58"])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        sweep.plan([], [], baseline=False)


def test_two_methods_two_ratios_write_table_csv_json_and_plots(setup):
    out = setup["root"] / "out"
    configs = sweep.plan(["fastervlm", "uniform"], [0.5, 0.25])
    paths = _sweep(setup, out, configs, examples=1)

    kept = {"none": TOKENS_PER_IMAGE, "0.5": TOKENS_PER_IMAGE // 2, "0.25": TOKENS_PER_IMAGE // 4}
    with open(paths["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["config"] for r in rows] == [c.label for c in configs]
    for row in rows:
        ratio = row["config"].split("=")[-1] if "=" in row["config"] else "none"
        assert float(row["visual_tokens_kept"]) == kept[ratio]
        assert float(row["visual_tokens_in"]) == TOKENS_PER_IMAGE
        assert float(row["accuracy"]) == pytest.approx(setup["accuracy"])  # lmms-eval's exact_match
        assert row["metric"] == "exact_match,none" and int(row["samples"]) == LIMIT
        assert float(row["ttft_ms"]) > 0 and float(row["peak_memory_mb"]) > 0
    by_config = {r["config"]: r for r in rows}
    assert (
        float(by_config["fastervlm keep_ratio=0.25"]["prefill_gflops"])
        < float(by_config["fastervlm keep_ratio=0.5"]["prefill_gflops"])
        < float(by_config["none"]["prefill_gflops"])
    )

    payload = json.loads(paths["json"].read_text())
    assert [r["config"] for r in payload["rows"]] == [r["config"] for r in rows]
    table = paths["markdown"].read_text().splitlines()
    assert len(table) == 2 + len(configs)
    assert all(any(line.startswith(f"| {c.label} |") for line in table) for c in configs)

    for name in ("accuracy_vs_tokens", "prefill_vs_tokens"):
        with Image.open(paths[name]) as image:
            assert image.format == "PNG" and image.width > 200
    lines = plots.series(payload["rows"], "ttft_ms")["vtprune_shapes"]
    assert sorted(lines) == ["fastervlm", "none", "uniform"]  # one line per method
    assert [x for x, _ in lines["fastervlm"]] == [4.0, 8.0]

    # kept patches of the first sample, one panel per pruned configuration
    (image_path,) = paths["kept_patches"]
    assert image_path.name == "vtprune_shapes_doc0.png"
    run = json.loads(next((out / "runs").glob("uniform_keep_ratio=0.25-*.json")).read_text())
    (example,) = run["examples"]
    assert example["doc_id"] == 0 and len(example["stages"][-1]["kept"]) == TOKENS_PER_IMAGE // 4


def test_an_interrupted_sweep_resumes_where_it_stopped(setup, monkeypatch):
    out = setup["root"] / "resume"
    configs = sweep.plan(["random"], [0.5, 0.25], baseline=False)
    evaluated = []
    real_evaluate = sweep.evaluate_config

    def interrupt_second(lm, config, *args):
        if len(evaluated) == 1:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the second configuration
        evaluated.append(config.label)
        return real_evaluate(lm, config, *args)

    monkeypatch.setattr(sweep, "evaluate_config", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        _sweep(setup, out, configs)
    (first_run,) = (out / "runs").glob("*.json")
    first_bytes = first_run.read_bytes()
    assert evaluated == ["random keep_ratio=0.5"]
    assert not (out / "results.csv").exists()

    def count(lm, config, *args):
        evaluated.append(config.label)
        return real_evaluate(lm, config, *args)

    monkeypatch.setattr(sweep, "evaluate_config", count)
    paths = _sweep(setup, out, configs)
    assert evaluated == ["random keep_ratio=0.5", "random keep_ratio=0.25"]  # the first was not redone
    assert first_run.read_bytes() == first_bytes
    rows = json.loads(paths["json"].read_text())["rows"]
    assert [(r["config"], r["visual_tokens_kept"]) for r in rows] == [
        ("random keep_ratio=0.5", 8.0),
        ("random keep_ratio=0.25", 4.0),
    ]

    evaluated.clear()  # a finished sweep only rewrites the report
    _sweep(setup, out, configs)
    assert evaluated == []


def test_cli_rejects_bad_sweep_flags(capsys):
    assert (
        vtprune_main(["eval", "--model-args", "pretrained=x", "--tasks", "t", "--out", "o", "--methods", "nope"]) == 2
    )
    assert "unknown method 'nope'" in capsys.readouterr().err
    code = vtprune_main(["eval", "--model-args", "pretrained=x,method=random", "--tasks", "t", "--out", "o"])
    assert code == 2
    assert "must not set method/preset" in capsys.readouterr().err


def _cli_argv(setup, out, model_args=None, tasks="vtprune_shapes"):
    model_args = model_args or ",".join(f"{k}={v}" for k, v in setup["model_args"].items())
    flags = {"--model-args": model_args, "--tasks": tasks, "--include-path": setup["include"], "--limit": str(LIMIT)}
    return ["eval", *(x for flag, value in flags.items() for x in (flag, value)), "--no-warmup", "--out", str(out)]


def test_cli_methods_without_ratios_is_an_error_not_an_unpruned_only_run(setup, capsys):
    out = setup["root"] / "no_ratios"
    assert vtprune_main(_cli_argv(setup, out) + ["--methods", "uniform"]) == 2
    assert "--methods uniform needs --ratios" in capsys.readouterr().err
    assert not (out / "runs").exists()  # nothing was evaluated (it used to run only the unpruned model, exit 0)
    assert vtprune_main(_cli_argv(setup, out) + ["--ratios", "0.5"]) == 2
    assert "--ratios needs --methods" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("task", 2, "lmms-eval does not know task(s) 'vtprune_shapez' (did you mean vtprune_shapes"),
        ("base", 1, "unknown base='llava_hff' (the lmms-eval model to wrap); did you mean llava_hf"),
        ("folder", 1, "is neither a folder nor a model id on the Hub (HF_HUB_OFFLINE is set"),
    ],
)
def test_cli_unknown_task_base_or_model_folder_is_one_line_naming_the_fix(setup, capsys, case, code, message):
    out = setup["root"] / f"unknown_{case}"
    model_args = {
        "task": None,
        "base": f"base=llava_hff,pretrained={setup['model_args']['pretrained']},device=cpu",
        "folder": f"base=llava_hf,pretrained={out / 'no_such_model'},device=cpu",
    }[case]
    tasks = "vtprune_shapez" if case == "task" else "vtprune_shapes"
    argv = _cli_argv(setup, out, model_args, tasks) + ["--methods", "uniform", "--ratios", "0.5"]
    assert vtprune_main(argv) == code
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    fix = {"task": "python -m lmms_eval tasks list", "base": "python -m lmms_eval models", "folder": "save_pretrained"}
    assert fix[case] in err
    assert len(err) < 600  # one message, not lmms-eval's list of its ~150 models


def test_kept_patch_overlay_darkens_exactly_the_dropped_patches():
    image = Image.new("RGB", (32, 32), (200, 200, 200))
    shaded = kept_patches.kept_patch_overlay(image, [0, 2, 6], grid=(4, 4), num_prefix=1)  # [CLS], patches 1, 5
    expected = np.zeros((4, 4), dtype=bool)
    expected[0, 1] = expected[1, 1] = True
    pixels = np.asarray(shaded)
    assert pixels.shape == (32, 32, 3)
    bright = (pixels == 200).all(axis=-1)
    assert (bright == np.kron(expected, np.ones((8, 8), dtype=bool))).all()
    assert (pixels[~bright] < 100).all()  # the dropped patches are darkened, not just tinted


def test_cli_generates_the_builtin_task_and_rejects_a_budget_the_model_lacks(setup, capsys):
    out = setup["root"] / "cli"
    model_args = ",".join(f"{k}={v}" for k, v in setup["model_args"].items())
    argv = ["eval", "--model-args", model_args, "--tasks", "vtprune_shapes", "--task-size", "3", "--out", str(out)]
    code = vtprune_main(argv + ["--methods", "uniform", "--ratios", "0.5", "--presets", "fastervlm-58"])
    assert code == 2
    assert "configuration 'fastervlm-58' does not fit this model: keep_tokens=58" in capsys.readouterr().err
    assert (out / "tasks" / "vtprune_shapes.yaml").exists()  # generated, no --include-path given
    assert list((out / "runs").glob("*.json")) == []  # checked before anything was evaluated
