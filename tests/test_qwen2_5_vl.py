"""Qwen2.5-VL adapter: window-ordered probe scores, M-RoPE positions (transformers 5.24's rule) through
pre-LLM and in-LLM cuts, images and video.

References are independent of vtprune: the window order and the M-RoPE positions re-stated here from
the model's rules, full-softmax attention per window, the unpatched LLM fed the hand-pruned sequence
(inputs_embeds, positions) and run one decoder layer at a time with hand cuts.
"""

import functools

import pytest
import torch
from helpers import qwen2_vl_inputs

import vtprune
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, tiny_qwen2_5_vl

IMAGE = (1, 6, 10)  # 3 x 5 merged tokens: windows of 2 x 2 merged tokens, the last row and column partial
VIDEO = (4, 4, 4)  # four temporal slices of 2 x 2 merged tokens
SECONDS = 1.5  # second_per_grid_ts: 3 temporal values per slice (tokens_per_second 2), more than max(h, w) / 2


@functools.cache
def model():
    return tiny_qwen2_5_vl(seed=1)


inputs = functools.partial(qwen2_vl_inputs, seconds=SECONDS)


def rope_positions(kw, tokens_per_second=2, merge=2) -> torch.Tensor:
    """(3, 1, L) M-RoPE positions by transformers 5.24's rule, re-stated: text runs count on; an image or
    video (t, h, w) starting at value s gets (s + floor(i * step), s + row, s + column), step 1 for an
    image and tokens_per_second * second_per_grid_ts for a video; the text after it starts at
    s + max(h, w) / merge."""
    types = kw["mm_token_type_ids"][0].tolist()
    grids = {1: iter(kw.get("image_grid_thw", [])), 2: iter(kw.get("video_grid_thw", []))}
    rows, current, column = [], 0, 0
    while column < len(types):
        kind = types[column]
        if kind == 0:
            rows.append([current] * 3)
            current, column = current + 1, column + 1
            continue
        t, h, w = (int(v) for v in next(grids[kind]))
        step = tokens_per_second * SECONDS if kind == 2 else 1
        for i in range(t):
            for r in range(h // merge):
                for c in range(w // merge):
                    rows.append([current + int(i * step), current + r, current + c])
        column += t * h * w // merge**2
        current += max(h, w) // merge
    return torch.tensor(rows).T[:, None]


def merged(m, kw):
    """Unpatched: the merged input embeddings (1, L, D) and the visual mask (L,)."""
    ids = kw["input_ids"]
    with torch.no_grad():
        embeds = m.get_input_embeddings()(ids)
        for kind, token in (("image", IMAGE_TOKEN_ID), ("video", VIDEO_TOKEN_ID)):
            px = kw.get("pixel_values" if kind == "image" else "pixel_values_videos")
            if px is not None:
                features = getattr(m.model, f"get_{kind}_features")(px, kw[f"{kind}_grid_thw"]).pooler_output
                embeds[ids == token] = torch.cat(features)
    return embeds, (ids[0] == IMAGE_TOKEN_ID) | (ids[0] == VIDEO_TOKEN_ID)


def hand_positions(positions, columns, mode):
    """The kept columns' positions; "compact": each used value -> its rank among the used values."""
    kept = positions[:, :, columns]
    if mode == "original":
        return kept
    rank = {v: i for i, v in enumerate(sorted(set(kept.flatten().tolist())))}
    return kept.clone().apply_(lambda v: rank[v])


def kept_columns(visual, kept):
    keep = ~visual
    keep[visual.nonzero().flatten()[kept]] = True
    return keep.nonzero().flatten()


def test_the_restated_position_rule_is_the_installed_models():
    m = model()
    kw = inputs([IMAGE, VIDEO], ["image", "video"])
    positions, _ = m.model.get_rope_index(
        kw["input_ids"], kw["mm_token_type_ids"], kw["image_grid_thw"], kw["video_grid_thw"], kw["second_per_grid_ts"]
    )
    expected = rope_positions(kw)
    assert torch.equal(positions, expected)
    video = kw["mm_token_type_ids"][0] == 2
    after = video.nonzero().max() + 1
    assert expected[0, 0, after] <= expected[0, 0, video].max()  # 5.24: text after a long video overlaps it


def window_order(grids, window=2, merge=2) -> torch.Tensor:
    """The tower's merged-token order, re-stated: per image / video and temporal slice, windows of
    window x window merged tokens in raster order of windows (partial at the bottom and right edges),
    raster order inside each window."""
    order, offset = [], 0
    for t, h, w in grids:
        rows, cols = h // merge, w // merge
        for i in range(t):
            for top in range(0, rows, window):
                for left in range(0, cols, window):
                    for r in range(top, min(top + window, rows)):
                        for c in range(left, min(left + window, cols)):
                            order.append(offset + (i * rows + r) * cols + c)
        offset += t * rows * cols
    return torch.tensor(order)


def eager_received(m, kw, block_index, windowed):
    """FoPru's significance the plain way, per merged token in the LLM's order: full softmax of the block
    within each window (``windowed``) or each temporal slice, mean over heads and queries, mean over the
    4 patches of a merged token, then the tower's window order undone."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    visual = m.model.visual
    grids = kw["image_grid_thw"].tolist()
    block = visual.blocks[block_index]
    captured = {}
    hook = block.attn.register_forward_pre_hook(
        lambda mod, a, k: captured.update(x=a[0], pe=k["position_embeddings"]), with_kwargs=True
    )
    with torch.no_grad():
        visual(kw["pixel_values"], grid_thw=kw["image_grid_thw"])
        hook.remove()
        x = captured["x"]
        heads = block.attn.num_heads
        q, k, _ = block.attn.qkv(x).view(x.shape[0], 3, heads, -1).unbind(1)
        q, k = apply_rotary_pos_emb_vision(q, k, *captured["pe"])
    order = window_order(grids)
    if windowed:  # groups of merged tokens in the tower's order: one per window
        sizes = [
            min(2, h // 2 - top) * min(2, w // 2 - left)
            for t, h, w in grids
            for _ in range(t)
            for top in range(0, h // 2, 2)
            for left in range(0, w // 2, 2)
        ]
    else:
        sizes = [h * w // 4 for t, h, w in grids for _ in range(t)]
    scores, start = [], 0
    for size in sizes:
        a, b = 4 * start, 4 * (start + size)
        weights = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]).mul(block.attn.scaling).softmax(-1)
        scores.append(weights.mean(dim=(0, 1)).view(-1, 4).mean(dim=1))
        start += size
    in_tower_order = torch.cat(scores)
    return torch.empty_like(in_tower_order).index_put_((order,), in_tower_order)


@pytest.mark.parametrize("block, windowed", [(0, True), (1, False)])
def test_probe_scores_are_put_back_in_the_llms_order(block, windowed):
    m = model()
    grids = [IMAGE, (1, 8, 4)]
    kw = inputs(grids, ["image", "image"], seed=5)
    assert not torch.equal(window_order(grids), torch.arange(19))  # the tower's order differs from the LLM's
    for keep in (4, 7):
        with vtprune.patched(m, f"fopru:keep_tokens={keep},layer={block}") as handle, torch.no_grad():
            m(**kw)
        scores = eager_received(m, kw, block, windowed)
        expected = torch.cat(
            [scores[:15].topk(keep).indices.sort().values, 15 + scores[15:].topk(keep).indices.sort().values]
        )
        assert torch.equal(handle.last.stages[0].kept[0], expected)


@pytest.mark.parametrize("mode", ["original", "compact"])
@pytest.mark.parametrize(
    "spec, grids, kinds",
    [
        ("fastervlm:keep_tokens=5,score=received", [IMAGE], ["image"]),
        ("fopru:keep_tokens=2", [IMAGE, VIDEO], ["image", "video"]),
        ("uniform:keep_tokens=1", [VIDEO], ["video"]),
        ("random:keep_tokens=3,seed=2", [VIDEO, IMAGE], ["video", "image"]),
    ],
)
def test_pre_llm_cut_matches_the_hand_pruned_sequence_through_decode(spec, grids, kinds, mode):
    m = model()
    kw = inputs(grids, kinds, seed=2)
    with vtprune.patched(m, f"{spec},positions={mode}") as handle:
        with torch.no_grad():
            logits = m(**kw).logits
        kept = handle.last.stages[0].kept[0]
        generated = m.generate(**kw, max_new_tokens=4, do_sample=False)[0, kw["input_ids"].shape[1] :].tolist()
    assert len(kept) < int(handle.last.visual_tokens_in[0])
    embeds, visual = merged(m, kw)
    columns = kept_columns(visual, kept)
    x, pos = embeds[:, columns], hand_positions(rope_positions(kw), columns, mode)
    tokens, first = [], None
    with torch.no_grad():
        for _ in range(4):
            out = m.lm_head(
                m.model.language_model(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state
            )
            first = out if first is None else first
            tokens.append(int(out[0, -1].argmax()))
            x = torch.cat([x, m.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], dim=1)
            pos = torch.cat([pos, pos[:, :, -1:] + 1], dim=2)
    torch.testing.assert_close(logits, first, rtol=1e-5, atol=1e-5)
    assert generated == tokens


def layerwise_logits(m, kw, stages):
    """The unpatched LLM one decoder layer at a time on the full prompt, with hand cuts: stages
    [(layer, kept original visual indices)] (layer 0 = before the LLM), positions kept ("original")."""
    lm = m.model.language_model
    embeds, visual = merged(m, kw)
    index = torch.where(visual, visual.long().cumsum(0) - 1, -1)
    hidden, positions = embeds, rope_positions(kw)
    with torch.no_grad():
        for number, layer in enumerate(lm.layers):
            for cut_layer, kept in stages:
                if cut_layer == number:
                    columns = ((index < 0) | torch.isin(index, kept)).nonzero().flatten()
                    hidden, index, positions = hidden[:, columns], index[columns], positions[:, :, columns]
            length = hidden.shape[1]
            mask = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            hidden = layer(hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, positions))
        return m.lm_head(lm.norm(hidden))


@pytest.mark.parametrize(
    "spec", ["fastv:k=2,ratio=0.5", "pdrop:layers=1;2;3,lam=0.5", "uniform:keep_tokens=2+fastv:k=1"]
)
def test_in_llm_methods_match_a_layerwise_reference(spec):
    m = model()
    kw = inputs([IMAGE, VIDEO], ["image", "video"], seed=8)
    spec = "+".join(f"{part},positions=original" for part in spec.split("+"))
    with vtprune.patched(m, spec) as handle, torch.no_grad():
        logits = m(**kw).logits
    record = handle.last
    assert record.visual_tokens_kept[0] < record.visual_tokens_in[0]
    stages = [(max(stage.layer, 0), stage.kept[0]) for stage in record.stages]
    torch.testing.assert_close(logits, layerwise_logits(m, kw, stages), rtol=1e-5, atol=1e-5)


def test_quota_frames_keep_the_video_time_step(monkeypatch):
    """QuoTA's resized frames: frame i of a video starting at s keeps the temporal value the model gave it,
    s + floor(i x tokens_per_second x second_per_grid_ts) (here s + 3 i), not Qwen2-VL's s + i."""
    import vtprune.patches.qwen2_vl as qwen2_vl

    calls = []
    original = qwen2_vl.frame_positions
    monkeypatch.setattr(qwen2_vl, "frame_positions", lambda *a: calls.append(a) or original(*a))
    m = model()
    kw = inputs([VIDEO], ["video"], seed=3)
    with (
        torch.no_grad(),
        vtprune.patched(
            m,
            "quota",
            scorer=lambda frames, prompt: torch.linspace(0.2, 0.9, frames.shape[0]),
            query="What?",
            keep_ratio=0.5,
        ) as handle,
    ):
        m(**kw)
    assert handle.last.visual_tokens_kept[0] < handle.last.visual_tokens_in[0]
    video = kw["mm_token_type_ids"][0] == 2
    start = int(rope_positions(kw)[0, 0, video.nonzero().min()])
    ((grids, times, first),) = calls
    assert int(first) == start
    assert times.tolist() == [start + int(i * 2 * SECONDS) for i in range(VIDEO[0])]
    rows = original(grids, times, first)
    kept_frames = [i for i, grid in enumerate(grids) if grid is not None]
    assert set(rows[0].tolist()) == {start + int(i * 2 * SECONDS) for i in kept_frames}


# -- lmms-eval end to end (base=qwen2_5_vl; test_qwen3_vl.py: base=qwen3_vl) -----------------------
def save_tiny_qwen(path, builder, answer="red"):
    """save_pretrained a tiny Qwen-VL family model that always answers ``answer`` and its processor."""
    from eval_helpers import answer_always

    from vtprune.evals.models.processors import build_qwen2_vl_processor
    from vtprune.evals.tasks import shapes

    processor = build_qwen2_vl_processor(shapes.corpus())
    tokenizer = processor.tokenizer
    model = builder(vocab=len(tokenizer), hidden=128)  # one-hot embeddings: hidden >= vocabulary
    answer_always(model, tokenizer, answer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def run_shapes_task(tmp_path, base, builder, method, limit=4):
    """``python -m lmms_eval --model vtprune --model_args base=BASE,...`` on the offline shapes task with
    ``limit`` samples; asserts the accuracy (the model always answers red) and returns the per-sample
    statistics."""
    import json

    pytest.importorskip("qwen_vl_utils", reason="lmms-eval's Qwen classes need qwen-vl-utils")
    from eval_helpers import run_lmms_eval

    from vtprune.evals.tasks import shapes
    from vtprune.evals.tasks.make_task import make_builtin_task

    model_dir = save_tiny_qwen(tmp_path / "model", builder)
    task_dir = make_builtin_task("vtprune_shapes", tmp_path / "tasks", n=limit)
    stats = tmp_path / "stats.json"
    model_args = (
        f"base={base},pretrained={model_dir},device=cpu,min_pixels=1024,max_pixels=4096,{method},stats_path={stats}"
    )
    result = run_lmms_eval(
        ["--model", "vtprune", "--model_args", model_args, "--tasks", "vtprune_shapes"]
        + ["--include_path", str(task_dir.parent), "--output_path", str(tmp_path / "out")],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    accuracy = json.loads(results_file.read_text())["results"]["vtprune_shapes"]["exact_match,none"]
    expected = sum(r["answer"] == "red" for r in shapes.records(limit)) / limit  # the model always answers red
    assert 0 < expected < 1 and accuracy == pytest.approx(expected)
    return json.loads(stats.read_text())["samples"]


def test_lmms_eval_runs_base_qwen2_5_vl_pruned(tmp_path):
    """lmms-eval's Qwen2.5-VL class resizes the 64 px images to multiples of 28 px within max_pixels 4096
    (56 x 56), the processor keeps multiples of 8 px: 14 x 14 patches of 4 px, 7 x 7 = 49 visual tokens."""
    samples = run_shapes_task(tmp_path, "qwen2_5_vl", tiny_qwen2_5_vl, "method=fopru,keep_ratio=0.25")
    assert len(samples) == 4
    for sample in samples:
        assert (sample["visual_tokens_in"], sample["visual_tokens_kept"]) == (49, 12)  # int(0.25 x 49) per frame
        assert sample["llm_prompt_tokens"] == sample["prompt_tokens"] - (49 - 12)
        assert sample["flops_after"] < sample["flops_before"]


def test_bench_rows_follow_the_budget_arithmetic():
    """The Qwen2.5-VL benchmark on the tiny model: a 48 x 64 px image is 12 x 16 patches, 6 x 8 = 48 tokens."""
    from vtprune.evals.bench import qwen2_5_vl as bench

    m = model()
    assert bench.image_grid(m, (966, 1288)) == (1, 242, 322)  # 968 x 1288 px (multiples of 8) in 4 px patches
    inputs = bench.qwen_inputs(m, 12, "cpu", image=(48, 64))
    rows = {row["config"]: row for row in bench.measure(m, inputs, repeats=1, ratios=(0.25,))}
    assert list(rows) == [
        "full",
        "fastervlm keep 0.25 (received)",
        "fopru keep 0.25",
        "uniform keep 0.25",
        "fastv k=1 R=0.75",
    ]
    assert rows["full"]["visual_tokens"] == 48
    for name, row in list(rows.items())[1:]:
        assert row["visual_tokens"] == 12, name  # 0.25 x 48
        assert row["llm_flops"] < rows["full"]["llm_flops"] and row["flops_ideal_speedup"] > 1
    assert rows["fastv k=1 R=0.75"]["layer_tokens"][0] == inputs["input_ids"].shape[1]  # layer 0 sees every token
