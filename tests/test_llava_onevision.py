"""LLaVA-OneVision adapter: AnyRes-max-9 packing (with the canvas resize), video frames, references.

References: the model's own packed features (non-resized images), the unpatched model's merged
input embeddings with columns dropped by hand, and per-frame budgets counted by hand.
"""

import functools

import pytest
import torch
from conftest import hook_counts
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

import vtprune
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, tiny_llava_onevision
from vtprune.patches.llava_onevision import LlavaOnevisionAdapter

N = 16  # tokens per sub-image (4 x 4 patches)
FRAME = 4  # pooled tokens per video frame (2 x 2)


@functools.cache
def model():
    return tiny_llava_onevision(seed=3)


def count(size):
    return image_size_to_num_patches(size, model().config.image_grid_pinpoints, 32)


def image_inputs(size, seed=0):
    m = model()
    sizes = torch.tensor([size])
    px = torch.randn(1, count(size), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        length = m.model.get_image_features(pixel_values=px, image_sizes=sizes).pooler_output[0].shape[0]
    ids = torch.cat([torch.tensor([9, 10, 11]), torch.full((length,), IMAGE_TOKEN_ID), torch.tensor([12, 13])])
    return {"input_ids": ids[None], "pixel_values": px, "image_sizes": sizes}


def video_inputs(frames=4, seed=0):
    px = torch.randn(1, frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([torch.tensor([9, 10]), torch.full((frames * FRAME + 1,), VIDEO_TOKEN_ID), torch.tensor([12, 13])])
    return {"input_ids": ids[None], "pixel_values_videos": px}


def greedy(m, **kw):
    with torch.no_grad():
        return m.generate(**kw, max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("size", [[30, 50], [60, 40], [32, 32]])
def test_packing_map_matches_the_models_own_packed_features(size):
    m = model()
    kw = image_inputs(size, seed=1)
    with torch.no_grad():
        packed = m.model.get_image_features(pixel_values=kw["pixel_values"], image_sizes=kw["image_sizes"])
        packed = packed.pooler_output[0]
        tower = m.model.vision_tower(kw["pixel_values"][0], output_hidden_states=True)
        projected = m.model.multi_modal_projector(tower.hidden_states[-1]).reshape(-1, packed.shape[-1])
    (image,) = LlavaOnevisionAdapter(m).packing_map(kw["image_sizes"])
    visual = image.token_map >= 0
    torch.testing.assert_close(packed[visual], projected[image.token_map[visual]])
    torch.testing.assert_close(packed[~visual], m.model.image_newline.expand(int((~visual).sum()), -1))


def test_resized_canvas_maps_each_column_to_a_distinct_nearest_token():
    m = model()
    size = [128, 128]  # 16 crops: a 16 x 16 canvas, more than 9 base images: resized to 12 x 12
    (image,) = LlavaOnevisionAdapter(m).packing_map(torch.tensor([size]))
    tokens = image.token_map[image.token_map >= 0]
    assert tokens.numel() == N + 12 * 12 and tokens.unique().numel() == tokens.numel()
    assert int((image.token_map == -1).sum()) == 12  # one newline per resized row
    # row r of the resized canvas samples source row (r + 0.5) * 16 / 12 - 0.5, rounded
    canvas = image.token_map[N:].view(12, 13)[:, :12]
    crop, patch = canvas // N - 1, canvas % N
    rows = (crop // 4) * 4 + patch // 4
    expected = (((torch.arange(12) + 0.5) * 16 / 12 - 0.5).round()).long()
    assert torch.equal(rows[:, 0], expected)


@pytest.mark.parametrize("spec", ["fopru:keep_ratio=1.0", "uniform:keep_ratio=1.0", "random:keep_ratio=1.0"])
@pytest.mark.parametrize("kind", ["resized", "video"])  # plain AnyRes images: the matrix (test_contracts.py)
def test_keep_all_is_bit_identical_and_remove_restores(spec, kind):
    m = model()
    kw = {"resized": lambda: image_inputs([100, 120]), "video": video_inputs}[kind]()
    with torch.no_grad():
        reference = m(**kw).logits
    tokens = greedy(m, **kw)
    before = hook_counts(m)
    with vtprune.patched(m, spec), torch.no_grad():
        assert torch.equal(m(**kw).logits, reference)
        assert torch.equal(greedy(m, **kw), tokens)
    assert hook_counts(m) == before
    assert not {"get_image_features", "get_video_features"} & set(vars(m.model))
    with torch.no_grad():
        assert torch.equal(m(**kw).logits, reference)


def language_model_inputs(m, kw) -> torch.Tensor:
    """(B, L, D) embeddings the language model receives when ``m`` runs on ``kw`` (patched or not)."""
    captured = {}
    hook = m.model.language_model.register_forward_pre_hook(
        lambda mod, a, k: captured.update(x=k["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        m(**kw)
    hook.remove()
    return captured["x"]


def merged_reference(m, kw, kept):
    """Logits of the unpatched LLM on its own merged embeddings with the non-kept visual columns
    dropped by hand, positions renumbered 0.. (compact)."""
    x = language_model_inputs(m, kw)
    ids = kw["input_ids"][0]
    visual = (ids == IMAGE_TOKEN_ID) | (ids == VIDEO_TOKEN_ID)
    keep = ~visual
    keep[visual.nonzero().flatten()[kept]] = True
    with torch.no_grad():
        hidden = m.model.language_model(
            inputs_embeds=x[:, keep], position_ids=torch.arange(int(keep.sum()))[None], use_cache=False
        ).last_hidden_state
        return m.lm_head(hidden)


@pytest.mark.parametrize(
    "spec, kind",
    [
        ("fopru:keep_tokens=2", "video"),
        ("fastervlm:keep_tokens=3,score=received", "video"),
        ("random:keep_tokens=3,seed=2", "video"),
        ("fopru:keep_tokens=5", "resized"),
        ("uniform:keep_tokens=4", "image"),
    ],
)
def test_cut_matches_hand_pruned_reference_and_cached_decode(spec, kind):
    m = model()
    kw = {"image": lambda: image_inputs([60, 40], 4), "resized": lambda: image_inputs([100, 120], 5)}.get(
        kind, lambda: video_inputs(seed=6)
    )()
    with vtprune.patched(m, spec) as handle:
        with torch.no_grad():
            logits = m(**kw).logits
        kept = handle.last.stages[0].kept[0]
        cached = greedy(m, **kw)
        uncached = m.generate(**kw, max_new_tokens=4, do_sample=False, use_cache=False)
    torch.testing.assert_close(logits, merged_reference(m, kw, kept), rtol=1e-5, atol=1e-5)
    assert torch.equal(cached, uncached)
    if kind == "video" and spec.startswith("fopru"):
        per_frame = torch.bincount(kept[kept < 4 * FRAME] // FRAME, minlength=4)
        assert per_frame.tolist() == [2, 2, 2, 2] and int(kept[-1]) == 4 * FRAME  # + the trailing newline


def test_fastervlm_without_opt_in_is_refused():
    with pytest.raises(ValueError, match="no \\[CLS\\] token.*score='received'"):
        vtprune.patch(model(), "fastervlm", keep_ratio=0.5)
