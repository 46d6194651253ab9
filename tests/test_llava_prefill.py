"""LLaVA-1.5 adapter with pre-LLM methods, against eager and hand-pruned references (the contracts every
family shares: tests/test_contracts.py)."""

import pytest
import torch
from helpers import clip_images, eager_cls_attention, left_pad, llava_prompt, prompt_ids, pruned_reference_logits

import vtprune
from vtprune.engine.flops import llm_prefill_flops
from vtprune.engine.stages import StageStack
from vtprune.evals.models.transformers_vlms import tiny_llava
from vtprune.methods.base import VisualLayout, top_k_sorted
from vtprune.methods.baselines import uniform_grid_indices

N = 16  # visual tokens per image of the tiny model (4 x 4 patches)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=1)


def greedy(model, **inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
def test_fastervlm_scores_and_kept_indices_match_eager_attention(strategy, feature_layer, monkeypatch):
    model = tiny_llava(seed=2, select_strategy=strategy, feature_layer=feature_layer)
    num_tokens = N + (strategy == "full")
    px = clip_images(3, seed=5)
    reference = eager_cls_attention(model, px)  # (3, num_tokens)
    encoded = []  # what each encoding hands the stage stack
    add_visual = StageStack.add_visual
    monkeypatch.setattr(StageStack, "add_visual", lambda self, kind, v: (encoded.append(v), add_visual(self, kind, v)))
    with vtprune.patched(model, "fastervlm", keep_tokens=5) as handle, torch.no_grad():
        model.model.get_image_features(pixel_values=px)
        ids = torch.cat([prompt_ids([2, 2, 2, 3], num_images=3, tokens_per_image=num_tokens)])[None]
        model(input_ids=ids, pixel_values=px)
    torch.testing.assert_close(encoded[0].scores["cls"], reference, rtol=1e-5, atol=1e-6)
    expected = top_k_sorted(reference, 5) + torch.arange(3)[:, None] * num_tokens
    assert torch.equal(handle.last.stages[0].kept[0], expected.flatten())


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_pruned_logits_equal_a_hand_pruned_sequence(model, positions):
    ids, px = llava_prompt((5, 7), num_images=2, seed=3), clip_images(2, seed=3)
    with vtprune.patched(model, "fastervlm", keep_tokens=6, positions=positions) as handle, torch.no_grad():
        logits = model(input_ids=ids, pixel_values=px).logits
    kept = handle.last.stages[0].kept[0]
    assert kept.numel() == 12 and handle.last.visual_tokens_kept == [12] and handle.last.visual_tokens_in == [32]
    assert (kept[:6] < N).all() and (kept[6:] >= N).all()
    reference = pruned_reference_logits(model, ids, px, kept, positions=positions)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_batch_with_different_image_counts_and_a_text_only_sample(model):
    prompts = [
        prompt_ids([3, 2, 4], num_images=2, seed=1),
        prompt_ids([6], num_images=0, seed=2),
        prompt_ids([2, 5], num_images=1, seed=3),
    ]
    px = clip_images(3, seed=9)
    ids, mask = left_pad(prompts)
    with vtprune.patched(model, "fastervlm", keep_tokens=3) as handle:
        tokens = greedy(model, input_ids=ids, attention_mask=mask, pixel_values=px)
        record = handle.last
        assert record.visual_tokens_in == [32, 0, 16]
        assert record.visual_tokens_kept == [6, 0, 3]
        assert record.stages[0].kept[1].numel() == 0
        before, after = record.sequence_lengths
        assert [b - a for b, a in zip(before, after, strict=True)] == [26, 0, 13]
        assert record.flops_after < record.flops_before
        # every sample decodes as it would alone
        for row, prompt in enumerate(prompts):
            first = [0, 2, 2][row]
            count = [2, 0, 1][row]
            pixels = {"pixel_values": px[first : first + count]} if count else {}
            alone = greedy(model, input_ids=prompt[None], **pixels)
            assert torch.equal(alone[0], tokens[row, ids.shape[1] - prompt.numel() :])


def test_decode_steps_do_not_overwrite_the_prefill_record(model):
    with vtprune.patched(model, "fastervlm", keep_tokens=4) as handle:
        greedy(model, input_ids=llava_prompt(), pixel_values=clip_images(1))  # 6 decode steps after the prefill
        assert handle.last.visual_tokens_kept == [4]


def test_a_text_only_prompt_gets_its_own_record(model):
    """handle.last describes the last prompt: after a text-only one, no stages and 0 visual tokens."""
    text = torch.tensor([[5, 6, 7]])
    with vtprune.patched(model, "fastervlm", keep_tokens=4) as handle:
        greedy(model, input_ids=llava_prompt(), pixel_values=clip_images(1))
        assert handle.last.visual_tokens_kept == [4]
        greedy(model, input_ids=text)
        record = handle.last
    assert record.stages == []
    assert record.visual_tokens_in == record.visual_tokens_kept == [0]
    assert record.layer_tokens == [[3] * model.config.text_config.num_hidden_layers]
    assert record.flops_before == record.flops_after == llm_prefill_flops(3, model.config.text_config)


def test_manual_decode_with_returned_cache(model):
    ids, px = llava_prompt((4, 5), seed=8), clip_images(1, seed=8)
    with vtprune.patched(model, "fastervlm", keep_tokens=4, positions="original"), torch.no_grad():
        out = model(input_ids=ids, pixel_values=px, use_cache=True)
        assert out.cache.get_seq_length() == ids.shape[1] - N + 4
        next_token = out.logits[:, -1:].argmax(-1)
        step = model(input_ids=next_token, cache=out.cache, use_cache=True).logits
        full = model(input_ids=torch.cat([ids, next_token], 1), pixel_values=px, use_cache=False).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    model = tiny_llava(seed=3).to(dtype)
    ids, mask = left_pad([prompt_ids([3, 9], seed=1), prompt_ids([8, 2], seed=2)])
    px = clip_images(2).to(dtype)
    with vtprune.patched(model, "fastervlm", keep_tokens=5) as handle:
        tokens = greedy(model, input_ids=ids, attention_mask=mask, pixel_values=px)
        assert tokens.shape == (2, ids.shape[1] + 6)
        assert handle.last.visual_tokens_kept == [5, 5]
        reference = top_k_sorted(eager_cls_attention(model.float(), px.float()), 5)
    # scores are computed in fp32 from half-precision projections: the top-5 sets agree up to near-ties
    for row in range(2):
        overlap = set(handle.last.stages[0].kept[row].tolist()) & set(reference[row].tolist())
        assert len(overlap) >= 4


def test_labels_are_cut_with_the_sequence(model):
    ids, px = llava_prompt((4, 6), seed=6), clip_images(1, seed=6)
    labels = ids.clone()
    labels[ids == 3] = -100
    with vtprune.patched(model, "fastervlm", keep_tokens=4) as handle, torch.no_grad():
        out = model(input_ids=ids, pixel_values=px, labels=labels)
        kept = handle.last.stages[0].kept[0]
    reference = pruned_reference_logits(model, ids, px, kept)
    keep_columns = torch.ones(ids.shape[1], dtype=torch.bool)
    keep_columns[(ids[0] == 3).nonzero().flatten()] = False
    keep_columns[(ids[0] == 3).nonzero().flatten()[kept]] = True
    expected = torch.nn.functional.cross_entropy(reference[0, :-1], labels[0, keep_columns][1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


def test_uniform_and_random_budgets():
    layout = VisualLayout(num_tokens=16, grid=(4, 4))
    assert uniform_grid_indices(layout, 4).tolist() == [5, 7, 13, 15]
    for k in range(1, 17):
        kept = uniform_grid_indices(layout, k)
        assert kept.numel() == k and kept.unique().numel() == k and torch.equal(kept, kept.sort().values)
    big = VisualLayout(num_tokens=576, grid=(24, 24))
    kept = uniform_grid_indices(big, 144)
    rows, cols = kept // 24, kept % 24
    assert rows.unique().numel() == 12 and cols.unique().numel() == 12  # a 12 x 12 lattice
    assert uniform_grid_indices(big, 58).numel() == 58
    full = VisualLayout(num_tokens=17, grid=(4, 4), num_prefix=1)
    assert uniform_grid_indices(full, 5).tolist() == [0, 6, 8, 14, 16]

    model = tiny_llava(seed=4)
    kept = {}
    for seed in (0, 0, 1):
        with vtprune.patched(model, "random", keep_tokens=6, seed=seed) as handle, torch.no_grad():
            model(input_ids=llava_prompt(), pixel_values=clip_images(1))
        kept.setdefault(seed, []).append(handle.last.stages[0].kept[0])
    assert torch.equal(kept[0][0], kept[0][1]) and not torch.equal(kept[0][0], kept[1][0])
