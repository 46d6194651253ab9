"""QuoTA on Qwen2-VL: frames from the flattened patches, per-frame grids, M-RoPE positions, decode.

References are independent of vtprune: the processor's own patch flattening, the budget and grid
rules written out by hand, and the unpatched model's language model run on a hand-built sequence
(text, then each item's kept frames resized with ``F.interpolate``, then text) whose M-RoPE
positions follow the model's own rule (``get_rope_index``: frame i of an item starting at s has
(s + i, s + row, s + column); the text after an item starts at s + its larger spatial side), then
the "compact" renumbering (each used value -> its rank, with Python sets). Decoding continues at
the prompt's last position + 1, as ``generate`` continues a prompt (even where a video's temporal
values pass the text after it: the "long video" case).
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import hook_counts
from helpers import qwen2_vl_prompt
from test_qwen2_vl import left_padded_batch
from test_qwen2_vl import merged as merged_batch
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

import vtprune
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, tiny_qwen2_vl
from vtprune.patches.qwen2_vl import frames_from_patches

PATCH, MERGE, TEMPORAL, CHANNELS = 4, 2, 2, 3  # the tiny model's vision config


@functools.cache
def model():
    return tiny_qwen2_vl(seed=1)


def flatten_video(frames):
    """(F, C, H, W) frames -> pixel_values_videos rows and the (t, h, w) grid, by the processor itself."""
    rows, t, h, w = Qwen2VLVideoProcessor().patchify(
        frames[None], patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL
    )
    return rows[0], (t, h, w)


def flatten_image(image):
    rows, h, w = Qwen2VLImageProcessor().patchify(
        image[None], patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL
    )
    return rows[0], (1, h, w)


def random_frames(count, height, width, seed):
    return torch.randn(count, CHANNELS, height, width, generator=torch.Generator().manual_seed(seed))


def prompt(items, text=(3, 4), seed=0):
    """items: [("video", (F, C, H, W) frames) or ("image", (C, H, W))] in order of appearance."""
    pixels, grids, order = {"image": [], "video": []}, {"image": [], "video": []}, []
    for kind, x in items:
        rows, grid = flatten_video(x) if kind == "video" else flatten_image(x)
        pixels[kind].append(rows)
        grids[kind].append(grid)
        order.append(grid)
    ids, types = qwen2_vl_prompt(list(text) + [2] * (len(items) - 1), order, [k for k, _ in items], seed=seed)
    kw = {"input_ids": ids[None], "mm_token_type_ids": types[None]}
    if pixels["image"]:
        kw |= {"pixel_values": torch.cat(pixels["image"]), "image_grid_thw": torch.tensor(grids["image"])}
    if pixels["video"]:
        kw |= {"pixel_values_videos": torch.cat(pixels["video"]), "video_grid_thw": torch.tensor(grids["video"])}
    return kw


def stub(*per_call):
    """A scorer with fixed yes-probabilities: call k (one per image / video, in order of appearance)
    answers per_call[k]; it records the frames it was handed."""
    frames_seen = []

    def scorer(frames, text):
        frames_seen.append(frames.clone())
        return torch.tensor(per_call[len(frames_seen) - 1])

    scorer.frames = frames_seen
    return scorer


def by_pixels(frames, text):  # depends on each frame only: the same answer alone or in a batch
    return torch.sigmoid(frames.float().mean(dim=(1, 2, 3)) * 20)


def hand_tokens(p, total):
    """int(T * w_i), w_i = (100 p_i)^2 normalised (equal weights when all are 0)."""
    squares = [(100 * x) ** 2 for x in p]
    squares = squares if sum(squares) else [1.0] * len(p)
    return [int(total * (s / sum(squares))) for s in squares]


def hand_grid(n, native):
    """Square frames: floor-sqrt grid, h = w = floor(sqrt(n)), one more row while it still fits in n.
    A non-square native (H, W) grid: the aspect-kept grid h = floor(sqrt(n H / W)), w = floor(n / h)."""
    if n == 0:
        return None
    if native[0] != native[1]:
        h = max(1, min(n, math.floor(math.sqrt(n * native[0] / native[1]))))
        return h, n // h
    h = w = math.isqrt(n)
    return (h + 1, w) if h * w < n and (h + 1) * w <= n else (h, w)


def merged(m, kw):
    """Unpatched model: (L, D) merged input embeddings and its own (3, L) M-RoPE positions."""
    embeds, positions, _ = merged_batch(m, kw)
    return embeds[0], positions[:, 0]


def hand_reference(m, kw, item_grids, steps=4):
    """The unpatched LLM on the hand-built prompt, greedy, without a cache: the prompt's logits, the
    generated tokens and each step's last-column logits.

    item_grids: per image / video in order of appearance, each frame's resized grid (None: dropped).
    """
    embeds, positions = merged(m, kw)
    ids = kw["input_ids"][0].tolist()
    native = {
        "image": iter(kw.get("image_grid_thw", torch.zeros(0, 3)).tolist()),
        "video": iter(kw.get("video_grid_thw", torch.zeros(0, 3)).tolist()),
    }
    parts, rows, move, column, item = [], [], 0, 0, 0
    while column < len(ids):
        if ids[column] not in (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID):  # text: its own position, moved
            parts.append(embeds[column : column + 1])
            rows.append([int(v) + move for v in positions[:, column]])
            column += 1
            continue
        t, h, w = next(native["image" if ids[column] == IMAGE_TOKEN_ID else "video"])
        h, w = h // MERGE, w // MERGE
        frames = embeds[column : column + t * h * w].view(t, h, w, -1)
        start = int(positions[0, column]) + move
        for i, grid in enumerate(item_grids[item]):
            if grid is None:
                continue
            resized = F.interpolate(frames[i].permute(2, 0, 1)[None], size=grid, mode="bilinear", align_corners=False)
            parts.append(resized[0].permute(1, 2, 0).reshape(grid[0] * grid[1], -1))
            rows += [[start + i, start + r, start + c] for r in range(grid[0]) for c in range(grid[1])]
        move += max(max(g) for g in item_grids[item] if g) - max(h, w)  # text after: start + larger side
        column += t * h * w
        item += 1
    rank = {v: i for i, v in enumerate(sorted({v for row in rows for v in row}))}  # "compact"
    x = torch.cat(parts)[None]
    pos = torch.tensor([[rank[v] for v in row] for row in rows]).T[:, None]  # (3, 1, L')
    tokens, first_logits, step_logits = [], None, []
    with torch.no_grad():
        for _ in range(steps):
            hidden = m.model.language_model(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state
            logits = m.lm_head(hidden)
            first_logits = logits if first_logits is None else first_logits
            step_logits.append(logits[:, -1])
            token = logits[0, -1].argmax()
            tokens.append(int(token))
            x = torch.cat([x, m.get_input_embeddings()(token.view(1, 1))], dim=1)
            pos = torch.cat([pos, pos[:, :, -1:] + 1], dim=2)
    return first_logits, tokens, torch.stack(step_logits, dim=1)


def greedy(m, kw, steps=4):
    with torch.no_grad():
        return m.generate(**kw, max_new_tokens=steps, do_sample=False)


# -- tests ----------------------------------------------------------------------------------------


def test_frames_from_patches_inverts_the_processors_flattening():
    video = random_frames(7, 16, 24, seed=0)  # odd: the processor repeats the last frame
    rows, grid = flatten_video(video)
    assert grid == (4, 4, 6)
    assert torch.equal(frames_from_patches(rows, grid, CHANNELS, PATCH, MERGE, TEMPORAL), video[0::2])
    image = random_frames(1, 8, 16, seed=1)[0]
    rows, grid = flatten_image(image)
    assert torch.equal(frames_from_patches(rows, grid, CHANNELS, PATCH, MERGE, TEMPORAL), image[None])


def test_keep_all_is_bit_identical_and_remove_restores():
    m = model()
    prompts = {
        "video": (prompt([("video", random_frames(8, 16, 16, seed=2))]), [0.3] * 4),
        "one-frame video": (prompt([("video", random_frames(2, 16, 16, seed=3))]), [0.2]),
        "non-square video": (prompt([("video", random_frames(4, 16, 24, seed=6))]), [0.3] * 2),  # 2 x 3 frames
        "image + video": (
            prompt([("image", random_frames(1, 16, 16, seed=4)[0]), ("video", random_frames(8, 16, 16, seed=5))]),
            [0.0],
        ),
    }
    references = {}
    with torch.no_grad():
        for name, (kw, _) in prompts.items():
            references[name] = (m(**kw).logits, greedy(m, kw))
    before = hook_counts(m)
    for name, (kw, p) in prompts.items():
        calls = [p] if name != "image + video" else [p, [0.3] * 4]
        with vtprune.patched(m, "quota", scorer=stub(*calls, *calls), query="q") as handle, torch.no_grad():
            assert torch.equal(m(**kw).logits, references[name][0]), name
            native = 6 if name == "non-square video" else 4  # each frame its own 2 x 2 (2 x 3) grid
            assert all(t == [native] * len(t) for t in handle.last.extra["frame_tokens"])
            assert handle.last.visual_tokens_kept == handle.last.visual_tokens_in
            assert torch.equal(greedy(m, kw), references[name][1]), name
    assert hook_counts(m) == before
    assert not {"get_image_features", "get_video_features"} & set(vars(m.model))
    with torch.no_grad():
        for name, (kw, _) in prompts.items():
            assert torch.equal(m(**kw).logits, references[name][0])


CASES = {
    # T = 16: w ∝ 8100, 2500, 100, 0 -> 12, 3, 0, 0 tokens -> (4, 3) (up-sampled from 2 x 2), (2, 1)
    "video": ([("video", 8, 16, 16)], [[0.9, 0.5, 0.1, 0.0]], {}, (3, 4)),
    "video, keep_ratio": ([("video", 8, 16, 16)], [[0.9, 0.5, 0.1, 0.0]], {"keep_ratio": 0.5}, (3, 4)),
    # six frames, short text after: temporal values pass the text (largest position != last column)
    "long video": ([("video", 12, 16, 16)], [[0.5, 0.0, 0.0, 0.0, 0.0, 0.5]], {"budget_tokens": 4}, (3, 1)),
    # a 2 x 3 image (its own budget, one frame) then a video with frames 2 x 3 tokens wide
    "image + video": (
        [("image", 1, 16, 24), ("video", 6, 16, 24)],
        [[0.7], [0.5, 0.0, 0.5]],
        {"keep_ratio": 0.5},
        (3, 4),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_a_hand_built_reference_through_decode(case):
    spec, probabilities, options, text = CASES[case]
    built = [random_frames(n, hgt, wid, seed=10 + i) for i, (_, n, hgt, wid) in enumerate(spec)]
    items = [(kind, x if kind == "video" else x[0]) for (kind, *_), x in zip(spec, built, strict=True)]
    kw = prompt(items, text=text, seed=6)
    m = model()
    scorer = stub(*probabilities, *probabilities)
    with vtprune.patched(m, "quota", scorer=scorer, query="q", **options) as handle:
        with torch.no_grad():
            logits = m(**kw).logits
        extra = handle.last.extra
        with torch.no_grad():
            out = m.generate(**kw, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected_tokens, expected_grids = [], []
    for (_, _, hgt, wid), p in zip(spec, probabilities, strict=True):
        unpruned = len(p) * (hgt // PATCH // MERGE) * (wid // PATCH // MERGE)
        total = options.get("budget_tokens") or max(1, math.floor(options.get("keep_ratio", 1.0) * unpruned + 0.5))
        expected_tokens.append(hand_tokens(p, total))
        native = (hgt // PATCH // MERGE, wid // PATCH // MERGE)
        expected_grids.append([hand_grid(k, native) for k in expected_tokens[-1]])
    assert extra["frame_tokens"] == expected_tokens
    assert extra["frame_grids"] == expected_grids
    assert handle.last.visual_tokens_kept == [sum(g[0] * g[1] for grids in expected_grids for g in grids if g)]
    for seen, x, (kind, *_) in zip(scorer.frames[: len(spec)], built, spec, strict=True):  # our frames
        assert torch.equal(seen, x[0::2] if kind == "video" else x)
    reference_logits, reference_tokens, reference_steps = hand_reference(m, kw, expected_grids)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    assert out.sequences[0, kw["input_ids"].shape[1] :].tolist() == reference_tokens
    torch.testing.assert_close(torch.stack(out.logits, dim=1), reference_steps, rtol=1e-5, atol=1e-5)  # cached decode


def test_batch_of_two_videos_with_different_grids_equals_each_alone():
    m = model()
    samples = [
        prompt([("video", random_frames(8, 16, 16, seed=20))], seed=7),
        prompt([("video", random_frames(4, 16, 24, seed=21))], text=(5, 2), seed=8),
    ]
    batch = left_padded_batch(samples, "video")
    ids = batch["input_ids"]
    with vtprune.patched(m, "quota", scorer=by_pixels, query="q", keep_ratio=0.5) as handle:
        with torch.no_grad():
            together_logits = m(**batch).logits[:, -1]
        plans = handle.last.extra["frame_grids"]
        together = greedy(m, batch)
        for row, s in enumerate(samples):
            with torch.no_grad():
                alone_logits = m(**s).logits[0, -1]
            assert handle.last.extra["frame_grids"] == [plans[row]]
            torch.testing.assert_close(together_logits[row], alone_logits, rtol=1e-4, atol=1e-5)
            alone = greedy(m, s)
            assert torch.equal(alone[0], together[row, ids.shape[1] - s["input_ids"].shape[1] :])
    assert plans[0] != plans[1]


def test_stacks_with_an_in_llm_stage_and_refuses_bad_budgets():
    m = model()
    kw = prompt([("video", random_frames(8, 16, 16, seed=30))])
    stages = [("quota", {"scorer": stub([0.9, 0.5, 0.1, 0.0]), "query": "q"}), ("fastv", {"k": 1, "ratio": 0.5})]
    with vtprune.patched(m, stages) as handle, torch.no_grad():
        m(**kw)
    assert [s["kept"] for s in handle.last.summary()["stages"]] == [[14], [7]]
    with (
        vtprune.patched(m, "quota", scorer=by_pixels, query="q", budget_tokens=17),
        torch.no_grad(),
        pytest.raises(ValueError, match="exceeds the video's 16 unpruned frame tokens"),
    ):
        m(**kw)
    with (
        vtprune.patched(m, "quota", scorer=by_pixels),
        torch.no_grad(),
        pytest.raises(ValueError, match="needs the user's question"),
    ):
        m(**kw)


def test_a_scorer_running_the_model_itself_leaves_decode_positions_alone():
    """The self-scorer runs the patched model (suspended) inside the prefill; its forward resets the
    model's ``rope_deltas``. A manual decode loop (no positions, no mask) reads them."""
    m = model()
    kw = prompt([("video", random_frames(8, 16, 16, seed=40))], seed=9)
    other = prompt([("image", random_frames(1, 16, 24, seed=41)[0])], text=(9, 2), seed=10)

    def scorer(frames, text):
        with vtprune.get_handle(m).suspended(), torch.no_grad():
            m(**other)
        return torch.tensor([0.9, 0.5, 0.1, 0.0])

    with vtprune.patched(m, "quota", scorer=scorer, query="q"), torch.no_grad():
        out = m(**kw, use_cache=True)
        steps, cache = [out.logits[:, -1]], out.cache
        for _ in range(3):
            out = m(input_ids=steps[-1].argmax(dim=-1, keepdim=True), cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    _, _, expected = hand_reference(m, kw, [[(4, 3), (2, 1), None, None]])
    torch.testing.assert_close(torch.stack(steps, dim=1), expected, rtol=1e-5, atol=1e-5)


# -- the patched model as its own scorer -------------------------------------------------------------


def test_the_patched_qwen2_vl_scores_its_own_frames():
    from vtprune.evals.models.processors import build_qwen2_vl_processor
    from vtprune.methods import quota

    question = "what is the man holding ?"
    processor = build_qwen2_vl_processor([quota.ENTITY_PROMPT, quota.QUESTION_PROMPT, question])
    m = model()
    pictures = torch.rand(6, CHANNELS, 16, 16, generator=torch.Generator().manual_seed(5))  # t = 3 slices
    video = [{"type": "video"}, {"type": "text", "text": question}]
    kw = processor(text=[quota.chat_turn(processor, video)], videos=[pictures], return_tensors="pt", do_rescale=False)
    yes = processor.tokenizer.convert_tokens_to_ids("A")
    expected = []
    for picture in pictures[::TEMPORAL]:  # a slice's frame: the first of its temporal pair, as a one-frame video
        parts = [{"type": "video"}, {"type": "text", "text": quota.scoring_prompt(question, None)}]
        turn = quota.chat_turn(processor, parts)
        one = processor(text=[turn], videos=[picture[None]], return_tensors="pt", do_rescale=False)
        with torch.no_grad():
            expected.append(m(**one).logits[0, -1].softmax(dim=-1)[yes])
    with vtprune.patched(m, "quota", processor=processor, query=question, keep_ratio=0.5) as handle, torch.no_grad():
        logits = m(**kw).logits
        got = torch.tensor(handle.last.extra["yes_probability"][0], dtype=torch.float32)
        generated = m.generate(**kw, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-7)
    with vtprune.patched(m, "quota", scorer=lambda f, t: got, query=question, keep_ratio=0.5), torch.no_grad():
        assert torch.equal(m(**kw).logits, logits)
        assert torch.equal(m.generate(**kw, max_new_tokens=3, do_sample=False), generated)
