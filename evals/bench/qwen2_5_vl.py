"""``python -m vtprune.evals.bench.qwen2_5_vl``: prefill speed of pruning on a Qwen2.5-VL-7B-shaped model.

Model (``transformers_vlms.qwen2_5_vl_shaped``): Qwen2.5-VL-7B's widths with fewer layers: a ViT
1280 wide (2 of its 32 blocks: one windowed, the last over the whole image, as blocks 7, 15, 23, 31
of the checkpoint) and an LLM 3584 wide (28 heads, 4 KV heads, MLP 18944; 3 of its 28 layers),
random weights, fp32, SDPA. One 1288 x 966 image, as the processor sizes it (multiples of 28 px:
1288 x 952, 92 x 68 patches of 14 px, 46 x 34 = 1564 visual tokens), in a prompt with 40 text
tokens. The FLOPs-ideal speedup is per decoder layer, so it barely depends on the layer count
(FastV's does: with 3 layers, k=1 cuts before layers 1 and 2).

For keep 0.25 and 0.1: fastervlm (attention received at the last, full-attention ViT block: the
tower has no [CLS]), fopru (the same signal, rank), uniform (a lattice per frame) and FastV
(k=1, ratio 1 - keep). Reported: median LLM prefill time (the decoder stack, vtprune's cut
included) against the unpruned one, next to the FLOPs-ideal speedup, timed round-robin as in
:mod:`vtprune.evals.bench.llava15`.
"""

from __future__ import annotations

import torch

from vtprune.evals.bench.llava15 import add_speedups, run_cli, speedup_table, time_configs
from vtprune.evals.models.transformers_vlms import (
    IMAGE_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    qwen2_5_vl_shaped,
)

RATIOS = (0.25, 0.1)
IMAGE = (966, 1288)  # height, width in pixels


def qwen_configs(ratios=RATIOS) -> list[tuple[str, object]]:
    configs: list[tuple[str, object]] = [("full", None)]
    for ratio in ratios:
        configs += [
            (f"fastervlm keep {ratio} (received)", f"fastervlm:keep_ratio={ratio},score=received"),
            (f"fopru keep {ratio}", f"fopru:keep_ratio={ratio}"),
            (f"uniform keep {ratio}", f"uniform:keep_ratio={ratio}"),
            (f"fastv k=1 R={1 - ratio:g}", f"fastv:k=1,ratio={1 - ratio:g}"),
        ]
    return configs


def image_grid(model, image=IMAGE) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the processor gives an image: each side rounded to a multiple of
    patch x merge pixels (``smart_resize``, within its pixel bounds for these sizes)."""
    vision = model.config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    height, width = (max(factor, round(side / factor) * factor) for side in image)
    return 1, height // vision.patch_size, width // vision.patch_size


def qwen_inputs(model, text_tokens: int, device, image=IMAGE) -> dict:
    """One prompt: 5 text tokens, <vision start>, the image's tokens, <vision end>, the rest of the text;
    random flattened patches as the processor packs them."""
    vision = model.config.vision_config
    grid = image_grid(model, image)
    tokens = grid[1] * grid[2] // vision.spatial_merge_size**2
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, model.config.text_config.vocab_size, (text_tokens,), generator=generator)
    visual = torch.cat(
        [torch.tensor([VISION_START_ID]), torch.full((tokens,), IMAGE_TOKEN_ID), torch.tensor([VISION_END_ID])]
    )
    input_ids = torch.cat([text[:5], visual, text[5:]])[None]
    types = (input_ids == IMAGE_TOKEN_ID).long()  # mm_token_type_ids: 1 at image tokens
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixel_values = torch.randn(grid[1] * grid[2], patch, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "mm_token_type_ids": types.to(device),
        "pixel_values": pixel_values.to(device, model.dtype),
        "image_grid_thw": torch.tensor([grid], device=device),
    }


def measure(model, inputs, repeats: int, ratios=RATIOS) -> list[dict]:
    rows = time_configs(model, inputs, qwen_configs(ratios), repeats)
    add_speedups(rows)
    return rows


def run(repeats: int, text_tokens: int, device: str) -> dict:
    model = qwen2_5_vl_shaped().to(device)
    inputs = qwen_inputs(model, text_tokens, device)
    return {
        "model": "Qwen2.5-VL-7B-shaped: ViT 2x1280 (windowed + full) + LLM 3x3584, random weights",
        "image": f"{IMAGE[1]}x{IMAGE[0]} px, patch grid {image_grid(model)}",
        "device": device,
        "threads": torch.get_num_threads(),
        "prompt_tokens": inputs["input_ids"].shape[1],
        "repeats": repeats,
        "rows": measure(model, inputs, repeats),
    }


def format_table(result: dict) -> str:
    return speedup_table("visual tokens").markdown(result["rows"])


def main(argv=None) -> int:
    return run_cli(argv, "vtprune Qwen2.5-VL bench", __doc__.splitlines()[0], run, format_table, default_repeats=3)


if __name__ == "__main__":
    raise SystemExit(main())
