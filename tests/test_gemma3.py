"""Gemma 3 (transformers 5.24): pruned runs against the unpatched model fed hand-pruned sequences.

References are built here from the model's own parts: the merged embeddings (``embed_tokens`` +
``get_image_features`` scattered at the image placeholders), the family's mask rule on the
hand-pruned sequence (``token_type_ids`` cut like it: bidirectional image blocks, sliding
windows), eager SigLIP attention maps for the scores, and a layer-by-layer decoder run for the
in-LLM cuts.
"""

from __future__ import annotations

import pytest
import torch
from helpers import left_pad

import vtprune
from vtprune.evals.models.transformers_vlms import BOI_TOKEN_ID, EOI_TOKEN_ID, IMAGE_TOKEN_ID, tiny_gemma3

TOKENS = 16  # tokens per image of the tiny model (4 x 4, pooled from 16 x 16 patches)


def model(attn="sdpa"):
    return tiny_gemma3(seed=2, attn_implementation=attn)


def prompt(text_lengths, seed=0) -> torch.Tensor:
    """Text runs with an image block (<start_of_image> 16 x <image> <end_of_image>) between each two."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for index, length in enumerate(text_lengths):
        parts.append(torch.randint(8, 128, (length,), generator=generator))
        if index < len(text_lengths) - 1:
            parts += [torch.tensor([BOI_TOKEN_ID]), torch.full((TOKENS,), IMAGE_TOKEN_ID), torch.tensor([EOI_TOKEN_ID])]
    return torch.cat(parts)


def batch(prompts, seed=0) -> dict:
    """A left-padded batch with the processor's token types and generate's positions."""
    ids, mask = left_pad(prompts)
    images = int((ids == IMAGE_TOKEN_ID).sum()) // TOKENS
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": (ids == IMAGE_TOKEN_ID).long(),
        "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0),
        "pixel_values": torch.randn(images, 3, 64, 64, generator=torch.Generator().manual_seed(seed)),
    }


TWO = [prompt([3, 2, 4], seed=1), prompt([5, 3], seed=2)]  # two images, then one image


def merged(m, kw):
    """The unpatched model's merged inputs_embeds (B, L, D)."""
    with torch.no_grad():
        embeds = m.get_input_embeddings()(kw["input_ids"])
        features = m.model.get_image_features(kw["pixel_values"]).pooler_output
    visual = kw["input_ids"] == IMAGE_TOKEN_ID
    return embeds.masked_scatter(visual[..., None], features.reshape(-1, embeds.shape[-1]))


def hand_pruned_logits(m, kw, kept: list[torch.Tensor], mode: str, token_types=True) -> list[torch.Tensor]:
    """Per row: the unpatched model on that row's real text + kept image columns (batch of 1)."""
    embeds = merged(m, kw)
    rows = []
    for row, row_kept in enumerate(kept):
        real = kw["attention_mask"][row].bool()
        visual = kw["input_ids"][row] == IMAGE_TOKEN_ID
        keep = real & ~visual
        keep[visual.nonzero().flatten()[row_kept]] = True
        columns = keep.nonzero().flatten()
        positions = kw["position_ids"][row, columns] if mode == "original" else torch.arange(columns.numel())
        with torch.no_grad():
            out = m(
                inputs_embeds=embeds[row : row + 1, columns],
                attention_mask=torch.ones(1, columns.numel(), dtype=torch.long),
                position_ids=positions[None],
                token_type_ids=visual[columns].long()[None] if token_types else None,
            )
        rows.append(out.logits[0])
    return rows


@pytest.mark.parametrize("mode", ["compact", "original"])
@pytest.mark.parametrize(
    "spec", ["fopru:keep_ratio=0.5", "random:keep_tokens=5", "fastervlm:keep_tokens=3,score=received"]
)
def test_pre_llm_cut_equals_the_unpatched_model_on_the_hand_pruned_sequence(spec, mode):
    m = model()
    kw = batch(TWO, seed=3)
    with vtprune.patched(m, f"{spec},positions={mode}") as handle, torch.no_grad():
        logits = m(**kw).logits
        kept = handle.last.stages[0].kept
    assert handle.last.visual_tokens_kept < handle.last.visual_tokens_in
    expected = hand_pruned_logits(m, kw, kept, mode)
    causal = hand_pruned_logits(m, kw, kept, mode, token_types=False)
    for row, (reference, plain) in enumerate(zip(expected, causal, strict=True)):
        got = logits[row, -reference.shape[0] :]  # left padding: the real columns end the row
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5, msg=f"row {row}")
        assert not torch.allclose(got, plain, atol=1e-3), "the image blocks must attend bidirectionally"


def test_pruned_generate_equals_the_unpatched_generate_on_the_hand_pruned_sequence():
    m = model()
    kw = batch(TWO[:1], seed=4)
    with vtprune.patched(m, "fopru:keep_tokens=6") as handle, torch.no_grad():
        tokens = m.generate(**kw, max_new_tokens=4, do_sample=False)[:, kw["input_ids"].shape[1] :]
        kept = handle.last.stages[0].kept[0]
    embeds = merged(m, kw)
    visual = kw["input_ids"][0] == IMAGE_TOKEN_ID
    keep = ~visual
    keep[visual.nonzero().flatten()[kept]] = True
    expected, cache = [], None
    step = {"inputs_embeds": embeds[:, keep], "token_type_ids": visual[keep].long()[None]}  # the prefill
    with torch.no_grad():
        for _ in range(4):  # greedy with a cache; decode steps carry no token types, as generate's
            length = (cache.get_seq_length() if cache is not None else 0) + next(iter(step.values())).shape[1]
            out = m(**step, attention_mask=torch.ones(1, length, dtype=torch.long), cache=cache, use_cache=True)
            cache = out.cache
            expected.append(out.logits[:, -1].argmax(-1, keepdim=True))
            step = {"input_ids": expected[-1]}
    expected = torch.cat(expected, dim=1)
    assert torch.equal(tokens, expected)


def patch_scores(m, pixel_values) -> torch.Tensor:
    """FoPru's significance the plain way: the eager attention map of the tower's last layer, mean over
    heads and queries, then each LLM token's 4 x 4 block of patches averaged by hand."""
    twin = model("eager")
    twin.load_state_dict(m.state_dict())
    with torch.no_grad():
        attention = twin.model.vision_tower(pixel_values, output_attentions=True).attentions[-1]
    received = attention.float().mean(dim=(1, 2))  # (n, 256): heads, then queries
    blocks = received.view(-1, 4, 4, 4, 4)  # (n, token row, patch row in block, token column, patch column)
    return blocks.mean(dim=(2, 4)).flatten(1)  # (n, 16)


def test_scores_are_the_mean_of_each_tokens_patches():
    m = model()
    kw = batch(TWO[:1], seed=5)
    with vtprune.patched(m, "fopru:keep_tokens=5") as handle, torch.no_grad():
        m(**kw)
    expected = patch_scores(m, kw["pixel_values"]).topk(5).indices.sort().values
    kept = handle.last.stages[0].kept[0].view(2, 5) - torch.tensor([[0], [TOKENS]])
    assert torch.equal(kept, expected)


def layerwise_logits(m, kw, cuts, tokens=()) -> torch.Tensor:
    """The unpatched decoder run one layer at a time on one sample and ``tokens`` generated after it, no
    cache; cuts: {layer: (kept original visual indices, positions mode)}, layer 0 = before the LLM. Every
    layer gets Gemma 3's masks of the columns it sees (image blocks of the kept image columns) and the
    rotary of its layer type; a cut's kept columns keep their positions ("original") or are renumbered
    ("compact"), the generated tokens following the prompt in that numbering."""
    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model,
        get_block_sequence_ids_for_mask,
    )

    lm = m.model.language_model
    with torch.no_grad():
        generated = m.get_input_embeddings()(torch.tensor([list(tokens)], dtype=torch.long))
    hidden = torch.cat([merged(m, kw), generated], dim=1)
    visual = torch.cat([kw["input_ids"][0] == IMAGE_TOKEN_ID, torch.zeros(len(tokens), dtype=torch.bool)])
    index = torch.where(visual, visual.long().cumsum(0) - 1, -1)
    positions = torch.arange(hidden.shape[1])[None]
    with torch.no_grad():
        for number, layer in enumerate(lm.layers):
            if number in cuts:
                kept, mode = cuts[number]
                keep = (index < 0) | torch.isin(index, kept)
                hidden, index = hidden[:, keep], index[keep]
                positions = positions[:, keep] if mode == "original" else torch.arange(hidden.shape[1])[None]
            length = hidden.shape[1]
            masks = create_masks_for_vision_model(
                config=lm.config,
                inputs_embeds=hidden,
                attention_mask=torch.ones(1, length, dtype=torch.long),
                cache=None,
                position_ids=positions,
                block_sequence_ids=get_block_sequence_ids_for_mask((index >= 0).long()[None]),
            )
            kind = lm.config.layer_types[number]
            hidden = layer(
                hidden,
                attention_mask=masks[kind],
                position_embeddings=lm.rotary_emb(hidden, positions, kind),
                position_ids=positions,
            )
        return m.lm_head(lm.norm(hidden))[0]


@pytest.mark.parametrize("spec", ["fastv:k=1,ratio=0.5", "pdrop:layers=1;2,lam=0.5", "random:keep_tokens=8+fastv:k=2"])
def test_in_llm_cuts_equal_a_layerwise_reference_with_rebuilt_image_blocks(spec):
    m = model()
    kw = batch(TWO[:1], seed=6)
    del kw["position_ids"]  # one sample: the model's own arange
    with vtprune.patched(m, spec) as handle, torch.no_grad():
        logits = m(**kw).logits[0]
        record = handle.last
    assert record.visual_tokens_kept[0] < record.visual_tokens_in[0]
    modes = [method.config.positions for method in handle.methods]
    modes = modes[:1] * (len(record.stages) - len(modes) + 1) + modes[1:]  # pdrop: one method, several cuts
    cuts = {max(stage.layer, 0): (stage.kept[0], mode) for stage, mode in zip(record.stages, modes, strict=True)}
    torch.testing.assert_close(logits, layerwise_logits(m, kw, cuts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["compact", "original"])
def test_in_llm_cuts_decode_as_the_layerwise_reference(mode):
    """Greedy generate on the pruned caches (sliding layers hold a window of the cut sequence) = the
    layerwise reference re-run on the prompt and the tokens so far, with the prefill's kept sets."""
    m = model()
    kw = batch(TWO[:1], seed=7)
    del kw["position_ids"]
    with vtprune.patched(m, f"fastv:k=1,ratio=0.5,positions={mode}") as handle, torch.no_grad():
        generated = m.generate(**kw, max_new_tokens=4, do_sample=False)[0, kw["input_ids"].shape[1] :].tolist()
        cuts = {stage.layer: (stage.kept[0], mode) for stage in handle.last.stages}
    tokens = []
    for _ in range(4):
        tokens.append(int(layerwise_logits(m, kw, cuts, tokens)[-1].argmax()))
    assert generated == tokens


def test_refusals_name_why():
    m = model()
    for method, options, reason in [
        ("fastervlm", {"keep_ratio": 0.5}, "no \\[CLS\\] token"),
        ("hired", {"budget_ratio": 0.5}, "no \\[CLS\\] token"),
        ("globalcom2", {"keep_ratio": 0.5}, "no \\[CLS\\] token"),
        ("quota", {"scorer": lambda frames, query: torch.ones(len(frames)), "query": "q"}, "resizes frames"),
    ]:
        with pytest.raises(ValueError, match=reason):
            vtprune.patch(m, method, **options)
    assert vtprune.get_handle(m) is None


def test_lmms_eval_runs_vtprune_on_the_gemma3_base_end_to_end(tmp_path):
    """``--model vtprune --model_args base=gemma3,...`` (lmms-eval's own Gemma 3 class, its processor's
    chat template and token types) on a tiny saved model that always answers "red"."""
    import json

    from eval_helpers import answer_always, run_lmms_eval

    from vtprune.evals.models.processors import build_gemma3_processor
    from vtprune.evals.tasks import shapes
    from vtprune.evals.tasks.make_task import make_builtin_task

    limit = 4
    processor = build_gemma3_processor(shapes.corpus())
    saved = tiny_gemma3(vocab=len(processor.tokenizer))
    answer_always(saved, processor.tokenizer, "red")
    saved.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    saved.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    task_dir = make_builtin_task("vtprune_shapes", tmp_path / "tasks", n=limit)
    stats = tmp_path / "stats.json"
    model_args = f"base=gemma3,pretrained={tmp_path / 'model'},device=cpu,method=fopru,keep_tokens=5,stats_path={stats}"
    result = run_lmms_eval(
        ["--model", "vtprune", "--model_args", model_args, "--tasks", "vtprune_shapes", "--limit", str(limit)]
        + ["--include_path", str(task_dir.parent), "--output_path", str(tmp_path / "out"), "--log_samples"],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    (samples_file,) = (tmp_path / "out").rglob("*_samples_vtprune_shapes.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert [s["filtered_resps"] for s in samples] == ["red"] * limit
    payload = json.loads(stats.read_text())
    assert len(payload["samples"]) == limit
    for sample in payload["samples"]:
        assert (sample["visual_tokens_in"], sample["visual_tokens_kept"]) == (TOKENS, 5)
        assert sample["flops_after"] < sample["flops_before"]
