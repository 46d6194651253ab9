"""Tiny random models saved to disk as transformers writes them, for vLLM to load (no vLLM import here).

vLLM loads a model from a directory: weights, config, a tokenizer and the processor. The model is the
test suite's config-built LLaVA (vtprune.evals.models) with a decoder vLLM's CPU attention accepts
(head size 32), written by the serving bench's writer (a word-level tokenizer over the 128 ids,
transformers' own ``LlavaProcessor``).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor

from vtprune.evals.bench.vllm_serving import BOS_ID, save_llava_dir
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, build_llava, llava_config, text_config

VOCAB = 128
IMAGE_SIZE = 32

__all__ = ["IMAGE_TOKEN_ID", "pixel_values", "prompt_ids", "random_image", "save_tiny_llava"]


def save_tiny_llava(path, seed: int = 0):
    """A tiny LLaVA-1.5 (32 px CLIP tower, 4 x 4 patches, feature layer -2) in ``path``; returns the model."""
    model = build_llava(llava_config(text=text_config(hidden=64, heads=2, kv_heads=2, vocab=VOCAB)), seed=seed)
    save_llava_dir(path, model)
    return model


def random_image(seed: int, size=(IMAGE_SIZE, IMAGE_SIZE)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pixel_values(path, image: Image.Image) -> torch.Tensor:
    """What the saved processor gives the model for ``image`` (the pixels vLLM's processor makes too)."""
    return AutoProcessor.from_pretrained(path).image_processor(images=image, return_tensors="pt")["pixel_values"]


def prompt_ids(text_before: int, text_after: int, seed: int) -> list[int]:
    """Random text ids around one ``<image>`` token (vLLM expands it to the image's placeholders)."""
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(7, VOCAB, (text_before,), generator=generator).tolist()
    after = torch.randint(7, VOCAB, (text_after,), generator=generator).tolist()
    return [BOS_ID, *before, IMAGE_TOKEN_ID, *after]
