"""Merging methods (visionzip, pool) against re-statements of their official code, on a tiny LLaVA.

Each expectation is computed apart from vtprune: the official algorithm restated here from its
code (VisionZip: ``visionzip/clip_encoder.py::CLIPVisionTower_VisionZip.forward`` @ 3151f6d on an
eager tower's ``output_attentions`` / ``hidden_states`` and the layer's keys; pool: UniPruneBench
``Pool_PreLLM.py::pool_prune_pre_llm``, ``adaptive_avg_pool2d`` of the projected grid), spliced by
hand into the prompt and fed to the unpatched language model. The patched model must give the same
logits (so the engine's merged tokens and their positions are those sequences), and
``handle.last.stages[0].merged`` the official merge groups.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import eager_twin, prompt_ids

import vtprune
from vtprune.evals.models import transformers_vlms as vlms
from vtprune.methods.visionzip import VisionZipConfig

SIDE = 8  # an 8 x 8 patch grid: 64 visual tokens per image
TEXT = (3, 4)


@pytest.fixture(scope="module")
def model():
    return vlms.tiny_llava(seed=3, image_size=8 * SIDE, patch_size=8).eval()


def images(n, seed=0):
    return torch.randn(n, 3, 8 * SIDE, 8 * SIDE, generator=torch.Generator().manual_seed(seed))


def prompt(seed=0):
    return prompt_ids(list(TEXT), tokens_per_image=SIDE * SIDE, seed=seed).unsqueeze(0)


def spliced_logits(model, input_ids, tokens, positions="compact"):
    """The unpatched LLM on the prompt whose image block is replaced by ``tokens`` (K, D)."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)[0]
        block = (input_ids[0] == vlms.IMAGE_TOKEN_ID).nonzero().flatten()
        first, last = int(block[0]), int(block[-1])
        sequence = torch.cat([embeds[:first], tokens.to(embeds.dtype), embeds[last + 1 :]])
        count = tokens.shape[0]
        if positions == "compact":
            position_ids = torch.arange(sequence.shape[0])
        else:  # the merged block keeps the positions of its first columns, the text after it its own
            position_ids = torch.cat([torch.arange(first + count), torch.arange(last + 1, input_ids.shape[1])])
        hidden = model.model.language_model(
            inputs_embeds=sequence[None],
            position_ids=position_ids[None],
            attention_mask=torch.ones(1, sequence.shape[0], dtype=torch.long),
            use_cache=False,
        ).last_hidden_state
        return model.lm_head(hidden)[0]


def patched_logits(model, input_ids, pixel_values, method, **options):
    with vtprune.patched(model, method, **options) as handle, torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
        return logits, handle.last


# -- VisionZip: the official rule, restated -----------------------------------------------------


def official_visionzip(model, pixel_values, dominant, contextual):
    """VisionZip's tokens as its official tower computes them, projected by the model's projector.

    Eager tower with output_attentions; ``attentions[-2]`` [CLS] row summed over heads; the merge
    metric is ``layers[-2]``'s k projection, heads split and averaged; ``hidden_states[-2]`` with [CLS].
    Returns (tokens (B, dominant + contextual, D_llm), sources (B, 1 + P): the token row of each input,
    and the official ``all_indices``).
    """
    twin = eager_twin(model) if isinstance(model, type(vlms.tiny_llava())) else model
    layer = (
        twin.model.vision_tower.vision_model.encoder.layers[-2]
        if hasattr(twin.model.vision_tower, "vision_model")
        else twin.model.vision_tower.encoder.layers[-2]
    )
    keys = {}
    hook = layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.update(k=out))
    with torch.no_grad():
        out = twin.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
    hook.remove()
    attn, hidden = out.attentions[-2], out.hidden_states[-2]
    batch, length, width = hidden.shape
    heads = attn.shape[1]
    metric = keys["k"].view(batch, length, heads, -1).transpose(1, 2).mean(1)  # (B, T, head_dim)

    dominant_num = dominant - 1
    topk = attn[:, :, 0, 1:].sum(dim=1).topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros(batch, 1, dtype=topk.dtype), topk], dim=1)
    mask = torch.ones(batch, length, dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden.masked_select(~mask[..., None]).view(batch, dominant_num + 1, width)
    rest = length - (dominant_num + 1)
    metric_filtered = metric[mask].view(batch, rest, metric.shape[2])
    hidden_filtered = hidden.masked_select(mask[..., None]).view(batch, rest, width)
    normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, rest // contextual)
    targets = torch.arange(0, rest, step)[:contextual]
    others = ~torch.isin(torch.arange(rest), targets)
    similarity = torch.bmm(normalized[:, others], normalized[:, targets].transpose(1, 2))
    assign = similarity.argmax(dim=2)
    one_hot = torch.zeros(batch, int(others.sum()), contextual, dtype=hidden.dtype).scatter_(2, assign[..., None], 1)
    counts = one_hot.sum(dim=1).clamp(min=1)[..., None]
    aggregated = torch.bmm(one_hot.transpose(1, 2), hidden_filtered[:, others]) / counts
    contextual_tokens = hidden_filtered[:, targets] + aggregated
    with torch.no_grad():
        tokens = twin.model.multi_modal_projector(torch.cat([dominant_tokens, contextual_tokens], dim=1))

    sources = torch.empty(batch, length, dtype=torch.long)
    for b in range(batch):  # the merge groups, token by token
        kept = (~mask[b]).nonzero().flatten().tolist()
        filtered = mask[b].nonzero().flatten().tolist()
        members = iter(assign[b].tolist())
        for row, index in enumerate(kept):
            sources[b, index] = row
        for position, index in enumerate(filtered):
            is_target = position in targets.tolist()
            group = targets.tolist().index(position) if is_target else next(members)
            sources[b, index] = dominant + group
    return tokens, sources, all_indices


@pytest.mark.parametrize(("dominant", "contextual"), [(10, 3), (20, 6), (5, 1)])
def test_visionzip_equals_the_official_tokens_spliced_into_the_prompt(model, dominant, contextual):
    px = images(2, seed=dominant)
    expected, sources, _ = official_visionzip(model, px, dominant, contextual)
    ids = torch.cat([prompt(seed=1), prompt(seed=2)])
    logits, last = patched_logits(model, ids, px, "visionzip", dominant=dominant, contextual=contextual)
    for b in range(2):
        reference = spliced_logits(model, ids[b : b + 1], expected[b])
        torch.testing.assert_close(logits[b], reference, atol=1e-4, rtol=1e-4)
        assert last.stages[0].merged[b].tolist() == sources[b, 1:].tolist()  # the patches' groups ([CLS] is none)
        assert last.stages[0].kept[b].tolist() == list(range(dominant + contextual))
    assert last.visual_tokens_kept == [dominant + contextual] * 2


def test_visionzip_original_positions_keep_the_first_columns_of_the_block(model):
    px = images(1, seed=5)
    expected, _, _ = official_visionzip(model, px, 12, 4)
    ids = prompt(seed=3)
    logits, _ = patched_logits(model, ids, px, "visionzip", dominant=12, contextual=4, positions="original")
    torch.testing.assert_close(logits[0], spliced_logits(model, ids, expected[0], "original"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("keep", "split"), [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)), (32, (27, 5))])
def test_visionzip_keep_tokens_gives_the_papers_splits(keep, split):
    assert VisionZipConfig(keep_tokens=keep).split(576) == split


def test_visionzip_image_alone_equals_in_a_batch(model):
    px = images(3, seed=9)
    ids = torch.cat([prompt(seed=s) for s in range(3)])
    batch, _ = patched_logits(model, ids, px, "visionzip", keep_tokens=16)
    for b in range(3):
        alone, _ = patched_logits(model, ids[b : b + 1], px[b : b + 1], "visionzip", keep_tokens=16)
        torch.testing.assert_close(batch[b], alone[0], atol=1e-5, rtol=1e-5)


def test_visionzip_refuses_budgets_that_do_not_fit_and_towers_without_cls(model):
    with (
        pytest.raises(ValueError, match="does not fit"),
        vtprune.patched(model, "visionzip", dominant=60, contextual=10),
    ):
        model(input_ids=prompt(), pixel_values=images(1))
    with pytest.raises(ValueError, match="one budget"):
        VisionZipConfig(dominant=10, contextual=2, keep_tokens=12)
    onevision = vlms.tiny_llava_onevision(seed=0)
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        vtprune.patch(onevision, "visionzip", keep_tokens=8)


# -- pool: UniPruneBench's adaptive pooling of the projected grid ------------------------------


@pytest.mark.parametrize(("keep", "mode"), [(16, "average"), (9, "average"), (9, "max"), (6, "average")])
def test_pool_equals_adaptive_pooling_of_the_projected_grid(model, keep, mode):
    px = images(2, seed=keep)
    ids = torch.cat([prompt(seed=4), prompt(seed=5)])
    with torch.no_grad():
        features = torch.stack(model.model.get_image_features(pixel_values=px).pooler_output)  # (2, 64, D)
    rows = round(keep**0.5)  # the documented grid rule on a square grid: (round(sqrt(k)), ceil(k / rows))
    out = (rows, -(-keep // rows))
    grid = features.transpose(1, 2).reshape(2, -1, SIDE, SIDE)
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    pooled = pool(grid, out).flatten(2).transpose(1, 2)
    logits, last = patched_logits(model, ids, px, "pool", keep_tokens=keep, mode=mode)
    for b in range(2):
        torch.testing.assert_close(logits[b], spliced_logits(model, ids[b : b + 1], pooled[b]), atol=1e-4, rtol=1e-4)
    # merge groups: every patch in the (last) adaptive bin that starts at or before it
    row_bin = torch.tensor([max(i for i in range(out[0]) if (i * SIDE) // out[0] <= r) for r in range(SIDE)])
    col_bin = torch.tensor([max(i for i in range(out[1]) if (i * SIDE) // out[1] <= c) for c in range(SIDE)])
    expected_groups = (row_bin[:, None] * out[1] + col_bin[None, :]).flatten()
    assert last.stages[0].merged[0].tolist() == expected_groups.tolist()


def test_pool_keeping_the_whole_grid_is_the_unpatched_model(model):
    px, ids = images(1, seed=1), prompt(seed=1)
    with torch.no_grad():
        reference = model(input_ids=ids, pixel_values=px).logits
    logits, _ = patched_logits(model, ids, px, "pool", keep_ratio=1.0)
    assert torch.equal(logits, reference)


def test_merge_map_survives_expanded_rows(model):
    """num_return_sequences repeats every row after the images were encoded: each copy's merge map
    is its row's."""
    px = images(2, seed=2)
    ids = torch.cat([prompt(seed=6), prompt(seed=7)])
    with vtprune.patched(model, "visionzip", keep_tokens=16) as handle, torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        plain = handle.last.stages[0].merged
        model.generation_config.eos_token_id = None
        model.generate(input_ids=ids, pixel_values=px, max_new_tokens=1, num_return_sequences=2, do_sample=True)
        expanded = handle.last.stages[0].merged
    assert [m.tolist() for m in expanded] == [plain[0].tolist()] * 2 + [plain[1].tolist()] * 2


# -- PruMerge+: the official rule, restated ---------------------------------------------------


def official_prumerge_plus(model, pixel_values, neighbours):
    """PruMerge+ as ``token_prune_merge_advanced_plus`` computes it (adaptive, one image), projected.

    q / k: the last layer's q_proj / k_proj outputs; one full-width head; IQR on the [CLS] row with
    numpy's percentiles; top patches in descending order, then the stride samples not among them;
    each chosen token adds the score-weighted sum of its nearest keys among the rest (the other chosen
    tokens, then the others ascending); the extra token sums the others. Returns (tokens, chosen).
    """
    import numpy as np

    tower = model.model.vision_tower
    layer = tower.encoder.layers[-1]
    captured = {}
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: captured.update(k=out)),
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, out: captured.update(q=out)),
    ]
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    features = out.hidden_states[-2][:, 1:]
    _, patches, width = features.shape
    attn = ((captured["q"] @ captured["k"].transpose(-2, -1)) * width**-0.5).softmax(dim=-1)
    cls_attn = attn[:, 0, 1:]
    values = cls_attn.float().numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    ratio = len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)
    _, idx = torch.topk(cls_attn, int(patches * ratio), dim=1, largest=True)
    step = int(1 / ratio)
    sequence = torch.arange(0, patches - 1, int(step / 3))
    idx = torch.cat([idx, torch.tensor([x for x in sequence.tolist() if x not in idx.flatten().tolist()])[None]], dim=1)
    keys = captured["k"][:, 1:]
    chosen = idx[0].tolist()
    others = sorted(set(range(patches)) - set(chosen))
    normed = torch.nn.functional.normalize(keys[0], p=2, dim=-1)
    rows = []
    for i, token in enumerate(chosen):
        rest = chosen[:i] + chosen[i + 1 :] + others
        similarity = normed[token][None] @ normed[rest].T
        nearest = [rest[j] for j in similarity.topk(neighbours, dim=1).indices[0].tolist()]
        rows.append(features[0, token] + (features[0, nearest] * cls_attn[0, nearest][:, None]).sum(dim=0))
    rows.append((features[0, others] * cls_attn[0, others][:, None]).sum(dim=0))
    with torch.no_grad():
        return model.model.multi_modal_projector(torch.stack(rows)), chosen


@pytest.mark.parametrize("seed", [1, 16, 32, 19, 47])  # images with 1, 2, 3, 4 and 5 IQR outliers of 64
def test_prumerge_plus_equals_the_official_tokens_spliced_into_the_prompt(model, seed):
    px, ids = images(1, seed=seed), prompt(seed=seed)
    expected, chosen = official_prumerge_plus(model, px, neighbours=32)
    logits, last = patched_logits(model, ids, px, "prumerge_plus")
    torch.testing.assert_close(logits[0], spliced_logits(model, ids, expected), atol=1e-4, rtol=1e-4)
    groups = [len(chosen)] * (SIDE * SIDE)
    for row, patch in enumerate(chosen):
        groups[patch] = row
    assert last.stages[0].merged[0].tolist() == groups
    assert last.visual_tokens_kept == [len(chosen) + 1]


def test_prumerge_plus_without_outliers_keeps_the_top_patch(model):
    """Where the official code divides by zero (no IQR outlier), vtprune takes r = 1 / N: the top patch
    and the stride samples int(N / 3) apart."""
    px, ids = images(1, seed=0), prompt(seed=0)  # no outlier among the 64 scores
    _, last = patched_logits(model, ids, px, "prumerge_plus")
    groups = last.stages[0].merged[0]
    extra = int(groups.max())  # the extra token comes last
    chosen = (groups != extra).nonzero().flatten().tolist()
    spatial = set(range(0, SIDE * SIDE - 1, SIDE * SIDE // 3))
    assert spatial <= set(chosen) and len(chosen) in (len(spatial), len(spatial) + 1) and extra == len(chosen)


@pytest.mark.parametrize("keep", [8, 16, 33])
def test_prumerge_plus_fixed_budget_sends_exactly_that_many_tokens(model, keep):
    px = images(2, seed=keep)
    ids = torch.cat([prompt(seed=1), prompt(seed=2)])
    logits, last = patched_logits(model, ids, px, "prumerge_plus", keep_tokens=keep)
    assert last.visual_tokens_kept == [keep, keep]
    for b in range(2):  # batch = alone
        alone, _ = patched_logits(model, ids[b : b + 1], px[b : b + 1], "prumerge_plus", keep_tokens=keep)
        torch.testing.assert_close(logits[b], alone[0], atol=1e-5, rtol=1e-5)


def test_kept_patch_picture_shows_merged_groups(model):
    """A patch kept as itself is left as it is, a patch in a merged group takes its group's tint, and
    the same group's patches the same tint."""
    from PIL import Image

    from vtprune.evals.sweep.kept_patches import GROUP_COLOURS, kept_patch_overlay

    px, ids = images(1, seed=4), prompt(seed=4)
    _, last = patched_logits(model, ids, px, "visionzip", dominant=10, contextual=3)
    stage = last.stages[0]
    grey = Image.new("RGB", (8 * SIDE, 8 * SIDE), (128, 128, 128))
    picture = kept_patch_overlay(grey, stage.kept[0], (SIDE, SIDE), merged=stage.merged[0])
    groups = stage.merged[0].tolist()
    for patch, group in enumerate(groups):
        r, c = divmod(patch, SIDE)
        pixel = picture.getpixel((c * 8 + 4, r * 8 + 4))
        if groups.count(group) == 1:
            assert pixel == (128, 128, 128)
        else:
            colour = GROUP_COLOURS[group % len(GROUP_COLOURS)]
            assert pixel != (128, 128, 128) and all(
                abs(p - (128 + (q - 128) * 110 / 255)) <= 1 for p, q in zip(pixel, colour)
            )


def official_next_layout(tokens, keep_idx, crop_grid, side, newline):
    """One LLaVA-NeXT image as ``prepare_inputs_labels_for_multimodal_visionzip`` lays it out: a lone
    base image and the newline; else the base tokens, the crops' dominant patches restored onto the
    stitched canvas and read out where kept (``restore_image_features_sorted``), the crops' [CLS]
    tokens, then their contextual tokens."""
    if tokens.shape[0] == 1:
        return torch.cat([tokens[0], newline[None]])
    base, crops, keep = tokens[0], tokens[1:], keep_idx[1:]
    count, num_keep, width = crops.shape[0], keep.shape[1], crops.shape[2]
    restore = keep.sort(dim=1).values[:, 1:] - 1
    restored = torch.zeros(count, side * side, width)
    mask = torch.zeros(count, side * side, dtype=torch.bool).scatter_(1, restore, True)
    restored[mask] = crops[:, 1:num_keep].reshape(-1, width)
    height, width_crops = crop_grid
    restored = restored.view(height, width_crops, side, side, width).permute(0, 2, 1, 3, 4)
    mask = mask.view(height, width_crops, side, side).permute(0, 2, 1, 3).reshape(height * side, width_crops * side)
    selected = restored.reshape(height * side, width_crops * side, width)[mask]
    return torch.cat([base, selected, crops[:, 0], crops[:, num_keep:].reshape(-1, width)])


def test_visionzip_on_llava_next_follows_the_official_next_path():
    from contract_cases import _anyres_batch, _anyres_samples
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
    )

    model = vlms.tiny_llava_next(seed=2, attn_implementation="eager")
    config = model.config
    samples = _anyres_samples(model, [[60, 40], [30, 50], [20, 20]], seed=11)
    batch = _anyres_batch(samples)
    side = config.vision_config.image_size // config.vision_config.patch_size
    with vtprune.patched(model, "visionzip", dominant=5, contextual=2) as handle, torch.no_grad():
        logits = model(**batch).logits
        kept = handle.last.visual_tokens_kept
    for index, sample in enumerate(samples):
        size = sample["image_sizes"][0].tolist()
        grid = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
        crops = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        tokens, _, keep_idx = official_visionzip(model, sample["pixel_values"][0, :crops], 5, 2)
        expected = official_next_layout(tokens, keep_idx, grid, side, model.model.image_newline.detach())
        assert kept[index] == expected.shape[0]
        reference = spliced_logits(model, sample["input_ids"], expected)
        length = reference.shape[0]
        torch.testing.assert_close(logits[index, -length:], reference, atol=1e-4, rtol=1e-4)


def test_bench_times_the_visionzip_merge_and_both_towers():
    from vtprune.evals.bench.llava15 import benchmark_inputs, time_visionzip

    tiny = vlms.tiny_llava(seed=3, image_size=32, patch_size=8)
    inputs = benchmark_inputs(tiny, text_tokens=12, device="cpu")
    figures = time_visionzip(tiny, inputs, base_llm_prefill_s=1.0, repeats=1, dominant=5, contextual=2)
    assert figures["merge_s"] > 0 and figures["vtprune_tower_s"] > 0 and figures["official_style_tower_s"] > 0
    assert tiny.model.vision_tower.config._attn_implementation == "sdpa"  # the eager switch is undone


# -- VisionZip's Qwen2.5-VL variant: the official rule, restated ---------------------------------


def official_qwen_visionzip(model, sample, embeds):
    """``Qwen2_5_VL/qwen2_5vl_visionzip.py`` on one image: the last block's softmax(q k^T / sqrt(d)) of the
    rotated q / k over the whole image, head-mean, summed over queries, mean over each 2 x 2 unit, back
    from window order; keys likewise (unit mean, head mean); int(0.65 Nm) dominant by that score and
    max(int(0.05 Nm), 1) contextual (stride targets, cosine argmax, target + mean of members) written
    at their targets. Returns (kept merged-token indices, their values) in raster order."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    visual = model.model.visual
    attention = visual.blocks[-1].attn
    captured = {}
    hooks = [
        attention.register_forward_pre_hook(
            lambda m, a, kw: captured.update(cos_sin=kw["position_embeddings"]), with_kwargs=True
        ),
        attention.qkv.register_forward_hook(lambda m, a, out: captured.update(qkv=out)),
    ]
    with torch.no_grad():
        model.model.get_image_features(pixel_values=sample["pixel_values"], image_grid_thw=sample["image_grid_thw"])
    for hook in hooks:
        hook.remove()
    length = captured["qkv"].shape[0]
    heads = attention.num_heads
    q, k, _ = captured["qkv"].view(length, 3, heads, -1).unbind(1)
    q, k = apply_rotary_pos_emb_vision(q, k, *captured["cos_sin"])
    q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # (H, T, d)
    logits = (q @ k.transpose(1, 2) / q.shape[-1] ** 0.5).softmax(dim=-1)
    vision = model.config.vision_config
    window_index, _ = get_vision_window_index(
        sample["image_grid_thw"],
        spatial_merge_size=vision.spatial_merge_size,
        window_size=vision.window_size,
        patch_size=vision.patch_size,
    )
    reverse = window_index.argsort()
    score = logits.mean(dim=0).sum(dim=0).view(length // 4, 4).mean(-1)[reverse]
    keys = k.view(heads, length // 4, 4, -1).mean(2)[:, reverse].mean(0)

    count = length // 4
    dominant, contextual = int(0.65 * count), max(int(0.05 * count), 1)
    keep = torch.zeros(count, dtype=torch.bool)
    keep[score.topk(dominant).indices] = True
    rest = (~keep).nonzero().flatten()
    metric = keys[rest] / keys[rest].norm(dim=-1, keepdim=True)
    targets = torch.arange(0, rest.numel(), max(1, rest.numel() // contextual))[:contextual]
    others = ~torch.isin(torch.arange(rest.numel()), targets)
    assign = (metric[others] @ metric[targets].T).argmax(dim=1)
    values = embeds.clone()
    for c, target in enumerate(targets.tolist()):
        members = rest[others][assign == c]
        mean = embeds[members].mean(dim=0) if members.numel() else torch.zeros_like(embeds[0])
        values[rest[target]] = embeds[rest[target]] + mean
    keep[rest[targets]] = True
    return keep.nonzero().flatten(), values[keep]


def test_visionzip_qwen2_5_vl_variant_equals_the_official_rule():
    from helpers import qwen2_vl_pixels, qwen2_vl_prompt

    model = vlms.tiny_qwen2_5_vl(seed=4, layers=2)
    grid = (1, 8, 12)  # 24 merged tokens, 2 x 2-token windows
    ids, types = qwen2_vl_prompt([3, 4], [grid], seed=4)
    sample = {
        "input_ids": ids[None],
        "mm_token_type_ids": types[None],
        "pixel_values": qwen2_vl_pixels([grid], seed=4),
        "image_grid_thw": torch.tensor([grid]),
    }
    image = ids == vlms.IMAGE_TOKEN_ID
    with torch.no_grad():
        features = torch.cat(
            model.model.get_image_features(**{k: sample[k] for k in ("pixel_values", "image_grid_thw")}).pooler_output
        )
    kept, values = official_qwen_visionzip(model, sample, features)
    seen = {}
    with vtprune.patched(model, "visionzip", keep_ratio=0.7, variant="qwen2_5_vl", positions="original") as handle:
        hook = model.model.language_model.register_forward_pre_hook(  # after the stack's: the cut sequence
            lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True
        )
        with torch.no_grad():
            model(**sample)
        hook.remove()
        stage = handle.last.stages[0]
    assert stage.kept[0].tolist() == kept.tolist()
    first = int(image.nonzero()[0])
    torch.testing.assert_close(seen["embeds"][0, first : first + kept.numel()], values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_visionzip_qwen2_5_vl_variant_batch_equals_each_sample_alone(family):
    from contract_cases import FAMILIES

    case = FAMILIES[family]()
    options = {"keep_ratio": 0.7, "variant": "qwen2_5_vl"}
    with vtprune.patched(case.model, "visionzip", **options) as handle, torch.no_grad():
        batch = case.model(**case.batch).logits[:, -1]
        kept = handle.last.stages[0].kept
        for index, sample in enumerate(case.samples):
            alone = case.model(**sample).logits[:, -1]
            assert handle.last.stages[0].kept[0].tolist() == kept[index].tolist()
            torch.testing.assert_close(batch[index], alone[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="in place"):
        vtprune.patch(vlms.tiny_llava(seed=0), "visionzip", keep_ratio=0.5, variant="qwen2_5_vl")
