"""LLaVA-NeXT-Video adapter: video scores pooled as the resampler pools the features (against an eager tower),
images and videos in one prompt against the unpatched model on a hand-pruned sequence, quota on videos, and the
refusals (the contracts every family shares: tests/test_contracts.py)."""

import pytest
import torch

import vtprune
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, tiny_llava_next_video

FRAME = 4  # pooled tokens per frame: 4 x 4 patches pooled 2 x 2


def models(pool_mode="average", image_size=32):
    """(sdpa model, eager twin with the same weights)."""
    model = tiny_llava_next_video(seed=4, layers=4, pool_mode=pool_mode, image_size=image_size)
    twin = tiny_llava_next_video(
        seed=4, layers=4, pool_mode=pool_mode, image_size=image_size, attn_implementation="eager"
    )
    twin.load_state_dict(model.state_dict())
    return model, twin


@pytest.fixture(scope="module")
def model():
    return models()[0]


def video(frames=3, seed=0):
    return torch.randn(1, frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def text(n, seed):
    return torch.randint(7, 128, (n,), generator=torch.Generator().manual_seed(seed))


def eager_pooled_cls(twin, frames, pool):
    """The [CLS] row of the feature layer (-2) over the 8 x 8 patches, eager, mean over heads, then each pooled
    token's 2 x 2 patch block reduced by ``pool`` (written out): (frames, 16)."""
    with torch.no_grad():
        out = twin.model.vision_tower(frames, output_attentions=True)
    rows = out.attentions[-2][:, :, 0, 1:].float().mean(dim=1)  # hidden_states[-2] is the output of layer L - 2
    blocks = [
        torch.stack([rows[:, (2 * i + di) * 8 + 2 * j + dj] for di in range(2) for dj in range(2)], dim=1)
        for i in range(4)
        for j in range(4)
    ]
    return torch.stack([pool(block, dim=1) for block in blocks], dim=1)


@pytest.mark.parametrize("mode, pool", [("average", torch.mean), ("max", lambda x, dim: x.max(dim=dim).values)])
def test_video_scores_are_pooled_like_the_features(mode, pool):
    model, twin = models(mode, image_size=64)  # 8 x 8 patches, 4 x 4 tokens per frame
    vid = torch.randn(1, 3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ids = torch.cat([text(3, 1), torch.full((3 * 16,), VIDEO_TOKEN_ID), text(2, 2)])[None]
    with vtprune.patched(model, "fastervlm", keep_tokens=5) as handle, torch.no_grad():
        model(input_ids=ids, pixel_values_videos=vid)
    reference = eager_pooled_cls(twin, vid[0], pool)
    expected = torch.cat([reference[f].topk(5).indices.sort().values + f * 16 for f in range(3)])
    assert handle.last.stages[0].kept[0].tolist() == expected.tolist()


def image_and_video_prompt(model, seed=0):
    """(input_ids, pixel_values, image_sizes, pixel_values_videos): text, an AnyRes image, text, a 2-frame video."""
    sizes = torch.tensor([[30, 50]])  # base image + 2 crops
    px = torch.randn(1, 3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        (packed,) = model.model.get_image_features(pixel_values=px, image_sizes=sizes).pooler_output
    parts = [text(3, seed), torch.full((packed.shape[0],), IMAGE_TOKEN_ID), text(2, seed + 1)]
    parts += [torch.full((2 * FRAME,), VIDEO_TOKEN_ID), text(3, seed + 2)]
    return torch.cat(parts)[None], px, sizes, video(2, seed=seed + 3)


def hand_pruned_logits(model, ids, px, sizes, vid, kept, positions):
    """The unpatched model's logits with only the ``kept`` visual columns (image and video placeholders in order
    of appearance) left: its own image and video features scattered in, positions renumbered or original."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        images = torch.cat(model.model.get_image_features(pixel_values=px, image_sizes=sizes).pooler_output)
        videos = model.model.get_video_features(pixel_values_videos=vid).pooler_output.flatten(0, 1)
        embeds[0, ids[0] == IMAGE_TOKEN_ID] = images
        embeds[0, ids[0] == VIDEO_TOKEN_ID] = videos
        visual = ((ids[0] == IMAGE_TOKEN_ID) | (ids[0] == VIDEO_TOKEN_ID)).nonzero().flatten()
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        keep[visual] = False
        keep[visual[kept]] = True
        columns = keep.nonzero().flatten()
        position_ids = torch.arange(columns.numel()) if positions == "compact" else columns
        hidden = model.model.language_model(
            inputs_embeds=embeds[:, columns],
            position_ids=position_ids[None],
            attention_mask=torch.ones(1, columns.numel(), dtype=torch.long),
            use_cache=False,
        ).last_hidden_state
        return model.lm_head(hidden)


@pytest.mark.parametrize(
    "spec",
    [
        "fastervlm:keep_ratio=0.5",
        "fastervlm:keep_ratio=0.5,positions=original",
        "hired:budget_ratio=0.4",
        "globalcom2:keep_ratio=0.4",
        "fopru:keep_ratio=0.5",
        "uniform:keep_ratio=0.5",
    ],
)
def test_pruned_logits_equal_the_unpatched_model_on_the_hand_pruned_sequence(model, spec):
    ids, px, sizes, vid = image_and_video_prompt(model, seed=5)
    with vtprune.patched(model, spec) as handle, torch.no_grad():
        logits = model(input_ids=ids, pixel_values=px, image_sizes=sizes, pixel_values_videos=vid).logits
    kept = handle.last.stages[0].kept[0]
    video_columns = int((ids == VIDEO_TOKEN_ID).sum())
    visual = handle.last.visual_tokens_in[0]
    assert 0 < int((kept >= visual - video_columns).sum()) < video_columns  # the video was cut too
    positions = "original" if "original" in spec else "compact"
    torch.testing.assert_close(logits, hand_pruned_logits(model, ids, px, sizes, vid, kept, positions))


def test_quota_fills_each_video_with_its_plans_resized_frames(model):
    """quota's output = the unpatched LLM on the prompt whose video columns are the plan's resized frames
    (QuoTA's own plan_video on the video's pooled frame grids), the rest of the video dropped."""
    vid = video(4, seed=6)
    ids = torch.cat([text(3, 6), torch.full((4 * FRAME,), VIDEO_TOKEN_ID), text(4, 7)])[None]

    def scorer(frames, prompt):
        return torch.sigmoid(frames.float().mean(dim=(1, 2, 3)) * 20)

    with vtprune.patched(model, "quota", keep_ratio=0.5, query="What happens?", scorer=scorer) as handle:
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values_videos=vid).logits
        method = handle.methods[0]
    with torch.no_grad():
        features = model.model.get_video_features(pixel_values_videos=vid).pooler_output[0].view(4, 2, 2, -1)
        plan = method.plan_video(vid[0], features, "What happens?")
        embeds = model.get_input_embeddings()(ids)
        columns = (ids[0] == VIDEO_TOKEN_ID).nonzero().flatten()
        filled = columns[: plan.features.shape[0]]
        embeds[0, filled] = plan.features
        keep = ids[0] != VIDEO_TOKEN_ID
        keep[filled] = True
        hidden = model.model.language_model(
            inputs_embeds=embeds[:, keep], position_ids=torch.arange(int(keep.sum()))[None], use_cache=False
        ).last_hidden_state
    assert 0 < plan.features.shape[0] < 4 * FRAME
    torch.testing.assert_close(logits, model.lm_head(hidden))


def test_quota_refuses_an_image_prompt_naming_why(model):
    ids, px, sizes, _ = image_and_video_prompt(model, seed=1)
    keep_video = ids != VIDEO_TOKEN_ID
    ids = ids[keep_video][None]
    with (
        vtprune.patched(
            model, "quota", keep_ratio=0.5, query="?", scorer=lambda frames, prompt: torch.ones(len(frames))
        ),
        pytest.raises(ValueError, match="not a set of frames"),
        torch.no_grad(),
    ):
        model(input_ids=ids, pixel_values=px, image_sizes=sizes)


def test_a_learned_conv_resampler_refuses_scored_methods_at_patch_time():
    model = tiny_llava_next_video(seed=1, pool_mode="conv")
    with pytest.raises(ValueError, match="learned 'conv' resampler"):
        vtprune.patch(model, "fastervlm", keep_ratio=0.5)
    with vtprune.patched(model, "random", keep_ratio=0.5) as handle, torch.no_grad():
        model(
            input_ids=torch.cat([text(2, 1), torch.full((2 * FRAME,), VIDEO_TOKEN_ID)])[None],
            pixel_values_videos=video(2),
        )
    assert handle.last.visual_tokens_kept == [4]


@pytest.mark.parametrize("spec", ["fastervlm:keep_ratio=0.5", "hired:budget_ratio=0.4", "fopru:keep_ratio=0.3"])
def test_a_left_padded_batch_of_image_and_video_prompts_equals_each_alone(model, spec):
    """Sample 0: an AnyRes image and a video; sample 1: a video only (images and videos in one batch)."""
    from helpers import left_pad

    ids0, px, sizes, vid0 = image_and_video_prompt(model, seed=8)
    vid1 = video(2, seed=9)
    ids1 = torch.cat([text(6, 10), torch.full((2 * FRAME,), VIDEO_TOKEN_ID), text(2, 11)])[None]
    ids, mask = left_pad([ids0[0], ids1[0]])
    alone = []
    with vtprune.patched(model, spec) as handle, torch.no_grad():
        for inputs in (
            dict(input_ids=ids0, pixel_values=px, image_sizes=sizes, pixel_values_videos=vid0),
            dict(input_ids=ids1, pixel_values_videos=vid1),
        ):
            alone.append((model(**inputs).logits[0, -1], handle.last.stages[0].kept[0].tolist()))
        batch = model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=px,
            image_sizes=sizes,
            pixel_values_videos=torch.cat([vid0, vid1]),
        ).logits[:, -1]
        kept = [k.tolist() for k in handle.last.stages[0].kept]
    assert kept == [a[1] for a in alone]
    torch.testing.assert_close(batch, torch.stack([a[0] for a in alone]), atol=1e-5, rtol=1e-4)
