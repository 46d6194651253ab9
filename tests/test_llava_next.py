"""LLaVA-NeXT (AnyRes) adapter: packing map, newline rule, budgets, batches, references (the contracts every
family shares: tests/test_contracts.py)."""

import pytest
import torch
from helpers import left_pad
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import vtprune
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, tiny_llava_next
from vtprune.patches._anyres import keep_packed
from vtprune.patches.llava_next import LlavaNextAdapter

SIZES = [[30, 50], [60, 40], [32, 32], [64, 64]]  # base image + 2, 2, 2 and 4 crops
N = 16


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next(seed=1)


def pixels(num_images, seed=0):
    return torch.randn(num_images, 5, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def packed_lengths(model, pixel_values, sizes):
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes).pooler_output
    return [f.shape[0] for f in features]


def prompt(model, pixel_values, sizes, text=(3, 4), seed=0):
    """Text around the images with as many placeholders as the unpatched model packs."""
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.randint(4, 128, (text[0],), generator=generator)]
    for length in packed_lengths(model, pixel_values, sizes):
        parts += [torch.full((length,), IMAGE_TOKEN_ID), torch.randint(4, 128, (text[1],), generator=generator)]
    return torch.cat(parts)


def greedy(model, **inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, do_sample=False)


def test_packing_map_matches_the_models_own_packed_features(model):
    sizes = torch.tensor(SIZES)
    px = pixels(len(SIZES))
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=px, image_sizes=sizes).pooler_output
        counts = [image_size_to_num_patches(size, model.config.image_grid_pinpoints, 32) for size in SIZES]
        subimages = torch.cat([p[:n] for p, n in zip(px, counts, strict=True)])
        tower = model.model.vision_tower(subimages, output_hidden_states=True)
        projected = model.model.multi_modal_projector(tower.hidden_states[-2][:, 1:])  # (S_total, N, D)
    first = 0
    for image, features in zip(LlavaNextAdapter(model).packing_map(sizes), packed, strict=True):
        count = image.valid.shape[0]
        expected = projected[first : first + count].reshape(count * N, -1)
        visual = image.token_map >= 0
        torch.testing.assert_close(features[visual], expected[image.token_map[visual]])
        torch.testing.assert_close(features[~visual], model.model.image_newline.expand(int((~visual).sum()), -1))
        assert int(image.valid.sum()) == int(visual.sum())
        first += count


def test_newline_rule():
    # base image of 4 tokens, then a crop canvas of two rows of two tokens, each closed by a newline
    token_map = torch.tensor([0, 1, 2, 3, 4, 5, -1, 6, 7, -1])
    keep = torch.zeros(2, 4, dtype=torch.bool)
    keep[0, 1] = True  # a base token
    keep[1, 3] = True  # token 7: second canvas row only
    assert keep_packed(token_map, keep).tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    # a lone image (no crops): its newline follows the base image's fate
    lone = torch.tensor([0, 1, 2, 3, -1])
    assert keep_packed(lone, torch.tensor([[False, False, True, False]])).tolist() == [0, 0, 1, 0, 1]
    assert keep_packed(lone, torch.zeros(1, 4, dtype=torch.bool)).tolist() == [0, 0, 0, 0, 0]


def kept_visual_per_subimage(model, record, sizes, sample=0):
    """Non-newline kept tokens per sub-image, from the record and the packing map."""
    images = LlavaNextAdapter(model).packing_map(sizes)
    token_map = torch.cat([image.token_map + (image.token_map >= 0) * 1000 * i for i, image in enumerate(images)])
    kept = token_map[record.stages[0].kept[sample]]
    kept = kept[kept >= 0]
    return kept, images


@pytest.mark.parametrize(
    "spec, total",
    [
        ("hired:budget_ratio=0.3,budget_base=valid", lambda valid: round(0.3 * valid)),
        ("globalcom2:keep_ratio=0.25", lambda v: round(v / 4)),
    ],
)
def test_budget_methods_keep_exactly_their_total(model, spec, total):
    for size in SIZES:
        sizes = torch.tensor([size])
        px = pixels(1, seed=sum(size))
        ids = prompt(model, px, sizes)[None]
        with vtprune.patched(model, spec) as handle, torch.no_grad():
            model(input_ids=ids, pixel_values=px, image_sizes=sizes)
        kept, (image,) = kept_visual_per_subimage(model, handle.last, sizes)
        valid = int(image.valid.sum())
        assert kept.numel() == int(total(valid) + 0.5)  # round half up


def test_per_image_budget_keeps_k_per_subimage(model):
    sizes = torch.tensor([SIZES[0]])  # base + 2 crops, the crops unpadded to fewer columns
    px = pixels(1, seed=4)
    ids = prompt(model, px, sizes)[None]
    with vtprune.patched(model, "fastervlm", keep_tokens=7) as handle, torch.no_grad():
        model(input_ids=ids, pixel_values=px, image_sizes=sizes)
    kept, (image,) = kept_visual_per_subimage(model, handle.last, sizes)
    per_subimage = torch.bincount(kept // N, minlength=3)
    assert per_subimage.tolist() == image.valid.sum(dim=1).clamp(max=7).tolist()


@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_fopru_matches_eager_received_attention(strategy):
    model = tiny_llava_next(seed=2)
    twin = tiny_llava_next(seed=2, attn_implementation="eager")
    twin.load_state_dict(model.state_dict())
    sizes = torch.tensor([SIZES[1]])
    px = pixels(1, seed=6)
    ids = prompt(model, px, sizes)[None]
    with vtprune.patched(model, "fopru", keep_tokens=5, strategy=strategy) as handle, torch.no_grad():
        model(input_ids=ids, pixel_values=px, image_sizes=sizes)
        attentions = twin.model.vision_tower(px[0, :3], output_attentions=True).attentions[-2]
    significance = attentions.float().mean(dim=(1, 2))[:, 1:]  # mean over heads and queries, patch keys
    kept, (image,) = kept_visual_per_subimage(model, handle.last, sizes)
    for sub in range(3):
        got = set((kept[kept // N == sub] % N).tolist())
        valid = image.valid[sub]
        score = torch.where(valid, significance[sub], -1.0)
        if strategy == "rank":
            expected = set(score.topk(int(min(5, valid.sum()))).indices.tolist())
        else:  # whole rows by summed significance while they fit, then the best remaining tokens
            rows = torch.where(valid, significance[sub], 0.0).view(4, 4)
            expected, budget = set(), int(min(5, valid.sum()))
            for row in rows.sum(dim=1).argsort(descending=True).tolist():
                members = [row * 4 + c for c in range(4) if valid[row * 4 + c]]
                if len(expected) + len(members) > budget:
                    break
                expected |= set(members)
            rest = [i for i in score.argsort(descending=True).tolist() if i not in expected and valid[i]]
            expected |= set(rest[: budget - len(expected)])
        assert got == expected


def test_batch_with_different_image_sizes_equals_samples_alone(model):
    size_sets = [torch.tensor([SIZES[0]]), torch.tensor([SIZES[3], SIZES[2]])]
    pixel_sets = [pixels(1, seed=7), pixels(2, seed=8)]
    prompts = [prompt(model, px, s, seed=i) for i, (px, s) in enumerate(zip(pixel_sets, size_sets, strict=True))]
    ids, mask = left_pad(prompts)
    px = torch.cat(pixel_sets)
    sizes = torch.cat(size_sets)
    for spec in ("hired", "fastervlm:keep_tokens=5", "globalcom2"):
        with vtprune.patched(model, spec) as handle:
            batch = greedy(model, input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=sizes)
            batch_kept = handle.last.stages[0].kept
            for row, (p, s) in enumerate(zip(pixel_sets, size_sets, strict=True)):
                alone = greedy(model, input_ids=prompts[row][None], pixel_values=p, image_sizes=s)
                assert torch.equal(handle.last.stages[0].kept[0], batch_kept[row])
                assert torch.equal(alone[0], batch[row, ids.shape[1] - prompts[row].numel() :])


def test_in_llm_stage_stacks_on_an_anyres_cut(model):
    sizes = torch.tensor([SIZES[0]])
    px = pixels(1, seed=10)
    ids = prompt(model, px, sizes)[None]
    with vtprune.patched(model, "fastervlm:keep_tokens=6+pdrop:layers=1,lam=0.5") as handle:
        tokens = greedy(model, input_ids=ids, pixel_values=px, image_sizes=sizes)
    pre, llm = handle.last.stages
    assert (pre.layer, llm.layer) == (-1, 1)
    assert set(llm.kept[0].tolist()) <= set(pre.kept[0].tolist())
    assert llm.kept[0].numel() == pre.kept[0].numel() // 2
    assert tokens.shape == (1, ids.shape[1] + 5)


def test_single_resolution_model_refuses_crop_budget_methods():
    from vtprune.evals.models.transformers_vlms import tiny_llava

    with pytest.raises(ValueError, match="splits a budget across the crops"):
        vtprune.patch(tiny_llava(), "hired")
