"""Qwen3-VL (and Qwen3-VL-MoE) adapter: DeepStack rows through pre-LLM and in-LLM cuts, images and video.

References are independent of vtprune: the unpatched language model fed the hand-pruned sequence
(inputs_embeds, the model's own M-RoPE positions of the kept columns, ``visual_pos_masks`` of the kept
columns and each DeepStack level's rows of the kept tokens only, picked by index), and the decoder
run one layer at a time with hand cuts, the DeepStack levels added after layers 0, 1, 2 to the
visual tokens still there.
"""

import functools

import pytest
import torch
from helpers import qwen2_vl_pixels

import vtprune
from vtprune.evals.models.transformers_vlms import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    tiny_qwen3_vl,
)

IMAGE = (1, 6, 8)  # 3 x 4 merged tokens
VIDEO = (3, 4, 4)  # three temporal slices of 2 x 2 merged tokens, each its own block after a timestamp


@functools.cache
def model(moe=False):
    return tiny_qwen3_vl(seed=1, moe=moe)


def prompt(grids, kinds, seed=0, text=(3, 4), merge=2, vocab=128):
    """One Qwen3-VL prompt, as its processor writes it: text, then per image <start> tokens <end>, per
    video slice a (2-token) timestamp then <start> tokens <end>; text between and after the items.
    Returns input_ids (1, L) and mm_token_type_ids (1, L) (0 text, 1 image, 2 video)."""
    generator = torch.Generator().manual_seed(seed)

    def words(n):
        return torch.randint(7, vocab, (n,), generator=generator).tolist()

    ids = words(text[0])
    types = [0] * len(ids)
    for index, ((t, h, w), kind) in enumerate(zip(grids, kinds, strict=True)):
        token, code = (IMAGE_TOKEN_ID, 1) if kind == "image" else (VIDEO_TOKEN_ID, 2)
        for _ in range(t if kind == "video" else 1):
            stamp = words(2) if kind == "video" else []
            count = (1 if kind == "video" else t) * h * w // merge**2
            ids += stamp + [VISION_START_ID] + [token] * count + [VISION_END_ID]
            types += [0] * (len(stamp) + 1) + [code] * count + [0]
        after = words(text[1] if index == len(grids) - 1 else 2)
        ids, types = ids + after, types + [0] * len(after)
    return torch.tensor([ids]), torch.tensor([types])


def inputs(grids, kinds, seed=0):
    ids, types = prompt(grids, kinds, seed=seed)
    kw = {"input_ids": ids, "mm_token_type_ids": types}
    for kind, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        chosen = [g for g, k in zip(grids, kinds, strict=True) if k == kind]
        if chosen:
            kw |= {pixels: qwen2_vl_pixels(chosen, seed=seed + len(kind)), f"{kind}_grid_thw": torch.tensor(chosen)}
    return kw


def merged(m, kw):
    """Unpatched: merged embeddings (1, L, D), the model's positions (3, 1, L), the visual mask (L,) and
    the DeepStack levels, each (N, D) with one row per visual column in column order."""
    ids = kw["input_ids"]
    visual = (ids[0] == IMAGE_TOKEN_ID) | (ids[0] == VIDEO_TOKEN_ID)
    with torch.no_grad():
        embeds = m.get_input_embeddings()(ids)
        levels = None
        for kind, token in (("image", IMAGE_TOKEN_ID), ("video", VIDEO_TOKEN_ID)):
            px = kw.get("pixel_values" if kind == "image" else "pixel_values_videos")
            if px is None:
                continue
            out = getattr(m.model, f"get_{kind}_features")(px, kw[f"{kind}_grid_thw"])
            embeds[ids == token] = torch.cat(out.pooler_output)
            if levels is None:
                levels = [torch.zeros(int(visual.sum()), embeds.shape[-1]) for _ in out.deepstack_features]
            rows = (ids[0] == token)[visual]
            for level, features in zip(levels, out.deepstack_features, strict=True):
                level[rows] = torch.cat(features)
        positions, _ = m.model.get_rope_index(
            ids, kw["mm_token_type_ids"], kw.get("image_grid_thw"), kw.get("video_grid_thw")
        )
    return embeds, positions, visual, levels


def hand_positions(positions, columns, mode):
    kept = positions[:, :, columns]
    if mode == "original":
        return kept
    rank = {v: i for i, v in enumerate(sorted(set(kept.flatten().tolist())))}
    return kept.clone().apply_(lambda v: rank[v])


def reference_greedy(m, x, pos, visual, rows, steps=3):
    """Cache-free greedy decoding of the unpatched language model on a hand-built prompt: x (1, L, D),
    pos (3, 1, L), visual (L,) the prompt's visual columns and rows their DeepStack rows (or None: no
    DeepStack). Generated tokens come after the prompt at its last position + 1, + 2, ... Returns the
    prompt's logits and the tokens."""
    lm, tokens, first = m.model.language_model, [], None
    with torch.no_grad():
        for _ in range(steps):
            deepstack = {}
            if rows is not None:
                mask = torch.nn.functional.pad(visual, (0, x.shape[1] - visual.shape[0]))[None]
                deepstack = {"visual_pos_masks": mask, "deepstack_visual_embeds": rows}
            hidden = lm(inputs_embeds=x, position_ids=pos, use_cache=False, **deepstack).last_hidden_state
            logits = m.lm_head(hidden)
            first = logits if first is None else first
            tokens.append(int(logits[0, -1].argmax()))
            x = torch.cat([x, m.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], dim=1)
            pos = torch.cat([pos, pos[:, :, -1:] + 1], dim=2)
    return first, tokens


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("mode", ["original", "compact"])
@pytest.mark.parametrize(
    "spec, grids, kinds",
    [
        ("fopru:keep_tokens=3", [IMAGE, VIDEO], ["image", "video"]),
        ("fastervlm:keep_tokens=4,score=received", [IMAGE], ["image"]),
        ("uniform:keep_tokens=2", [VIDEO], ["video"]),
        ("random:keep_tokens=2,seed=1", [VIDEO, IMAGE], ["video", "image"]),
    ],
)
def test_pre_llm_cut_matches_the_hand_pruned_sequence_with_its_deepstack_rows(spec, grids, kinds, mode, moe):
    m = model(moe)
    kw = inputs(grids, kinds, seed=2)
    with vtprune.patched(m, f"{spec},positions={mode}") as handle:
        with torch.no_grad():
            logits = m(**kw).logits
        kept = handle.last.stages[0].kept[0]
        generated = m.generate(**kw, max_new_tokens=3, do_sample=False)[0, kw["input_ids"].shape[1] :].tolist()
    embeds, positions, visual, levels = merged(m, kw)
    assert len(kept) < int(visual.sum())
    keep = ~visual
    keep[visual.nonzero().flatten()[kept]] = True
    columns = keep.nonzero().flatten()
    x, pos = embeds[:, columns], hand_positions(positions, columns, mode)
    first, tokens = reference_greedy(m, x, pos, visual[columns], [level[kept] for level in levels])
    without_deepstack, _ = reference_greedy(m, x, pos, None, None, steps=1)
    torch.testing.assert_close(logits, first, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, without_deepstack, rtol=1e-3, atol=1e-3)  # the rows matter
    assert generated == tokens


def layerwise_logits(m, kw, stages):
    """The unpatched decoder one layer at a time with hand cuts: stages [(layer, kept original visual
    indices)] (layer 0 = before the LLM), positions kept ("original"); after layer i < 3 the DeepStack
    level i rows of the visual tokens still present are added to them."""
    lm = m.model.language_model
    embeds, positions, visual, levels = merged(m, kw)
    index = torch.where(visual, visual.long().cumsum(0) - 1, -1)
    hidden = embeds
    with torch.no_grad():
        for number, layer in enumerate(lm.layers):
            for cut_layer, kept in stages:
                if cut_layer == number:
                    columns = ((index < 0) | torch.isin(index, kept)).nonzero().flatten()
                    hidden, index, positions = hidden[:, columns], index[columns], positions[:, :, columns]
            length = hidden.shape[1]
            mask = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            hidden = layer(hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, positions))
            if number < len(levels):
                present = (index >= 0).nonzero().flatten()
                hidden = hidden.clone()
                hidden[0, present] += levels[number][index[present]]
        return m.lm_head(lm.norm(hidden))


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize(
    "spec", ["fastv:k=1,ratio=0.5", "pdrop:layers=1;2;3,lam=0.5", "uniform:keep_tokens=2+fastv:k=2,ratio=0.5"]
)
def test_in_llm_cuts_before_the_last_deepstack_layer_match_a_layerwise_reference(spec, moe):
    m = model(moe)
    kw = inputs([IMAGE, VIDEO], ["image", "video"], seed=8)
    spec = "+".join(f"{part},positions=original" for part in spec.split("+"))
    with vtprune.patched(m, spec) as handle, torch.no_grad():
        logits = m(**kw).logits
    record = handle.last
    assert record.visual_tokens_kept[0] < record.visual_tokens_in[0]
    stages = [(max(stage.layer, 0), stage.kept[0]) for stage in record.stages]
    assert any(0 < layer < 3 for layer, _ in stages)  # a cut lands among the DeepStack layers
    torch.testing.assert_close(logits, layerwise_logits(m, kw, stages), rtol=1e-5, atol=1e-5)


def test_refusals_name_the_reason():
    m = model()
    with pytest.raises(ValueError, match="DeepStack"):
        vtprune.patch(m, "quota", scorer=lambda frames, prompt: torch.ones(frames.shape[0]), query="?")
    with pytest.raises(ValueError, match="score='received'"):
        vtprune.patch(m, "fastervlm", keep_ratio=0.5)
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        vtprune.patch(m, "hired")
    assert vtprune.get_handle(m) is None


def test_lmms_eval_runs_base_qwen3_vl_pruned_inside_the_llm(tmp_path):
    """base=qwen3_vl through lmms-eval: its class resizes the 64 px images to multiples of 32 px (64 x 64),
    the processor keeps them: 16 x 16 patches of 4 px, 8 x 8 = 64 visual tokens. FastV at layer 1, before
    the DeepStack injections at layers 1 and 2, keeps half of them."""
    import test_qwen2_5_vl

    samples = test_qwen2_5_vl.run_shapes_task(tmp_path, "qwen3_vl", tiny_qwen3_vl, "method=fastv,k=1,ratio=0.5")
    assert len(samples) == 4
    for sample in samples:
        assert (sample["visual_tokens_in"], sample["visual_tokens_kept"]) == (64, 32)
        assert sample["flops_after"] < sample["flops_before"]
