"""``make demo``: prune the ShapesVQA reference model with every method; accuracy, tokens and time.

The default demo loads the committed reference model (``evals/reference/checkpoint``: a
small LLaVA trained on ShapesVQA, 144 visual tokens per 96 x 96 image, 97.6 % on the held-out
test split) and evaluates it on a slice of that split, unpruned and under every method that
runs on a single-resolution LLaVA at keep ratios 0.5 / 0.25 / 0.1 (the in-LLM methods at
comparable budgets, see ``vtprune.evals.reference.evaluate.budget_options``). Per configuration it prints the
accuracy (and on the location questions), the visual tokens kept, the visual tokens per LLM
layer and the LLM prefill time per sample; methods the model cannot run are listed with the
reason. It writes ``accuracy_vs_tokens.png``, ``kept_patches.png`` (which patches each method
kept on one ShapesVQA image, and its answer) and ``results.json``.

``--speed`` runs the older speed demo instead: a LLaVA-1.5-shaped model (CLIP tower at 336 px
with 14 px patches, so 576 visual tokens, feature layer -2) with random weights and the bundled
sample image; for each method and keep ratio it prints the visual tokens kept, the LLM prefill
FLOPs and the measured prefill time, and writes a picture of the kept patches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import CLIPImageProcessor

import vtprune
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, build_llava, llava15_shaped_config
from vtprune.evals.reference import evaluate as reference_eval
from vtprune.evals.reference import shapes_vqa
from vtprune.evals.sample_image import load_sample
from vtprune.evals.sweep.kept_patches import kept_patch_overlay, panel
from vtprune.evals.sweep.report import Column, Table

METHODS = ("fastervlm", "uniform", "random")  # the speed demo's
KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)  # the speed demo's
DEMO_NUM = 280  # records 0..279 of the ShapesVQA test split (40 per question kind): 1-2 min on 2 cores
DEMO_RATIOS = (0.5, 0.25, 0.1)
PICTURE_RATIO = 0.25
PICTURE_SIZE = 224  # the 96 px image drawn at this size in kept_patches.png


def demo_methods() -> list[str]:
    """Every registered method, and FasterVLM again with ``positions=original`` (the positions finding)."""
    methods = []
    for name in vtprune.methods():
        methods.append(name)
        if name == "fastervlm":
            methods.append("fastervlm:positions=original")
    return methods


# the reference sweep's columns, laid out for the terminal
DEMO_TABLE = Table(
    (
        Column("method", reference_eval.cell_label, 29, "<"),
        Column("keep", lambda row: f"{row['keep_ratio']:.2f}" if "keep_ratio" in row else "", 5),
        Column("accuracy%", reference_eval.cell_percent("accuracy"), 9),
        Column("location%", reference_eval.cell_percent("location_accuracy"), 10),
        Column("kept", reference_eval.cell_tokens("visual_tokens_kept"), 7),
        Column("per layer", reference_eval.cell_tokens("visual_tokens_per_layer"), 10),
        Column("prefill ms", reference_eval.cell_prefill, 11),
    ),
    message_at=2,
)


def kept_patches_picture(model, processor, record: dict, rows: list[dict], ratio: float = PICTURE_RATIO):
    """One record's image, then per evaluated configuration at ``ratio``: the patches it kept and its answer.

    For in-LLM methods the picture shows the set the deepest layers see (their last stage).
    """
    grid = (shapes_vqa.IMAGE_SIZE // shapes_vqa.PATCH_SIZE,) * 2
    image = record["image"].resize((PICTURE_SIZE, PICTURE_SIZE), resample=0)  # nearest: the patches stay sharp
    prompt = reference_eval.chat_prompt(processor, record["question"])
    inputs = processor(images=[record["image"]], text=[prompt], return_tensors="pt")
    new = slice(inputs["input_ids"].shape[1], None)
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=4)
    answer = processor.decode(output[0, new], skip_special_tokens=True)
    pictures = [image]
    titles = [f"full ({grid[0] * grid[1]}): {reference_eval.normalize_answer(answer)}"]
    for row in rows:
        if row.get("keep_ratio") != ratio or "accuracy" not in row:
            continue
        with vtprune.patched(model, row["method"], **row["options"]) as handle, torch.no_grad():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=4)
            stage = handle.last.stages[-1]
        answer = reference_eval.normalize_answer(processor.decode(output[0, new], skip_special_tokens=True))
        merged = stage.merged[0] if stage.merged is not None else None  # merge methods: their groups
        pictures.append(kept_patch_overlay(image, stage.kept[0], grid, merged=merged))
        where = f", layer {stage.layer}+" if stage.layer >= 0 else ""
        label = row["label"].replace("positions=original", "pos=orig")
        titles.append(f"{label} ({stage.kept[0].numel()}{where}): {answer}")
    return panel(pictures, titles, columns=5)


def run(
    out_dir: Path,
    num: int = DEMO_NUM,
    methods=None,
    keep_ratios=DEMO_RATIOS,
    batch_size: int = 32,
    image_index: int = 0,
    log=print,
) -> list[dict]:
    """The reference-model demo; returns ``vtprune.evals.reference.evaluate.sweep``'s rows."""
    model, processor = reference_eval.load_reference_model()
    records = shapes_vqa.make_split("test", num)
    log(
        f"vtprune demo: ShapesVQA reference model ({reference_eval.tokens_per_image(model)} visual tokens per image, "
        f"{model.config.text_config.num_hidden_layers}-layer LLM), test records 0..{num - 1}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    log(DEMO_TABLE.text_header())
    rows = reference_eval.sweep(
        model,
        processor,
        records,
        demo_methods() if methods is None else methods,
        keep_ratios,
        batch_size,
        log=log,
        formatter=DEMO_TABLE.text_row,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    reference_eval.plot(rows, out_dir / "accuracy_vs_tokens.png")
    record = shapes_vqa.make_record("test", image_index)
    picture = kept_patches_picture(model, processor, record, rows)
    picture.save(out_dir / "kept_patches.png")
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    log(
        "accuracy: exact match of the first word; location: the 'what colour/shape is the object at the ...' "
        "questions; kept: visual tokens after the last pruning stage; per layer: visual tokens per LLM layer "
        "(mean; in-LLM methods run their first layers on all tokens); prefill: LLM forward on the prompts, "
        f"batches of {batch_size}, per sample"
    )
    log(f"kept patches on test record {image_index} ({record['question']} -> {record['answer']}), keep {PICTURE_RATIO}")
    log(f"wrote {out_dir / 'accuracy_vs_tokens.png'}, {out_dir / 'kept_patches.png'}, {out_dir / 'results.json'}")
    return rows


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


def run_speed(out_dir: Path, repeats: int = 3, methods=METHODS, keep_ratios=KEEP_RATIOS) -> list[dict]:
    """The speed demo: random-weights LLaVA-1.5-shaped model, one image; tokens, FLOPs, prefill time."""
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
                    stage = record.stages[0]
                    merged = stage.merged[0] if stage.merged is not None else None
                    overlays.append(kept_patch_overlay(image, stage.kept[0], layout_grid, merged=merged))
                    titles.append(f"{method} keep 0.25 ({row['visual_tokens']} tokens)")
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = out_dir / "kept_patches.png"
    panel(overlays, titles, columns=len(overlays)).save(picture)
    print(f"wrote {picture}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="vtprune demo", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the plot and pictures")
    parser.add_argument("--num", type=int, default=DEMO_NUM, help="ShapesVQA test records 0..num-1 (default 280)")
    parser.add_argument("--ratios", nargs="*", type=float, default=list(DEMO_RATIOS), help="keep ratios")
    parser.add_argument("--image-index", type=int, default=0, help="test record drawn in kept_patches.png")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--speed", action="store_true", help="run the random-weights LLaVA-1.5-shaped speed demo")
    parser.add_argument("--repeats", type=int, default=3, help="--speed: timed prefills per configuration (median)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.speed:
        print("vtprune speed demo: LLaVA-1.5-shaped model (random weights), 576 visual tokens, fp32, sdpa")
        run_speed(args.out, args.repeats)
    else:
        run(args.out, args.num, keep_ratios=tuple(args.ratios), image_index=args.image_index)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
