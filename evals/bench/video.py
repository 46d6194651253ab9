"""``vtprune bench --video``: prefill speed of video pruning on a LLaVA-OneVision-shaped model.

Model (``transformers_vlms.llava_onevision_shaped``): a SigLIP-so400m-shaped tower (384 px, patch 14:
27 x 27 patches, pooled to 14 x 14 = 196 tokens per frame; 1 of its 27 layers) and an LLM of
Qwen2-0.5B's width (896, 14 heads, 2 KV heads, MLP 4864, vocabulary 151936; 2 of its 24 layers),
random weights, fp32, SDPA. One 32-frame video (32 x 196 + 1 newline = 6273 visual tokens) in
a chat turn with a short question. The FLOPs-ideal speedup is per decoder layer, so it barely
depends on the layer count; the tower is in the whole prefill but is not what is compared.

For each keep ratio, at the same budget: quota (the patched model scores its own frames, each
as a one-frame video; total T = keep_ratio x frame tokens), quota with a stub scorer of skewed
yes-probabilities (to show uneven per-frame grids; it costs nothing), fastervlm (attention
received, since SigLIP has no [CLS]; top-k of keep_ratio per frame) and uniform (a lattice of
keep_ratio per frame). Reported: median LLM prefill time (the decoder stack) against the
unpruned one next to the FLOPs-ideal speedup, and the self-scorer's cost separately: its time
on the benchmark's clock, the part of it spent in the decoder, and both as a fraction of the
unpruned LLM prefill. The scorer runs inside the patched forward (before the LLM), so it is in
the whole prefill and not in the LLM prefill.
"""

from __future__ import annotations

import statistics

import torch

from vtprune.evals.bench.llava15 import (
    CONFIG,
    LLM_PREFILL_MS,
    LLM_TFLOPS,
    SPEEDUPS,
    WHOLE_PREFILL_MS,
    StopWatch,
    add_speedups,
    clock,
    run_cli,
    time_configs,
)
from vtprune.evals.models.processors import build_onevision_processor
from vtprune.evals.models.transformers_vlms import llava_onevision_shaped
from vtprune.evals.sweep.report import Column, Table
from vtprune.methods import quota

FRAMES = 32
RATIOS = (0.5, 0.25, 0.1)
QUESTION = "what is the man holding in his right hand ?"


def onevision_processor(image_size: int = 384, patch_size: int = 14):
    """An offline OneVision processor whose word-level tokenizer knows QuoTA's prompts and QUESTION."""
    corpus = [quota.ENTITY_PROMPT, quota.QUESTION_PROMPT, quota.DECOUPLE_TEMPLATE, QUESTION]
    return build_onevision_processor(corpus, image_size=image_size, patch_size=patch_size)


def video_inputs(processor, frames: int, image_size: int, device) -> dict:
    """One chat turn: a video of ``frames`` random frames (pixels in [0, 1]) and QUESTION."""
    pictures = torch.rand(frames, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    text = quota.chat_turn(processor, [{"type": "video"}, {"type": "text", "text": QUESTION}])
    inputs = processor(text=[text], videos=[pictures], return_tensors="pt", do_rescale=False)
    return {key: value.to(device) for key, value in inputs.items()}


class TimedScorer:
    """QuoTA's default scorer (``ModelScorer(model, processor)``, the patched model on each frame),
    timed on the benchmark's clock: per call, the whole scoring and the part spent in the decoder."""

    def __init__(self, model, processor):
        self.scorer, self.language_model = quota.ModelScorer(model, processor), model.model.language_model
        self.seconds, self.decoder_seconds = [], []

    def bind(self, model, handle):  # quota hands the patched model's handle on (its pruning is suspended while scoring)
        self.scorer.bind(model, handle)

    def __call__(self, frames, prompt):
        watch = StopWatch(self.language_model)
        try:
            start = clock()
            p = self.scorer(frames, prompt)
            self.seconds.append(clock() - start)
        finally:
            watch.remove()
        self.decoder_seconds.append(sum(watch.times))
        return p


def skewed_probabilities(frames: int) -> torch.Tensor:
    """A stub scorer's answer: a bump of relevant frames around the first third of the video."""
    t = torch.arange(frames, dtype=torch.float64)
    return 0.05 + 0.9 * torch.exp(-(((t - frames / 3) / (frames / 8)) ** 2))


def video_configs(model, processor, frames: int, ratios=RATIOS) -> tuple[list, dict]:
    """(label, spec) per configuration, and the TimedScorer of each self-scoring quota row."""
    stub = skewed_probabilities(frames)
    configs, scorers = [("full", None)], {}
    for ratio in ratios:
        label = f"quota keep {ratio}"
        scorers[label] = TimedScorer(model, processor)
        configs += [
            (label, ("quota", {"scorer": scorers[label], "query": QUESTION, "keep_ratio": ratio})),
            (
                f"quota keep {ratio}, stub scorer (skewed p)",
                ("quota", {"scorer": lambda f, prompt: stub[: f.shape[0]], "query": QUESTION, "keep_ratio": ratio}),
            ),
            (f"fastervlm keep {ratio} (received)", f"fastervlm:keep_ratio={ratio},score=received"),
            (f"uniform keep {ratio}", f"uniform:keep_ratio={ratio}"),
        ]
    return configs, scorers


def measure(model, processor, inputs, frames: int, repeats: int, ratios=RATIOS) -> list[dict]:
    """Rows of :func:`vtprune.evals.bench.time_configs`, with speedups, per-frame tokens and scorer costs."""
    configs, scorers = video_configs(model, processor, frames, ratios)
    rows = time_configs(model, inputs, configs, repeats)
    base = add_speedups(rows)
    for row in rows:
        grids = row.get("extra", {}).get("frame_grids")
        row["frame_tokens_kept"] = (
            [grid[0] * grid[1] if grid else 0 for grid in grids[0]]  # quota: its resized grids
            if grids
            else [(row["visual_tokens"] - 1) // frames] * frames  # per-frame methods: the same k per frame
        )
        scorer = scorers.get(row["config"])
        if scorer is not None:  # medians of the timed rounds (the first, warm-up, call is left out)
            row["scorer_s"] = statistics.median(scorer.seconds[1:])
            row["scorer_decoder_s"] = statistics.median(scorer.decoder_seconds[1:])
            row["scorer_pct_of_unpruned_llm_prefill"] = 100 * row["scorer_s"] / base["llm_prefill_s"]
            row["scorer_decoder_pct_of_unpruned_llm_prefill"] = 100 * row["scorer_decoder_s"] / base["llm_prefill_s"]
    return rows


def run(repeats: int, text_tokens: int, device: str, layers: int = 2, vision_layers: int = 1) -> dict:
    """The full-size case (``text_tokens`` is not used: the prompt is one chat turn around the video)."""
    model = llava_onevision_shaped(layers=layers, vision_layers=vision_layers).to(device)
    processor = onevision_processor()
    inputs = video_inputs(processor, FRAMES, 384, device)
    rows = measure(model, processor, inputs, FRAMES, repeats)
    return {
        "model": f"LLaVA-OneVision-shaped: SigLIP-so400m-shaped tower ({vision_layers} layer(s), 384 px, patch 14) "
        f"+ Qwen2-0.5B-wide LLM ({layers} of 24 layers), random weights; {FRAMES} frames x 196 tokens + 1 newline",
        "device": device,
        "threads": torch.get_num_threads(),
        "frames": FRAMES,
        "llm_layers": layers,
        "vision_layers": vision_layers,
        "question": QUESTION,
        "prompt_tokens": inputs["input_ids"].shape[1],
        "repeats": repeats,
        "rows": rows,
    }


def _range(values) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


def _scorer_cell(row: dict) -> str:
    if "scorer_s" not in row:
        return "-"
    return f"{row['scorer_s'] * 1e3:.0f} ({row['scorer_pct_of_unpruned_llm_prefill']:.0f}%)"


VIDEO_TABLE = Table(
    (
        CONFIG,
        Column("visual tokens kept (incl. newline)", lambda row: str(row["visual_tokens"])),
        Column("tokens per frame", lambda row: _range(row["frame_tokens_kept"])),
        LLM_TFLOPS,
        LLM_PREFILL_MS,
        *SPEEDUPS,
        WHOLE_PREFILL_MS,
        Column("scorer ms (% of unpruned LLM prefill)", _scorer_cell),
    )
)


def format_table(result: dict) -> str:
    lines = [VIDEO_TABLE.markdown(result["rows"])]
    lines += ["", "quota's self-scorer (one forward of the patched model per frame, as a one-frame video):", ""]
    for row in result["rows"]:
        if "scorer_s" not in row:
            continue
        p = row["extra"]["yes_probability"][0]
        spread = (max(p) - min(p)) / max(max(p), 1e-30)
        lines.append(
            f"- {row['config']}: {row['scorer_s'] * 1e3:.0f} ms, of which {row['scorer_decoder_s'] * 1e3:.0f} ms in "
            f"the decoder ({row['scorer_decoder_pct_of_unpruned_llm_prefill']:.0f}% of the unpruned LLM prefill); "
            f"handle.last.extra['scoring_seconds'] (wall) {row['extra']['scoring_seconds'] * 1e3:.0f} ms; "
            f"p(yes) {min(p):.3g}-{max(p):.3g} (spread {100 * spread:.1f}% of the largest)"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_cli(argv, "vtprune video bench", __doc__.splitlines()[0], run, format_table, default_repeats=3)


if __name__ == "__main__":
    raise SystemExit(main())
