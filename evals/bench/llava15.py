"""``vtprune bench``: prefill speed of pruning on a LLaVA-1.5-shaped model at realistic size.

Model: CLIP ViT-L/14-336 tower shape (24 layers, 1024 wide, 576 visual tokens, feature layer
-2) and a ~0.5B Llama (24 layers, 1024 wide), random weights, fp32, SDPA. For each
configuration it reports the median LLM prefill time (the decoder stack, including vtprune's
cut) and the whole prefill (vision tower + LLM), the FLOPs-ideal speedup next to the measured
one, and, measured separately on the same tensors, the time spent scoring ([CLS] row from
the captured q/k) and selecting (top-k and the sequence cut).

In-LLM methods (FastV, PyramidDrop) are timed the same way; every row also reports the
tokens each decoder layer processes, the KV-cache bytes of the prefill (from the record, and
measured on a real cache), and the peak memory of one whole prefill. Side by side, FastV runs
the way its official inplace code does (``OfficialStyleFastV``: eager attention in the LLM,
layer k-1's full attention map returned as with ``output_attentions``, then the inplace cut),
against vtprune's FastV (SDPA kept, one attention row probed).

Peak memory: on CUDA ``max_memory_allocated``; on a Linux CPU the rise of the process's peak
resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``) over one prefill, with
glibc told to return every block over 64 KiB to the system on free, so the peak follows the
live tensors.

Timings are medians of ``--repeats`` runs within one process; compare ratios, not absolute
numbers, across machines. On a CPU shared with other jobs, ``--threads 1 --clock cpu`` times
the CPU the process actually got, which other load does not inflate.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import vtprune
from vtprune.engine.flops import decoder_layer_flops, kv_bytes_per_token, llm_prefill_flops
from vtprune.engine.probe import cls_attention_row
from vtprune.engine.sequence import plan_cut
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, build_llava, llava15_shaped_config
from vtprune.evals.sweep.report import Column, Table
from vtprune.methods.base import top_k_sorted
from vtprune.patches.llava import LlavaAdapter

_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = {"now": time.perf_counter}


def clock() -> float:
    """Seconds on the chosen clock: wall time, or this process's CPU time (``--clock cpu``).

    CPU time with ``--threads 1`` is what to use on a machine shared with other jobs: it counts
    only the cycles this process got, so other load does not inflate it (wall time does).
    """
    return _clock["now"]()


class OfficialStyleFastV:
    """FastV as its official inplace code runs it; for this benchmark's comparison only.

    Follows ``LlamaModel.forward`` of FastV's vendored transformers with ``fast_v_inplace``
    and the HF port's requirement of an eager model: the LLM runs eager attention, layer k-1
    hands back its full (B, H, T, T) attention weights (what ``output_attentions`` returns),
    the last row ranks the image window ``[SYS_LENGTH, SYS_LENGTH + IMAGE_TOKEN_LENGTH)``, the
    top ``round(N * (1 - R))`` plus all text positions are kept in order, the hidden states are
    gathered, ``position_ids`` become the kept indices, and a plain causal mask is rebuilt over
    the new length. Batch size 1 and no KV cache, as in the official inplace mode.
    """

    def __init__(self, k: int, ratio: float):
        self.k, self.ratio = k, ratio

    def prefill(self, model, inputs, encoded=None) -> dict:
        """One prefill; ``encoded``: image features computed beforehand (the vision tower is then skipped)."""
        language_model = model.model.language_model
        input_ids = inputs["input_ids"]
        image_mask = input_ids[0] == IMAGE_TOKEN_ID
        sys_length = int(image_mask.nonzero()[0, 0])
        image_tokens = int(image_mask.sum())
        rank = round(image_tokens * (1 - self.ratio))
        implementation = language_model.config._attn_implementation
        language_model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                StopWatch._sync()
                start = clock()
                embeds = model.get_input_embeddings()(input_ids)
                if encoded is None:
                    encoded = model.model.get_image_features(pixel_values=inputs["pixel_values"])
                features = encoded.pooler_output
                embeds = embeds.masked_scatter(image_mask[None, :, None], torch.cat(features).to(embeds.dtype))
                StopWatch._sync()
                llm_start = clock()
                hidden = self._decoder(language_model, embeds, sys_length, image_tokens, rank)
                model.lm_head(hidden[:, -1:])
                StopWatch._sync()
                end = clock()
        finally:
            language_model.set_attn_implementation(implementation)
        length = input_ids.shape[1]
        layers = language_model.config.num_hidden_layers
        counts = [length] * self.k + [length - image_tokens + rank] * (layers - self.k)
        return {"prefill_s": end - start, "llm_prefill_s": end - llm_start, "record": _Counts(counts, rank)}

    def _decoder(self, language_model, hidden, sys_length, image_tokens, rank):
        length = hidden.shape[1]
        positions = torch.arange(length, device=hidden.device)[None]
        mask, embeddings = self._causal(hidden, positions, language_model)
        weights = {}
        capture = language_model.layers[self.k - 1].self_attn.register_forward_hook(
            lambda module, args, output: weights.__setitem__("layer", output[1])
        )
        try:
            for index, layer in enumerate(language_model.layers):
                if index == self.k:
                    window = weights.pop("layer")[0, :, -1, sys_length : sys_length + image_tokens].mean(dim=0)
                    top = window.topk(rank).indices + sys_length
                    keep = (
                        torch.cat(
                            [
                                torch.arange(sys_length, device=hidden.device),
                                top,
                                torch.arange(sys_length + image_tokens, length, device=hidden.device),
                            ]
                        )
                        .sort()
                        .values
                    )
                    hidden, positions = hidden[:, keep], keep[None]
                    mask, embeddings = self._causal(hidden, positions, language_model)
                hidden = layer(hidden, attention_mask=mask, position_embeddings=embeddings, position_ids=positions)
        finally:
            capture.remove()
        return language_model.norm(hidden)

    @staticmethod
    def _causal(hidden, positions, language_model):
        length = hidden.shape[1]
        mask = torch.full((length, length), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device)
        return mask.triu(1)[None, None], language_model.rotary_emb(hidden, positions)


class _Counts:
    """The figures a PruneRecord gives, for the official-style run (one sample)."""

    def __init__(self, layer_tokens: list[int], kept: int):
        self.layer_tokens, self.visual_tokens_kept = [layer_tokens], [kept]

    def flops(self, text_config) -> int:
        return sum(decoder_layer_flops(n, text_config) for n in self.layer_tokens[0])


# (label, spec): None is the unpruned model; an OfficialStyleFastV runs outside vtprune
CONFIGS: list[tuple[str, object]] = [
    ("full", None),
    ("fastervlm keep 0.5", "fastervlm:keep_ratio=0.5"),
    ("fastervlm keep 0.25", "fastervlm:keep_ratio=0.25"),
    ("fastervlm keep 0.1", "fastervlm:keep_ratio=0.1"),
    ("fastv k=2 R=0.5", "fastv:k=2,ratio=0.5"),
    ("fastv k=2 R=0.75", "fastv:k=2,ratio=0.75"),
    ("pdrop (defaults)", "pdrop"),
    ("visionzip 64 (54+10)", "visionzip:dominant=54,contextual=10"),
    ("visionzip 128 (108+20)", "visionzip:dominant=108,contextual=20"),
    ("pool 144 (12x12)", "pool:keep_tokens=144"),
    ("prumerge_plus 64", "prumerge_plus:keep_tokens=64"),
    ("fastv official-style k=2 R=0.5", OfficialStyleFastV(k=2, ratio=0.5)),
    ("fastv official-style k=2 R=0.75", OfficialStyleFastV(k=2, ratio=0.75)),
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
        self._t0 = clock()

    def _stop(self, module, args, output):
        self._sync()
        self.times.append(clock() - self._t0)

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
    if isinstance(spec, OfficialStyleFastV):
        return spec.prefill(model, inputs)
    handle = vtprune.patch(model, spec) if spec is not None else None
    llm_watch = StopWatch(model.model.language_model)
    try:
        with torch.no_grad():
            StopWatch._sync()
            start = clock()
            model(**inputs, use_cache=False, logits_to_keep=1)
            StopWatch._sync()
            total = clock() - start
        record = handle.last if handle else None
    finally:
        llm_watch.remove()
        if handle:
            handle.remove()
    # the last call is the prefill's own (a self-scoring method, quota, runs the language model before it)
    return {"prefill_s": total, "llm_prefill_s": llm_watch.times[-1], "record": record}


def time_configs(model, inputs, configs, repeats: int) -> list[dict]:
    """Median timings per configuration, run round-robin so background load hits all alike."""
    runs = {label: [] for label, _ in configs}
    for repeat in range(repeats + 1):
        for label, spec in configs:
            run = prefill_once(model, inputs, spec)
            if repeat > 0:  # the first round warms up
                runs[label].append(run)
        print(f"  round {repeat}/{repeats} done", flush=True)
    text_config = model.config.text_config
    length = inputs["input_ids"].shape[1]
    flops_unpruned = llm_prefill_flops(length, text_config)
    kv_per_token = kv_bytes_per_token(model.config.text_config, model.dtype)
    visual_ids = [getattr(model.config, name, None) for name in ("image_token_id", "video_token_id")]
    visual_unpruned = int(torch.isin(inputs["input_ids"], torch.tensor([i for i in visual_ids if i is not None])).sum())
    rows = []
    for label, _ in configs:
        record = runs[label][0]["record"]
        if record is None:
            flops, layer_tokens = flops_unpruned, [length] * text_config.num_hidden_layers
        elif isinstance(record, _Counts):
            flops, layer_tokens = record.flops(text_config), record.layer_tokens[0]
        else:
            flops, layer_tokens = record.flops_after, record.layer_tokens[0]
        rows.append(
            {
                "config": label,
                "visual_tokens": record.visual_tokens_kept[0] if record else visual_unpruned,
                "llm_flops": flops,
                "layer_tokens": layer_tokens,
                "kv_cache_bytes": sum(layer_tokens) * kv_per_token,
                "llm_prefill_s": statistics.median(r["llm_prefill_s"] for r in runs[label]),
                "prefill_s": statistics.median(r["prefill_s"] for r in runs[label]),
            }
        )
        if getattr(record, "extra", None):  # the method's own figures (quota: per-frame tokens and grids)
            rows[-1]["extra"] = dict(record.extra)
    return rows


def measured_kv_bytes(model, inputs, spec) -> int | None:
    """Bytes of the KV cache a real cached prefill leaves (None for the official-style run: no cache)."""
    if isinstance(spec, OfficialStyleFastV):
        return None
    handle = vtprune.patch(model, spec) if spec is not None else None
    try:
        with torch.no_grad():
            cache = model(**inputs, use_cache=True, logits_to_keep=1).cache
    finally:
        if handle:
            handle.remove()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


class PeakMemory:
    """Peak memory of a block above what was in use when it started (bytes, or None if unknown)."""

    M_MMAP_THRESHOLD = -3

    @classmethod
    def prepare(cls) -> None:
        """On glibc, serve and return every block over 64 KiB with mmap, so freed tensors leave the RSS."""
        if not torch.cuda.is_available():
            with contextlib.suppress(OSError):
                ctypes.CDLL("libc.so.6").mallopt(cls.M_MMAP_THRESHOLD, 64 * 1024)

    def __enter__(self):
        self.peak = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak resident set size (VmHWM) to the current one
                self._base = self._status()["VmRSS"]
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        elif self._base is not None:
            self.peak = self._status()["VmHWM"] - self._base

    @staticmethod
    def _status() -> dict:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
        return values


def measure_memory(model, inputs, configs, rows) -> None:
    """Adds the peak memory of one whole prefill and the measured KV-cache bytes to each row."""
    for (_, spec), row in zip(configs, rows, strict=True):
        prefill_once(model, inputs, spec)  # warm: the measured run allocates like a steady state
        with PeakMemory() as memory:
            prefill_once(model, inputs, spec)
        row["peak_memory_bytes"] = memory.peak
        row["kv_cache_bytes_measured"] = measured_kv_bytes(model, inputs, spec)


def time_scoring(model, inputs, keep_ratio: float, repeats: int = 50) -> dict:
    """Seconds spent scoring and selecting, on the tensors of a real prefill."""
    attention = LlavaAdapter(model).vision_attention("feature")
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
            start = clock()
            fn(*args)
            times.append(clock() - start)
        return statistics.median(times)

    kept = score_and_select()
    return {"score_select_s": median_seconds(score_and_select), "cut_s": median_seconds(cut, kept)}


def fastv_head_to_head(model, inputs, ratios=(0.5, 0.75), k: int = 2, repeats: int = 10) -> list[dict]:
    """vtprune's FastV against the official-style FastV: LLM prefill time and peak memory.

    Both run on the same image features, computed once beforehand (the vision tower is the
    same for both and is left out), in alternating order; times are the median and the
    minimum of ``repeats`` runs each (the minimum is the least disturbed by other load).
    """
    with torch.no_grad():
        encoded = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    input_ids = inputs["input_ids"]

    def ours(spec):
        handle = vtprune.patch(model, spec)
        watch = StopWatch(model.model.language_model)
        try:
            with torch.no_grad():
                model(input_ids=input_ids, mm_encoder_outputs={"image": encoded}, use_cache=False, logits_to_keep=1)
        finally:
            watch.remove()
            handle.remove()
        return watch.times[0]

    rows = []
    for ratio in ratios:
        spec, official = f"fastv:k={k},ratio={ratio}", OfficialStyleFastV(k=k, ratio=ratio)
        runs = {
            "vtprune": lambda spec=spec: ours(spec),
            "official": lambda official=official: official.prefill(model, inputs, encoded)["llm_prefill_s"],
        }
        times = {name: [] for name in runs}
        peaks = {}
        for name, fn in runs.items():
            fn()  # warm up
            with PeakMemory() as memory:
                fn()
            peaks[name] = memory.peak
        for _ in range(repeats):
            for name, fn in runs.items():
                times[name].append(fn())
        row = {"k": k, "ratio": ratio}
        for name in runs:
            row[f"{name}_llm_prefill_s_median"] = statistics.median(times[name])
            row[f"{name}_llm_prefill_s_min"] = min(times[name])
            row[f"{name}_llm_peak_memory_bytes"] = peaks[name]
        rows.append(row)
        print(f"  fastv head-to-head R={ratio} done", flush=True)
    return rows


def time_visionzip(
    model, inputs, base_llm_prefill_s: float, repeats: int = 5, dominant: int = 54, contextual: int = 10
) -> dict:
    """VisionZip's own cost on the tensors of a real prefill, and the tower it needs.

    merge: the [CLS] row and the keys from the captured q/k, the dominant / contextual merge
    (54 + 10) and the projection of the 64 tokens, then the sequence cut, as % of the unpruned LLM
    prefill. tower: the vision tower as vtprune runs it (SDPA, q/k / hidden-state hooks) against the
    official-style tower (eager attention, ``output_attentions`` and ``output_hidden_states`` on every
    layer, as ``CLIPVisionTower_VisionZip.forward`` calls it); both followed by nothing else.
    """
    from vtprune.engine.pre_llm import merged_selection
    from vtprune.engine.probe import head_mean_keys
    from vtprune.methods.visionzip import visionzip_tokens
    from vtprune.types import MergedTokens

    adapter = LlavaAdapter(model)
    attention, layer = adapter.vision_attention("feature"), adapter.feature_layer()
    captured = {}
    hooks = [
        attention.q_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("q", out)),
        attention.k_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("k", out)),
        layer.register_forward_hook(
            lambda m, a, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out)
        ),
    ]
    with torch.no_grad():
        model.model.get_image_features(pixel_values=inputs["pixel_values"])
    for hook in hooks:
        hook.remove()
    image_mask = inputs["input_ids"] == IMAGE_TOKEN_ID
    num_tokens = int(image_mask.sum())
    embeds = torch.randn(1, image_mask.shape[1], model.config.text_config.hidden_size, dtype=model.dtype)
    projector = model.model.multi_modal_projector

    def merge():
        with torch.no_grad():
            cls = cls_attention_row(captured["q"], captured["k"], attention.num_heads, attention.scale)[:, 1:]
            keys = head_mean_keys(captured["q"], captured["k"], attention.num_heads, attention.scale)[:, 1:]
            tokens, sources, _ = visionzip_tokens(cls, keys, captured["h"], dominant, contextual)
            selection = merged_selection(MergedTokens(projector(tokens), sources[:, 1:]), num_tokens)
            plan = plan_cut((~image_mask).masked_scatter(image_mask, selection.keep))
            return plan.gather(embeds)

    def median_seconds(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = clock()
            fn()
            times.append(clock() - start)
        return statistics.median(times)

    tower = model.model.vision_tower
    pixels = inputs["pixel_values"]

    def vtprune_tower():
        with torch.no_grad():
            model.model.get_image_features(pixel_values=pixels)

    def official_tower():
        with torch.no_grad():
            tower(pixels, output_attentions=True, output_hidden_states=True)

    merge_s = median_seconds(merge)
    with vtprune.patched(model, "visionzip", dominant=dominant, contextual=contextual):
        ours = median_seconds(vtprune_tower)
    implementation = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        official = median_seconds(official_tower)
    finally:
        tower.config._attn_implementation = implementation
    return {
        "merge_s": merge_s,
        "merge_pct_of_unpruned_llm_prefill": 100 * merge_s / base_llm_prefill_s,
        "vtprune_tower_s": ours,
        "official_style_tower_s": official,
    }


def run(repeats: int, text_tokens: int, device: str) -> dict:
    PeakMemory.prepare()
    torch.manual_seed(0)
    model = build_llava(llava15_shaped_config("realistic")).to(device)
    inputs = benchmark_inputs(model, text_tokens, device)
    rows = time_configs(model, inputs, CONFIGS, repeats)
    measure_memory(model, inputs, CONFIGS, rows)
    head_to_head = fastv_head_to_head(model, inputs, repeats=max(2 * repeats, 10))
    base = add_speedups(rows)
    scoring = time_scoring(model, inputs, keep_ratio=0.25)
    scoring["overhead_pct_of_unpruned_llm_prefill"] = (
        100 * (scoring["score_select_s"] + scoring["cut_s"]) / base["llm_prefill_s"]
    )
    visionzip = time_visionzip(model, inputs, base["llm_prefill_s"], repeats=max(repeats, 3))
    return {
        "model": "LLaVA-1.5-shaped: CLIP ViT-L/14-336 (576 tokens) + Llama 24x1024 (~0.5B), random weights",
        "dtype": str(model.dtype),
        "attention": model.config.text_config._attn_implementation,
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "clock": next(name for name, fn in _CLOCKS.items() if fn is _clock["now"]),
        "prompt_tokens": inputs["input_ids"].shape[1],
        "repeats": repeats,
        "rows": rows,
        "fastv_head_to_head": head_to_head,
        "scoring": scoring,
        "visionzip": visionzip,
    }


def _run_lengths(counts: list[int]) -> str:
    """[620, 620, 332, ...] -> "620x2, 332x22"."""
    parts, start = [], 0
    for index in range(1, len(counts) + 1):
        if index == len(counts) or counts[index] != counts[start]:
            parts.append(f"{counts[start]}x{index - start}")
            start = index
    return ", ".join(parts)


def add_speedups(rows: list[dict]) -> dict:
    """Each row's FLOPs-ideal and measured LLM prefill speedup over the first row (the unpruned model),
    and measured / ideal (``efficiency``); returns the first row."""
    base = rows[0]
    for row in rows:
        row["flops_ideal_speedup"] = base["llm_flops"] / row["llm_flops"]
        row["measured_speedup"] = base["llm_prefill_s"] / row["llm_prefill_s"]
        row["efficiency"] = row["measured_speedup"] / row["flops_ideal_speedup"]
    return base


# the columns of every benchmark's speedup table
CONFIG = Column("config", lambda row: row["config"])
LLM_TFLOPS = Column("LLM TFLOPs", lambda row: f"{row['llm_flops'] / 1e12:.3f}")
LLM_PREFILL_MS = Column("LLM prefill ms", lambda row: f"{row['llm_prefill_s'] * 1e3:.0f}")
WHOLE_PREFILL_MS = Column("whole prefill ms", lambda row: f"{row['prefill_s'] * 1e3:.0f}")
SPEEDUPS = (
    Column("FLOPs-ideal speedup", lambda row: f"{row['flops_ideal_speedup']:.2f}x"),
    Column("measured speedup", lambda row: f"{row['measured_speedup']:.2f}x"),
    Column("measured / ideal", lambda row: f"{row['efficiency']:.2f}"),
)


def speedup_table(tokens_header: str) -> Table:
    """config, visual tokens, LLM TFLOPs, LLM and whole prefill ms, the speedups."""
    tokens = Column(tokens_header, lambda row: str(row["visual_tokens"]))
    return Table((CONFIG, tokens, LLM_TFLOPS, LLM_PREFILL_MS, WHOLE_PREFILL_MS, *SPEEDUPS))


def _megabytes(value, digits: int = 0, missing: str = "n/a") -> str:
    return missing if value is None else f"{value / 2**20:.{digits}f}"


MEMORY_TABLE = Table(
    (
        CONFIG,
        Column("tokens per decoder layer", lambda row: _run_lengths(row["layer_tokens"])),
        Column(
            "KV cache MB (record / measured)",
            lambda row: (
                f"{_megabytes(row['kv_cache_bytes'], 1)} / "
                f"{_megabytes(row.get('kv_cache_bytes_measured'), 1, 'n/a (no cache)')}"
            ),
        ),
        Column("peak memory of a prefill MB", lambda row: _megabytes(row.get("peak_memory_bytes"))),
    )
)


def _median_min(row: dict, who: str) -> str:
    return f"{row[f'{who}_llm_prefill_s_median'] * 1e3:.0f} ({row[f'{who}_llm_prefill_s_min'] * 1e3:.0f})"


def _faster_by(row: dict) -> str:
    median = row["official_llm_prefill_s_median"] / row["vtprune_llm_prefill_s_median"]
    low = row["official_llm_prefill_s_min"] / row["vtprune_llm_prefill_s_min"]
    return f"{median:.2f}x / {low:.2f}x"


HEAD_TO_HEAD_TABLE = Table(
    (
        Column("R", lambda row: str(row["ratio"])),
        Column("vtprune ms", lambda row: _median_min(row, "vtprune")),
        Column("official-style ms", lambda row: _median_min(row, "official")),
        Column("vtprune faster by (median / min)", _faster_by),
        Column("peak MB vtprune", lambda row: _megabytes(row["vtprune_llm_peak_memory_bytes"])),
        Column("peak MB official-style", lambda row: _megabytes(row["official_llm_peak_memory_bytes"])),
    )
)


def format_table(result: dict) -> str:
    lines = [
        speedup_table("visual tokens").markdown(result["rows"]),
        "",
        MEMORY_TABLE.markdown(result["rows"]),
        "",
        "FastV k=2, LLM prefill on the same image features: vtprune (SDPA, attention-row probe) against the "
        "official-style run (eager LLM, full attention map of layer k-1), median (min) of alternating runs:",
        "",
        HEAD_TO_HEAD_TABLE.markdown(result["fastv_head_to_head"]),
    ]
    scoring = result["scoring"]
    lines.append(
        f"\nScoring + selection (keep 0.25): {scoring['score_select_s'] * 1e3:.2f} ms, sequence cut "
        f"{scoring['cut_s'] * 1e3:.2f} ms = {scoring['overhead_pct_of_unpruned_llm_prefill']:.2f}% of the "
        "unpruned LLM prefill."
    )
    zip_ = result["visionzip"]
    lines.append(
        f"VisionZip 54+10: [CLS] row, keys, merge, projection and cut {zip_['merge_s'] * 1e3:.2f} ms = "
        f"{zip_['merge_pct_of_unpruned_llm_prefill']:.2f}% of the unpruned LLM prefill; vision tower "
        f"{zip_['vtprune_tower_s'] * 1e3:.0f} ms (vtprune: SDPA + hooks) vs "
        f"{zip_['official_style_tower_s'] * 1e3:.0f} ms (official-style: eager, output_attentions) = "
        f"{zip_['official_style_tower_s'] / zip_['vtprune_tower_s']:.2f}x."
    )
    return "\n".join(lines)


def run_cli(argv, prog: str, description: str, run, format_table, default_repeats: int) -> int:
    """The command line shared by the benchmarks: parse, set threads and clock, run, print, save."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--repeats", type=int, default=default_repeats, help="timed runs per configuration (median)")
    parser.add_argument("--text-tokens", type=int, default=40, help="text tokens around the image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=sorted(_CLOCKS),
        default="wall",
        help="wall time, or process CPU time (robust on a shared machine; use with --threads 1 on CPU)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _clock["now"] = _CLOCKS[args.clock]
    print(
        f"{prog} on {args.device} ({torch.get_num_threads()} threads, {args.clock} clock), {args.repeats} repeats",
        flush=True,
    )
    result = run(args.repeats, args.text_tokens, args.device)
    result["clock"] = args.clock
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


CASES = {"--anyres": "vtprune.evals.bench.anyres", "--video": "vtprune.evals.bench.video"}


def main(argv=None) -> int:
    """``vtprune bench [--anyres | --video] ...``: the LLaVA-1.5 case, or another case's module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag, module in CASES.items():
        if flag in argv:
            argv.remove(flag)
            return importlib.import_module(module).main(argv)
    description = f"{__doc__.splitlines()[0]} Other cases: {', '.join(CASES)} (e.g. vtprune bench --video --help)."
    return run_cli(argv, "vtprune bench", description, run, format_table, default_repeats=5)


if __name__ == "__main__":
    raise SystemExit(main())
