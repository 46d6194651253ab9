"""DivPrune, VisPruner and GlobalCom²'s official score against re-statements of their official code.

Each ``official_*`` function below re-states the official algorithm line by line from the official
code (read, not copied), on the same tensors the method gets:
- DivPrune: vbdi/divprune ``LLaVA/llava/model/llava_arch.py::LlavaMetaForCausalLM.DivPrune``;
- VisPruner: Theia-4869/VisPruner ``llava/model/llava_arch.py::LlavaMetaForCausalLM.encode_images``;
- GlobalCom²: xuyang-liu16/GlobalCom2 @ 96b2d00 ``llava_arch.py::generate_scale_for_crop_features``
  and ``apply_customvit.py`` (the score: head-mean of the pre-softmax logits).
"""

import numpy as np
import pytest
import torch

import vtprune
from vtprune.engine.probe import cls_attention_row, cls_logit_row
from vtprune.methods.base import VisualLayout
from vtprune.methods.divprune import DivPrune, DivPruneConfig, cosine_distance, max_min_picks
from vtprune.methods.globalcom2 import GlobalCom2, GlobalCom2Config, block_mass, crop_retention
from vtprune.methods.highres import CropLayout
from vtprune.methods.vispruner import VisPruner, VisPrunerConfig, vispruner_picks
from vtprune.patches._anyres import keep_packed
from vtprune.patches.llava_next import LlavaNextAdapter

# -- DivPrune ---------------------------------------------------------------------------------------------


def official_divprune(features: torch.Tensor, ratio: float) -> torch.Tensor:
    """DivPrune(visual_feature_vectors, image_feature_length, threshold_ratio): (L, D) -> s, in pick order."""
    terms = int(round(ratio * features.shape[0]))
    norm = features / features.norm(dim=1, keepdim=True)
    cosine = 1.0 - torch.mm(norm, norm.t())
    s = torch.empty(terms, dtype=torch.long)
    for i in range(terms):
        m2 = cosine if i == 0 else torch.index_select(cosine, 0, s[:i])
        scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :] if i == 0 else torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s


def clustered(n, tokens, dim, seed):
    """Features in a few clusters with spread: the max-min order has wide margins."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n, 6, dim, generator=generator) * 3
    members = torch.randint(0, 6, (n, tokens), generator=generator)
    return centres.gather(1, members[..., None].expand(-1, -1, dim)) + torch.randn(n, tokens, dim, generator=generator)


@pytest.mark.parametrize("ratio", [0.098, 0.25, 0.5])
def test_divprune_picks_are_the_official_picks_in_order(ratio):
    features = clustered(4, 64, 16, seed=1)
    layout = VisualLayout(64, (8, 8))
    method = DivPrune(DivPruneConfig(keep_ratio=ratio))
    k = method.config.num_keep(64)
    picks = max_min_picks(cosine_distance(features), k)
    kept = method.select(features, 4, layout, "cpu")
    for row in range(4):
        official = official_divprune(features[row], ratio)
        assert picks[row].tolist() == official.tolist()
        assert kept[row].tolist() == sorted(official.tolist())  # raster order


def test_divprune_rounds_as_the_official_code():
    assert DivPruneConfig(keep_ratio=0.098).num_keep(576) == 56  # int(round(56.448))
    assert DivPruneConfig(keep_ratio=0.25).num_keep(10) == 2  # round(2.5) = 2 (half to even)
    assert DivPruneConfig(keep_ratio=0.001).num_keep(576) == 1  # at least one token
    assert DivPruneConfig(keep_tokens=64).num_keep(576) == 64


def test_divprune_is_batch_invariant_and_keeps_k_distinct_tokens():
    features = clustered(3, 49, 8, seed=2)
    layout = VisualLayout(49, (7, 7))
    method = DivPrune(DivPruneConfig(keep_tokens=12))
    batch = method.select(features, 3, layout, "cpu")
    alone = torch.cat([method.select(features[i : i + 1], 1, layout, "cpu") for i in range(3)])
    assert torch.equal(batch, alone)
    duplicates = features[:1, :4].repeat(1, 12, 1)[:, :48]  # 4 distinct tokens, each 12 times
    kept = method.select(duplicates, 1, VisualLayout(48, (6, 8)), "cpu")
    assert kept.unique().numel() == 12  # the official loop would re-pick and keep fewer


def test_divprune_on_crops_prunes_the_valid_tokens_of_the_whole_image():
    """AnyRes (the official LLaVA-1.6 path): one budget round(ratio * tokens) over the image's unpadded tokens."""
    features = clustered(1, 5 * 16, 8, seed=3).view(5, 16, 8)
    valid = torch.ones(5, 16, dtype=torch.bool)
    valid[2, [3, 7, 11, 15]] = False  # a crop's padding column
    valid[4, [3, 7, 11, 15]] = False
    crops = CropLayout((4, 4), (2, 2), valid)
    keep = DivPrune(DivPruneConfig(keep_ratio=0.2)).select_crops({"embeds": features}, crops)
    tokens = valid.flatten().nonzero().flatten()
    official = official_divprune(features.reshape(80, 8)[tokens], 0.2)
    assert keep.flatten().nonzero().flatten().tolist() == sorted(tokens[official].tolist())
    per_image = DivPrune(DivPruneConfig(keep_ratio=0.25, budget="per_image")).select_crops({"embeds": features}, crops)
    for row in range(5):
        row_tokens = valid[row].nonzero().flatten()
        expected = official_divprune(features[row, row_tokens], 4 / len(row_tokens))  # k = round(0.25 * 16) = 4
        assert per_image[row].nonzero().flatten().tolist() == sorted(row_tokens[expected].tolist())


# -- VisPruner --------------------------------------------------------------------------------------------


def official_vispruner(attention: torch.Tensor, features: torch.Tensor, tokens: int, ratio: float) -> torch.Tensor:
    """encode_images' selection: (B, N) head-mean [CLS] attention, (B, N, C) features -> (B, N) index mask."""
    B, N, _ = features.shape
    important_num = int(tokens * ratio)
    diverse_num = tokens - important_num
    order = attention.argsort(dim=-1, descending=True)
    important, residual = order[:, :important_num], order[:, important_num:]
    normalized = features / features.norm(dim=-1, keepdim=True)
    while diverse_num > 0:
        R = residual.shape[1]
        r = min(8, R - diverse_num)
        if r <= 0:
            break
        residual_tokens = normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct = scores.argsort(dim=-1, descending=True)[:, r:]
        residual = torch.cat(
            [residual[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct], residual[..., 1::2]],
            dim=-1,
        )
    selected = torch.cat([important, residual], dim=-1) if diverse_num > 0 else important
    return torch.zeros(B, N, dtype=torch.bool).scatter_(1, selected, True)


def vispruner_inputs(n, tokens, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    attention = torch.rand(n, tokens, generator=generator).softmax(dim=-1)
    return attention, clustered(n, tokens, dim, seed)


@pytest.mark.parametrize("tokens, ratio", [(16, 0.5), (32, 0.75), (10, 0.0), (20, 1.0)])
def test_vispruner_keeps_the_official_tokens(tokens, ratio):
    attention, features = vispruner_inputs(1, 64, 16, seed=tokens)
    official = official_vispruner(attention, features, tokens, ratio)
    kept = VisPruner(VisPrunerConfig(keep_tokens=tokens, important_ratio=ratio)).select(
        torch.cat([attention[..., None], features], dim=-1), 1, VisualLayout(64, (8, 8)), "cpu"
    )
    assert kept[0].tolist() == official[0].nonzero().flatten().tolist()
    picks = vispruner_picks(attention, features, tokens, ratio)  # important first, then the residual's order
    assert (
        picks[0, : int(tokens * ratio)].tolist()
        == attention[0].argsort(descending=True)[: int(tokens * ratio)].tolist()
    )


@pytest.mark.parametrize("tokens, ratio", [(18, 0.5), (24, 0.75)])
def test_vispruner_odd_residual_crashes_the_official_loop_not_ours(tokens, ratio):
    """An odd residual: T_imp = 9 (64 - 9 = 55 tokens), or 46 -> ... -> 14 tokens with T_div = 6, where a round
    must drop r = 8 of the 7 even tokens, drops all 7 and leaves 7."""
    attention, features = vispruner_inputs(1, 64, 16, seed=5)
    with pytest.raises(IndexError):
        official_vispruner(attention, features, tokens, ratio)
    picks = vispruner_picks(attention, features, tokens, ratio)
    important = int(tokens * ratio)
    assert picks.shape == (1, tokens) and picks.unique().numel() == tokens
    assert picks[0, :important].tolist() == attention[0].argsort(descending=True)[:important].tolist()
    # each round drops the even tokens that best match an odd one: an exact duplicate pair loses one of its two
    twin = features.clone()
    twin[0, 1] = twin[0, 0]
    kept = vispruner_picks(torch.zeros_like(attention), twin, 9, 0.0)[0].tolist()
    assert not (0 in kept and 1 in kept)


def test_vispruner_is_batch_invariant():
    attention, features = vispruner_inputs(3, 36, 8, seed=7)
    stacked = torch.cat([attention[..., None], features], dim=-1)
    method = VisPruner(VisPrunerConfig(keep_tokens=12))
    layout = VisualLayout(36, (6, 6))
    batch = method.select(stacked, 3, layout, "cpu")
    alone = torch.cat([method.select(stacked[i : i + 1], 1, layout, "cpu") for i in range(3)])
    assert torch.equal(batch, alone)


def test_vispruner_on_crops_is_the_official_selection_on_each_sub_image_s_valid_tokens():
    attention, features = vispruner_inputs(3, 64, 8, seed=8)
    valid = torch.ones(3, 64, dtype=torch.bool)
    valid[2, 56:] = False  # the crop's last row is padding
    keep = VisPruner(VisPrunerConfig(keep_tokens=16)).select_crops(
        {"stacked": torch.cat([attention[..., None], features], dim=-1)}, CropLayout((8, 8), (1, 2), valid)
    )
    for row in range(3):
        tokens = valid[row].nonzero().flatten()
        official = official_vispruner(attention[row : row + 1, tokens], features[row : row + 1, tokens], 16, 0.5)
        assert keep[row].nonzero().flatten().tolist() == tokens[official[0]].tolist()


# -- the models: what the adapters hand the methods ---------------------------------------------------------


def tiny_llava_and_inputs():
    import contract_cases

    case = contract_cases.llava()
    return case.model, case.samples[0]


def test_divprune_on_llava_prunes_the_projected_tokens_the_llm_receives():
    model, sample = tiny_llava_and_inputs()
    with torch.no_grad():
        embeds = model.model.get_image_features(pixel_values=sample["pixel_values"]).pooler_output
    embeds = embeds if isinstance(embeds, torch.Tensor) else torch.stack(list(embeds))
    with vtprune.patched(model, "divprune", keep_ratio=0.25) as handle, torch.no_grad():
        model(**sample)
    tokens = embeds.shape[1]
    official = official_divprune(embeds[0].reshape(tokens, -1).float(), 0.25)
    assert handle.last.stages[0].kept[0].tolist() == sorted(official.tolist())


def divprune_kept(model, inputs, ratio):
    with vtprune.patched(model, "divprune", keep_ratio=ratio) as handle, torch.no_grad():
        model(**inputs)
    return [kept.tolist() for kept in handle.last.stages[0].kept]


@pytest.mark.parametrize(
    ("family", "ratio", "image_tokens"),
    [
        # Qwen2-VL: one image (one temporal slice) per sample, the merger's tokens
        ("qwen2_vl", 0.5, lambda model, s: model.model.get_image_features(s["pixel_values"], s["image_grid_thw"])),
        # InternVL: the pixel-shuffled, projected tokens of every tile of the image (crops, then the thumbnail)
        ("internvl", 0.25, lambda model, s: model.model.get_image_features(pixel_values=s["pixel_values"])),
    ],
)
def test_divprune_prunes_the_llm_input_embeddings_of_each_image(family, ratio, image_tokens):
    """Without a projector probe: the official max-min over each image's projected tokens (the unpatched
    model's get_image_features), the whole image at once; a batch keeps what each sample keeps alone."""
    import contract_cases

    case = getattr(contract_cases, family)()
    alone = []
    for sample in case.samples:
        with torch.no_grad():
            tokens = image_tokens(case.model, sample).pooler_output
        tokens = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens]).float()
        official = official_divprune(tokens, ratio)
        assert 0 < official.numel() < tokens.shape[0]
        kept = divprune_kept(case.model, sample, ratio)
        assert kept == [sorted(official.tolist())]
        alone += kept
    assert divprune_kept(case.model, case.batch, ratio) == alone


def test_divprune_on_qwen2_vl_video_prunes_each_temporal_slice_on_its_own():
    """An image and a two-slice video: the official max-min on the image's merged tokens and on each
    temporal slice of the video's (the unpatched model's get_image_features / get_video_features)."""
    import contract_cases
    from helpers import qwen2_vl_pixels, qwen2_vl_prompt

    model = contract_cases.qwen2_vl().model
    image, video = (1, 4, 6), (2, 4, 8)  # 6 tokens; 2 slices of 8 tokens
    ids, types = qwen2_vl_prompt([3, 2, 4], [image, video], ["image", "video"], seed=3)
    inputs = {
        "input_ids": ids[None],
        "mm_token_type_ids": types[None],
        "pixel_values": qwen2_vl_pixels([image], seed=3),
        "image_grid_thw": torch.tensor([image]),
        "pixel_values_videos": qwen2_vl_pixels([video], seed=4),
        "video_grid_thw": torch.tensor([video]),
    }
    with torch.no_grad():
        image_tokens = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        video_tokens = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    parts = [image_tokens.pooler_output[0], *video_tokens.pooler_output[0].float().chunk(2)]
    expected, first = [], 0
    for tokens in parts:
        expected += [first + i for i in sorted(official_divprune(tokens.float(), 0.5).tolist())]
        first += tokens.shape[0]
    assert divprune_kept(model, inputs, 0.5) == [expected]


def test_vispruner_on_llava_uses_the_feature_layer_attention_and_output():
    """The signals as the official feature_select takes them: ``attentions[-2]`` (layer 22 of 24, here the
    layer vision_feature_layer names) [CLS] row over the patches, head-mean, and ``hidden_states[-2][:, 1:]``."""
    model, sample = tiny_llava_and_inputs()
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        out = tower(sample["pixel_values"], output_hidden_states=True, output_attentions=True)
    tower.config._attn_implementation = "sdpa"
    layer = model.config.vision_feature_layer
    attention = out.attentions[layer][:, :, 0, 1:].mean(dim=1)
    features = out.hidden_states[layer][:, 1:]
    with vtprune.patched(model, "vispruner", keep_tokens=12) as handle, torch.no_grad():
        model(**sample)
    official = official_vispruner(attention, features, 12, 0.5)  # 16 tokens: 6 important, 10 -> 6 diverse
    assert handle.last.stages[0].kept[0].tolist() == official[0].nonzero().flatten().tolist()


# -- GlobalCom²: the official score --------------------------------------------------------------------------


def official_scales(
    base_scores: np.ndarray, num_patch_width: int, num_patch_height: int, ratio: float, temperature=10.0
):
    """generate_scale_for_crop_features: block sums of the thumbnail row, softmax / T, scales around r."""
    n = base_scores.shape[0]
    side = int(n**0.5)
    patch_width, patch_height = max(side // num_patch_width, 1), max(side // num_patch_height, 1)
    sums = np.zeros(num_patch_width * num_patch_height)
    for idx, score in enumerate(base_scores):
        i, j = divmod(idx, side)
        sums[
            min(i // patch_height, num_patch_height - 1) * num_patch_width + min(j // patch_width, num_patch_width - 1)
        ] += score
    shifted = (sums - np.max(sums)) / temperature
    soft = np.exp(shifted) / (np.sum(np.exp(shifted)) + 1e-8)
    return np.clip(ratio * (1 + soft - np.mean(soft)), None, 1.0)


def test_cls_logit_probe_is_the_head_mean_of_the_pre_softmax_logits():
    """apply_customvit.py: attn_weights = bmm(q_proj(x) * scale, k^T), viewed (B, H, T, T), mean over heads."""
    generator = torch.Generator().manual_seed(0)
    heads, head_dim, tokens = 4, 8, 17
    q, k = (
        torch.randn(2, tokens, heads * head_dim, generator=generator),
        torch.randn(2, tokens, heads * head_dim, generator=generator),
    )
    scale = head_dim**-0.5
    qh = (q * scale).view(2, tokens, heads, head_dim).transpose(1, 2).reshape(2 * heads, tokens, head_dim)
    kh = k.view(2, tokens, heads, head_dim).transpose(1, 2).reshape(2 * heads, tokens, head_dim)
    official = torch.bmm(qh, kh.transpose(1, 2)).view(2, heads, tokens, tokens).mean(dim=1)[:, 0]
    torch.testing.assert_close(cls_logit_row(q, k, heads, scale), official)
    torch.testing.assert_close(
        cls_attention_row(q, k, heads, scale),
        torch.bmm(qh, kh.transpose(1, 2)).softmax(-1).view(2, heads, tokens, tokens).mean(dim=1)[:, 0],
    )


@pytest.mark.parametrize("crop_grid", [(2, 2), (1, 3), (3, 2)])
def test_globalcom2_retention_is_the_official_scale(crop_grid):
    generator = torch.Generator().manual_seed(sum(crop_grid))
    logits = torch.randn(576, generator=generator) * 2
    nh, nw = crop_grid
    ours = crop_retention(block_mass(logits, (24, 24), crop_grid), 0.25, 10.0)
    official = official_scales(logits.double().numpy(), nw, nh, 0.25)
    np.testing.assert_allclose(ours.numpy(), official, rtol=1e-5)


def test_globalcom2_pre_softmax_score_spreads_crop_retention_the_softmax_row_does_not():
    """The issue's finding, on a thumbnail whose logits favour the top-left quarter: block sums of logits
    differ by tens, so the crops' ratios spread around r; the post-softmax row sums to 1, so every crop's
    ratio falls within about 1 % of r, as with the feature-layer softmax row vtprune used before."""
    generator = torch.Generator().manual_seed(3)
    rows, cols = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    logits = (2.0 * ((rows < 12) & (cols < 12)) + torch.randn(24, 24, generator=generator)).flatten()
    spread = {}
    for name, score in (("logits", logits), ("softmax", logits.softmax(dim=0))):
        ratios = torch.tensor(official_scales(score.double().numpy(), 2, 2, 0.25))
        ours = crop_retention(block_mass(score, (24, 24), (2, 2)), 0.25, 10.0)
        torch.testing.assert_close(ours.double(), ratios, rtol=1e-5, atol=1e-7)
        spread[name] = float((ratios.max() - ratios.min()) / 0.25)
    assert spread["logits"] > 0.5  # the top-left crop keeps far more than the others
    assert spread["softmax"] < 0.02


def test_globalcom2_default_scores_by_the_last_layer_pre_softmax_logits():
    import contract_cases

    case = contract_cases.llava_next()
    model, sample = case.model, case.samples[0]
    with vtprune.patched(model, "globalcom2") as handle, torch.no_grad():
        model(**sample)
    assert GlobalCom2(GlobalCom2Config()).vision_probes() == {"cls": ("cls_logits", -1)}
    assert GlobalCom2(GlobalCom2Config(score="softmax")).vision_probes() == {"cls": ("cls", "feature")}
    # the kept set = select_crops on logits computed here from the last layer's own input and weights
    tower = model.model.vision_tower
    (image,) = LlavaNextAdapter(model).packing_map(sample["image_sizes"])
    pixels = sample["pixel_values"][0][: image.valid.shape[0]]  # the sub-images the image has (the rest pad)
    last = LlavaNextAdapter(model).vision_layers()[-1]
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2]  # the last layer's input
        x = last.layer_norm1(hidden)
        attention = last.self_attn
        logits = cls_logit_row(attention.q_proj(x), attention.k_proj(x), attention.num_heads, attention.scale)[:, 1:]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    crops = CropLayout((side, side), image.crop_grid, image.valid, image.valid)
    keep = GlobalCom2(GlobalCom2Config()).select_crops({"cls": logits}, crops)
    columns = keep_packed(image.token_map, keep).nonzero().flatten()
    assert handle.last.stages[0].kept[0].tolist() == columns.tolist()


# -- CDPruner ---------------------------------------------------------------------------------------------


def official_cdpruner(image_features, image_embeds, text_embeds, tokens):
    """encode_images: cosine kernel of the projected tokens x negated, min-max normalised relevance, greedy
    MAP of the DPP. (B, N, D), (B, N, C), (M, C) -> select_idx (T, B), in pick order."""
    B, N, _ = image_features.shape
    image_normalized = (image_features / image_features.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (-torch.matmul(image_embeds, text_embeds.t())).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((tokens, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((tokens, B), dtype=torch.long)
    for i in range(tokens):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (
            kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])
        ) / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")
    return select_idx


def test_cdpruner_dpp_picks_are_the_official_picks_in_order():
    from vtprune.methods.cdpruner import dpp_picks, query_relevance

    generator = torch.Generator().manual_seed(4)
    features = clustered(1, 36, 24, seed=4)
    image_embeds = torch.randn(1, 36, 8, generator=generator)
    text_embeds = torch.randn(2, 8, generator=generator)  # two 77-token segments
    official = official_cdpruner(features, image_embeds, text_embeds, 12)
    picks = dpp_picks(features, query_relevance(image_embeds, text_embeds), 12)
    assert picks[0].tolist() == official[:, 0].tolist()


def test_cdpruner_needs_a_clip_joint_space_and_the_instruction():
    with pytest.raises(ValueError, match="clip="):
        vtprune.build_methods("cdpruner", {"keep_tokens": 8})
    import contract_cases

    model, sample = tiny_llava_and_inputs()
    with pytest.raises(ValueError, match="cannot load the CLIP checkpoint"):
        vtprune.patch(model, "cdpruner", keep_tokens=8, clip="/nonexistent/clip")
    with vtprune.patched(model, "cdpruner", keep_tokens=8, clip=contract_cases.CLIP) as handle:
        with pytest.raises(ValueError, match="handle.set_query"), torch.no_grad():
            model(**sample)
        handle.set_query("What is shown?")
        with torch.no_grad():
            model(**sample)
        assert handle.last.visual_tokens_kept == [8]


def test_cdpruner_text_past_77_tokens_is_cut_into_zero_padded_segments():
    import contract_cases

    clip = contract_cases.CLIP
    short, long = clip.text("what is shown"), clip.text(" ".join(["word"] * 100))  # 102 ids: two segments
    assert short.shape == (1, 8) and long.shape == (2, 8)
    ids = contract_cases.WordTokenizer()(" ".join(["word"] * 100))["input_ids"]
    padded = torch.cat([ids, torch.zeros(1, 52, dtype=torch.long)], dim=1).view(2, 77)
    mask = (torch.arange(154) < 102).long().view(2, 77)
    with torch.no_grad():
        official = clip.clip.text_projection(clip.clip.text_model(input_ids=padded, attention_mask=mask).pooler_output)
    torch.testing.assert_close(long, official)


def test_cdpruner_on_llava_is_the_official_selection_on_the_models_signals():
    """The signals as the official code takes them: the projected tokens; visual_projection(post_layernorm(
    hidden_states[-2][:, 1:])) and the text tower's embedding of the instruction, from the CLIP checkpoint."""
    import contract_cases

    model, sample = tiny_llava_and_inputs()
    clip = contract_cases.CLIP
    with torch.no_grad():
        embeds = model.model.get_image_features(pixel_values=sample["pixel_values"]).pooler_output
        embeds = embeds if isinstance(embeds, torch.Tensor) else torch.stack(list(embeds))
        hidden = model.model.vision_tower(sample["pixel_values"], output_hidden_states=True).hidden_states
        tokens = hidden[model.config.vision_feature_layer][:, 1:]
        image_embeds = clip.clip.visual_projection(clip.clip.vision_model.post_layernorm(tokens))
        text_embeds = clip.clip.text_projection(
            clip.clip.text_model(**_segments("what is in the picture")).pooler_output
        )
    official = official_cdpruner(embeds.float(), image_embeds, text_embeds, 6)
    with (
        vtprune.patched(model, "cdpruner", keep_tokens=6, clip=clip, query="what is in the picture") as handle,
        torch.no_grad(),
    ):
        model(**sample)
    assert handle.last.stages[0].kept[0].tolist() == sorted(official[:, 0].tolist())


def _segments(text):
    import contract_cases

    inputs = contract_cases.WordTokenizer()(text)
    pad = 77 - inputs["input_ids"].shape[1]
    return {k: torch.cat([v, v.new_zeros(1, pad)], dim=1) for k, v in inputs.items()}


def test_cdpruner_is_batch_invariant():
    import contract_cases

    case = contract_cases.llava()
    options = {"keep_tokens": 5, "clip": contract_cases.CLIP, "query": "a question"}
    with vtprune.patched(case.model, "cdpruner", **options) as handle, torch.no_grad():
        case.model(**case.batch)
        batch = [k.tolist() for k in handle.last.stages[0].kept]
        alone = []
        for sample in case.samples:
            case.model(**sample)
            alone.append(handle.last.stages[0].kept[0].tolist())
    assert batch == alone
