"""Per-sample statistics of an evaluation and their summary.

One record per lmms-eval request: visual tokens in / kept, prompt tokens before / after
pruning, LLM prefill FLOPs before / after (``vtprune.engine.flops``), time to first token and
decode throughput. With vtprune patched they come from ``handle.last`` (the prefill of this
request); unpatched, from the prompt itself (image tokens counted, nothing removed).
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

from vtprune.engine.flops import llm_prefill_flops

RECORD_FIELDS = (
    "task",
    "split",
    "doc_id",
    "visual_tokens_in",
    "visual_tokens_kept",
    "prompt_tokens",
    "llm_prompt_tokens",
    "flops_before",
    "flops_after",
    "ttft_s",
    "new_tokens",
    "decode_tokens",
    "decode_s",
    "latency_s",
    "scoring_s",  # a method's own model calls inside the prefill (quota's scorer and decoupler), part of ttft_s
)


def sample_record(request, calls: list, prune, config) -> dict:
    """Statistics of one request from its ``generate`` calls and its vtprune record (or None)."""
    metadata = getattr(request, "metadata", None) or {}
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(task=request.task_name, split=metadata.get("split"), doc_id=request.doc_id)
    if prune is not None:
        record.update(
            visual_tokens_in=sum(prune.visual_tokens_in),
            visual_tokens_kept=sum(prune.visual_tokens_kept),
            flops_before=int(prune.flops_before),
            flops_after=int(prune.flops_after),
            scoring_s=_scoring_seconds(prune.extra),
        )
        lengths = getattr(prune, "sequence_lengths", None)
        if lengths is not None:
            record.update(prompt_tokens=sum(lengths[0]), llm_prompt_tokens=sum(lengths[1]))
    elif calls and calls[0].prompt_tokens:
        text_config = getattr(config, "text_config", config)
        first = calls[0]
        flops = sum(llm_prefill_flops(n, text_config) for n in first.prompt_tokens)
        visual = sum(first.visual_tokens) if first.visual_tokens else None
        prompt = sum(first.prompt_tokens)
        record.update(
            visual_tokens_in=visual,
            visual_tokens_kept=visual,
            prompt_tokens=prompt,
            llm_prompt_tokens=prompt,
            flops_before=flops,
            flops_after=flops,
        )
    if calls:
        record.update(_timings(calls))
    return record


def _scoring_seconds(extra: dict) -> float | None:
    parts = [extra[key] for key in ("scoring_seconds", "decouple_seconds") if extra.get(key) is not None]
    return sum(parts) if parts else None


def _timings(calls: list) -> dict:
    first = calls[0]
    finished = [c for c in calls if c.end is not None]
    decoding = [c for c in finished if c.first_token is not None and c.new_tokens >= 2]
    return {
        "ttft_s": first.ttft_s,
        "new_tokens": sum(c.new_tokens for c in finished),
        "decode_tokens": sum(c.new_tokens - 1 for c in decoding),
        "decode_s": sum(c.end - c.first_token for c in decoding),
        "latency_s": sum(c.end - c.start for c in finished),
    }


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(records: list[dict]) -> dict:
    """Means per sample (tokens, FLOPs, TTFT), median TTFT and pooled decode tokens/s."""
    column = {key: [r.get(key) for r in records] for key in RECORD_FIELDS}
    ttft = [v for v in column["ttft_s"] if v is not None]
    decode_tokens = sum(v for v in column["decode_tokens"] if v)
    decode_s = sum(v for v in column["decode_s"] if v)
    summary = {"samples": len(records)}
    for key in ("visual_tokens_in", "visual_tokens_kept", "prompt_tokens", "llm_prompt_tokens"):
        summary[key] = _mean(column[key])
    for key in ("flops_before", "flops_after", "ttft_s", "latency_s", "new_tokens", "scoring_s"):
        summary[key] = _mean(column[key])
    summary["ttft_s_median"] = statistics.median(ttft) if ttft else None
    summary["decode_tokens_per_s"] = decode_tokens / decode_s if decode_s > 0 else None
    return summary


# -- kept-patch examples ------------------------------------------------------------------------
def visual_layout(model):
    """The adapter's :class:`VisualLayout` (fixed patch grid), or None when it has none."""
    from vtprune.patches import get_adapter

    try:
        adapter = get_adapter(model)(model)
        return adapter.layout() if hasattr(adapter, "layout") else None
    except Exception:
        return None


def _image_processor(base):
    for name in ("_image_processor", "processor", "_processor", "image_processor"):
        processor = getattr(base, name, None)
        if processor is not None:
            return getattr(processor, "image_processor", processor)
    return None


def model_view_image(pixels: torch.Tensor, base=None) -> np.ndarray:
    """(3, H, W) normalised pixels -> (H, W, 3) uint8: the image as the model saw it."""
    pixels = pixels.detach().float().cpu()
    processor = _image_processor(base)
    mean = getattr(processor, "image_mean", None)
    std = getattr(processor, "image_std", None)
    if mean is not None and std is not None:
        pixels = pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    else:  # unknown normalisation: stretch to [0, 1]
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp_min(1e-6)
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
