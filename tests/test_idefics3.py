"""Idefics3 / SmolVLM (transformers 5.24): pruned runs against the unpatched model fed hand-pruned sequences.

References are built here from the model's own parts: the merged embeddings (``embed_tokens`` +
``get_image_features``, which drops the all-zero padding images, scattered at the placeholders),
the unpatched ``text_model`` on the hand-pruned sequence, eager tower attention maps for the scores,
and eager LLM attention for FastV's choice.
"""

from __future__ import annotations

import pytest
import torch
from helpers import left_pad

import vtprune
from vtprune.evals.models.transformers_vlms import (
    BOI_TOKEN_ID,
    GLOBAL_IMAGE_TOKEN_ID,
    IMAGE_TOKEN_ID,
    tiny_idefics3,
    tiny_smolvlm,
)

TOKENS = 16  # tokens per tile of the tiny models (4 x 4, each a 2 x 2 block of 8 x 8 patches)
BUILDERS = {"idefics3": tiny_idefics3, "smolvlm": tiny_smolvlm}


def model(family, attn="sdpa"):
    return BUILDERS[family](seed=4, attn_implementation=attn, layers=3)


def prompt(tiles: int, text=(3, 2), seed=0) -> torch.Tensor:
    """``tiles`` tiles then the global image (the processor's order), each <fake_token> + 16 <image>."""
    generator = torch.Generator().manual_seed(seed)
    tile = torch.cat([torch.tensor([BOI_TOKEN_ID]), torch.full((TOKENS,), IMAGE_TOKEN_ID)])
    global_image = torch.cat(
        [torch.tensor([BOI_TOKEN_ID, GLOBAL_IMAGE_TOKEN_ID]), torch.full((TOKENS,), IMAGE_TOKEN_ID)]
    )
    return torch.cat(
        [
            torch.randint(8, 128, (text[0],), generator=generator),
            *[tile] * tiles,
            global_image,
            torch.tensor([BOI_TOKEN_ID]),
            torch.randint(8, 128, (text[1],), generator=generator),
        ]
    )


def batch(seed=0) -> dict:
    """Two samples: a split image (2 tiles + global) and a lone image (global only), so the second
    sample's pixel_values carry two all-zero padding images."""
    ids, mask = left_pad([prompt(2, seed=1), prompt(0, text=(6, 3), seed=2)])
    pixels = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    pixels[1, 1:] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0),
        "pixel_values": pixels,
    }


def merged(m, kw):
    with torch.no_grad():
        embeds = m.get_input_embeddings()(kw["input_ids"])
        features = torch.cat(m.model.get_image_features(kw["pixel_values"]).pooler_output)
    visual = kw["input_ids"] == IMAGE_TOKEN_ID
    return embeds.masked_scatter(visual[..., None], features)


@pytest.mark.parametrize("mode", ["compact", "original"])
@pytest.mark.parametrize("spec", ["fopru:keep_ratio=0.5", "random:keep_tokens=5"])
@pytest.mark.parametrize("family", BUILDERS)
def test_pre_llm_cut_equals_the_unpatched_model_on_the_hand_pruned_sequence(family, spec, mode):
    m = model(family)
    kw = batch(seed=3)
    with vtprune.patched(m, f"{spec},positions={mode}") as handle, torch.no_grad():
        logits = m(**kw).logits
        kept = handle.last.stages[0].kept
    assert handle.last.visual_tokens_in == [3 * TOKENS, TOKENS]  # the padding images have no tokens
    assert handle.last.visual_tokens_kept < handle.last.visual_tokens_in
    embeds = merged(m, kw)
    for row, row_kept in enumerate(kept):
        visual = kw["input_ids"][row] == IMAGE_TOKEN_ID
        keep = kw["attention_mask"][row].bool() & ~visual
        keep[visual.nonzero().flatten()[row_kept]] = True
        columns = keep.nonzero().flatten()
        positions = kw["position_ids"][row, columns] if mode == "original" else torch.arange(columns.numel())
        with torch.no_grad():
            expected = m(
                inputs_embeds=embeds[row : row + 1, columns],
                attention_mask=torch.ones(1, columns.numel(), dtype=torch.long),
                position_ids=positions[None],
            ).logits[0]
        torch.testing.assert_close(logits[row, -columns.numel() :], expected, rtol=1e-5, atol=1e-5)


def block_scores(m, family, pixel_values) -> torch.Tensor:
    """FoPru's significance the plain way, for the real images: the eager attention map of the tower's
    last layer, mean over heads and queries, then each token's 2 x 2 block of patches averaged by hand."""
    twin = model(family, "eager")
    twin.load_state_dict(m.state_dict())
    with torch.no_grad():
        attention = twin.model.vision_model(pixel_values, output_attentions=True).attentions[-1]
    received = attention.float().mean(dim=(1, 2))  # (n, 64)
    return received.view(-1, 4, 2, 4, 2).mean(dim=(2, 4)).flatten(1)  # (n, 16)


@pytest.mark.parametrize("family", BUILDERS)
def test_scores_are_the_mean_of_each_tokens_patches_over_the_real_images(family):
    m = model(family)
    kw = batch(seed=5)
    with vtprune.patched(m, "fopru:keep_tokens=5") as handle, torch.no_grad():
        m(**kw)
    real = kw["pixel_values"].flatten(0, 1)[[0, 1, 2, 3]]  # sample 0's three images, sample 1's first
    expected = block_scores(m, family, real).topk(5).indices.sort().values + TOKENS * torch.arange(4)[:, None]
    kept = handle.last.stages[0].kept
    assert torch.equal(kept[0], expected[:3].flatten())
    assert torch.equal(kept[1], expected[3] - 3 * TOKENS)


@pytest.mark.parametrize("family", BUILDERS)
def test_fastv_keeps_the_top_of_eager_last_token_attention_on_text_model(family):
    m, twin = model(family), model(family, "eager")
    twin.load_state_dict(m.state_dict())
    kw = batch(seed=6)
    kw = {"input_ids": kw["input_ids"][:1], "pixel_values": kw["pixel_values"][:1]}
    captured = {}
    hook = twin.model.text_model.layers[1].self_attn.register_forward_hook(
        lambda module, args, out: captured.__setitem__("weights", out[1])
    )
    with torch.no_grad():
        twin(**kw)
    hook.remove()
    visual = kw["input_ids"][0] == IMAGE_TOKEN_ID
    row = captured["weights"][0, :, -1].float().mean(dim=0)[visual]
    with vtprune.patched(m, "fastv:k=2,ratio=0.5") as handle, torch.no_grad():
        m(**kw)
    expected = row.topk(round(int(visual.sum()) * 0.5)).indices.sort().values
    assert torch.equal(handle.last.stages[0].kept[0], expected)


def test_refusals_name_why():
    m = model("smolvlm")
    for method, options in [
        ("fastervlm", {"keep_ratio": 0.5}),
        ("hired", {"budget_ratio": 0.5}),
        ("globalcom2", {"keep_ratio": 0.5}),
    ]:
        with pytest.raises(ValueError, match="no \\[CLS\\] token"):
            vtprune.patch(m, method, **options)
    with pytest.raises(ValueError, match="resizes frames"):
        vtprune.patch(m, "quota", scorer=lambda frames, query: torch.ones(len(frames)), query="q")
    assert vtprune.get_handle(m) is None
