"""Budget arithmetic over a base image plus crops, against hand-computed expectations."""

import torch

from vtprune.methods.base import BudgetConfig
from vtprune.methods.highres import CropLayout, allocate, base_map_on_crops, keep_top, subimage_budgets


def test_keep_top_keeps_exactly_k_valid_tokens_per_row():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.1]])
    valid = torch.tensor([[True, True, True, True], [True, False, True, True]])
    kept = keep_top(scores, valid, torch.tensor([2, 3]))
    assert kept.tolist() == [[False, True, False, True], [True, False, True, True]]
    assert keep_top(scores, valid, torch.tensor([0, 9])).sum(dim=1).tolist() == [0, 3]  # capped by valid


def test_allocate_is_proportional_capped_and_exact():
    shares = allocate(10, torch.tensor([1.0, 1.0, 2.0]), torch.tensor([100, 100, 100]))
    assert shares.tolist() == [3, 2, 5] or shares.tolist() == [2, 3, 5]
    # a full share hands its surplus to the others
    assert allocate(10, torch.tensor([8.0, 1.0, 1.0]), torch.tensor([4, 10, 10])).tolist() == [4, 3, 3]
    # more than fits: everything is kept
    assert allocate(50, torch.tensor([1.0, 2.0]), torch.tensor([5, 7])).tolist() == [5, 7]
    # zero weights still receive tokens when the others are full
    assert allocate(6, torch.tensor([1.0, 0.0]), torch.tensor([2, 9])).tolist() == [2, 4]
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        parts = int(torch.randint(1, 9, (1,), generator=generator))
        weights = torch.rand(parts, generator=generator) ** 3
        capacity = torch.randint(0, 60, (parts,), generator=generator)
        total = int(torch.randint(0, 300, (1,), generator=generator))
        shares = allocate(total, weights, capacity)
        assert int(shares.sum()) == min(total, int(capacity.sum()))
        assert bool((shares <= capacity).all()) and bool((shares >= 0).all())


def test_base_map_is_resized_onto_the_valid_region_of_the_crops():
    # 2 x 2 patches per sub-image, crops in a 1 x 2 grid; the right crop's last column is padding
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[2, [1, 3]] = False
    layout = CropLayout(grid=(2, 2), crop_grid=(1, 2), valid=valid)
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    on_crops = base_map_on_crops(base, layout)
    assert on_crops.shape == (2, 4)
    assert torch.allclose(on_crops[0], torch.ones(4))
    assert on_crops[1].tolist() == [1.0, 0.0, 1.0, 0.0]
    left_heavy = torch.tensor([3.0, 0.0, 3.0, 0.0])  # the base image's left column
    on_crops = base_map_on_crops(left_heavy, layout)
    assert on_crops[0].sum() > on_crops[1].sum()


def test_subimage_budgets_caps_by_valid_tokens():
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[2, 8:] = False
    layout = CropLayout(grid=(4, 4), crop_grid=(1, 2), valid=valid)
    assert subimage_budgets(layout, BudgetConfig(keep_tokens=10)).tolist() == [10, 10, 8]
    assert subimage_budgets(layout, BudgetConfig(keep_ratio=0.25)).tolist() == [4, 4, 4]
    assert subimage_budgets(layout, BudgetConfig(keep_ratio=0.25, budget="global")).tolist() == [5, 5, 2]
