"""The committed reference model: standard checkpoint, recorded accuracy, pruning matters; the trainer runs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vtprune.evals.reference import shapes_vqa
from vtprune.evals.reference.evaluate import REFERENCE_DIR, TEST_SLICE, evaluate, load_reference_model
from vtprune.evals.reference.train import build_reference_model, parse_args, train


@pytest.fixture(scope="module")
def reference():
    return load_reference_model()


@pytest.fixture(scope="module")
def test_slice():
    return shapes_vqa.make_split("test", TEST_SLICE)


@pytest.fixture(scope="module")
def metrics():
    return json.loads((REFERENCE_DIR / "metrics.json").read_text())


def test_checkpoint_is_a_small_standard_llava_folder():
    files = {p.name: p.stat().st_size for p in REFERENCE_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(files)
    assert sum(files.values()) <= 30 * 2**20
    config = json.loads((REFERENCE_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["text_config"]["model_type"] == "llama"


def test_loads_with_the_auto_classes():
    model = LlavaForConditionalGeneration.from_pretrained(REFERENCE_DIR)
    processor = AutoProcessor.from_pretrained(REFERENCE_DIR)
    assert hasattr(model.model.vision_tower.embeddings, "class_embedding")  # a [CLS] token
    assert model.config.text_config._attn_implementation == "sdpa"
    record = shapes_vqa.make_record("test", 0)
    inputs = processor(images=[record["image"]], text=["USER: <image>\n" + record["question"] + " ASSISTANT:"])
    assert sum(i == model.config.image_token_id for i in inputs["input_ids"][0]) == 144


def test_reaches_its_recorded_accuracy_on_the_test_slice(reference, test_slice, metrics):
    model, processor = reference
    result = evaluate(model, processor, test_slice)
    assert result["accuracy"] >= 0.9
    assert abs(result["accuracy"] - metrics["test_slice"]["accuracy"]) <= 2 / TEST_SLICE
    assert metrics["test_accuracy"] >= 0.9 and metrics["test_samples"] >= 1400


def test_pruning_choices_matter_on_the_test_slice(reference, test_slice):
    model, processor = reference
    full = evaluate(model, processor, test_slice)
    pruned = evaluate(model, processor, test_slice, "random", keep_ratio=0.1)
    assert pruned["visual_tokens_kept"] == 14  # round(0.1 * 144)
    assert pruned["accuracy"] <= full["accuracy"] - 0.2


def test_training_script_runs_end_to_end_and_is_reproducible(tmp_path):
    threads = torch.get_num_threads()
    weights = []
    for run in ("a", "b"):
        settings = parse_args(["--tiny", "--threads", "1", "--out", str(tmp_path / run)])
        metrics = train(settings, log=lambda *_: None)
        assert set(metrics) >= {"train_seconds", "val_accuracy", "test_accuracy", "test_slice", "settings"}
        model = LlavaForConditionalGeneration.from_pretrained(tmp_path / run)
        processor = AutoProcessor.from_pretrained(tmp_path / run)
        result = evaluate(model, processor, shapes_vqa.make_split("test", 2))
        assert result["visual_tokens_kept"] == 144
        weights.append(model.state_dict())
    assert torch.get_num_threads() == threads  # the trainer restores the global torch state
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # both stages trained: the tower (stage 1) and the LLM (stage 2) moved away from the seeded initialisation
    torch.manual_seed(settings.seed)
    fresh = build_reference_model(settings.size, len(processor.tokenizer), settings.seed).state_dict()
    for prefix in ("model.vision_tower.", "model.language_model."):
        names = [k for k in fresh if k.startswith(prefix) and k in weights[0]]
        assert names and any(not torch.equal(fresh[k], weights[0][k]) for k in names)


def test_package_data_ships_every_checkpoint_file():
    # load_reference_model() reads REFERENCE_DIR inside the installed package: setup.cfg must list its files
    import configparser
    from fnmatch import fnmatch
    from pathlib import Path

    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    patterns = [p.strip() for p in setup["options.package_data"]["vtprune.evals.reference"].split(",")]
    package_dir = REFERENCE_DIR.parent
    files = [p.relative_to(package_dir).as_posix() for p in REFERENCE_DIR.iterdir()]
    assert "checkpoint/model.safetensors" in files
    assert all(any(fnmatch(f, pattern) for pattern in patterns) for f in files), (files, patterns)
