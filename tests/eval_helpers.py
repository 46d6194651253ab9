"""Tiny saved models and offline tasks for the lmms-eval and sweep tests (no downloads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from vtprune.evals.models.llava_original import build_llava_original, llava_original_config, save_clip_tower
from vtprune.evals.models.processors import build_processor, build_tokenizer
from vtprune.evals.models.transformers_vlms import text_config, tiny_llava

TOKENS_PER_IMAGE = 16  # tiny_llava: 32 px images, 8 px patches -> a 4 x 4 grid


def answer_always(model, tokenizer, word: str) -> None:
    """Turn the LLM into a bigram table: after ":" (the end of "ASSISTANT:") say ``word``, then EOS.

    Embeddings become one-hot rows (the hidden size must be at least the vocabulary) and every
    attention and MLP output projection is zeroed, so the last hidden state is the current
    token's own embedding; the LM head maps it to the next token. The image is irrelevant to the
    answer, so accuracy is known in advance. For the transformers LLaVA and the original LLaVA
    (``LlavaLlamaForCausalLM``, whose ``model`` is the LLM itself).
    """
    config = getattr(model.config, "text_config", model.config)
    vocab = config.vocab_size
    if config.hidden_size < vocab:
        raise ValueError(f"one-hot embeddings need hidden_size >= vocab_size ({config.hidden_size} < {vocab})")
    ids = tokenizer.convert_tokens_to_ids([":", word, tokenizer.eos_token])
    language_model = getattr(model.model, "language_model", model.model)
    with torch.no_grad():
        embeddings = language_model.embed_tokens.weight
        embeddings.zero_()
        embeddings[torch.arange(vocab), torch.arange(vocab)] = 1.0
        for layer in language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = model.lm_head.weight
        head.zero_()
        head[ids[1], ids[0]] = 1.0
        head[ids[2], ids[1]] = 1.0


def save_tiny_llava(path, corpus: list[str], answer: str | None = None, vocab_size: int | None = None) -> Path:
    """save_pretrained a tiny LLaVA and its processor into ``path``.

    ``vocab_size`` below the tokenizer's makes the highest token ids out of range for the model.
    """
    processor = build_processor(corpus, image_size=32, patch_size=8)
    tokenizer = processor.tokenizer
    model = tiny_llava(text=text_config(vocab=vocab_size or len(tokenizer)))
    if answer is not None:
        answer_always(model, tokenizer, answer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return Path(path)


def save_llava_original(path, corpus: list[str], *, answer: str | None = None, seed: int = 0, **config):
    """A tiny original-LLaVA checkpoint folder that ``llava.model.builder.load_pretrained_model`` loads offline.

    The folder holds the model (``save_pretrained``), a word-level tokenizer over ``corpus`` and,
    in ``clip_tower/``, the CLIP tower that ``mm_vision_tower`` points at (an absolute path). The
    builder picks the LLaVA code path only when the model name (the folder's last component)
    contains "llava", so ``path`` must. ``answer`` makes the model always answer that word.
    """
    path = Path(path).resolve()
    if "llava" not in path.name.lower():
        raise ValueError(f"load_pretrained_model needs 'llava' in the model folder's name; got {path.name!r}")
    tower = save_clip_tower(path / "clip_tower", seed=seed)
    tokenizer = build_tokenizer(corpus)
    options = dict(
        vocab=len(tokenizer),
        mm_use_im_patch_token=False,  # else the builder adds <im_patch> and resizes the embeddings
        mm_use_im_start_end=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = build_llava_original(llava_original_config(tower, **{**options, **config}), seed=seed)
    if answer is not None:
        answer_always(model, tokenizer, answer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    # as released checkpoints: without the tower's weights (the builder loads it from mm_vision_tower)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")}
    model.save_pretrained(path, state_dict=weights)
    tokenizer.save_pretrained(path)
    return path


def offline_env(tmp_path) -> dict:
    """Environment for an lmms-eval subprocess: offline, caches inside ``tmp_path``."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"),
        TOKENIZERS_PARALLELISM="false",
        TQDM_MININTERVAL="5",
    )
    return env


def run_lmms_eval(args: list[str], tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m lmms_eval ARGS`` as a user would run it; stdout and stderr together."""
    return subprocess.run(
        [sys.executable, "-m", "lmms_eval", *args],
        env=offline_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
