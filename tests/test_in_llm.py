"""In-LLM pruning (FastV, PyramidDrop, stacking) against eager attention and layer-by-layer references.

The independent reference (``layerwise``) runs an eager twin of the unpatched model one decoder
layer at a time on a single sample, drops the given visual tokens by hand before the given
layers, builds the causal mask and positions by hand, and records each layer's eager attention
weights. Expected kept sets are computed from those weights with plain ``topk``.
"""

import functools

import pytest
import torch
from conftest import hook_counts
from helpers import clip_images, eager_twin, left_pad, prompt_ids

import vtprune
from vtprune.engine.flops import decoder_layer_flops
from vtprune.engine.probe import last_token_attention
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, text_config, tiny_llava
from vtprune.patches._backbones import llm_backbone

N = 16  # visual tokens per image of the tiny model
LAYERS = 4
BACKBONES = ["llama", "mistral", "qwen2"]


@functools.cache
def model_for(model_type: str, attn: str = "sdpa", seed: int = 1):
    return tiny_llava(seed=seed, text=text_config(model_type, layers=LAYERS), attn_implementation=attn)


@functools.cache
def twin_of(model_type: str, attn: str = "sdpa", seed: int = 1):
    return eager_twin(model_for(model_type, attn, seed))


def merged_embeddings(model, input_ids, pixel_values):
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            features = torch.cat(model.model.get_image_features(pixel_values=pixel_values).pooler_output)
            embeds[input_ids == IMAGE_TOKEN_ID] = features.to(embeds.dtype)
    return embeds


def layerwise(twin, input_ids, pixel_values, cuts):
    """One sample through the eager twin, layer by layer, with hand-applied cuts.

    cuts: {layer: (kept original visual indices, "compact" | "original")}; layer 0 cuts before
    the first decoder layer (a pre-LLM stage). Returns (logits (1, T, V), {layer: attention
    weights (H, T, T)}, original visual index per column at each layer's input).
    """
    lm = twin.model.language_model
    hidden = merged_embeddings(twin, input_ids, pixel_values)
    is_image = input_ids[0] == IMAGE_TOKEN_ID
    visual = torch.where(is_image, is_image.long().cumsum(0) - 1, -1)
    positions = torch.arange(input_ids.shape[1])
    attentions, visual_at = {}, {}
    captured = {}
    with torch.no_grad():
        for index, layer in enumerate(lm.layers):
            if index in cuts:
                kept, mode = cuts[index]
                keep = (visual < 0) | torch.isin(visual, kept)
                hidden, visual, positions = hidden[:, keep], visual[keep], positions[keep]
                if mode == "compact":
                    positions = torch.arange(int(keep.sum()))
            length = hidden.shape[1]
            mask = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            cos_sin = lm.rotary_emb(hidden, positions[None])
            hook = layer.self_attn.register_forward_hook(lambda m, a, out: captured.__setitem__("w", out[1]))
            hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=positions[None])
            hook.remove()
            attentions[index], visual_at[index] = captured.pop("w")[0], visual
        logits = twin.lm_head(lm.norm(hidden))
    return logits, attentions, visual_at


def last_row_visual_scores(attention, visual):
    """(H, T, T) eager weights -> mean over heads of the last row, at the visual columns."""
    return attention[:, -1, visual >= 0].float().mean(dim=0)


def expected_topk(scores, visual, k):
    """Original visual indices of the top-k scored visual columns, sorted."""
    return visual[visual >= 0][scores.topk(k).indices].sort().values


def sample(seed, text=(4, 6), num_images=1):
    return prompt_ids(list(text), num_images=num_images, seed=seed)


# -- identity and removal ---------------------------------------------------------------------


@pytest.mark.parametrize("model_type", BACKBONES)
def test_nothing_dropped_is_bit_identical_and_remove_restores(model_type):
    model = model_for(model_type)
    ids, mask = left_pad([sample(1, (3, 9)), sample(2, (8, 2))])
    px = clip_images(2, seed=3)
    run = functools.partial(
        model.generate, input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=4, do_sample=False
    )
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        ref_tokens = run()
    before = hook_counts(model)
    for spec in ["fastv:ratio=0", "pdrop:lam=1", "fastervlm:keep_ratio=1.0+pdrop:lam=1"]:
        handle = vtprune.patch(model, spec)
        assert hook_counts(model) != before
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=px).logits, ref_logits)
            assert torch.equal(run(), ref_tokens)
        assert handle.last.visual_tokens_kept == [N, N]
        assert handle.last.flops_after == handle.last.flops_before
        handle.remove()
        assert hook_counts(model) == before
    for spec in ["fastv", "pdrop"]:  # pruning for real, then removed: the unpatched model again
        with vtprune.patched(model, spec) as handle, torch.no_grad():
            run()
            assert handle.last.visual_tokens_kept[0] < N
        assert hook_counts(model) == before
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=px).logits, ref_logits)
            assert torch.equal(run(), ref_tokens)


# -- the probe ---------------------------------------------------------------------------------


@functools.cache
def windowed_mistral(attn: str = "sdpa", window: int = 7):
    config = text_config("mistral", layers=LAYERS)
    config.sliding_window = window
    return tiny_llava(seed=1, text=config, attn_implementation=attn)


@pytest.mark.parametrize("model_type", [*BACKBONES, "qwen3", "mistral-window"])
def test_probe_equals_eager_attention_weights(model_type):
    """The last-prompt-token row of each layer, from the sdpa model's own parts, left padding included
    (and a sliding window shorter than the prompt)."""
    if model_type == "mistral-window":
        model = windowed_mistral()
        twin = eager_twin(model)
    else:
        model, twin = model_for(model_type), twin_of(model_type)
    ids, mask = left_pad([sample(1, (3, 9)), sample(2, (8, 2))])
    embeds = merged_embeddings(model, ids, clip_images(2))
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    inputs, eager = {}, {}

    def grab(index):
        def hook(module, args, kwargs):
            inputs[index] = (args[0], kwargs["position_embeddings"])

        return hook

    lm = model.model.language_model
    hooks = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
    with torch.no_grad():
        lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        out = twin.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_attentions=True
        )
    for hook in hooks:
        hook.remove()
    backbone = llm_backbone(lm)
    for index in range(LAYERS):
        hidden, cos_sin = inputs[index]
        with torch.no_grad():
            probe = last_token_attention(hidden, mask.bool(), backbone.attention_parts(index), cos_sin)
        eager[index] = out.attentions[index][:, :, -1, :].float().mean(dim=1)
        torch.testing.assert_close(probe, eager[index], rtol=1e-5, atol=1e-6)
        assert (probe[mask == 0] == 0).all()


# -- kept indices against eager references ----------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", BACKBONES)
def test_fastv_kept_indices_and_logits_match_eager_reference(model_type, attn):
    model, twin = model_for(model_type, attn), twin_of(model_type, attn)
    ids, px = sample(5, (5, 7))[None], clip_images(1, seed=5)
    with vtprune.patched(model, "fastv", k=2, ratio=0.75) as handle, torch.no_grad():
        logits = model(input_ids=ids, pixel_values=px).logits
    _, attentions, visual_at = layerwise(twin, ids, px, cuts={})
    expected = expected_topk(last_row_visual_scores(attentions[1], visual_at[1]), visual_at[1], 4)  # round(16 * .25)
    (stage,) = handle.last.stages
    assert stage.name == "fastv" and stage.layer == 2
    assert torch.equal(stage.kept[0], expected)
    reference, _, _ = layerwise(twin, ids, px, cuts={2: (expected, "original")})
    assert logits.shape == reference.shape  # the logits cover the reduced sequence
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)
    assert handle.last.layer_tokens == [[ids.shape[1]] * 2 + [ids.shape[1] - 12] * 2]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", BACKBONES)
def test_pdrop_kept_indices_and_logits_match_layerwise_eager_reference(model_type, attn):
    model, twin = model_for(model_type, attn), twin_of(model_type, attn)
    ids, px = sample(6, (4, 6), num_images=1)[None], clip_images(1, seed=6)
    with vtprune.patched(model, "pdrop", layers=[1, 2, 3], lam=0.5) as handle, torch.no_grad():
        logits = model(input_ids=ids, pixel_values=px).logits
    cuts = {}
    for layer, k in [(1, 8), (2, 4), (3, 2)]:  # int(16 * 0.5^s)
        # the attention layer `layer` computes on the sequence the earlier stages left
        _, attentions, visual_at = layerwise(twin, ids, px, cuts)
        scores = last_row_visual_scores(attentions[layer], visual_at[layer])
        cuts[layer] = (expected_topk(scores, visual_at[layer], k), "compact")
    stages = handle.last.stages
    assert [(s.name, s.layer) for s in stages] == [("pdrop", 1), ("pdrop", 2), ("pdrop", 3)]
    for stage, layer in zip(stages, (1, 2, 3)):
        assert torch.equal(stage.kept[0], cuts[layer][0])
    reference, _, _ = layerwise(twin, ids, px, cuts)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)


def test_fractions_of_depth_and_paper_defaults():
    from vtprune.methods.pdrop import PDrop, PDropConfig

    assert [c.cut_layer for c in PDrop(PDropConfig()).schedule(32)] == [8, 16, 24]
    assert [c.cut_layer for c in PDrop(PDropConfig()).schedule(24)] == [6, 12, 18]
    assert [c.cut_layer for c in PDrop(PDropConfig(layers=[0.25, 0.5, 0.75])).schedule(4)] == [1, 2, 3]
    counts = PDrop(PDropConfig()).keep_counts
    assert [int(counts(s, torch.tensor([576]))) for s in range(3)] == [288, 144, 72]
    assert int(PDrop(PDropConfig(lam=0.6)).keep_counts(2, torch.tensor([576]))) == int(576 * 0.6**3)
    model = model_for("llama")
    with vtprune.patched(model, "pdrop") as handle, torch.no_grad():  # defaults on 4 layers: 1, 2, 3
        model(input_ids=sample(1)[None], pixel_values=clip_images(1))
    assert [s.layer for s in handle.last.stages] == [1, 2, 3]
    assert handle.methods[0].config.positions == "compact"
    assert vtprune.build_methods("fastv")[0].config.positions == "original"


# -- batches and the KV cache -----------------------------------------------------------------


def generate_with_logits(model, **inputs):
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return out.sequences, torch.stack(out.logits, dim=1)  # (B, L + n), (B, n, V)


@pytest.mark.parametrize(
    "model_type, attn, spec",
    [
        ("llama", "sdpa", "fastv"),
        ("llama", "eager", "fastv:positions=compact"),
        ("mistral", "sdpa", "pdrop:layers=1;3"),
        ("qwen2", "eager", "pdrop:layers=1;2;3,positions=original"),
        ("qwen2", "sdpa", "fastervlm:keep_tokens=10+fastv:k=1,keep_tokens=5"),
    ],
)
def test_decode_steps_match_a_no_cache_forward_with_the_same_kept_set(model_type, attn, spec):
    """Left-padded batch, generate with the pruned cache: every step's logits equal the eager,
    cache-free, layer-by-layer reference over prompt + generated tokens with the same cuts, and
    every sample equals itself run alone."""
    model, twin = model_for(model_type, attn), twin_of(model_type, attn)
    prompts = [sample(3, (3, 9)), sample(4, (8, 2))]
    px = clip_images(2, seed=4)
    ids, mask = left_pad(prompts)
    with vtprune.patched(model, spec) as handle:
        tokens, step_logits = generate_with_logits(model, input_ids=ids, attention_mask=mask, pixel_values=px)
        batch_stages = handle.last.stages
        for row, prompt in enumerate(prompts):
            alone_tokens, alone_logits = generate_with_logits(
                model, input_ids=prompt[None], pixel_values=px[row : row + 1]
            )
            for batch_stage, alone_stage in zip(batch_stages, handle.last.stages):
                assert torch.equal(batch_stage.kept[row], alone_stage.kept[0])
            assert torch.equal(alone_tokens[0], tokens[row, ids.shape[1] - prompt.numel() :])
            torch.testing.assert_close(alone_logits[0], step_logits[row], rtol=1e-4, atol=1e-4)
    modes = {m.stage: m.config.positions for m in handle.methods}
    for row, prompt in enumerate(prompts):
        cuts = {}
        for stage in batch_stages:
            layer = max(stage.layer, 0)
            cuts[layer] = (stage.kept[row], modes["pre_llm" if stage.layer < 0 else "in_llm"])
        generated = tokens[row, ids.shape[1] :]
        for step in range(generated.numel()):
            sequence = torch.cat([prompt, generated[:step]])[None]
            reference, _, _ = layerwise(twin, sequence, px[row : row + 1], cuts)
            torch.testing.assert_close(step_logits[row, step], reference[0, -1], rtol=1e-4, atol=1e-4)


def test_manual_decode_with_the_returned_cache_has_per_layer_lengths():
    model, twin = model_for("llama"), twin_of("llama")
    ids, px = sample(8, (4, 5))[None], clip_images(1, seed=8)
    with vtprune.patched(model, "pdrop", layers=[1, 3]) as handle, torch.no_grad():
        out = model(input_ids=ids, pixel_values=px, use_cache=True)
        length = ids.shape[1]
        assert [out.cache.get_seq_length(i) for i in range(LAYERS)] == [length, length - 8, length - 8, length - 12]
        cached = sum(layer.keys.numel() + layer.values.numel() for layer in out.cache.layers)
        assert handle.last.kv_cache_bytes[1] == cached * torch.float32.itemsize  # what the cache really holds
        next_token = out.logits[:, -1:].argmax(-1)
        step = model(input_ids=next_token, cache=out.cache, use_cache=True).logits
        cuts = {s.layer: (s.kept[0], "compact") for s in handle.last.stages}
    reference, _, _ = layerwise(twin, torch.cat([ids, next_token], 1), px, cuts)
    torch.testing.assert_close(step[:, -1], reference[:, -1], rtol=1e-4, atol=1e-5)


def test_batch_with_different_image_counts_and_a_text_only_sample():
    model = model_for("qwen2")
    prompts = [sample(1, (3, 2, 4), num_images=2), sample(2, (6,), num_images=0), sample(3, (2, 5))]
    px = clip_images(3, seed=9)
    ids, mask = left_pad(prompts)
    with vtprune.patched(model, "pdrop", layers=[1, 2], lam=0.5) as handle:
        with torch.no_grad():
            tokens = model.generate(
                input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=4, do_sample=False
            )
        record = handle.last
        assert record.visual_tokens_in == [32, 0, 16]
        assert [[k.numel() for k in s.kept] for s in record.stages] == [[16, 0, 8], [8, 0, 4]]
        lengths = [p.numel() for p in prompts]
        assert record.layer_tokens == [[n, n - 16, n - 24, n - 24] for n in (lengths[0],)] + [
            [lengths[1]] * 4,
            [lengths[2], lengths[2] - 8, lengths[2] - 12, lengths[2] - 12],
        ]
        expected_flops = sum(
            decoder_layer_flops(n, model.config.text_config) for row in record.layer_tokens for n in row
        )
        assert record.flops_after == expected_flops < record.flops_before
        for row, prompt in enumerate(prompts):
            first, count = [0, 2, 2][row], [2, 0, 1][row]
            pixels = {"pixel_values": px[first : first + count]} if count else {}
            with torch.no_grad():
                alone = model.generate(input_ids=prompt[None], **pixels, max_new_tokens=4, do_sample=False)
            assert torch.equal(alone[0], tokens[row, ids.shape[1] - prompt.numel() :])


# -- stacking ---------------------------------------------------------------------------------


def test_stacked_pre_llm_and_in_llm_stages_use_original_indices():
    model, twin = model_for("mistral"), twin_of("mistral")
    ids, px = sample(7, (4, 3, 5), num_images=2)[None], clip_images(2, seed=7)
    spec = [("fastervlm", {"keep_tokens": 6}), ("pdrop", {"layers": [2, 3]})]
    with vtprune.patched(model, spec) as handle, torch.no_grad():
        logits = model(input_ids=ids, pixel_values=px).logits
    with vtprune.patched(model, "fastervlm:keep_tokens=6+pdrop:layers=2;3") as same, torch.no_grad():
        model(input_ids=ids, pixel_values=px)
    stages = handle.last.stages
    assert [(s.name, s.layer) for s in stages] == [("fastervlm", -1), ("pdrop", 2), ("pdrop", 3)]
    assert [s.kept[0].numel() for s in stages] == [12, 6, 3]  # 2 images x 6, then int(12 * .5^s)
    assert all(torch.equal(a.kept[0], b.kept[0]) for a, b in zip(stages, same.last.stages))
    pre_kept = stages[0].kept[0]
    cuts = {0: (pre_kept, "compact")}
    for layer, k in [(2, 6), (3, 3)]:
        _, attentions, visual_at = layerwise(twin, ids, px, cuts)
        cuts[layer] = (
            expected_topk(last_row_visual_scores(attentions[layer], visual_at[layer]), visual_at[layer], k),
            "compact",
        )
        assert torch.isin(cuts[layer][0], pre_kept).all()
    for stage in stages[1:]:
        assert torch.equal(stage.kept[0], cuts[stage.layer][0])
    reference, _, _ = layerwise(twin, ids, px, cuts)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)


def test_labels_are_cut_by_every_stage():
    model = model_for("llama")
    ids, px = sample(6, (4, 6))[None], clip_images(1, seed=6)
    labels = torch.where(ids == IMAGE_TOKEN_ID, -100, ids)
    with vtprune.patched(model, "fastervlm:keep_tokens=8+fastv:keep_tokens=3") as handle, torch.no_grad():
        out = model(input_ids=ids, pixel_values=px, labels=labels)
    kept = handle.last.stages[-1].kept[0]
    text = ids[0] != IMAGE_TOKEN_ID
    visual_columns = (~text).nonzero().flatten()
    keep = text.clone()
    keep[visual_columns[kept]] = True
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, keep][1:], ignore_index=-100)
    assert out.logits.shape[1] == int(keep.sum())
    torch.testing.assert_close(out.loss, expected)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, options, error, message",
    [
        ("fastv", {"k": 0}, ValueError, "k must be a decoder layer index >= 1"),
        ("fastv", {"k": 4}, ValueError, r"k=4 is outside the LLM's 4 decoder layers; k must be in 1..3"),
        ("fastv", {"ratio": 1.5}, ValueError, r"ratio .* must be in \[0, 1\]"),
        ("fastv", {"ratio": 0.5, "keep_tokens": 3}, ValueError, "not both"),
        ("fastv", {"keep_tokens": -1}, ValueError, "keep_tokens must be an integer >= 0"),
        ("pdrop", {"layers": [0, 2]}, ValueError, "decoder layer index >= 1 or a fraction"),
        ("pdrop", {"layers": [1, 5]}, ValueError, r"resolve to \[1, 5\] .* within 1..3"),
        ("pdrop", {"layers": [2, 2]}, ValueError, "strictly increasing"),
        ("pdrop", {"layers": [1.5]}, ValueError, "decoder layer index >= 1 or a fraction"),
        ("pdrop", {"lam": 0}, ValueError, r"lam .* must be in \(0, 1\]"),
        ("pdrop", {"lam": 1.5}, ValueError, r"lam .* must be in \(0, 1\]"),
        ("pdrop+fastv", {}, ValueError, "ambiguous|at most one pre-LLM stage followed by at most one in-LLM"),
        ([("pdrop", {}), ("fastervlm", {"keep_tokens": 4})], {}, ValueError, "at most one pre-LLM stage followed"),
    ],
)
def test_bad_input_fails_at_patch_time(spec, options, error, message):
    model = model_for("llama")
    before = hook_counts(model)
    with pytest.raises(error, match=message):
        vtprune.patch(model, spec, **options)
    assert vtprune.get_handle(model) is None and hook_counts(model) == before


def test_default_pdrop_on_a_too_shallow_llm_names_the_fix():
    model = tiny_llava(text=text_config("llama", layers=2))
    with pytest.raises(ValueError, match=r"resolve to \[1, 1, 2\] for an LLM with 2 decoder layers.*Pass layers"):
        vtprune.patch(model, "pdrop")


def test_unsupported_llm_backbone_lists_the_supported_ones():
    model = tiny_llava(text=text_config("phi3", layers=2))
    with pytest.raises(TypeError, match=r"model_type='phi3'.*supported LLM backbones: llama, mistral, qwen2"):
        vtprune.patch(model, "fastv", k=1)
    vtprune.patch(model, "fastervlm", keep_tokens=4).remove()  # pre-LLM methods do not need the backbone


def test_methods_are_registered_with_their_options():
    listed = vtprune.methods()
    assert listed["fastv"]["stage"] == listed["pdrop"]["stage"] == "in_llm"
    assert set(listed["fastv"]["options"]) == {"positions", "k", "ratio", "keep_tokens"}
    assert set(listed["pdrop"]["options"]) == {"positions", "layers", "lam"}
