"""`generate`'s whole surface on a patched model: expansion (beams, several return sequences),
a returned cache continued by a second `generate`, labels in a left-padded batch, the KV-cache
figures, and call-time overrides the scores must follow.

Each expectation is independent of vtprune: the unpatched model run on a sequence pruned by hand,
the unpatched model's own continuation rule, or losses and byte counts written out by hand.
"""

import pytest
import torch
from helpers import clip_images, left_pad, llava_prompt, prompt_ids, qwen2_vl_pixels, qwen2_vl_prompt

import vtprune
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, tiny_llava, tiny_llava_next, tiny_qwen2_vl

N = 16  # visual tokens per image of the tiny LLaVA (4 x 4 patches)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=1)


def hand_pruned_embeds(model, input_ids, pixel_values, kept):
    """Unpatched: the merged prompt with only the ``kept`` visual tokens, (1, L', D)."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        features = torch.cat(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))
        image_columns = (input_ids[0] == IMAGE_TOKEN_ID).nonzero().flatten()
        embeds[0, image_columns] = features.to(embeds.dtype)
        keep = torch.ones(input_ids.shape[1], dtype=torch.bool)
        keep[image_columns] = False
        keep[image_columns[kept]] = True
        return embeds[:, keep]


# -- expansion: beam search and num_return_sequences -------------------------------------------


@pytest.mark.parametrize("method", ["fastervlm", "fopru", "uniform"])
def test_beam_search_keeps_each_samples_tokens_on_every_beam(llava, method):
    ids, px = llava_prompt(), clip_images(1)
    handle = vtprune.patch(llava, method, keep_tokens=4)
    try:
        with torch.no_grad():
            llava.generate(input_ids=ids, pixel_values=px, max_new_tokens=3, do_sample=False)
            greedy_kept = handle.last.stages[0].kept[0]
            beams = llava.generate(input_ids=ids, pixel_values=px, max_new_tokens=3, do_sample=False, num_beams=2)
        assert handle.last.visual_tokens_kept == [4, 4]
        for row in handle.last.stages[0].kept:
            assert torch.equal(row, greedy_kept)
    finally:
        handle.remove()
    # independent: the unpatched model's beam search on the hand-pruned prompt (compact positions)
    embeds = hand_pruned_embeds(llava, ids, px, greedy_kept)
    with torch.no_grad():
        reference = llava.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=3,
            do_sample=False,
            num_beams=2,
        )
    assert torch.equal(beams[:, ids.shape[1] :], reference)


def test_num_return_sequences_expands_a_left_padded_batch(llava):
    rows = [prompt_ids([2, 3], num_images=2, seed=1), prompt_ids([5, 6], num_images=1, seed=2)]
    ids, mask = left_pad(rows)
    px = clip_images(3, seed=3)
    handle = vtprune.patch(llava, "fastervlm", keep_tokens=4)
    try:
        with torch.no_grad():
            llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=2, do_sample=False)
            kept = handle.last.stages[0].kept
            llava.generate(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=px,
                max_new_tokens=2,
                do_sample=True,
                num_return_sequences=2,
            )
        expanded = handle.last.stages[0].kept
        assert handle.last.visual_tokens_kept == [8, 8, 4, 4]
        for row in range(4):
            assert torch.equal(expanded[row], kept[row // 2])
    finally:
        handle.remove()


def llava_next_inputs(model, sizes, text=(3, 4), seed=0):
    px = torch.randn(len(sizes), 5, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    image_sizes = torch.tensor(sizes)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=px, image_sizes=image_sizes).pooler_output
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.randint(7, 128, (text[0],), generator=generator)]
    for f in features:
        parts += [torch.full((f.shape[0],), IMAGE_TOKEN_ID), torch.randint(7, 128, (text[1],), generator=generator)]
    return {"input_ids": torch.cat(parts)[None], "pixel_values": px, "image_sizes": image_sizes}


def qwen2_vl_inputs(grids, seed=0):
    ids, types = qwen2_vl_prompt([3, 4] + [2] * (len(grids) - 1), grids, ["image"] * len(grids), seed=seed)
    return {
        "input_ids": ids[None],
        "mm_token_type_ids": types[None],
        "pixel_values": qwen2_vl_pixels(grids, seed=seed),
        "image_grid_thw": torch.tensor(grids),
    }


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_beam_search_on_packed_families(family):
    if family == "llava_next":
        model = tiny_llava_next(seed=1)
        inputs = llava_next_inputs(model, [[30, 50], [60, 40]])
        spec = "fastervlm:keep_ratio=0.5"
    else:
        model = tiny_qwen2_vl(seed=1)
        inputs = qwen2_vl_inputs([(1, 4, 6), (1, 4, 4)])
        spec = "uniform:keep_ratio=0.5"
    handle = vtprune.patch(model, spec)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            kept = handle.last.stages[0].kept[0]
            model.generate(**inputs, max_new_tokens=2, do_sample=False, num_beams=2, num_return_sequences=2)
        assert len(handle.last.stages[0].kept) == 2
        for row in handle.last.stages[0].kept:
            assert torch.equal(row, kept)
    finally:
        handle.remove()


# -- a returned cache continued by a second generate -----------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "fastervlm:keep_tokens=4",
        "fastv:k=1,keep_tokens=4",
        "uniform:keep_tokens=6",
        "fastervlm:keep_tokens=4+pdrop:layers=1,lam=0.5",
    ],
)
def test_second_generate_continues_a_returned_cache(llava, spec):
    ids, px = llava_prompt(), clip_images(1)

    def continued():
        with torch.no_grad():
            first = llava.generate(
                input_ids=ids, pixel_values=px, max_new_tokens=3, do_sample=False, return_dict_in_generate=True
            )
            second = llava.generate(
                input_ids=first.sequences,
                cache=first.past_key_values,
                max_new_tokens=3,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
            whole = llava.generate(
                input_ids=ids,
                pixel_values=px,
                max_new_tokens=6,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
        return second, whole

    with vtprune.patched(llava, spec):
        second, whole = continued()
    assert torch.equal(second.sequences, whole.sequences[:, : second.sequences.shape[1]])
    for step in range(len(second.logits)):
        torch.testing.assert_close(second.logits[step], whole.logits[3 + step], rtol=1e-5, atol=1e-5)


# -- labels in a left-padded batch ------------------------------------------------------------


@pytest.mark.parametrize("spec", ["fastervlm:keep_tokens=4", "fastv:k=1,keep_tokens=4"])
def test_left_padded_labels_count_the_same_loss_terms_as_each_sample_alone(llava, spec):
    # sample 0 is the longer prompt but loses more (two images): the cut re-aligns it behind padding
    rows = [prompt_ids([2, 2, 2], num_images=2, seed=4), prompt_ids([10, 11], num_images=1, seed=5)]
    pixels = [clip_images(2, seed=6), clip_images(1, seed=7)]
    ids, mask = left_pad(rows)
    assert ids.shape[1] == rows[0].numel()  # sample 0's first token sits at column 0: never a loss term

    def labels_of(row_ids, row_mask):
        labels = torch.where((row_ids == IMAGE_TOKEN_ID) | (row_mask == 0), -100, row_ids)
        first_real = row_mask.long().argmax(dim=1)
        labels[torch.arange(len(labels)), first_real] = torch.where(
            first_real > 0, -100, labels[torch.arange(len(labels)), first_real]
        )  # a padded sample's first token would be predicted from padding: not a term alone either
        return labels

    with vtprune.patched(llava, spec), torch.no_grad():
        batch = llava(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pixels), labels=labels_of(ids, mask))
        total, terms = 0.0, 0
        for row, px in zip(rows, pixels, strict=True):
            row_ids, row_mask = row[None], torch.ones(1, row.numel(), dtype=torch.long)
            row_labels = labels_of(row_ids, row_mask)
            alone = llava(input_ids=row_ids, pixel_values=px, labels=row_labels)
            count = int((row_labels[0, 1:] != -100).sum())
            total, terms = total + float(alone.loss) * count, terms + count
    torch.testing.assert_close(batch.loss, torch.tensor(total / terms), rtol=1e-5, atol=1e-6)


# -- KV-cache figures ------------------------------------------------------------------------


def kv_bytes_per_token(model, dtype):
    config = model.config.text_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_for_a_pre_llm_method_in_the_models_dtype(dtype):
    model = tiny_llava(seed=1)
    ids, px = llava_prompt(), clip_images(1)
    handle = vtprune.patch(model, "fastervlm", keep_tokens=4)
    try:
        model.to(dtype)  # after patching: the figures follow the model, not the dtype at patch time
        with torch.no_grad():
            model(input_ids=ids, pixel_values=px.to(dtype))
        layers = model.config.text_config.num_hidden_layers
        per_token = kv_bytes_per_token(model, dtype)
        length = ids.shape[1]
        assert handle.last.kv_cache_bytes == (
            length * layers * per_token,
            (length - N + 4) * layers * per_token,
        )
    finally:
        handle.remove()


# -- call-time overrides ---------------------------------------------------------------------


def test_call_time_vision_feature_layer_is_not_silently_ignored(llava):
    ids, px = llava_prompt(), clip_images(1)
    with vtprune.patched(llava, "fastervlm", keep_tokens=4) as handle:
        with torch.no_grad():
            llava(input_ids=ids, pixel_values=px, vision_feature_layer=llava.config.vision_feature_layer)
        assert handle.last.visual_tokens_kept == [4]
        other = -1 if llava.config.vision_feature_layer != -1 else -2
        with pytest.raises(ValueError, match="vision_feature_layer"), torch.no_grad():
            llava(input_ids=ids, pixel_values=px, vision_feature_layer=other)
        with pytest.raises(ValueError, match="vision_feature_select_strategy"), torch.no_grad():
            llava.generate(input_ids=ids, pixel_values=px, vision_feature_select_strategy="full", max_new_tokens=2)


def test_an_older_cache_continues_after_another_prompt(llava):
    first_ids, second_ids, px = llava_prompt(seed=0), llava_prompt(text=(5, 3), seed=1), clip_images(1)
    with vtprune.patched(llava, "fastervlm", keep_tokens=4), torch.no_grad():
        whole = llava.generate(input_ids=first_ids, pixel_values=px, max_new_tokens=6, do_sample=False)
        first = llava.generate(
            input_ids=first_ids, pixel_values=px, max_new_tokens=3, do_sample=False, return_dict_in_generate=True
        )
        llava.generate(input_ids=second_ids, pixel_values=clip_images(1, seed=2), max_new_tokens=3, do_sample=False)
        continued = llava.generate(
            input_ids=first.sequences, cache=first.past_key_values, max_new_tokens=3, do_sample=False
        )
    assert torch.equal(continued, whole[:, : continued.shape[1]])


def test_a_selection_is_repeated_onto_every_expanded_row():
    from vtprune.engine.generation import expand_selection

    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        rows, length, expand = (int(torch.randint(1, n, (1,), generator=generator)) for n in (5, 9, 4))
        visual = torch.rand(rows, length, generator=generator) < 0.5
        keep = torch.rand(int(visual.sum()), generator=generator) < 0.5
        # the same keep, written out row by row: scatter into the grid, repeat the rows, read back
        grid = torch.zeros(rows, length, dtype=torch.bool).masked_scatter(visual, keep)
        expected = grid.repeat_interleave(expand, dim=0)[visual.repeat_interleave(expand, dim=0)]
        assert torch.equal(expand_selection(keep, visual, expand), expected)
