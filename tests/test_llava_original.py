"""The original LLaVA package (``llava-torch``): ``LlavaLlamaForCausalLM`` with tiny random models.

Runs in both environments ``make test`` builds: the main stack (transformers 5, the package
installed ``--no-deps``) and ``.venv-llava`` (the package's own era, transformers 4.37).
References: the unpatched model itself (keep-all, remove, cache-free greedy decoding); on
transformers 5 a transformers ``LlavaForConditionalGeneration`` built from the same weights
(kept indices and logits of fastervlm / fastv / pdrop must match it); on transformers 4.37
the eager attention the official FasterVLM / FastV code reads (``output_attentions``).
"""

import functools

import pytest
import torch
from conftest import hook_counts

pytest.importorskip("llava.model", reason="the original LLaVA package (llava-torch) is not installed here")

import vtprune  # noqa: E402
from vtprune.evals.models.llava_original import (  # noqa: E402
    IMAGE_TOKEN_INDEX,
    PAD_TOKEN_ID,
    original_prompt,
    save_clip_tower,
    tiny_llava_original,
    to_transformers_llava,
    to_transformers_prompt,
)
from vtprune.methods.base import top_k_sorted  # noqa: E402
from vtprune.patches.llava_original import legacy_transformers  # noqa: E402

N = 16  # visual tokens per image (4 x 4 patches)
LAYERS = 4
LEGACY = legacy_transformers()
needs_twin = pytest.mark.skipif(LEGACY, reason="the transformers LLaVA twin needs transformers 5 (checked there)")
legacy_only = pytest.mark.skipif(not LEGACY, reason="eager-attention references for the transformers 4.37 stack")


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return save_clip_tower(tmp_path_factory.mktemp("clip") / "tower")


@functools.cache
def _model(tower, padding_side="right", feature="patch", seed=1):
    return tiny_llava_original(tower, seed=seed, layers=LAYERS, padding_side=padding_side, select_feature=feature)


@pytest.fixture
def model(tower):
    return _model(tower)


@pytest.fixture
def left_model(tower):
    return _model(tower, "left")


def images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def pad(prompts, side):
    length = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), length), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        columns = slice(length - prompt.numel(), length) if side == "left" else slice(0, prompt.numel())
        ids[row, columns], mask[row, columns] = prompt, 1
    return ids, mask


def greedy(model, ids, px, steps=5, **kwargs):
    with torch.no_grad():
        return model.generate(ids, images=px, max_new_tokens=steps, do_sample=False, **kwargs)


def greedy_reference(model, ids, px, steps=5, **kwargs):
    """Cache-free greedy decoding with the model's plain forward (the package's own merge every step)."""
    tokens = ids
    new = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=tokens, images=px, use_cache=False, **kwargs).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            new.append(token)
            tokens = torch.cat([tokens, token], dim=1)
    return torch.cat(new, dim=1)


def new_tokens(output, ids):
    # the package's generate() runs from inputs_embeds: transformers 5 returns only the new tokens,
    # 4.37 the new tokens after an empty prompt (plus a start token when the config has one)
    return output[:, -5:] if output.shape[1] >= 5 else output


def instance_attributes(model):
    return {
        name
        for name in ("forward", "prepare_inputs_labels_for_multimodal", "prepare_inputs_for_generation")
        if name in vars(model)
    }


# -- identity and removal ---------------------------------------------------------------------


def test_keep_all_is_bit_identical_and_remove_restores(model):
    ids, px = original_prompt([4, 6], seed=0)[None], images(1)
    with torch.no_grad():
        reference_logits = model(input_ids=ids, images=px).logits
    reference_tokens = greedy_reference(model, ids, px)
    before = hook_counts(model)
    for spec in ["fastervlm:keep_ratio=1.0", "fastv:ratio=0", "pdrop:lam=1", "fastervlm:keep_ratio=1.0+pdrop:lam=1"]:
        handle = vtprune.patch(model, spec)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, images=px).logits, reference_logits)
        assert torch.equal(new_tokens(greedy(model, ids, px), ids), reference_tokens)
        assert handle.last.visual_tokens_kept == [N] and handle.last.visual_tokens_in == [N]
        handle.remove()
        assert hook_counts(model) == before
        assert instance_attributes(model) == set()
    for spec in ["fastervlm:keep_tokens=4", "fastv", "pdrop"]:  # pruning for real, then removed
        with vtprune.patched(model, spec) as handle:
            greedy(model, ids, px)
            assert handle.last.visual_tokens_kept[0] < N
        assert hook_counts(model) == before and instance_attributes(model) == set()
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, images=px).logits, reference_logits)


def test_patch_is_recorded_in_the_handle_and_leaves_the_class_alone(model):
    cls = type(model)
    class_attributes = {name: cls.__dict__.get(name) for name in ("forward", "prepare_inputs_labels_for_multimodal")}
    handle = vtprune.patch(model, "fastervlm", keep_tokens=4)
    assert "prepare_inputs_labels_for_multimodal" in vars(model)
    assert ("forward" in vars(model)) == (not LEGACY)  # the transformers 5 shim, on this instance only
    assert {name: cls.__dict__.get(name) for name in class_attributes} == class_attributes
    with pytest.raises(RuntimeError, match="already patched"):
        vtprune.patch(model, "fastv")
    handle.remove()
    assert instance_attributes(model) == set()


# -- kept indices against independent references ---------------------------------------------


@needs_twin
@pytest.mark.parametrize(
    "spec", ["fastervlm:keep_tokens=5", "fastv", "pdrop:layers=1;2;3", "fastervlm:keep_tokens=9+fastv"]
)
@pytest.mark.parametrize("feature", ["patch", "cls_patch"])
def test_kept_indices_and_logits_match_the_transformers_family(tower, spec, feature):
    model = _model(tower, "left", feature)
    twin = to_transformers_llava(model)
    per_image = N + (feature == "cls_patch")
    prompts = [original_prompt([3, 7], seed=1), original_prompt([6, 2], seed=2)]
    px = images(2, seed=4)
    ids, mask = pad(prompts, "left")
    twin_ids, twin_mask = pad([to_transformers_prompt(p, per_image) for p in prompts], "left")
    with vtprune.patched(model, spec) as handle, torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, images=px).logits
        stages = handle.last.stages
    with vtprune.patched(twin, spec) as handle, torch.no_grad():
        twin_logits = twin(input_ids=twin_ids, attention_mask=twin_mask, pixel_values=px).logits
        twin_stages = handle.last.stages
    assert [(s.name, s.layer) for s in stages] == [(s.name, s.layer) for s in twin_stages]
    for stage, twin_stage in zip(stages, twin_stages, strict=True):
        for kept, twin_kept in zip(stage.kept, twin_stage.kept, strict=True):
            assert torch.equal(kept, twin_kept)
            assert 0 < kept.numel() < per_image
    torch.testing.assert_close(logits[:, -1], twin_logits[:, -1], rtol=1e-5, atol=1e-5)


@legacy_only
@pytest.mark.parametrize("feature", ["patch", "cls_patch"])
def test_fastervlm_keeps_the_top_cls_attention_of_the_select_layer(tower, feature):
    model = _model(tower, "right", feature)
    px = images(3, seed=5)
    clip = model.get_vision_tower().vision_tower  # eager under 4.37: output_attentions is the official score
    with torch.no_grad():
        attentions = clip(px, output_attentions=True, output_hidden_states=True).attentions
    layer = model.config.mm_vision_select_layer % (len(attentions) + 1) - 1
    first = 1 if feature == "patch" else 0
    scores = attentions[layer][:, :, 0, first:].mean(dim=1)
    per_image = N + (feature == "cls_patch")
    ids = original_prompt([2, 2, 2, 3], num_images=3, seed=3)[None]
    with vtprune.patched(model, "fastervlm", keep_tokens=5) as handle, torch.no_grad():
        model(input_ids=ids, images=px)
    expected = top_k_sorted(scores, 5) + torch.arange(3)[:, None] * per_image
    assert torch.equal(handle.last.stages[0].kept[0], expected.flatten())


@legacy_only
def test_fastv_keeps_the_top_last_token_attention_of_layer_k_minus_1(model):
    """FastV's official score: the eager attention weights of layer K-1, last row, mean over heads."""
    ids, px = original_prompt([4, 6], seed=2)[None], images(1, seed=2)
    with torch.no_grad():
        out = model(input_ids=ids, images=px, output_attentions=True)  # 4.37 sdpa falls back to eager
    start = 4  # the image's N columns follow the 4 text tokens
    scores = out.attentions[1][0, :, -1, start : start + N].mean(dim=0)
    with vtprune.patched(model, "fastv", k=2, keep_tokens=6) as handle, torch.no_grad():
        model(input_ids=ids, images=px)
    assert torch.equal(handle.last.stages[0].kept[0], scores.topk(6).indices.sort().values)


# -- batches, padding, cache --------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["fastervlm:keep_tokens=5", "fastv", "pdrop:layers=1;2;3"])
def test_left_padded_batch_of_two_equals_each_sample_alone(left_model, spec):
    prompts = [original_prompt([3, 9], seed=1), original_prompt([8, 2], seed=2)]
    px = images(2, seed=7)
    ids, mask = pad(prompts, "left")
    with vtprune.patched(left_model, spec) as handle:
        batch_tokens = greedy(left_model, ids, px, attention_mask=mask)
        batch_stages = handle.last.stages
        for row, prompt in enumerate(prompts):
            alone = greedy(left_model, prompt[None], px[row : row + 1])
            for stage, batch_stage in zip(handle.last.stages, batch_stages, strict=True):
                assert torch.equal(stage.kept[0], batch_stage.kept[row])
            assert torch.equal(new_tokens(alone, prompt[None])[0], new_tokens(batch_tokens, ids)[row])


@pytest.mark.parametrize("spec", ["fastervlm:keep_tokens=5", "fastv", "pdrop:layers=1;2;3"])
def test_right_padded_batch_keeps_the_same_tokens_as_each_sample_alone(model, spec):
    """The package's default: it strips the padding and pads the merged sequences on the right."""
    prompts = [original_prompt([3, 9], seed=1), original_prompt([8, 2], seed=2)]
    px = images(2, seed=7)
    ids, mask = pad(prompts, "right")
    with vtprune.patched(model, spec) as handle, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, images=px)
        batch_stages = handle.last.stages
        for row, prompt in enumerate(prompts):
            model(input_ids=prompt[None], images=px[row : row + 1])
            for stage, batch_stage in zip(handle.last.stages, batch_stages, strict=True):
                assert torch.equal(stage.kept[0], batch_stage.kept[row])


@pytest.mark.parametrize(
    "spec",
    [
        "fastervlm:keep_tokens=5",
        "fastervlm:keep_tokens=5,positions=original",
        "fastv",
        "pdrop:layers=1;2;3",
        "fastervlm:keep_tokens=9+fastv:keep_tokens=4",
    ],
)
def test_generation_with_cache_equals_without_cache(left_model, spec):
    ids, mask = pad([original_prompt([3, 9], seed=4), original_prompt([7, 1], seed=5)], "left")
    px = images(2, seed=4)
    with vtprune.patched(left_model, spec) as handle:
        cached = greedy(left_model, ids, px, steps=6, attention_mask=mask)
        assert handle.last.visual_tokens_kept[0] < N
        uncached = greedy(left_model, ids, px, steps=6, attention_mask=mask, use_cache=False)
    assert torch.equal(cached, uncached)


def test_text_only_sample_in_a_batch(left_model):
    """The package consumes one image per text-only sample and splices nothing: kept indices stay aligned."""
    prompts = [original_prompt([6], num_images=0, seed=2), original_prompt([2, 5], seed=3)]
    px = images(2, seed=9)  # the first image is the text-only sample's unused placeholder
    ids, mask = pad(prompts, "left")
    with vtprune.patched(left_model, "fastervlm", keep_tokens=3) as handle, torch.no_grad():
        left_model(input_ids=ids, attention_mask=mask, images=px)
        assert handle.last.visual_tokens_in == [0, N]
        batch_kept = handle.last.stages[0].kept
        left_model(input_ids=prompts[1][None], images=px[1:])
        assert batch_kept[0].numel() == 0 and torch.equal(batch_kept[1], handle.last.stages[0].kept[0])


# -- labels and bad input ----------------------------------------------------------------------


def test_labels_follow_the_merged_and_pruned_sequence(model):
    ids, px = original_prompt([4, 6], seed=6)[None], images(1, seed=6)
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN_INDEX] = -100
    with torch.no_grad():
        reference = model(input_ids=ids, images=px, labels=labels).loss
    with vtprune.patched(model, "fastervlm", keep_ratio=1.0), torch.no_grad():
        assert torch.equal(model(input_ids=ids, images=px, labels=labels).loss, reference)
    with vtprune.patched(model, "fastervlm", keep_tokens=4), torch.no_grad():
        out = model(input_ids=ids, images=px, labels=labels)
    # the merged labels: 4 text tokens, the 4 kept image columns (-100), 6 text tokens; next-token loss
    merged = torch.cat([labels[0, :4], torch.full((4,), -100), labels[0, 5:]])
    assert out.logits.shape[1] == merged.numel()
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), merged[1:])
    torch.testing.assert_close(out.loss, expected)


def test_unloaded_tower_and_unpackable_anyres_are_refused(tower):
    from llava.model import LlavaLlamaForCausalLM

    from vtprune.evals.models.llava_original import llava_original_config

    unloaded = LlavaLlamaForCausalLM(llava_original_config(tower))  # delay_load: the tower is not loaded
    with pytest.raises(ValueError, match="load_model"):
        vtprune.patch(unloaded, "fastervlm", keep_ratio=0.5)
    anyres = tiny_llava_original(tower, mm_patch_merge_type="spatial_unpad", select_feature="cls_patch")
    with pytest.raises(ValueError, match="mm_vision_select_feature='patch'"):
        vtprune.patch(anyres, "fastervlm", keep_ratio=0.5)
    assert instance_attributes(anyres) == set()
    flat = _model(tower)  # mm_patch_merge_type="flat": the package flattens the crops into one block
    with (
        vtprune.patched(flat, "fastervlm", keep_ratio=0.5),
        torch.no_grad(),
        pytest.raises(NotImplementedError, match="spatial_unpad"),
    ):
        flat(input_ids=original_prompt([2, 2])[None], images=[images(3)], image_sizes=[(64, 32)])


# -- AnyRes (mm_patch_merge_type="spatial_unpad", the package's LLaVA-NeXT path) ------------------
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
ANYRES_SIZES = [(50, 30), (30, 64), (64, 40)]  # (width, height): 2 x 1, 1 x 2, 2 x 2 crops (w x h)


@functools.cache
def _anyres_model(tower):
    return tiny_llava_original(
        tower,
        seed=2,
        layers=LAYERS,
        mm_patch_merge_type="spatial_unpad",
        image_aspect_ratio="anyres",
        image_grid_pinpoints=PINPOINTS,
    )


@pytest.fixture
def anyres_model(tower):
    return _anyres_model(tower)


def crop_stacks(sizes, seed=0):
    """One (1 + crops, 3, 32, 32) stack per image, as the package's process_anyres_image returns."""
    from llava.mm_utils import get_anyres_image_grid_shape

    generator = torch.Generator().manual_seed(seed)
    stacks = []
    for size in sizes:
        width, height = get_anyres_image_grid_shape(size, PINPOINTS, 32)
        stacks.append(torch.randn(1 + width * height, 3, 32, 32, generator=generator))
    return stacks


def anyres_map(model, sizes):
    from vtprune.patches.llava_original import LlavaOriginalAdapter

    stacks = crop_stacks(sizes)
    return LlavaOriginalAdapter(model).packing_map(sizes, [s.shape[0] for s in stacks])


def test_anyres_packing_map_matches_the_packages_own_packed_features(anyres_model):
    model = anyres_model
    stacks = crop_stacks(ANYRES_SIZES)
    ids = original_prompt([2] * 4, num_images=3)[None]
    with torch.no_grad():
        merged = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, stacks, ANYRES_SIZES)[4][0]
        projected = model.encode_images(torch.cat(stacks))  # (S_total, N, D)
    column, first, unpadded = 2, 0, []  # two text tokens before each image
    for image in anyres_map(model, ANYRES_SIZES):
        count = image.valid.shape[0]
        features = merged[column : column + image.token_map.numel()]
        visual = image.token_map >= 0
        expected = projected[first : first + count].reshape(count * N, -1)
        torch.testing.assert_close(features[visual], expected[image.token_map[visual]])
        newline = model.get_model().image_newline
        torch.testing.assert_close(features[~visual], newline.expand(int((~visual).sum()), -1))
        assert image.crop_grid != (0, 0) and bool(image.valid[0].all())
        unpadded.append(int((~image.valid).sum()))
        column += image.token_map.numel() + 2
        first += count
    assert column == merged.shape[0]
    assert unpadded[0] > 0 and unpadded[2] > 0  # the package drops padding columns / rows of these canvases


@pytest.mark.parametrize("spec", ["fastervlm:keep_ratio=1.0", "hired:budget_ratio=1.0", "uniform:keep_ratio=1"])
def test_anyres_keep_all_is_bit_identical_and_remove_restores(anyres_model, spec):
    model = anyres_model
    sizes = ANYRES_SIZES[:2]
    stacks = crop_stacks(sizes, seed=3)
    ids = original_prompt([3, 4, 2], num_images=2)[None]
    with torch.no_grad():
        reference = model(input_ids=ids, images=stacks, image_sizes=sizes).logits
    tokens = greedy_reference(model, ids, stacks, image_sizes=sizes)  # the unpatched generate() needs transformers 4.3x
    before = hook_counts(model)
    with vtprune.patched(model, spec), torch.no_grad():
        assert torch.equal(model(input_ids=ids, images=stacks, image_sizes=sizes).logits, reference)
        assert torch.equal(new_tokens(greedy(model, ids, stacks, image_sizes=sizes), ids), tokens)
    assert hook_counts(model) == before and instance_attributes(model) == set()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, images=stacks, image_sizes=sizes).logits, reference)


def kept_per_image(model, record, sizes):
    """Per image: (token_map, kept packed columns as a bool mask, (S, N) keep of the sub-image tokens)."""
    kept = record.stages[0].kept[0]
    out, first = [], 0
    for image in anyres_map(model, sizes):
        length = image.token_map.numel()
        columns = torch.zeros(length, dtype=torch.bool)
        columns[kept[(kept >= first) & (kept < first + length)] - first] = True
        keep = torch.zeros(image.valid.numel(), dtype=torch.bool)
        keep[image.token_map[columns & (image.token_map >= 0)]] = True
        out.append((image, columns, keep.view_as(image.valid)))
        first += length
    return out


@pytest.mark.parametrize(
    ("spec", "per_image_total"),
    [
        ("fastervlm:keep_tokens=3", lambda image: int(image.valid.sum(dim=1).clamp(max=3).sum())),
        ("hired:budget_ratio=0.3,budget_base=valid", lambda image: int(0.3 * int(image.valid.sum()) + 0.5)),
        ("random:keep_ratio=0.25,budget=global", None),
    ],
)
def test_anyres_budgets_and_the_newline_rule(anyres_model, spec, per_image_total):
    from vtprune.patches._anyres import keep_packed

    model = anyres_model
    stacks = crop_stacks(ANYRES_SIZES, seed=5)
    ids = original_prompt([2, 3, 3, 2], num_images=3)[None]
    with vtprune.patched(model, spec) as handle, torch.no_grad():
        logits = model(input_ids=ids, images=stacks, image_sizes=ANYRES_SIZES).logits
    images = kept_per_image(model, handle.last, ANYRES_SIZES)
    assert handle.last.visual_tokens_in == [sum(image.token_map.numel() for image, _, _ in images)]
    assert logits.shape[1] == ids.shape[1] - 3 + handle.last.visual_tokens_kept[0]
    for image, columns, keep in images:
        assert not bool((keep & ~image.valid).any())  # only tokens that exist after unpadding
        assert torch.equal(columns, keep_packed(image.token_map, keep))  # newline iff its row keeps a token
        if spec.startswith("fastervlm"):  # per sub-image budget
            assert keep.sum(dim=1).tolist() == image.valid.sum(dim=1).clamp(max=3).tolist()
        if per_image_total is not None:
            assert int(keep.sum()) == per_image_total(image)


def test_anyres_batch_with_different_image_sizes_keeps_what_each_sample_alone_keeps(anyres_model):
    model = anyres_model
    stacks = crop_stacks(ANYRES_SIZES[:2], seed=6)
    prompts = [original_prompt([3, 2], seed=1), original_prompt([5, 4], seed=2)]
    ids, mask = pad(prompts, "right")
    for spec in ("hired:budget_ratio=0.3", "fastervlm:keep_tokens=4"):
        alone = []
        with vtprune.patched(model, spec) as handle, torch.no_grad():
            for row in range(2):
                model(
                    input_ids=prompts[row][None], images=stacks[row : row + 1], image_sizes=ANYRES_SIZES[row : row + 1]
                )
                alone.append(handle.last.stages[0].kept[0])
            model(input_ids=ids, attention_mask=mask, images=stacks, image_sizes=ANYRES_SIZES[:2])
            batch = handle.last.stages[0].kept
        for row in range(2):
            assert torch.equal(batch[row], alone[row]), spec
