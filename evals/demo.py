"""``make demo``: prune a LLaVA-1.5-shaped model with every method and report the cost.

The embedded default is a LLaVA-1.5-shaped model (CLIP tower at 336 px with 14 px patches,
so 576 visual tokens, feature layer -2) with random weights, since no checkpoint can be
downloaded here, and the bundled sample image. For each method and keep ratio it prints the
visual tokens kept, the LLM prefill FLOPs and the measured prefill time, and writes a picture
of the kept patches.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import CLIPImageProcessor

import vtprune
from vtprune.evals.sample_image import load_sample
from vtprune.evals.toy_models import IMAGE_TOKEN_ID, build_llava, llava15_shaped_config
from vtprune.evals.visualize import kept_patch_overlay, panel

METHODS = ("fastervlm", "uniform", "random")
KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)


def demo_inputs(model, image, text_tokens: int = 40):
    """A LLaVA-style prompt: a short system text, the image's 576 tokens, a question."""
    side = model.config.vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    num_image_tokens = (side // model.config.vision_config.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, model.config.text_config.vocab_size, (text_tokens,), generator=generator)
    input_ids = torch.cat([text[:5], torch.full((num_image_tokens,), IMAGE_TOKEN_ID), text[5:]])[None]
    return {"input_ids": input_ids, "pixel_values": pixel_values}


def time_prefill(model, inputs, repeats: int) -> float:
    """Median seconds of one prefill forward (vision tower + LLM)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(**inputs, use_cache=False)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first run warms up


def run(out_dir: Path, repeats: int = 3, methods=METHODS, keep_ratios=KEEP_RATIOS) -> list[dict]:
    torch.manual_seed(0)
    model = build_llava(llava15_shaped_config("small"))
    image = load_sample().resize((336, 336))
    inputs = demo_inputs(model, image)
    layout_grid = (24, 24)
    rows, overlays, titles = [], [image], ["original (576 tokens)"]
    print(f"{'method':<10} {'keep':>5} {'tokens':>7} {'LLM GFLOPs':>11} {'prefill ms':>11}")
    for method in methods:
        for keep in keep_ratios:
            with vtprune.patched(model, method, keep_ratio=keep) as handle:
                seconds = time_prefill(model, inputs, repeats)
                record = handle.last
                row = {
                    "method": method,
                    "keep_ratio": keep,
                    "visual_tokens": record.visual_tokens_kept[0],
                    "llm_gflops": record.flops_after / 1e9,
                    "prefill_ms": seconds * 1e3,
                }
                rows.append(row)
                print(
                    f"{method:<10} {keep:>5.2f} {row['visual_tokens']:>7d} {row['llm_gflops']:>11.2f} "
                    f"{row['prefill_ms']:>11.1f}"
                )
                if keep == 0.25:
                    overlays.append(kept_patch_overlay(image, record.stages[0].kept[0], layout_grid))
                    titles.append(f"{method} keep 0.25 ({row['visual_tokens']} tokens)")
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = out_dir / "kept_patches.png"
    panel(overlays, titles, columns=len(overlays)).save(picture)
    print(f"wrote {picture}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the kept-patch picture")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per configuration (median)")
    args = parser.parse_args(argv)
    print("vtprune demo: LLaVA-1.5-shaped model (random weights), 576 visual tokens, fp32, sdpa")
    run(args.out, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
