"""Fast offline evaluation of the reference model on ShapesVQA, with or without pruning.

    python -m vtprune.evals.reference_eval                      # every method x keep 1.0/0.5/0.25/0.1
    python -m vtprune.evals.reference_eval --methods fastervlm --ratios 0.1 --num 140

Answers are generated greedily (``generate``, up to 4 new tokens, stopping at ``</s>``) from the
processor's chat prompt, exactly as a user or lmms-eval would run the model, and scored by
exact match of the first word. Under a method the model is patched with
``vtprune.patch(model, method, keep_ratio=r)``; the visual tokens that reach the LLM are read
from ``handle.last`` and the LLM prefill time is measured around the language model's forward
on the prompt (the pass that pruning shortens).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

import vtprune
from vtprune.evals import shapes_vqa

REFERENCE_DIR = Path(__file__).resolve().parent / "assets" / "reference_model"
TEST_SLICE = 140  # records 0..139 of the test split (20 of each kind): the fast check of the tests
RATIOS = (1.0, 0.5, 0.25, 0.1)


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


@torch.no_grad()
def generate_answers(model, processor, records: list[dict], batch_size: int = 32, handle=None) -> dict:
    """Greedy answers for ``records``; with a vtprune ``handle``, also the visual tokens kept per sample."""
    answers, kept = [], []
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
            else:
                kept += [int(n) for n in (inputs["input_ids"] == model.config.image_token_id).sum(1)]
    finally:
        timer.remove()
    return {"answers": answers, "visual_tokens_kept": kept, "prefill_seconds": timer.seconds}


def score(records: list[dict], answers: list[str]) -> dict:
    """Exact-match accuracy, overall and per question kind."""
    per_kind = defaultdict(list)
    for record, answer in zip(records, answers, strict=True):
        per_kind[record.get("kind", "all")].append(answer == record["answer"])
    correct = [c for values in per_kind.values() for c in values]
    return {
        "accuracy": sum(correct) / len(correct),
        "per_kind": {kind: sum(v) / len(v) for kind, v in sorted(per_kind.items())},
    }


def evaluate(model, processor, records: list[dict], method: str | None = None, batch_size: int = 32, **options):
    """Accuracy of ``model`` on ``records``, unpatched (``method=None``) or under ``vtprune.patch``.

    Returns ``{"method", "options", "accuracy", "per_kind", "visual_tokens_kept" (mean per sample),
    "prefill_ms" (LLM prefill per sample), "num_samples"}``.
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
        "prefill_ms": 1000 * result["prefill_seconds"] / len(records),
        "seconds": time.perf_counter() - start,
        "num_samples": len(records),
    }


def sweep(model, processor, records, methods=None, ratios=RATIOS, batch_size: int = 32, log=print) -> list[dict]:
    """``full`` plus every method (default: all registered) at every keep ratio; errors are recorded."""
    rows = [evaluate(model, processor, records, batch_size=batch_size)]
    log(format_row(rows[-1]))
    for method in methods or list(vtprune.methods()):
        for ratio in ratios:
            try:
                rows.append(evaluate(model, processor, records, method, batch_size, keep_ratio=ratio))
            except Exception as error:  # a method this model cannot run: say so in the table
                rows.append({"method": method, "options": {"keep_ratio": ratio}, "error": repr(error)})
            log(format_row(rows[-1]))
    return rows


def format_row(row: dict) -> str:
    ratio = row["options"].get("keep_ratio", 1.0)
    if "error" in row:
        return f"| {row['method']} | {ratio} | error: {row['error']} | | |"
    return (
        f"| {row['method']} | {ratio} | {100 * row['accuracy']:.1f} | {row['visual_tokens_kept']:.1f} "
        f"| {row['prefill_ms']:.2f} |"
    )


def format_table(rows: list[dict]) -> str:
    """A Markdown table: method, keep ratio, accuracy (%), visual tokens kept, LLM prefill ms/sample."""
    header = "| method | keep ratio | accuracy (%) | visual tokens | LLM prefill (ms/sample) |\n|---|---|---|---|---|"
    return "\n".join([header, *(format_row(r) for r in rows)])


def plot(rows: list[dict], path: str | Path) -> None:
    """Accuracy vs visual tokens kept, one line per method, the unpruned model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_method = defaultdict(list)
    for row in rows:
        if "error" not in row:
            by_method[row["method"]].append((row["visual_tokens_kept"], 100 * row["accuracy"]))
    for method, points in sorted(by_method.items()):
        points.sort()
        if method == "full":
            ax.plot(*zip(*points), "k*", markersize=12, label="full (144 tokens)")
        else:
            ax.plot(*zip(*points), "o-", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens per image reaching the LLM")
    ax.set_ylabel("ShapesVQA test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REFERENCE_DIR), help="checkpoint folder")
    parser.add_argument("--split", default="test", choices=shapes_vqa.SPLITS)
    parser.add_argument("--num", type=int, default=1400, help="records 0..num-1 of the split")
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    parser.add_argument("--ratios", nargs="*", type=float, default=list(RATIOS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--plot", default=None, help="write the accuracy-vs-tokens plot here (.png)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_reference_model(args.model)
    records = shapes_vqa.make_split(args.split, args.num)
    print(format_table([]))
    rows = sweep(model, processor, records, args.methods, args.ratios, args.batch_size)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
