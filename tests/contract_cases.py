"""The cases of the contract matrix (tests/test_contracts.py): one entry per family, one per method.

A family case builds a tiny config-built model and its inputs: a left-padded batch of two prompts of
different lengths and each of those prompts alone. A new family adds one builder to ``FAMILIES``; a
new method adds one entry to ``METHODS`` (the contract test fails while either is missing).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

import torch
from helpers import left_pad, prompt_ids, qwen2_vl_pixels, qwen2_vl_prompt

from vtprune.evals.models import transformers_vlms as vlms

LAYERS = 4  # decoder layers of every tiny LLM: room for fastv k=1 and pdrop's layers 1 and 2
TOKEN_TYPES = ("mm_token_type_ids", "token_type_ids")  # per-token types (Qwen's M-RoPE; Gemma 3's image blocks)


@dataclass
class FamilyCase:
    """A tiny model and its prompts. ``batch``: both prompts left-padded; ``samples``: each alone."""

    model: torch.nn.Module
    batch: dict
    samples: list[dict]
    visual_ids: tuple[int, ...]  # input_ids placeholders of visual tokens (labels are -100 there)
    # the package-era families: generate() takes the prompt as ``inputs`` and returns only the new tokens
    prompt_keyword: str = "input_ids"
    returns_prompt: bool = True
    # why the unpatched model cannot generate here (the reference is then a cache-free greedy loop)
    no_unpatched_generate: str | None = None
    # why a second generate cannot continue the returned cache in this family's API
    no_continued_cache: str | None = None
    family: str = field(default="", init=False)  # its key in FAMILIES
    memo: dict = field(default_factory=dict, init=False, repr=False)  # the unpatched model's outputs

    def forward(self, inputs: dict, **options):
        with torch.no_grad():
            return self.model(**inputs, **options)

    def generate(self, inputs: dict, **options):
        inputs = dict(inputs)
        inputs[self.prompt_keyword] = inputs.pop("input_ids")
        with torch.no_grad():
            return self.model.generate(**inputs, **options)

    def new_tokens(self, sequences: torch.Tensor, inputs: dict, count: int) -> torch.Tensor:
        """The generated part of ``generate``'s output (``count`` tokens per row)."""
        tokens = sequences[:, inputs["input_ids"].shape[1] :] if self.returns_prompt else sequences[:, -count:]
        assert tokens.shape[1] == count, f"expected {count} new tokens, got {tokens.shape[1]}"
        return tokens

    def text_only(self, inputs: dict) -> dict:
        """The per-token inputs of ``inputs`` (what a decode step or a continued cache receives)."""
        return {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", *TOKEN_TYPES)}

    def extend(self, inputs: dict, tokens: torch.Tensor) -> dict:
        """``inputs`` with ``tokens`` (B, n) appended as text after the prompt."""
        extended = dict(inputs)
        extended["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)
        for key, value in (("attention_mask", 1), *((types, 0) for types in TOKEN_TYPES)):
            if key in inputs:
                extended[key] = torch.cat([inputs[key], torch.full_like(tokens, value)], dim=1)
        return extended

    def labels(self, inputs: dict) -> torch.Tensor:
        """Next-token labels: the prompt's text tokens; -100 at visual placeholders, padding and each
        row's first token (nothing in the row predicts it)."""
        ids = inputs["input_ids"]
        real = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        first = real.long().cumsum(dim=1) == 1
        ignored = torch.isin(ids, torch.tensor(self.visual_ids)) | ~real | (first & real)
        return torch.where(ignored, -100, ids)


def _no_eos(model):
    model.generation_config.eos_token_id = None  # random weights: every row generates max_new_tokens
    return model


def _images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _with_text(placeholders: torch.Tensor, text=(3, 4), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    before, after = (torch.randint(7, 128, (n,), generator=generator) for n in text)
    return torch.cat([before, placeholders, after])


def _left_padded(samples: list[dict], padded: dict) -> dict:
    """One left-padded batch of ``samples``; ``padded``: the batched non-text inputs."""
    ids, mask = left_pad([s["input_ids"][0] for s in samples])
    batch = {"input_ids": ids, "attention_mask": mask, **padded}
    for key in TOKEN_TYPES:
        if key in samples[0]:
            types = torch.zeros_like(ids)
            for row, s in enumerate(samples):
                types[row, ids.shape[1] - s["input_ids"].shape[1] :] = s[key][0]
            batch[key] = types
    return batch


def llava() -> FamilyCase:
    model = _no_eos(vlms.tiny_llava(seed=1, text=vlms.text_config(layers=LAYERS)))
    prompts = [prompt_ids([3, 9], seed=1), prompt_ids([8, 2], seed=2)]  # 28 and 26 tokens
    px = _images(2, seed=7)
    samples = [{"input_ids": p[None], "pixel_values": px[i : i + 1]} for i, p in enumerate(prompts)]
    return FamilyCase(model, _left_padded(samples, {"pixel_values": px}), samples, (vlms.IMAGE_TOKEN_ID,))


def _anyres_samples(model, sizes, seed):
    """One image per sample: the base image and its crops, padded to the batch's most crops (as the
    processors pad); as many placeholders as the unpatched model packs."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    pinpoints, side = model.config.image_grid_pinpoints, model.config.vision_config.image_size
    max_crops = max(image_size_to_num_patches(size, pinpoints, side) for size in sizes)
    samples = []
    for index, size in enumerate(sizes):
        image_sizes = torch.tensor([size])
        px = torch.randn(1, max_crops, 3, side, side, generator=torch.Generator().manual_seed(seed + index))
        with torch.no_grad():
            packed = model.model.get_image_features(pixel_values=px, image_sizes=image_sizes).pooler_output
        ids = _with_text(torch.full((packed[0].shape[0],), vlms.IMAGE_TOKEN_ID), (3 + 4 * index, 2), seed + index)
        samples.append({"input_ids": ids[None], "pixel_values": px, "image_sizes": image_sizes})
    return samples


def _anyres_batch(samples):
    return _left_padded(
        samples,
        {
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "image_sizes": torch.cat([s["image_sizes"] for s in samples]),
        },
    )


def llava_next() -> FamilyCase:
    model = _no_eos(vlms.tiny_llava_next(seed=1, text=vlms.text_config(layers=LAYERS)))
    samples = _anyres_samples(model, [[30, 50], [60, 40]], seed=3)
    return FamilyCase(model, _anyres_batch(samples), samples, (vlms.IMAGE_TOKEN_ID,))


def llava_onevision() -> FamilyCase:
    model = _no_eos(vlms.tiny_llava_onevision(seed=3, layers=LAYERS))
    samples = _anyres_samples(model, [[60, 40], [30, 50]], seed=5)
    return FamilyCase(model, _anyres_batch(samples), samples, (vlms.IMAGE_TOKEN_ID, vlms.VIDEO_TOKEN_ID))


def qwen2_vl() -> FamilyCase:
    return _qwen_vl_case(vlms.tiny_qwen2_vl(seed=1, layers=LAYERS))


def qwen2_5_vl() -> FamilyCase:
    return _qwen_vl_case(vlms.tiny_qwen2_5_vl(seed=1, layers=LAYERS))  # (1, 4, 6): two windows, one partial


def qwen3_vl() -> FamilyCase:
    return _qwen_vl_case(vlms.tiny_qwen3_vl(seed=1, layers=LAYERS))


def qwen3_vl_moe() -> FamilyCase:
    return _qwen_vl_case(vlms.tiny_qwen3_vl(seed=1, layers=LAYERS, moe=True))


def _qwen_vl_case(model) -> FamilyCase:
    """A Qwen-VL family's case: one image per sample, 2 x 3 and 4 x 2 merged tokens."""
    model = _no_eos(model)
    samples = []
    for seed, (grid, text) in enumerate([((1, 4, 6), (3, 4)), ((1, 8, 4), (5, 2))]):  # 6 and 8 merged tokens
        ids, types = qwen2_vl_prompt(list(text), [grid], seed=seed)
        samples.append(
            {
                "input_ids": ids[None],
                "mm_token_type_ids": types[None],
                "pixel_values": qwen2_vl_pixels([grid], seed=seed),
                "image_grid_thw": torch.tensor([grid]),
            }
        )
    padded = {
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "image_grid_thw": torch.cat([s["image_grid_thw"] for s in samples]),
    }
    return FamilyCase(model, _left_padded(samples, padded), samples, (vlms.IMAGE_TOKEN_ID, vlms.VIDEO_TOKEN_ID))


def llava_original() -> FamilyCase:
    """The original LLaVA code base (llava-torch); the caller skips when it is not installed."""
    from transformers import __version__

    from vtprune.evals.models.llava_original import (
        IMAGE_TOKEN_INDEX,
        original_prompt,
        save_clip_tower,
        tiny_llava_original,
    )

    with tempfile.TemporaryDirectory() as folder:  # the tower is loaded from the folder at build time
        model = tiny_llava_original(save_clip_tower(f"{folder}/tower"), seed=1, layers=LAYERS, padding_side="left")
    _no_eos(model)
    prompts = [original_prompt([3, 9], seed=1), original_prompt([8, 2], seed=2)]
    px = _images(2, seed=7)
    samples = [{"input_ids": p[None], "images": px[i : i + 1]} for i, p in enumerate(prompts)]
    era = int(__version__.split(".")[0]) < 5  # the package's own transformers 4.3x
    return FamilyCase(
        model,
        _left_padded(samples, {"images": px}),
        samples,
        (IMAGE_TOKEN_INDEX,),
        prompt_keyword="inputs",
        returns_prompt=False,
        no_unpatched_generate=None if era else f"the unpatched generate needs transformers 4.3x (found {__version__})",
        no_continued_cache="LlavaLlamaForCausalLM.generate runs from the merged inputs_embeds: no prompt ids to extend",
    )


def _tiled_samples(tiles: list[int], seed: int) -> list[dict]:
    """InternVL: one image per sample, ``tiles[i]`` tiles (crops then the thumbnail; 1: a lone tile)."""
    samples = []
    for index, count in enumerate(tiles):
        run = [vlms.VISION_START_ID] + [vlms.IMAGE_TOKEN_ID] * (16 * count) + [vlms.VISION_END_ID]
        ids = _with_text(torch.tensor(run), (3 + 4 * index, 2), seed + index)
        samples.append({"input_ids": ids[None], "pixel_values": _images(count, seed + index)})
    return samples


def internvl() -> FamilyCase:
    model = _no_eos(vlms.tiny_internvl(seed=2, layers=LAYERS))
    samples = _tiled_samples([3, 1], seed=11)  # 2 crops + thumbnail (48 tokens), a lone tile (16)
    padded = {"pixel_values": torch.cat([s["pixel_values"] for s in samples])}
    return FamilyCase(model, _left_padded(samples, padded), samples, (vlms.IMAGE_TOKEN_ID,))


def llava_next_video() -> FamilyCase:
    """Videos (the path quota runs on): two frames of 2 x 2 pooled tokens per sample; its AnyRes images are
    LLaVA-NeXT's (the llava_next case) and tests/test_llava_next_video.py mixes them with videos."""
    model = _no_eos(vlms.tiny_llava_next_video(seed=2, layers=LAYERS))
    samples = []
    for index in range(2):
        ids = _with_text(torch.full((8,), vlms.VIDEO_TOKEN_ID), (3 + 4 * index, 2), seed=20 + index)
        samples.append({"input_ids": ids[None], "pixel_values_videos": _images(2, seed=20 + index)[None]})
    padded = {"pixel_values_videos": torch.cat([s["pixel_values_videos"] for s in samples])}
    return FamilyCase(model, _left_padded(samples, padded), samples, (vlms.IMAGE_TOKEN_ID, vlms.VIDEO_TOKEN_ID))


def gemma3() -> FamilyCase:
    """One image per sample (<start_of_image> 16 tokens <end_of_image>), the processor's token types; the
    tiny decoder's sliding window (8) is shorter than an image."""
    model = _no_eos(vlms.tiny_gemma3(seed=1, layers=LAYERS))
    samples = []
    for index in range(2):
        image = torch.cat([torch.tensor([vlms.BOI_TOKEN_ID]), torch.full((16,), vlms.IMAGE_TOKEN_ID)])
        ids = _with_text(torch.cat([image, torch.tensor([vlms.EOI_TOKEN_ID])]), (3 + 4 * index, 2), seed=30 + index)
        pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(30 + index))
        types = (ids == vlms.IMAGE_TOKEN_ID).long()
        samples.append({"input_ids": ids[None], "token_type_ids": types[None], "pixel_values": pixels})
    padded = {"pixel_values": torch.cat([s["pixel_values"] for s in samples])}
    return FamilyCase(model, _left_padded(samples, padded), samples, (vlms.IMAGE_TOKEN_ID,))


def _idefics3_family(build) -> FamilyCase:
    """A split image (a tile, then the global image) and a lone image: the batch's pixel_values pad the
    second sample with an all-zero image, which the model drops."""
    model = _no_eos(build(seed=1, layers=LAYERS))
    samples = []
    for index, images in enumerate((2, 1)):
        tile = torch.cat([torch.tensor([vlms.BOI_TOKEN_ID]), torch.full((16,), vlms.IMAGE_TOKEN_ID)])
        ids = _with_text(torch.cat([tile] * images), (3 + 4 * index, 2), seed=40 + index)
        pixels = torch.randn(1, images, 3, 32, 32, generator=torch.Generator().manual_seed(40 + index))
        samples.append({"input_ids": ids[None], "pixel_values": pixels})
    padded = torch.zeros(2, 2, 3, 32, 32)
    for row, sample in enumerate(samples):
        padded[row, : sample["pixel_values"].shape[1]] = sample["pixel_values"][0]
    return FamilyCase(model, _left_padded(samples, {"pixel_values": padded}), samples, (vlms.IMAGE_TOKEN_ID,))


def idefics3() -> FamilyCase:
    return _idefics3_family(vlms.tiny_idefics3)


def smolvlm() -> FamilyCase:
    return _idefics3_family(vlms.tiny_smolvlm)


FAMILIES = {
    "llava": llava,
    "llava_next": llava_next,
    "llava_onevision": llava_onevision,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "qwen3_vl_moe": qwen3_vl_moe,
    "llava_original": llava_original,
    "internvl": internvl,
    "llava_next_video": llava_next_video,
    "gemma3": gemma3,
    "idefics3": idefics3,
    "smolvlm": smolvlm,
}


def constant_scorer(frames, prompt):
    """QuoTA's frame scorer stub: every frame equally relevant (each keeps its share of the budget)."""
    return torch.full((frames.shape[0],), 0.5)


def pixel_scorer(frames, prompt):
    """QuoTA's frame scorer stub that depends on each frame alone (the same answer in or out of a batch)."""
    return torch.sigmoid(frames.float().mean(dim=(1, 2, 3)) * 20)


class WordTokenizer:
    """A CLIP-style tokenizer stub: start id, one id per word, end id (no vocabulary files offline)."""

    def __call__(self, text, return_tensors="pt"):
        ids = [1] + [3 + sum(map(ord, word)) % 90 for word in text.split()] + [99]
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


def tiny_clip_relevance():
    """CDPruner's CLIP joint space for the tiny models: a random CLIPModel whose vision width is theirs (32)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    from vtprune.methods.cdpruner import ClipRelevance

    text = CLIPTextConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        eos_token_id=99,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vlms.clip_vision_config().to_dict(), projection_dim=8)
    with torch.random.fork_rng():  # the global generator stays as the other cases left it
        torch.manual_seed(0)
        clip = CLIPModel(config).eval()
    return ClipRelevance(clip, WordTokenizer())


@dataclass(frozen=True)
class MethodCase:
    """Options of a method at a small budget that applies to the tiny models, and the options that keep
    every token; ``no_keep_all``: families where no option keeps every token, and why."""

    small: dict
    keep_all: dict
    no_keep_all: dict[str, str] = field(default_factory=dict)


CLIP = tiny_clip_relevance()
_RATIO = MethodCase(small={"keep_ratio": 0.5}, keep_all={"keep_ratio": 1.0})

METHODS = {
    "fastervlm": _RATIO,
    "fopru": _RATIO,
    "random": _RATIO,
    "uniform": _RATIO,
    "globalcom2": _RATIO,
    "divprune": _RATIO,
    "vispruner": _RATIO,
    "cdpruner": MethodCase(
        small={"keep_ratio": 0.5, "clip": CLIP, "query": "What is shown?"},
        keep_all={"keep_ratio": 1.0, "clip": CLIP, "query": "What is shown?"},
    ),
    "hired": MethodCase(small={"budget_ratio": 0.5}, keep_all={"budget_ratio": 1.0}),
    "fastv": MethodCase(small={"k": 1, "ratio": 0.5}, keep_all={"k": 1, "ratio": 0.0}),
    "pdrop": MethodCase(small={"layers": [1, 2], "lam": 0.5}, keep_all={"layers": [1, 2], "lam": 1.0}),
    "quota": MethodCase(
        small={"scorer": pixel_scorer, "query": "What is shown?", "keep_ratio": 0.5},
        keep_all={"scorer": constant_scorer, "query": "What is shown?", "keep_ratio": 1.0},
        no_keep_all={"llava_onevision": "an image's frame is its base view: its AnyRes crops are always dropped"},
    ),
    "visionzip": MethodCase(
        small={"keep_ratio": 0.5},
        keep_all={"keep_ratio": 1.0},
        no_keep_all=dict.fromkeys(FAMILIES, "[CLS] joins the tokens and the rest is merged: never the unpruned image"),
    ),
    "pool": _RATIO,
    "prumerge_plus": MethodCase(
        small={"keep_tokens": 4},
        keep_all={},
        no_keep_all=dict.fromkeys(FAMILIES, "every kept token is merged with its neighbours: never the unpruned image"),
    ),
}
