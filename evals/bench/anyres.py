"""``vtprune bench --anyres``: prefill speed of AnyRes pruning on a LLaVA-NeXT-shaped model.

Model: the LLaVA-1.5-shaped realistic model (CLIP ViT-L/14-336 tower, ~0.5B Llama) with
LLaVA-NeXT's AnyRes packing; one 672 x 672 image = base image + 2 x 2 crops = 5 x 576 = 2880
patch tokens, 2928 image tokens with the row newlines. Random weights, fp32, SDPA. For
fastervlm (the same k per sub-image, as its official code), fopru (rank), hired and
globalcom2 at keep 0.25 and 0.1: median LLM prefill time next to the FLOPs-ideal speedup,
timed round-robin as in :mod:`vtprune.evals.bench.llava15`.
"""

from __future__ import annotations

import torch

from vtprune.evals.bench.llava15 import add_speedups, run_cli, speedup_table, time_configs
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, llava_next_shaped
from vtprune.patches.llava_next import LlavaNextAdapter

RATIOS = (0.25, 0.1)


def anyres_configs() -> list[tuple[str, object]]:
    configs: list[tuple[str, object]] = [("full", None)]
    for ratio in RATIOS:
        configs += [
            (f"fastervlm keep {ratio}", f"fastervlm:keep_ratio={ratio}"),
            (f"fopru keep {ratio}", f"fopru:keep_ratio={ratio}"),
            (f"hired budget {ratio}", f"hired:budget_ratio={ratio}"),
            (f"globalcom2 keep {ratio}", f"globalcom2:keep_ratio={ratio}"),
        ]
    return configs


def anyres_inputs(model, text_tokens: int, device) -> dict:
    """One prompt around one 672 x 672 image, with as many placeholders as the model packs."""
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 5, 3, 336, 336, generator=generator)
    image_sizes = torch.tensor([[672, 672]])
    (image,) = LlavaNextAdapter(model).packing_map(image_sizes)  # the model's own packer, on indices
    text = torch.randint(10, model.config.text_config.vocab_size, (text_tokens,), generator=generator)
    input_ids = torch.cat([text[:5], torch.full((image.token_map.numel(),), IMAGE_TOKEN_ID), text[5:]])[None]
    return {
        "input_ids": input_ids.to(device),
        "pixel_values": pixel_values.to(device, model.dtype),
        "image_sizes": image_sizes.to(device),
    }


def run(repeats: int, text_tokens: int, device: str) -> dict:
    model = llava_next_shaped("realistic").to(device)
    inputs = anyres_inputs(model, text_tokens, device)
    rows = time_configs(model, inputs, anyres_configs(), repeats)
    add_speedups(rows)
    return {
        "model": "LLaVA-NeXT-shaped: CLIP ViT-L/14-336 + Llama 24x1024 (~0.5B), AnyRes 672x672 = 5 sub-images",
        "device": device,
        "threads": torch.get_num_threads(),
        "prompt_tokens": inputs["input_ids"].shape[1],
        "repeats": repeats,
        "rows": rows,
    }


def format_table(result: dict) -> str:
    return speedup_table("image tokens kept (incl. newlines)").markdown(result["rows"])


def main(argv=None) -> int:
    return run_cli(argv, "vtprune AnyRes bench", __doc__.splitlines()[0], run, format_table, default_repeats=3)


if __name__ == "__main__":
    raise SystemExit(main())
