"""Qwen2-VL adapter: M-RoPE positions through pre-LLM and in-LLM cuts, decode steps, images and video.

References are independent of vtprune: the unpatched model's own M-RoPE positions
(``get_rope_index``), columns and positions dropped by hand (the "compact" renumbering written
out with Python sets), eager attention weights, and greedy decoding without a cache.
"""

import functools

import pytest
import torch
from conftest import hook_counts
from helpers import left_pad, qwen2_vl_inputs

import vtprune
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, tiny_qwen2_vl

IMAGE = [(1, 4, 6)]  # one image: 2 x 3 merged tokens
VIDEO = [(3, 4, 4)]  # three temporal slices of 2 x 2 merged tokens


@functools.cache
def model(attn="sdpa"):
    return tiny_qwen2_vl(seed=1, attn_implementation=attn)


inputs = qwen2_vl_inputs


def greedy(m, steps=4, **kw):
    with torch.no_grad():
        return m.generate(**kw, max_new_tokens=steps, do_sample=False)


def merged(m, kw):
    """Unpatched: merged input embeddings, the model's own M-RoPE positions (3, 1, L), visual mask."""
    with torch.no_grad():
        ids = kw["input_ids"]
        embeds = m.get_input_embeddings()(ids)
        for kind, token in (("image", IMAGE_TOKEN_ID), ("video", VIDEO_TOKEN_ID)):
            px = kw.get("pixel_values" if kind == "image" else "pixel_values_videos")
            if px is not None:
                features = getattr(m.model, f"get_{kind}_features")(px, kw[f"{kind}_grid_thw"]).pooler_output
                embeds[ids == token] = torch.cat(features)
        positions, _ = m.model.get_rope_index(
            ids, kw["mm_token_type_ids"], kw.get("image_grid_thw"), kw.get("video_grid_thw")
        )
    visual = (ids[0] == IMAGE_TOKEN_ID) | (ids[0] == VIDEO_TOKEN_ID)
    return embeds, positions, visual


def hand_positions(positions, columns, mode):
    """M-RoPE positions of the kept columns; "compact": each used value -> its rank among used values."""
    kept = positions[:, :, columns]
    if mode == "original":
        return kept
    used = sorted(set(kept.flatten().tolist()))
    rank = {v: i for i, v in enumerate(used)}
    return kept.clone().apply_(lambda v: rank[v])


def reference_greedy(m, kw, kept, mode, steps=4):
    """Greedy decoding of the unpatched LLM on the hand-pruned prompt, no cache: logits of the prompt
    and the generated tokens. Decode positions continue after the last prompt column (all rows)."""
    embeds, positions, visual = merged(m, kw)
    keep = ~visual
    keep[visual.nonzero().flatten()[kept]] = True
    columns = keep.nonzero().flatten()
    x, pos = embeds[:, columns], hand_positions(positions, columns, mode)
    tokens, first_logits = [], None
    with torch.no_grad():
        for _ in range(steps):
            hidden = m.model.language_model(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state
            logits = m.lm_head(hidden)
            first_logits = logits if first_logits is None else first_logits
            token = logits[0, -1].argmax()
            tokens.append(int(token))
            x = torch.cat([x, m.get_input_embeddings()(token.view(1, 1))], dim=1)
            pos = torch.cat([pos, pos[:, :, -1:] + 1], dim=2)
    return first_logits, tokens


@pytest.mark.parametrize(
    "spec", ["fopru:keep_ratio=1.0", "uniform:keep_ratio=1.0", "fastv:ratio=0", "random:keep_tokens=8"]
)
@pytest.mark.parametrize("grids, kinds", [(IMAGE + VIDEO, ["image", "video"])])  # images alone: test_contracts.py
def test_keep_all_is_bit_identical_and_remove_restores(spec, grids, kinds):
    m = model()
    kw = inputs(grids, kinds)
    with torch.no_grad():
        reference = m(**kw).logits
    tokens = greedy(m, **kw)
    before = hook_counts(m)
    with vtprune.patched(m, spec) as handle, torch.no_grad():
        assert torch.equal(m(**kw).logits, reference)
        assert torch.equal(greedy(m, **kw), tokens)
    assert handle.last.visual_tokens_kept == handle.last.visual_tokens_in
    assert hook_counts(m) == before
    assert not {"get_image_features", "get_video_features"} & set(vars(m.model))
    with torch.no_grad():
        assert torch.equal(m(**kw).logits, reference)
    assert torch.equal(greedy(m, **kw), tokens)


@pytest.mark.parametrize("mode", ["original", "compact"])
@pytest.mark.parametrize(
    "spec, grids, kinds",
    [
        ("fopru:keep_tokens=2", IMAGE, ["image"]),
        ("random:keep_tokens=1,seed=3", IMAGE + VIDEO, ["image", "video"]),
        ("uniform:keep_tokens=2", VIDEO, ["video"]),
    ],
)
def test_pre_llm_cut_matches_hand_pruned_reference_and_decodes_consistently(spec, grids, kinds, mode):
    m = model()
    kw = inputs(grids, kinds, seed=2)
    with vtprune.patched(m, f"{spec},positions={mode}") as handle:
        with torch.no_grad():
            logits = m(**kw).logits
        kept = handle.last.stages[0].kept[0]
        generated = greedy(m, **kw)[0, kw["input_ids"].shape[1] :].tolist()
    ref_logits, ref_tokens = reference_greedy(m, kw, kept, mode)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert generated == ref_tokens


def test_per_frame_budget_and_the_kept_sets():
    m = model()
    kw = inputs(VIDEO, ["video"], seed=4)
    with vtprune.patched(m, "fopru:keep_tokens=3") as handle, torch.no_grad():
        m(**kw)
    kept = handle.last.stages[0].kept[0]
    assert torch.bincount(kept // 4, minlength=3).tolist() == [3, 3, 3]  # 3 of 4 tokens in each slice
    with vtprune.patched(m, "fopru:keep_tokens=9") as handle, torch.no_grad():  # larger than a frame: all kept
        m(**kw)
    assert handle.last.visual_tokens_kept == [12]


def eager_received(m, kw):
    """FoPru's significance the plain way: full softmax per temporal slice of the last ViT block,
    mean over heads and queries, then the mean over each 2 x 2 merge group."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    visual = m.model.visual
    grid = kw["image_grid_thw"]
    block = visual.blocks[-1]
    captured = {}
    handle = block.attn.register_forward_pre_hook(
        lambda mod, a, k: captured.update(x=a[0] if a else k["hidden_states"], pe=k["position_embeddings"]),
        with_kwargs=True,
    )
    with torch.no_grad():
        visual(kw["pixel_values"], grid_thw=grid)
        handle.remove()
        x = captured["x"]
        heads = block.attn.num_heads
        q, k, _ = block.attn.qkv(x).view(x.shape[0], 3, heads, -1).unbind(1)
        q, k = apply_rotary_pos_emb_vision(q, k, *captured["pe"])
        weights = torch.einsum("qhd,khd->hqk", q, k).mul(block.attn.scaling).softmax(-1)
    return weights.mean(dim=(0, 1)).view(-1, 4).mean(dim=1)


def test_fopru_scores_match_a_full_softmax_reference():
    m = model()
    kw = inputs([(1, 8, 8)], seed=5)  # 16 merged tokens
    with vtprune.patched(m, "fopru:keep_tokens=5") as handle, torch.no_grad():
        m(**kw)
    expected = eager_received(m, kw).topk(5).indices.sort().values
    assert torch.equal(handle.last.stages[0].kept[0], expected)


def left_padded_batch(samples: list[dict], kind: str) -> dict:
    """One left-padded batch of single-sample Qwen2-VL inputs whose visual items are all ``kind``."""
    ids, mask = left_pad([s["input_ids"][0] for s in samples])
    types = torch.zeros_like(ids)
    for row, s in enumerate(samples):
        types[row, ids.shape[1] - s["input_ids"].shape[1] :] = s["mm_token_type_ids"][0]
    pixels, grids = ("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos", "video_grid_thw")
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": types,
        pixels: torch.cat([s[pixels] for s in samples]),
        grids: torch.cat([s[grids] for s in samples]),
    }


def layerwise_greedy(m, kw, stages, steps=4):
    """Greedy decoding of the unpatched LLM, one decoder layer at a time, no cache, with hand cuts.

    stages: [(layer, kept original visual indices, mode)], layer 0 = before the LLM. At each cut
    the dropped columns leave; "compact" renumbers the kept prompt columns by value rank (all
    M-RoPE rows). Generated tokens sit after the prompt: last prompt position + 1, + 2, ... in each
    stage's own numbering. Returns the generated tokens.
    """
    lm = m.model.language_model
    embeds, positions, visual = merged(m, kw)
    index = torch.where(visual, visual.long().cumsum(0) - 1, -1)
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            extra = m.get_input_embeddings()(torch.tensor([tokens], dtype=torch.long))
            hidden = torch.cat([embeds, extra], dim=1)
            vis, pos = index, positions  # prompt columns only
            for number, layer in enumerate(lm.layers):
                for cut_layer, kept, mode in stages:
                    if cut_layer == number:
                        keep = (vis < 0) | torch.isin(vis, kept)
                        columns = keep.nonzero().flatten()
                        tail = torch.arange(vis.numel(), hidden.shape[1])
                        hidden = hidden[:, torch.cat([columns, tail])]
                        vis, pos = vis[columns], hand_positions(pos, columns, mode)
                full = torch.cat([pos, pos[:, :, -1:] + torch.arange(1, len(tokens) + 1)], dim=2)
                length = hidden.shape[1]
                mask = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
                hidden = layer(hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, full))
            logits = m.lm_head(lm.norm(hidden))
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize(
    "spec", ["fastv:k=2", "pdrop:layers=1;2;3,lam=0.5", "fopru:keep_tokens=2+fastv:k=1", "random:keep_tokens=3+pdrop"]
)
def test_in_llm_methods_match_a_layerwise_reference_through_decode(spec):
    m = model()
    kw = inputs(IMAGE + VIDEO, ["image", "video"], seed=8)
    with vtprune.patched(m, spec) as handle:
        generated = greedy(m, steps=4, **kw)[0, kw["input_ids"].shape[1] :].tolist()
        record = handle.last
    assert record.visual_tokens_kept[0] < record.visual_tokens_in[0]
    modes = [method.config.positions for method in handle.methods]
    if len(modes) == 1 and len(record.stages) > 1:
        modes = modes * len(record.stages)
    elif len(record.stages) > len(modes):
        modes = modes[:1] + modes[1:] * (len(record.stages) - 1)
    stages = [(max(stage.layer, 0), stage.kept[0], mode) for stage, mode in zip(record.stages, modes, strict=True)]
    assert generated == layerwise_greedy(m, kw, stages)


def test_fastv_keeps_the_top_of_eager_last_token_attention():
    m, twin = model(), model("eager")
    twin.load_state_dict(m.state_dict())
    kw = inputs(IMAGE + VIDEO, ["image", "video"], seed=9)
    captured = {}
    hook = twin.model.language_model.layers[1].self_attn.register_forward_hook(
        lambda mod, a, out: captured.__setitem__("w", out[1])
    )
    with torch.no_grad():
        twin(**kw)
    hook.remove()
    visual = (kw["input_ids"][0] == IMAGE_TOKEN_ID) | (kw["input_ids"][0] == VIDEO_TOKEN_ID)
    row = captured["w"][0, :, -1].float().mean(dim=0)[visual]
    with vtprune.patched(m, "fastv:k=2,ratio=0.5") as handle, torch.no_grad():
        m(**kw)
    expected = row.topk(round(int(visual.sum()) * 0.5)).indices.sort().values
    assert torch.equal(handle.last.stages[0].kept[0], expected)


def test_decode_without_positions_or_mask_uses_unpruned_numbering():
    """A manual decode loop (no generate, no mask, no position ids): the model would count the
    pruned cache; the adapter supplies the unpruned positions and the engine shifts them."""
    m = model()
    kw = inputs(IMAGE, seed=10)
    with vtprune.patched(m, "fopru:keep_tokens=2") as handle, torch.no_grad():
        out = m(**kw, use_cache=True)
        token = out.logits[0, -1].argmax().view(1, 1)
        manual = [int(token)]
        cache = out.cache
        for _ in range(3):
            out = m(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[0, -1].argmax().view(1, 1)
            manual.append(int(token))
        kept = handle.last.stages[0].kept[0]
    _, expected = reference_greedy(m, kw, kept, "compact")
    assert manual == expected


def test_bad_input_is_refused_clearly():
    m = model()
    with pytest.raises(ValueError, match="score='received'"):
        vtprune.patch(m, "fastervlm", keep_ratio=0.5)
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        vtprune.patch(m, "hired")  # a crop-budget method, refused on its [CLS] score first
    with pytest.raises(ValueError, match="keep_tokens must be"):
        vtprune.patch(m, "fopru", keep_tokens=0)
    assert vtprune.get_handle(m) is None
