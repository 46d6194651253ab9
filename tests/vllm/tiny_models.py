"""Tiny random models saved to disk as transformers writes them, for vLLM to load (no vLLM import here).

vLLM loads a model from a directory: weights, config, a tokenizer and the processor. The models are
the test suite's config-built LLaVA (vtprune.evals.models) with a decoder vLLM's CPU attention accepts
(head size 32); the tokenizer is a word-level one over the 128 ids ("t0".."t127", ``<image>`` at the
model's image token id); the processor is transformers' own ``LlavaProcessor``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoProcessor, CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, PAD_TOKEN_ID, build_llava, llava_config, text_config

VOCAB = 128
IMAGE_SIZE = 32
BOS_ID, EOS_ID = 1, 2


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    vocab["<image>"] = IMAGE_TOKEN_ID
    del vocab[f"t{IMAGE_TOKEN_ID}"]
    model = Tokenizer(WordLevel(vocab, unk_token="t0"))
    model.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        pad_token=f"t{PAD_TOKEN_ID}",
        bos_token=f"t{BOS_ID}",
        eos_token=f"t{EOS_ID}",
        unk_token="t0",
        extra_special_tokens={"image_token": "<image>"},
    )


def save_tiny_llava(path, seed: int = 0, select_strategy: str = "default"):
    """A tiny LLaVA-1.5 (32 px CLIP tower, 4 x 4 patches, feature layer -2) in ``path``; returns the model."""
    config = llava_config(
        text=text_config(hidden=64, heads=2, kv_heads=2, vocab=VOCAB), select_strategy=select_strategy
    )
    model = build_llava(config, seed=seed)
    model.save_pretrained(path)
    side = IMAGE_SIZE
    images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer(),
        patch_size=8,
        vision_feature_select_strategy=select_strategy,
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    processor.save_pretrained(path)
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
