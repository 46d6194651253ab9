"""Fast offline evaluation of the reference model on ShapesVQA, with or without pruning.

    python -m vtprune.evals.reference.evaluate                      # every method x keep 0.5/0.25/0.1
    python -m vtprune.evals.reference.evaluate --methods fastervlm --ratios 0.1 --num 140

Answers are generated greedily (``generate``, up to 4 new tokens, stopping at ``</s>``) from the
processor's chat prompt, exactly as a user or lmms-eval would run the model, and scored by
exact match of the first word. Under a method the model is patched with
``vtprune.patch(model, method, **options)``; the visual tokens that reach the LLM are read
from ``handle.last`` and the LLM prefill time is measured around the language model's forward
on the prompt (the pass that pruning shortens).

A keep ratio r becomes each method's own budget option (:func:`budget_options`): ``keep_ratio``
for the methods that prune before the LLM; for the in-LLM methods, FastV's ``keep_tokens`` =
round(r x N) (layers k.. see as many tokens as a pre-LLM method keeps) and PyramidDrop's
lambda with int(N x lambda^s) = round(r x N) at its last cut. In-LLM methods still run their
first layers on all N tokens, so rows also give the visual tokens per LLM layer (mean over
layers), which is what compute follows. Methods the model cannot run (hired and globalcom2 are
AnyRes-only; quota runs on LLaVA-OneVision and Qwen2-VL) are listed as not applicable, with the
reason.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

import vtprune
from vtprune.config import build_methods, parse_spec
from vtprune.evals.reference import shapes_vqa
from vtprune.evals.sweep.plots import plot_vs_tokens
from vtprune.evals.sweep.report import Column, Table

REFERENCE_DIR = Path(__file__).resolve().parent / "checkpoint"
TEST_SLICE = 140  # records 0..139 of the test split (20 of each kind): the fast check of the tests
RATIOS = (0.5, 0.25, 0.1)  # keep 1.0 is the unpruned model, which every sweep runs first
LOCATION_KINDS = ("colour_at", "shape_at")  # "what colour is the object at the top left ?"
# Why a registered method cannot run on the reference model (a single-resolution LLaVA on images);
# the sweep lists such a method once, with this reason, when vtprune.patch refuses it.
_ANYRES_ONLY = "AnyRes only: splits one budget across the crops of a high-resolution image; this model sees one image"
NOT_APPLICABLE = {
    "hired": _ANYRES_ONLY,
    "globalcom2": _ANYRES_ONLY,
    "quota": "LLaVA-OneVision and Qwen2-VL only: resizes frames (video frames, or images as frames)",
}


def load_reference_model(path: str | Path = REFERENCE_DIR):
    """The committed reference checkpoint: ``(LlavaForConditionalGeneration, LlavaProcessor)``, fp32, eval."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def chat_prompt(processor, question: str) -> str:
    """``USER: <image>\\n{question} ASSISTANT:`` from the processor's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def normalize_answer(text: str) -> str:
    """The first word of a generated answer, lower-cased."""
    words = text.strip().lower().split()
    return words[0] if words else ""


class PrefillTimer:
    """Wall time of the language model's forwards over more than one token (the prefills)."""

    def __init__(self, language_model):
        self.seconds = 0.0
        self._start = None
        self._hooks = [
            language_model.register_forward_pre_hook(self._begin, with_kwargs=True, prepend=True),
            language_model.register_forward_hook(self._end, with_kwargs=True),
        ]

    def _begin(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        self._start = time.perf_counter() if embeds is not None and embeds.shape[1] > 1 else None

    def _end(self, module, args, kwargs, output):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def visual_tokens_per_layer(record) -> list[float]:
    """Per sample of a vtprune ``PruneRecord``: the visual tokens each LLM layer processed, mean over layers.

    A layer's visual tokens are its real tokens (``layer_tokens``) less the prompt's text tokens
    (the real prompt length before pruning less the visual tokens in), which no method removes.
    """
    before, _ = record.sequence_lengths
    means = []
    for length, visual_in, layers in zip(before, record.visual_tokens_in, record.layer_tokens, strict=True):
        text = length - visual_in
        means.append(sum(n - text for n in layers) / len(layers))
    return means


@torch.no_grad()
def generate_answers(model, processor, records: list[dict], batch_size: int = 32, handle=None) -> dict:
    """Greedy answers for ``records``; the visual tokens kept and the visual tokens per LLM layer per sample.

    With a vtprune ``handle`` the token counts come from ``handle.last``; unpatched, every layer
    sees all of the prompt's image tokens.
    """
    answers, kept, per_layer = [], [], []
    timer = PrefillTimer(model.model.language_model)
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            inputs = processor(
                images=[r["image"] for r in chunk],
                text=[chat_prompt(processor, r["question"]) for r in chunk],
                return_tensors="pt",
                padding=True,
            )
            output = model.generate(**inputs, do_sample=False, max_new_tokens=4)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers += [normalize_answer(t) for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]
            if handle is not None:
                kept += handle.last.visual_tokens_kept
                per_layer += visual_tokens_per_layer(handle.last)
            else:
                counts = [int(n) for n in (inputs["input_ids"] == model.config.image_token_id).sum(1)]
                kept += counts
                per_layer += [float(n) for n in counts]
    finally:
        timer.remove()
    return {
        "answers": answers,
        "visual_tokens_kept": kept,
        "visual_tokens_per_layer": per_layer,
        "prefill_seconds": timer.seconds,
    }


def score(records: list[dict], answers: list[str]) -> dict:
    """Exact-match accuracy: overall, per question kind, and on the location questions (None if none)."""
    per_kind = defaultdict(list)
    for record, answer in zip(records, answers, strict=True):
        per_kind[record.get("kind", "all")].append(answer == record["answer"])
    correct = [c for values in per_kind.values() for c in values]
    location = [c for kind in LOCATION_KINDS for c in per_kind.get(kind, [])]
    return {
        "accuracy": sum(correct) / len(correct),
        "per_kind": {kind: sum(v) / len(v) for kind, v in sorted(per_kind.items())},
        "location_accuracy": sum(location) / len(location) if location else None,
    }


def evaluate(model, processor, records: list[dict], method: str | None = None, batch_size: int = 32, **options):
    """Accuracy of ``model`` on ``records``, unpatched (``method=None``) or under ``vtprune.patch``.

    Returns ``{"method", "options", "accuracy", "per_kind", "location_accuracy",
    "visual_tokens_kept" (mean per sample, after the last pruning stage), "visual_tokens_per_layer"
    (mean per sample and LLM layer), "prefill_ms" (LLM prefill per sample), "seconds", "num_samples"}``.
    """
    start = time.perf_counter()
    if method is None:
        result = generate_answers(model, processor, records, batch_size)
    else:
        with vtprune.patched(model, method, **options) as handle:
            result = generate_answers(model, processor, records, batch_size, handle=handle)
    return {
        "method": method or "full",
        "options": options,
        **score(records, result["answers"]),
        "visual_tokens_kept": sum(result["visual_tokens_kept"]) / len(records),
        "visual_tokens_per_layer": sum(result["visual_tokens_per_layer"]) / len(records),
        "prefill_ms": 1000 * result["prefill_seconds"] / len(records),
        "seconds": time.perf_counter() - start,
        "num_samples": len(records),
    }


# -- a keep ratio as each method's budget -----------------------------------------------------------
def tokens_per_image(model) -> int:
    """Visual tokens of one image on a single-resolution LLaVA: (image size / patch size)^2."""
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def keep_count(ratio: float, num_tokens: int) -> int:
    """round-half-up(ratio x N), the count ``keep_ratio`` keeps (576 x 0.1 -> 58, 144 x 0.25 -> 36)."""
    return math.floor(ratio * num_tokens + 0.5)


def budget_options(model, method: str, ratio: float, options: dict | None = None) -> dict:
    """The options that give ``method`` the keep ratio ``ratio`` on ``model``.

    - methods with ``keep_ratio`` (fastervlm, fopru, random, uniform, globalcom2, quota): it;
      hired: ``budget_ratio``; methods with only ``keep_tokens`` (prumerge_plus): round(r x N);
    - fastv: ``keep_tokens`` = round(r x N): layers k.. see the tokens a pre-LLM method keeps;
    - pdrop: lambda such that its last cut keeps round(r x N) (``int(N lambda^s)``, s = the
      number of cuts, from ``options["layers"]`` or the default depth fractions).

    ``options`` are the method's other options (a spec's), read for pdrop's cut layers.
    """
    num = tokens_per_image(model)
    kept = keep_count(ratio, num)
    if method == "fastv":
        return {"keep_tokens": kept}
    if method == "pdrop":
        config = build_methods(method, dict(options or {}))[0].config
        cuts = len(config.resolve_layers(model.config.text_config.num_hidden_layers))
        # floor(N * lam^cuts) = kept: aim half a token above, rounded to 6 decimals (off by < 0.01 token)
        return {"lam": min(1.0, round(((kept + 0.5) / num) ** (1.0 / cuts), 6))}
    names = vtprune.methods()[method]["options"]
    if "keep_ratio" in names:
        return {"keep_ratio": ratio}
    if "budget_ratio" in names:
        return {"budget_ratio": ratio}
    if "keep_tokens" in names:  # a token count only (prumerge_plus): round(r x N)
        return {"keep_tokens": kept}
    raise ValueError(f"no keep-ratio budget for method {method!r}; its options: {', '.join(names)}")


def _parse_method(spec: str) -> tuple[str, dict]:
    """``"fastervlm:positions=original"`` -> ``("fastervlm", {"positions": "original"})``."""
    stages = parse_spec(spec)
    if len(stages) != 1:
        raise ValueError(f"one method per sweep entry, got {spec!r}")
    return stages[0]


def _label(method: str, options: dict) -> str:
    return " ".join([method, *(f"{k}={v}" for k, v in options.items())])


def not_applicable(model, method: str, options: dict) -> str | None:
    """Why ``vtprune.patch(model, method, **options)`` is refused at patch time, or None if it applies."""
    try:
        vtprune.patch(model, method, **options).remove()
    except (ValueError, TypeError) as error:
        return NOT_APPLICABLE.get(method, str(error))
    return None


def sweep(
    model,
    processor,
    records,
    methods=None,
    ratios=RATIOS,
    batch_size: int = 32,
    log=print,
    original_positions: bool = False,
    formatter=None,
) -> list[dict]:
    """``full`` plus every method (default: all registered) at every keep ratio.

    ``methods`` are names or one-method specs (``"fastervlm:positions=original"``); each keep ratio
    becomes the method's budget through :func:`budget_options`. ``original_positions`` adds, for
    each method whose positions are compact, the same method with ``positions=original``. A
    method that ``vtprune.patch`` refuses on this model gives one ``not_applicable`` row (with the
    reason); an error while evaluating gives an ``error`` row. Rows carry ``label`` (the method and
    its spec options) and ``keep_ratio``. Each row is passed to ``log`` as it comes, formatted by
    ``formatter`` (default: a Markdown row of :data:`REFERENCE_TABLE`).
    """
    formatter = formatter or REFERENCE_TABLE.markdown_row
    rows = [{**evaluate(model, processor, records, batch_size=batch_size), "label": "full", "keep_ratio": 1.0}]
    log(formatter(rows[-1]))
    for spec in methods or list(vtprune.methods()):
        method, spec_options = _parse_method(spec)
        variants = [spec_options]
        if original_positions:
            positions = spec_options.get("positions", vtprune.methods()[method]["options"].get("positions"))
            if positions != "original":
                variants.append({**spec_options, "positions": "original"})
        for variant in variants:
            label = _label(method, variant)
            reason = None
            for ratio in ratios:
                budget = budget_options(model, method, ratio, variant)
                options = {**budget, **variant}
                reason = not_applicable(model, method, options)
                if reason is not None:
                    rows.append({"method": method, "label": method, "options": variant, "not_applicable": reason})
                    log(formatter(rows[-1]))
                    break
                try:
                    row = evaluate(model, processor, records, method, batch_size, **options)
                    rows.append({**row, "label": label, "keep_ratio": ratio, "budget": budget})
                except Exception as error:  # a failure while running: say so in the table
                    rows.append({"method": method, "label": label, "options": options, "keep_ratio": ratio})
                    rows[-1]["error"] = repr(error)
                log(formatter(rows[-1]))
            if reason is not None:
                break
    return rows


def cell_label(row: dict) -> str:
    return row.get("label", row["method"])


def cell_percent(key: str):
    """A fraction as a percentage with one decimal, empty where the row has none."""
    return lambda row: "" if row.get(key) is None else f"{100 * row[key]:.1f}"


def cell_tokens(key: str):
    return lambda row: f"{row.get(key, row['visual_tokens_kept']):.1f}"


def cell_prefill(row: dict) -> str:
    return f"{row['prefill_ms']:.2f}"


def _cell_ratio(row: dict) -> str:
    return "" if "not_applicable" in row else str(row.get("keep_ratio", row["options"].get("keep_ratio", 1.0)))


# method, budget options, keep ratio, accuracy (%), location-question accuracy (%), visual tokens kept
# (after the last stage), visual tokens per LLM layer (mean), LLM prefill ms/sample
REFERENCE_TABLE = Table(
    (
        Column("method", cell_label),
        Column("budget", lambda row: ", ".join(f"{k}={v}" for k, v in row.get("budget", {}).items())),
        Column("keep ratio", _cell_ratio),
        Column("accuracy (%)", cell_percent("accuracy")),
        Column("location questions (%)", cell_percent("location_accuracy")),
        Column("visual tokens kept", cell_tokens("visual_tokens_kept")),
        Column("visual tokens per LLM layer", cell_tokens("visual_tokens_per_layer")),
        Column("LLM prefill (ms/sample)", cell_prefill),
    ),
    message_at=3,
)


def plot(rows: list[dict], path: str | Path) -> None:
    """Accuracy vs visual tokens per LLM layer (mean), one line per method and spec, the unpruned model as a star.

    For methods that prune before the LLM this is the visual tokens kept; for in-LLM methods
    (dashed) it counts their first layers, which still see every token.
    """
    plot_vs_tokens(
        rows,
        path,
        y="accuracy",
        scale=100,
        ylabel="ShapesVQA test accuracy (%)",
        x="visual_tokens_per_layer",
        xlabel="visual tokens per LLM layer (mean; pre-LLM methods: the tokens kept)",
        line="label",
        baseline="full",
        log_x=True,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REFERENCE_DIR), help="checkpoint folder")
    parser.add_argument("--split", default="test", choices=shapes_vqa.SPLITS)
    parser.add_argument("--num", type=int, default=1400, help="records 0..num-1 of the split")
    parser.add_argument(
        "--methods", nargs="*", default=None, help="names or specs (fastervlm:positions=original); default: all"
    )
    parser.add_argument("--ratios", nargs="*", type=float, default=list(RATIOS))
    parser.add_argument(
        "--original-positions",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run each method whose positions are compact with positions=original (default: yes)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--markdown", default=None, help="write the table here")
    parser.add_argument("--plot", default=None, help="write the accuracy-vs-tokens plot here (.png)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_reference_model(args.model)
    records = shapes_vqa.make_split(args.split, args.num)
    print(REFERENCE_TABLE.markdown_header())
    rows = sweep(
        model,
        processor,
        records,
        args.methods,
        args.ratios,
        args.batch_size,
        log=print,
        original_positions=args.original_positions,
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(REFERENCE_TABLE.markdown(rows) + "\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
