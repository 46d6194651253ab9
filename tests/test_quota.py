"""QuoTA building blocks: budget arithmetic and grids against hand-computed values."""

import pytest
import torch
import torch.nn.functional as F

from vtprune.methods.quota import frame_budgets, frame_grid, resize_frame


def test_budgets_follow_int_of_T_times_squared_weights():
    p = torch.tensor([0.9, 0.5, 0.1, 0.0])
    squares = [(100 * x) ** 2 for x in (0.9, 0.5, 0.1, 0.0)]
    expected = [int(100 * s / sum(squares)) for s in squares]  # 75, 23, 0, 0
    got = frame_budgets(p, 100)
    assert got.tolist() == expected and int(got.sum()) <= 100
    assert (got == 0).tolist() == [False, False, True, True]  # frames with zero weight are dropped


def test_budgets_equal_weights_and_bad_input():
    assert frame_budgets(torch.zeros(3), 10).tolist() == [3, 3, 3]
    assert frame_budgets(torch.tensor([0.7]), 196).tolist() == [196]  # one frame: the whole budget
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        frame_budgets(torch.tensor([1.5]), 10)
    with pytest.raises(ValueError, match="no frames"):
        frame_budgets(torch.tensor([]), 10)


@pytest.mark.parametrize("n, grid", [(1, (1, 1)), (12, (4, 3)), (16, (4, 4)), (20, (5, 4)), (196, (14, 14))])
def test_grid_rule(n, grid):
    assert frame_grid(n) == grid and grid[0] * grid[1] <= n


@pytest.mark.parametrize(
    "n, native, grid",
    [(6, (2, 3), (2, 3)), (24, (4, 6), (4, 6)), (10, (2, 3), (2, 5)), (3, (6, 4), (2, 1)), (1, (4, 1), (1, 1))],
)
def test_non_square_frames_keep_their_aspect_ratio(n, native, grid):
    assert frame_grid(n, native) == grid and grid[0] * grid[1] <= n
    assert frame_grid(n, (5, 5)) == frame_grid(n)  # square frames: the official rule


def test_resize_modes():
    x = torch.randn(6, 6, 8)
    bilinear = resize_frame(x, (3, 3))
    expected = F.interpolate(x.permute(2, 0, 1)[None], size=(3, 3), mode="bilinear")[0].permute(1, 2, 0)
    torch.testing.assert_close(bilinear, expected)
    torch.testing.assert_close(resize_frame(x, (3, 3), "pool"), x.view(3, 2, 3, 2, 8).mean(dim=(1, 3)))
    assert torch.equal(resize_frame(x, (2, 2), "uniform"), x[[0, 5]][:, [0, 5]])


# -- the registered method on LLaVA-OneVision video prompts -------------------------------------

import functools  # noqa: E402

from conftest import hook_counts  # noqa: E402
from test_llava_onevision import language_model_inputs  # noqa: E402

import vtprune  # noqa: E402
from vtprune.evals.models.transformers_vlms import VIDEO_TOKEN_ID, tiny_llava, tiny_llava_onevision  # noqa: E402
from vtprune.methods.quota import parse_entities, scoring_prompt  # noqa: E402

FRAME = 4  # pooled tokens per frame of the tiny model (2 x 2)


@functools.cache
def onevision():
    return tiny_llava_onevision(seed=3)


def video_inputs(frames=4, seed=0, prefix=(9, 10)):
    px = torch.randn(1, frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([torch.tensor(prefix), torch.full((frames * FRAME + 1,), VIDEO_TOKEN_ID), torch.tensor([12, 13])])
    return {"input_ids": ids[None], "pixel_values_videos": px}


def fixed(*p):
    """A stub scorer with fixed yes-probabilities: the first call gets the first frames' values,
    a later call (score_batch) the last ones; it records (frames, prompt) per call."""
    calls = []

    def scorer(frames, prompt):
        calls.append((frames.shape[0], prompt))
        return torch.tensor(p[: frames.shape[0]]) if len(calls) == 1 else torch.tensor(p[-frames.shape[0] :])

    scorer.calls = calls
    return scorer


def by_pixels(frames, prompt):  # depends on each frame only: the same answer alone or in a batch
    return torch.sigmoid(frames.float().mean(dim=(1, 2, 3)) * 20)


def merged(m, kw):
    """(L, D) what the language model receives for one prompt (the merged prompt when unpatched)."""
    return language_model_inputs(m, kw)[0]


def llm_logits(m, embeds):
    with torch.no_grad():
        hidden = m.model.language_model(
            inputs_embeds=embeds[None], position_ids=torch.arange(embeds.shape[0])[None], use_cache=False
        ).last_hidden_state
        return m.lm_head(hidden)


def test_stub_scorer_gives_hand_computed_frame_grids_and_logits():
    m = onevision()
    kw = video_inputs(seed=6)
    x = merged(m, kw)  # (2 + 17 + 2, D)
    frames = x[2:18].view(4, 2, 2, -1)

    def up(frame, size):
        return F.interpolate(frame.permute(2, 0, 1)[None], size=size, mode="bilinear")[0].permute(1, 2, 0)

    # w ∝ p²: 8100, 2500, 100, 0 of 10700; T = 16 -> int(12.11), int(3.74), int(0.15), 0 = 12, 3, 0, 0
    # grids: 12 -> (4, 3) (up-sampled from 2 x 2), 3 -> (2, 1); frames 2 and 3 dropped
    expected = torch.cat(
        [x[:2], up(frames[0], (4, 3)).reshape(12, -1), up(frames[1], (2, 1)).reshape(2, -1), x[18:]], dim=0
    )
    scorer = fixed(0.9, 0.5, 0.1, 0.0)
    with vtprune.patched(m, "quota", scorer=scorer, query="Where is the cat?") as handle:
        with torch.no_grad():
            logits = m(**kw).logits
        last = handle.last
        assert last.extra["frame_tokens"] == [[12, 3, 0, 0]]
        assert last.extra["frame_grids"] == [[(4, 3), (2, 1), None, None]]
        assert last.stages[0].kept[0].tolist() == list(range(14)) + [16]
        assert last.visual_tokens_in == [17] and last.visual_tokens_kept == [15]
        assert last.scoring_seconds is not None and last.scoring_seconds >= 0
        cached = m.generate(**kw, max_new_tokens=4, do_sample=False)
        uncached = m.generate(**kw, max_new_tokens=4, do_sample=False, use_cache=False)
    torch.testing.assert_close(logits, llm_logits(m, expected), rtol=1e-5, atol=1e-5)
    assert torch.equal(cached, uncached)
    assert scorer.calls[0] == (4, scoring_prompt("Where is the cat?", None))


@pytest.mark.parametrize("reduce", ["pool", "uniform"])
def test_other_reductions(reduce):
    m = onevision()
    kw = video_inputs(seed=2)
    frames = merged(m, kw)[2:18].view(4, 2, 2, -1)
    with vtprune.patched(m, "quota", scorer=fixed(0.0, 1.0, 0.0, 0.0), query="q", reduce=reduce, budget_tokens=1):
        pruned = merged(m, kw)
    expected = frames[1].mean(dim=(0, 1)) if reduce == "pool" else frames[1, 0, 0]
    torch.testing.assert_close(pruned[2], expected)  # frame 1 alone, one token
    assert pruned.shape[0] == 2 + 1 + 1 + 2


def test_keep_all_is_bit_identical_and_remove_restores():
    m = onevision()
    kw = video_inputs(seed=1)
    with torch.no_grad():
        reference = m(**kw).logits
    tokens = m.generate(**kw, max_new_tokens=4, do_sample=False)
    before = hook_counts(m)
    # equal probabilities and T = 16: 4 tokens per frame = each frame's own 2 x 2 grid
    with vtprune.patched(m, "quota", scorer=fixed(0.3, 0.3, 0.3, 0.3), query="q") as handle, torch.no_grad():
        assert torch.equal(m(**kw).logits, reference)
        assert handle.last.extra["frame_tokens"] == [[4, 4, 4, 4]]
        assert torch.equal(m.generate(**kw, max_new_tokens=4, do_sample=False), tokens)
    # a one-frame video gets the whole budget: its own grid again
    one = video_inputs(frames=1, seed=4)
    with torch.no_grad():
        alone = m(**one).logits
    with vtprune.patched(m, "quota", scorer=fixed(0.2), query="q") as handle, torch.no_grad():
        assert torch.equal(m(**one).logits, alone)
        assert handle.last.extra["frame_tokens"] == [[4]]
    assert hook_counts(m) == before
    with torch.no_grad():
        assert torch.equal(m(**kw).logits, reference)


def test_batch_invariance():
    m = onevision()
    a, b = video_inputs(seed=7), video_inputs(seed=8, prefix=(9, 10, 11, 14))
    pad = b["input_ids"].shape[1] - a["input_ids"].shape[1]
    batch = {
        "input_ids": torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), a["input_ids"]], 1), b["input_ids"]]),
        "attention_mask": torch.cat(
            [torch.cat([torch.zeros(1, pad), torch.ones_like(a["input_ids"])], 1), torch.ones_like(b["input_ids"])]
        ).long(),
        "pixel_values_videos": torch.cat([a["pixel_values_videos"], b["pixel_values_videos"]]),
    }
    with vtprune.patched(m, "quota", scorer=by_pixels, query="q", budget_tokens=10) as handle, torch.no_grad():
        together = m(**batch).logits[:, -1]
        tokens = handle.last.extra["frame_tokens"]
        alone = []
        for kw in (a, b):
            alone.append(m(**kw).logits[0, -1])
            assert handle.last.extra["frame_tokens"] == [tokens[len(alone) - 1]]
    assert tokens[0] != tokens[1] and all(sum(t) <= 10 for t in tokens)  # different plans in one batch
    torch.testing.assert_close(together, torch.stack(alone), rtol=1e-4, atol=1e-5)


def test_bad_input():
    m = onevision()
    kw = video_inputs()
    with pytest.raises(ValueError, match="which needs its processor: pass processor="):
        vtprune.patch(m, "quota", query="q")
    with pytest.raises(ValueError, match="positions='compact'"):
        vtprune.patch(m, "quota", scorer=by_pixels, positions="original")
    with pytest.raises(ValueError, match="supported on LLaVA-OneVision and Qwen2-VL"):
        vtprune.patch(tiny_llava(), "quota", scorer=by_pixels, query="q")
    with vtprune.patched(m, "quota", scorer=by_pixels) as handle, torch.no_grad():
        with pytest.raises(ValueError, match="needs the user's question"):
            m(**kw)
        handle.set_query("   ")
        with pytest.raises(ValueError, match="needs the user's question"):
            m(**kw)
        handle.set_query("what?")
        m(**kw)
    with (
        vtprune.patched(m, "quota", scorer=by_pixels, query="q", budget_tokens=17),
        torch.no_grad(),
        pytest.raises(ValueError, match="exceeds the video's 16 unpruned frame tokens"),
    ):
        m(**kw)
    with (
        vtprune.patched(m, "quota", scorer=fixed(0.5, 0.5, 0.5, 0.5), query="q", budget_tokens=3),
        torch.no_grad(),
        pytest.raises(ValueError, match="every frame 0 tokens"),
    ):
        m(**kw)
    with (
        vtprune.patched(m, "quota", scorer=lambda f, p: torch.ones(2), query="q"),
        torch.no_grad(),
        pytest.raises(ValueError, match="returned 2 probabilities for 4 frames"),
    ):
        m(**kw)


def test_frames_are_scored_in_batches():
    m = onevision()
    scorer = fixed(1.0, 0.0, 0.0, 0.0)
    with vtprune.patched(m, "quota", scorer=scorer, query="q", score_batch=3) as handle, torch.no_grad():
        m(**video_inputs())
    assert [n for n, _ in scorer.calls] == [3, 1]
    assert handle.last.extra["frame_tokens"] == [[16, 0, 0, 0]]


def test_query_decoupling_and_its_fallback():
    good = "Step 1: Yes\nStep 2: ['dog', 'color']\nStep 3: ['dog', 'red ball']"
    assert parse_entities(good) == ["dog", "red ball"]
    assert parse_entities("step 1: no\nstep 3: ['dog']") is None
    assert parse_entities("step 1: yes\nstep 3: [dog") is None
    assert parse_entities("step 1: yes\nstep 3: [os.system('x')]") is None
    m = onevision()
    scorer = fixed(0.5, 0.5, 0.5, 0.5)
    prompts = []
    decoupler = lambda text: prompts.append(text) or good  # noqa: E731
    with (
        vtprune.patched(m, "quota", scorer=scorer, query="Is the dog red?", decouple=True, decoupler=decoupler),
        torch.no_grad(),
    ):
        m(**video_inputs())
    assert "Is the dog red?" in prompts[0]
    assert scorer.calls[0][1] == "Does the image contain any object of {dog, red ball}? A. yes, B. no\n" + (
        "Answer with the option's letter directly."
    )

    def broken(text):
        raise RuntimeError("no LLM")

    scorer = fixed(0.5, 0.5, 0.5, 0.5)
    with (
        vtprune.patched(m, "quota", scorer=scorer, query="Q?", decouple=True, decoupler=broken),
        pytest.warns(UserWarning, match="decoupling failed"),
        torch.no_grad(),
    ):
        m(**video_inputs())
    assert scorer.calls[0][1].startswith("Q?\nDoes the image contain sufficient information")


def test_stacks_with_an_in_llm_stage():
    m = onevision()
    stages = [("quota", {"scorer": fixed(0.9, 0.5, 0.1, 0.0), "query": "q"}), ("fastv", {"k": 1, "ratio": 0.5})]
    with vtprune.patched(m, stages) as handle, torch.no_grad():
        m(**video_inputs(seed=6))
        summary = handle.last.summary()
    assert [s["kept"] for s in summary["stages"]] == [[15], [8]]  # 14 resized tokens + newline, then half


# -- the patched model as its own scorer and decoupler ------------------------------------------

from vtprune.evals.models.processors import build_onevision_processor  # noqa: E402
from vtprune.methods import quota as quota_module  # noqa: E402

QUESTION = "what is the man holding ?"


@functools.cache
def onevision_processor():
    corpus = [quota_module.ENTITY_PROMPT, quota_module.QUESTION_PROMPT, quota_module.DECOUPLE_TEMPLATE, QUESTION]
    return build_onevision_processor(corpus)


def processed_video(frames=4, seed=0):
    """A video through the processor: pixels in [0, 1], the chat prompt with its <video> placeholders."""
    processor = onevision_processor()
    pictures = torch.rand(frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    text = quota_module.chat_turn(processor, [{"type": "video"}, {"type": "text", "text": QUESTION}])
    return dict(processor(text=[text], videos=[pictures], return_tensors="pt", do_rescale=False)), pictures


def yes_probability_by_hand(m, picture, prompt):
    """The unpatched model on one frame as a one-frame video: softmax of the last logits at "A"."""
    processor = onevision_processor()
    text = quota_module.chat_turn(processor, [{"type": "video"}, {"type": "text", "text": prompt}])
    inputs = processor(text=[text], videos=[picture[None]], return_tensors="pt", do_rescale=False)
    with torch.no_grad():
        logits = m(**inputs).logits[0, -1]
    return logits.softmax(dim=-1)[processor.tokenizer.convert_tokens_to_ids("A")]


def test_the_patched_model_scores_its_own_frames():
    m = onevision()
    kw, pictures = processed_video(seed=8)
    expected = torch.stack([yes_probability_by_hand(m, p, scoring_prompt(QUESTION, None)) for p in pictures])
    hooks_before = hook_counts(m)
    with vtprune.patched(m, "quota", processor=onevision_processor(), query=QUESTION, keep_ratio=0.5) as handle:
        patched_hooks = [list(module._forward_pre_hooks) for module in m.modules()]
        with torch.no_grad():
            logits = m(**kw).logits
        got = torch.tensor(handle.last.extra["yes_probability"][0], dtype=torch.float32)
        # the self-scoring calls ran unpruned and left every hook where it was
        assert [list(module._forward_pre_hooks) for module in m.modules()] == patched_hooks
        tokens = handle.last.extra["frame_tokens"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert hook_counts(m) == hooks_before
    # the outer forward is the one a stub scorer with the same probabilities gives
    stub = fixed(*got.tolist())
    with vtprune.patched(m, "quota", scorer=stub, query=QUESTION, keep_ratio=0.5) as handle, torch.no_grad():
        torch.testing.assert_close(m(**kw).logits, logits, rtol=0, atol=0)
        assert handle.last.extra["frame_tokens"] == tokens


def test_self_scoring_inside_a_stacked_in_llm_stage_and_generate():
    m = onevision()
    kw, _ = processed_video(seed=9)
    stages = [("quota", {"processor": onevision_processor(), "query": QUESTION, "keep_ratio": 0.5}), "fastv:k=1"]
    with vtprune.patched(m, stages) as handle, torch.no_grad():
        logits = m(**kw).logits
        p = handle.last.extra["yes_probability"][0]
        kept = [s["kept"] for s in handle.last.summary()["stages"]]
        generated = m.generate(**kw, max_new_tokens=3, do_sample=False)
    stages[0] = ("quota", {"scorer": fixed(*p), "query": QUESTION, "keep_ratio": 0.5})
    with vtprune.patched(m, stages) as handle, torch.no_grad():
        assert torch.equal(m(**kw).logits, logits)
        assert [s["kept"] for s in handle.last.summary()["stages"]] == kept
        assert torch.equal(m.generate(**kw, max_new_tokens=3, do_sample=False), generated)


def test_the_patched_model_decouples_the_query():
    m = onevision()
    processor = onevision_processor()
    kw, _ = processed_video(seed=10)
    template = quota_module.DECOUPLE_TEMPLATE.format(question=QUESTION)
    text = quota_module.chat_turn(processor, [{"type": "text", "text": template}])
    ids = processor.tokenizer([text], return_tensors="pt")
    with torch.no_grad():  # what the unpatched model answers, text only
        out = m.generate(**ids, do_sample=False, max_new_tokens=5)
    expected = processor.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    options = {"processor": processor, "query": QUESTION, "decouple": True, "decouple_max_new_tokens": 5}
    with vtprune.patched(m, "quota", **options) as handle, torch.no_grad():
        answers = []
        decoupler = handle.methods[0].decoupler
        handle.methods[0].decoupler = lambda prompt: answers.append(decoupler(prompt)) or answers[-1]
        m(**kw)
        assert answers == [expected] and handle.last.extra["decouple_seconds"] > 0
        # a random model's answer does not parse: scored with the plain question
        assert handle.last.extra["entities"] == [parse_entities(expected)] == [None]


def test_model_scorer_rejects_a_tokenizer_without_the_yes_letter():
    processor = onevision_processor()
    with pytest.raises(ValueError, match="no single token for the yes option"):
        quota_module.ModelScorer(onevision(), processor, yes="Z")


# -- images as frames ------------------------------------------------------------------------------

from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID  # noqa: E402


def processed_images(sizes, seed=0):
    """One prompt with ``len(sizes)`` images of (height, width) pixels, through the processor."""
    generator = torch.Generator().manual_seed(seed)
    pictures = [torch.rand(3, h, w, generator=generator) for h, w in sizes]
    parts = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": QUESTION}]
    text = quota_module.chat_turn(onevision_processor(), parts)
    return dict(onevision_processor()(text=[text], images=[pictures], return_tensors="pt", do_rescale=False))


def up(frame, size):
    return F.interpolate(frame.permute(2, 0, 1)[None], size=size, mode="bilinear")[0].permute(1, 2, 0)


def test_a_single_image_is_one_frame_its_base_view_resized_and_its_crops_dropped():
    m = onevision()
    kw = processed_images([(60, 40)], seed=1)
    x = merged(m, kw)
    columns = (kw["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[:, 0]
    first, last = int(columns[0]), int(columns[-1])
    assert last - first + 1 > 16  # base view plus a crop canvas
    # one frame gets the whole budget: T = round(0.5 * 16) = 8 -> grid (3, 2) of the 4 x 4 base view
    expected = torch.cat([x[:first], up(x[first : first + 16].view(4, 4, -1), (3, 2)).reshape(6, -1), x[last + 1 :]])
    scorer = fixed(0.3)
    with vtprune.patched(m, "quota", scorer=scorer, query=QUESTION, keep_ratio=0.5) as handle, torch.no_grad():
        logits = m(**kw).logits
        assert handle.last.extra["frame_tokens"] == [[8]] and handle.last.extra["frame_grids"] == [[(3, 2)]]
        assert handle.last.visual_tokens_kept == [6]
    torch.testing.assert_close(logits, llm_logits(m, expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "p, tokens, grids",
    [
        # T = 32 (two 4 x 4 base views): the first image's 32 are capped at its own 16 placeholders
        ((0.9, 0.0), [16, 0], [(4, 4), None]),
        ((0.9, 0.5), [12, 3], [(4, 3), (2, 1)]),  # keep_ratio 0.5: T = 16 -> int(12.2), int(3.8)
    ],
)
def test_multi_image_prompts_treat_images_as_frames(p, tokens, grids):
    m = onevision()
    kw = processed_images([(32, 32), (40, 56)], seed=2)
    assert kw["batch_num_images"].tolist() == [2]
    x = merged(m, kw)
    columns = (kw["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[:, 0].tolist()
    assert len(columns) == 2 * 17  # each image: its base view, then a newline
    parts, end = [], 0
    for image, grid in enumerate(grids):
        first = columns[17 * image]
        parts.append(x[end:first])
        if grid is not None:
            base = x[first : first + 16].view(4, 4, -1)
            parts += [(base if grid == (4, 4) else up(base, grid)).reshape(-1, base.shape[-1]), x[first + 16][None]]
        end = first + 17
    expected = torch.cat([*parts, x[end:]])
    options = {"keep_ratio": 0.5} if tokens == [12, 3] else {}
    scorer = fixed(*p)
    with vtprune.patched(m, "quota", scorer=scorer, query=QUESTION, **options) as handle, torch.no_grad():
        logits = m(**kw).logits
        assert handle.last.extra["frame_tokens"] == [tokens] and handle.last.extra["frame_grids"] == [grids]
    torch.testing.assert_close(logits, llm_logits(m, expected), rtol=1e-5, atol=1e-5)
    assert scorer.calls == [(2, scoring_prompt(QUESTION, None))]


def test_image_frames_are_the_base_views_and_each_prompt_of_a_batch_is_its_own_frame_set():
    m = onevision()
    seen = []

    def scorer(frames, prompt):
        seen.append(frames.clone())
        return torch.full((frames.shape[0],), 0.5)

    kw = processed_images([(60, 40)], seed=3)
    with vtprune.patched(m, "quota", scorer=scorer, query=[QUESTION], keep_ratio=0.25), torch.no_grad():
        m(**kw)
    assert torch.equal(seen[0], kw["pixel_values"][:, 0])
    # a batch of two one-image prompts: two frame sets, each as alone
    processor, generator = onevision_processor(), torch.Generator().manual_seed(4)
    pictures = [torch.rand(3, 60, 40, generator=generator), torch.rand(3, 32, 32, generator=generator)]
    text = quota_module.chat_turn(processor, [{"type": "image"}, {"type": "text", "text": QUESTION}])
    with vtprune.patched(m, "quota", scorer=by_pixels, query=QUESTION, keep_ratio=0.25) as handle, torch.no_grad():
        alone = []
        for picture in pictures:
            one = processor(text=[text], images=[[picture]], return_tensors="pt", do_rescale=False)
            alone.append((m(**one).logits[0, -1], handle.last.extra["frame_grids"][0]))
        both = processor(
            text=[text] * 2, images=[[p] for p in pictures], return_tensors="pt", do_rescale=False, padding=True
        )
        batch = m(**both).logits[:, -1]
        assert handle.last.extra["frame_grids"] == [grids for _, grids in alone]
    torch.testing.assert_close(batch, torch.stack([logits for logits, _ in alone]), rtol=1e-4, atol=1e-5)
    with (
        vtprune.patched(m, "quota", scorer=by_pixels, query=QUESTION, keep_ratio=0.25),
        torch.no_grad(),
        pytest.raises(NotImplementedError, match="not both in one batch"),
    ):
        m(**both_kinds())


def both_kinds():
    parts = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": QUESTION}]
    text = quota_module.chat_turn(onevision_processor(), parts)
    media = {"images": [torch.rand(3, 32, 32)], "videos": [torch.rand(2, 3, 32, 32)]}
    return dict(onevision_processor()(text=[text], **media, return_tensors="pt", do_rescale=False))
