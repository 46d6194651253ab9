"""The offline lmms-eval task `vtprune_shapesvqa` (the ShapesVQA held-out test split) with the reference model.

lmms-eval end to end (`--model vtprune`, base llava_hf, the committed reference checkpoint),
pruned and unpruned, must score exactly what the in-process evaluator (`reference_eval`, batched
generation from the processor's chat prompt) scores on the same records, answer by answer.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from eval_helpers import offline_env

import vtprune
from vtprune.evals.reference import shapes_vqa
from vtprune.evals.reference.evaluate import (
    REFERENCE_DIR,
    evaluate,
    generate_answers,
    load_reference_model,
    normalize_answer,
)
from vtprune.evals.tasks.make_task import BUILTIN_TASKS, make_builtin_task

TASK = "vtprune_shapesvqa"
NUM = 28  # records 0..27 of the test split: 4 of each question kind


@pytest.fixture(scope="module")
def records():
    return shapes_vqa.make_split("test", NUM)


@pytest.fixture(scope="module")
def reference():
    return load_reference_model()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return make_builtin_task(TASK, tmp_path_factory.mktemp("tasks"), n=NUM).parent


def test_task_holds_the_test_split_and_prompts_with_the_bare_question(task_dir, records):
    import datasets

    assert BUILTIN_TASKS[TASK].default_num == 1400  # the split the reference accuracy is reported on
    text = (task_dir / f"{TASK}.yaml").read_text()
    assert "doc_to_text: !function vtprune.evals.tasks.offline.doc_to_question" in text
    table = datasets.Dataset.from_parquet(str(task_dir / f"{TASK}.parquet"))
    assert table["id"] == [f"test-{i}" for i in range(NUM)]
    assert table["question"] == [r["question"] for r in records]
    assert table["answer"] == [r["answer"] for r in records]
    assert table["kind"] == [shapes_vqa.KINDS[i % 7] for i in range(NUM)]
    assert all(a.convert("RGB").tobytes() == r["image"].tobytes() for a, r in zip(table["image"], records))


CONFIGS = {  # name: (model_args, method, options, visual tokens kept per sample)
    "fastervlm-0.25": ("method=fastervlm,keep_ratio=0.25", "fastervlm", {"keep_ratio": 0.25}, 36),
    "unpruned": ("method=none", None, {}, 144),
}


@pytest.fixture(scope="module")
def lmms_eval_runs(tmp_path_factory, task_dir):
    """``python -m lmms_eval --model vtprune`` once per configuration, both started at once.

    Each run spends ~20 s in lmms-eval's start-up (imports, indexing its task yamls) and little
    on the 28 samples; running them side by side keeps the test near half a minute.
    """
    root = tmp_path_factory.mktemp("lmms_eval")
    runs = {}
    for name, (model_args, *_) in CONFIGS.items():
        folder = root / name
        folder.mkdir()
        args = f"base=llava_hf,pretrained={REFERENCE_DIR},device=cpu,{model_args},stats_path={folder / 'stats.json'}"
        command = [sys.executable, "-m", "lmms_eval", "--model", "vtprune", "--model_args", args, "--tasks", TASK]
        command += ["--include_path", str(task_dir), "--output_path", str(folder / "out"), "--log_samples"]
        env = {**offline_env(folder), "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(
            command, env=env, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        runs[name] = (folder, process)
    done = {}
    for name, (folder, process) in runs.items():
        output, _ = process.communicate(timeout=300)
        done[name] = (folder, process.returncode, output)
    return done


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lmms_eval_scores_what_the_reference_evaluator_scores(name, lmms_eval_runs, records, reference):
    _, method, options, kept = CONFIGS[name]
    folder, returncode, output = lmms_eval_runs[name]
    assert returncode == 0, output[-4000:]

    model, processor = reference
    expected = evaluate(model, processor, records, method, **options)
    if method is None:
        answers = generate_answers(model, processor, records)["answers"]
    else:
        with vtprune.patched(model, method, **options) as handle:
            answers = generate_answers(model, processor, records, handle=handle)["answers"]

    (results_file,) = (folder / "out").rglob("*_results.json")
    accuracy = json.loads(results_file.read_text())["results"][TASK]["exact_match,none"]
    assert accuracy == pytest.approx(expected["accuracy"])
    (samples_file,) = (folder / "out").rglob(f"*_samples_{TASK}.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [normalize_answer(s["filtered_resps"]) for s in samples] == answers
    payload = json.loads((folder / "stats.json").read_text())
    assert [s["visual_tokens_kept"] for s in payload["samples"]] == [kept] * NUM
    if method is None:
        assert accuracy >= 0.9  # the reference model sees
    else:
        assert accuracy <= 0.85  # and compact-position pruning costs it (location questions)
