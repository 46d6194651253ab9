"""FoPru, HiRED and GlobalCom² selection logic against independent, hand-computed references."""

import pytest
import torch

from vtprune.methods.base import VisualLayout
from vtprune.methods.fopru import FoPru, FoPruConfig
from vtprune.methods.globalcom2 import GlobalCom2, GlobalCom2Config, crop_retention
from vtprune.methods.highres import CropLayout
from vtprune.methods.hired import HiRED, HiREDConfig


def random_layout(seed, grid=(4, 4), crop_grid=(2, 2)):
    """A base image plus crops whose last columns/rows are padding (as after unpadding)."""
    generator = torch.Generator().manual_seed(seed)
    (h, w), (nh, nw) = grid, crop_grid
    canvas = torch.ones(nh * h, nw * w, dtype=torch.bool)
    pad_cols = int(torch.randint(0, w, (1,), generator=generator))
    if pad_cols:
        canvas[:, -pad_cols:] = False
    crops = canvas.view(nh, h, nw, w).permute(0, 2, 1, 3).reshape(nh * nw, h * w)
    valid = torch.cat([torch.ones(1, h * w, dtype=torch.bool), crops])
    return CropLayout(grid=grid, crop_grid=crop_grid, valid=valid), generator


def test_fopru_rank_is_top_k_of_significance():
    scores = torch.rand(3, 16)
    kept = FoPru(FoPruConfig(keep_tokens=5)).select(scores, 3, VisualLayout(16, (4, 4)), "cpu")
    assert torch.equal(kept, scores.topk(5).indices.sort().values)


def test_fopru_row_keeps_whole_rows_then_fills():
    scores = torch.zeros(1, 16)
    scores[0, 8:12] = 1.0  # row 2: the most significant row
    scores[0, 0:4] = torch.tensor([0.5, 0.1, 0.45, 0.1])  # row 0: second (sum 1.15)
    scores[0, 13] = 0.9  # row 3 sums to 0.9: third, but holds the best single remaining token
    kept = FoPru(FoPruConfig(keep_tokens=6, strategy="row")).select(scores, 1, VisualLayout(16, (4, 4)), "cpu")
    # row 2 fits (4), row 0 would make 8 > 6, so fill 2 from the rest: token 13 (0.9), token 0 (0.5)
    assert kept.tolist() == [[0, 8, 9, 10, 11, 13]]
    kept = FoPru(FoPruConfig(keep_tokens=8, strategy="row")).select(scores, 1, VisualLayout(16, (4, 4)), "cpu")
    assert kept.tolist() == [[0, 1, 2, 3, 8, 9, 10, 11]]
    with_cls = FoPru(FoPruConfig(keep_tokens=5, strategy="row"))
    kept = with_cls.select(torch.cat([torch.zeros(1, 1), scores], 1), 1, VisualLayout(17, (4, 4), 1), "cpu")
    assert kept.tolist() == [[0, 9, 10, 11, 12]]  # [CLS] first, then row 2 (shifted by one)


@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_fopru_per_image_budget_on_crops(strategy):
    layout, generator = random_layout(1)
    scores = {"significance": torch.rand(layout.valid.shape, generator=generator)}
    keep = FoPru(FoPruConfig(keep_tokens=5, strategy=strategy)).select_crops(scores, layout)
    assert not (keep & ~layout.valid).any()
    assert keep.sum(dim=1).tolist() == layout.valid.sum(dim=1).clamp(max=5).tolist()


@pytest.mark.parametrize("budget_base", ["canvas", "valid"])
def test_hired_budgets_are_exact_and_follow_early_attention(budget_base):
    for seed in range(20):
        layout, generator = random_layout(seed)
        scores = {"cls": torch.rand(layout.valid.shape, generator=generator)}
        scores["early"] = torch.rand(layout.valid.shape, generator=generator)
        config = HiREDConfig(budget_ratio=0.3, alpha=0.5, budget_base=budget_base)
        keep = HiRED(config).select_crops(scores, layout)
        subimages, tokens = layout.valid.shape
        crop_tokens = int(layout.valid[1:].sum())
        if budget_base == "canvas":  # the official HiRED_token_selection budgets over the padded canvas
            total = int(subimages * tokens * 0.3)
            base = min(int(total * 0.5), tokens)
            crops = min(total - base, (subimages - 1) * tokens)
            assert int(keep[0].sum()) == base
            assert int(keep[1:].sum()) == min(crops, crop_tokens)  # only tokens that exist compete
        else:
            total = int((layout.valid.sum() * 0.3 + 0.5).floor())
            assert int(keep.sum()) == total
            assert int(keep[0].sum()) == total // 2  # floor(total * alpha)
        assert not (keep & ~layout.valid).any()
        # within each sub-image: the top of the feature-layer [CLS] attention
        for row in range(layout.num_subimages):
            count = int(keep[row].sum())
            ranked = torch.where(layout.valid[row], scores["cls"][row], -1.0).topk(count).indices
            assert set(ranked.tolist()) == set(keep[row].nonzero().flatten().tolist())
    # all early attention on the top-left quarter of the base image: the top-left crop wins
    layout = CropLayout((4, 4), (2, 2), torch.ones(5, 16, dtype=torch.bool))
    early = torch.zeros(5, 16)
    early[0, [0, 1, 4, 5]] = 1.0
    hired = HiRED(HiREDConfig(budget_ratio=0.2, alpha=0.5, budget_base="valid"))
    keep = hired.select_crops({"cls": torch.rand(5, 16), "early": early}, layout)
    assert keep.sum(dim=1).tolist() == [8, 8, 0, 0, 0]
    keep = HiRED(HiREDConfig(budget_ratio=0.2, alpha=0.5)).select_crops(
        {"cls": torch.rand(5, 16), "early": early}, layout
    )
    assert keep.sum(dim=1).tolist() == [8, 8, 0, 0, 0]  # int(80 * 0.2) = 16: the same on an unpadded canvas


def test_globalcom2_retention_and_exact_total():
    assert torch.allclose(crop_retention(torch.tensor([1.0, 1.0]), 0.25, 10.0), torch.tensor([0.25, 0.25]))
    assert crop_retention(torch.tensor([5.0, 0.0]), 0.25, 1.0).argmax() == 0
    for seed in range(20):
        layout, generator = random_layout(seed, crop_grid=(1, 3))
        scores = {"cls": torch.rand(layout.valid.shape, generator=generator)}
        keep = GlobalCom2(GlobalCom2Config(keep_ratio=0.25)).select_crops(scores, layout)
        assert int(keep.sum()) == int((layout.valid.sum() * 0.25 + 0.5).floor())
        assert int(keep[0].sum()) == 4  # round(0.25 * 16)
        assert not (keep & ~layout.valid).any()


def test_globalcom2_crop_ranking_mixes_own_and_thumbnail_attention():
    layout = CropLayout((2, 2), (1, 2), torch.ones(3, 4, dtype=torch.bool))
    cls = torch.tensor(
        [
            [1.0, 0.0, 1.0, 0.0],  # thumbnail: all attention on the left half -> left crop
            [0.1, 0.1, 0.1, 0.1],  # left crop: flat own attention, so the thumbnail map decides
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    keep = GlobalCom2(GlobalCom2Config(keep_ratio=0.5, temperature=0.01)).select_crops({"cls": cls}, layout)
    assert keep.sum().item() == 6 and keep[0].tolist() == [True, False, True, False]
    assert keep[1].sum() > keep[2].sum()  # the commanded crop keeps more


def test_hired_budget_bases_on_a_padded_image_keep_the_docstring_figures():
    """800 x 600 on LLaVA-NeXT: 2 x 2 crops of 24 x 24 tokens, the canvas' top and bottom 6 rows are padding
    (36 of 48 rows exist): 2304 of 2880 tokens. At 0.2 the official canvas base keeps int(2880 * 0.2) = 576,
    the valid base round(2304 * 0.2) = 461 (-20 %)."""
    canvas = torch.zeros(48, 48, dtype=torch.bool)
    canvas[6:42] = True
    crops = canvas.view(2, 24, 2, 24).permute(0, 2, 1, 3).reshape(4, 576)
    layout = CropLayout((24, 24), (2, 2), torch.cat([torch.ones(1, 576, dtype=torch.bool), crops]))
    scores = {"cls": torch.rand(5, 576, generator=torch.Generator().manual_seed(0)), "early": torch.rand(5, 576)}
    kept = {
        base: int(HiRED(HiREDConfig(budget_base=base)).select_crops(scores, layout).sum())
        for base in ("canvas", "valid")
    }
    assert kept == {"canvas": 576, "valid": 461}
