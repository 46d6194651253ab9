"""``vtprune bench``: prefill speed of pruning on a LLaVA-1.5-shaped model at realistic size.

Model: CLIP ViT-L/14-336 tower shape (24 layers, 1024 wide, 576 visual tokens, feature layer
-2) and a ~0.5B Llama (24 layers, 1024 wide), random weights, fp32, SDPA. For each
configuration it reports the median LLM prefill time (the decoder stack, including vtprune's
cut) and the whole prefill (vision tower + LLM), the FLOPs-ideal speedup next to the measured
one, and, measured separately on the same tensors, the time spent scoring ([CLS] row from
the captured q/k) and selecting (top-k and the sequence cut).

Timings are medians of ``--repeats`` runs within one process; compare ratios, not absolute
numbers, across machines.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import vtprune
from vtprune.engine.flops import llm_prefill_flops
from vtprune.engine.probe import cls_attention_row
from vtprune.engine.sequence import plan_cut
from vtprune.evals.toy_models import IMAGE_TOKEN_ID, build_llava, llava15_shaped_config
from vtprune.methods.base import top_k_sorted
from vtprune.patches.llava import LlavaAdapter

# (label, spec): None is the unpruned model
CONFIGS: list[tuple[str, object]] = [
    ("full", None),
    ("fastervlm keep 0.5", "fastervlm:keep_ratio=0.5"),
    ("fastervlm keep 0.25", "fastervlm:keep_ratio=0.25"),
    ("fastervlm keep 0.1", "fastervlm:keep_ratio=0.1"),
]


class StopWatch:
    """Forward pre-hook / hook pair that times one module's forward calls."""

    def __init__(self, module):
        self.times: list[float] = []
        self._hooks = [
            module.register_forward_pre_hook(self._start),
            module.register_forward_hook(self._stop),
        ]

    def _start(self, module, args):
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, module, args, output):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def remove(self):
        for hook in self._hooks:
            hook.remove()


def benchmark_inputs(model, text_tokens: int, device) -> dict:
    """One LLaVA-style prompt: 5 text tokens, 576 image tokens, the rest of the text."""
    vision = model.config.vision_config
    num_image_tokens = (vision.image_size // vision.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, model.config.text_config.vocab_size, (text_tokens,), generator=generator)
    input_ids = torch.cat([text[:5], torch.full((num_image_tokens,), IMAGE_TOKEN_ID), text[5:]])[None]
    pixel_values = torch.randn(1, 3, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": input_ids.to(device), "pixel_values": pixel_values.to(device, model.dtype)}


def prefill_once(model, inputs, spec) -> dict:
    """One prefill under one configuration: whole and LLM seconds, and the prune record."""
    handle = vtprune.patch(model, spec) if spec is not None else None
    llm_watch = StopWatch(model.model.language_model)
    try:
        with torch.no_grad():
            StopWatch._sync()
            start = time.perf_counter()
            model(**inputs, use_cache=False, logits_to_keep=1)
            StopWatch._sync()
            total = time.perf_counter() - start
        record = handle.last if handle else None
    finally:
        llm_watch.remove()
        if handle:
            handle.remove()
    return {"prefill_s": total, "llm_prefill_s": llm_watch.times[0], "record": record}


def time_configs(model, inputs, configs, repeats: int) -> list[dict]:
    """Median timings per configuration, run round-robin so background load hits all alike."""
    runs = {label: [] for label, _ in configs}
    for repeat in range(repeats + 1):
        for label, spec in configs:
            run = prefill_once(model, inputs, spec)
            if repeat > 0:  # the first round warms up
                runs[label].append(run)
        print(f"  round {repeat}/{repeats} done", flush=True)
    flops_unpruned = llm_prefill_flops(inputs["input_ids"].shape[1], model.config.text_config)
    rows = []
    for label, _ in configs:
        record = runs[label][0]["record"]
        rows.append(
            {
                "config": label,
                "visual_tokens": record.visual_tokens_kept[0] if record else int(inputs["pixel_values"].shape[0] * 576),
                "llm_flops": record.flops_after if record else flops_unpruned,
                "llm_prefill_s": statistics.median(r["llm_prefill_s"] for r in runs[label]),
                "prefill_s": statistics.median(r["prefill_s"] for r in runs[label]),
            }
        )
    return rows


def time_scoring(model, inputs, keep_ratio: float, repeats: int = 50) -> dict:
    """Seconds spent scoring and selecting, on the tensors of a real prefill."""
    attention = LlavaAdapter(model).feature_attention()
    captured = {}
    hooks = [
        attention.q_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("q", out)),
        attention.k_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("k", out)),
    ]
    with torch.no_grad():
        model.model.get_image_features(pixel_values=inputs["pixel_values"])
    for hook in hooks:
        hook.remove()
    image_mask = inputs["input_ids"] == IMAGE_TOKEN_ID
    num_tokens = int(image_mask.sum())
    k = round(keep_ratio * num_tokens)
    embeds = torch.randn(1, image_mask.shape[1], model.config.text_config.hidden_size, dtype=model.dtype)

    def score_and_select():
        scores = cls_attention_row(captured["q"], captured["k"], attention.num_heads, attention.scale)[:, 1:]
        return top_k_sorted(scores, k)

    def cut(kept):
        image_keep = torch.zeros(1, num_tokens, dtype=torch.bool).scatter_(1, kept, True)
        plan = plan_cut((~image_mask).masked_scatter(image_mask, image_keep.flatten()))
        return plan.gather(embeds)

    def median_seconds(fn, *args):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    kept = score_and_select()
    return {"score_select_s": median_seconds(score_and_select), "cut_s": median_seconds(cut, kept)}


def run(repeats: int, text_tokens: int, device: str) -> dict:
    torch.manual_seed(0)
    model = build_llava(llava15_shaped_config("realistic")).to(device)
    inputs = benchmark_inputs(model, text_tokens, device)
    rows = time_configs(model, inputs, CONFIGS, repeats)
    base = rows[0]
    for row in rows:
        row["flops_ideal_speedup"] = base["llm_flops"] / row["llm_flops"]
        row["measured_speedup"] = base["llm_prefill_s"] / row["llm_prefill_s"]
        row["efficiency"] = row["measured_speedup"] / row["flops_ideal_speedup"]
    scoring = time_scoring(model, inputs, keep_ratio=0.25)
    scoring["overhead_pct_of_unpruned_llm_prefill"] = (
        100 * (scoring["score_select_s"] + scoring["cut_s"]) / base["llm_prefill_s"]
    )
    return {
        "model": "LLaVA-1.5-shaped: CLIP ViT-L/14-336 (576 tokens) + Llama 24x1024 (~0.5B), random weights",
        "dtype": str(model.dtype),
        "attention": model.config.text_config._attn_implementation,
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "prompt_tokens": inputs["input_ids"].shape[1],
        "repeats": repeats,
        "rows": rows,
        "scoring": scoring,
    }


def format_table(result: dict) -> str:
    lines = [
        "| config | visual tokens | LLM TFLOPs | LLM prefill ms | whole prefill ms | FLOPs-ideal speedup "
        "| measured speedup | measured / ideal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['config']} | {row['visual_tokens']} | {row['llm_flops'] / 1e12:.3f} | "
            f"{row['llm_prefill_s'] * 1e3:.0f} | {row['prefill_s'] * 1e3:.0f} | {row['flops_ideal_speedup']:.2f}x | "
            f"{row['measured_speedup']:.2f}x | {row['efficiency']:.2f} |"
        )
    scoring = result["scoring"]
    lines.append(
        f"\nScoring + selection (keep 0.25): {scoring['score_select_s'] * 1e3:.2f} ms, sequence cut "
        f"{scoring['cut_s'] * 1e3:.2f} ms = {scoring['overhead_pct_of_unpruned_llm_prefill']:.2f}% of the "
        "unpruned LLM prefill."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (median)")
    parser.add_argument("--text-tokens", type=int, default=40, help="text tokens around the image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    print(f"vtprune bench on {args.device} ({torch.get_num_threads()} threads), {args.repeats} repeats", flush=True)
    result = run(args.repeats, args.text_tokens, args.device)
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
