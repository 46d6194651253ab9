"""QuoTA building blocks: budget arithmetic and grids against hand-computed values."""

import pytest
import torch
import torch.nn.functional as F

from vtprune.methods.quota import frame_budgets, frame_grid, resize_frame


def test_budgets_follow_int_of_T_times_squared_weights():
    p = torch.tensor([0.9, 0.5, 0.1, 0.0])
    squares = [(100 * x) ** 2 for x in (0.9, 0.5, 0.1, 0.0)]
    expected = [int(100 * s / sum(squares)) for s in squares]  # 75, 23, 0, 0
    got = frame_budgets(p, 100)
    assert got.tolist() == expected and int(got.sum()) <= 100
    assert (got == 0).tolist() == [False, False, True, True]  # frames with zero weight are dropped


def test_budgets_equal_weights_and_bad_input():
    assert frame_budgets(torch.zeros(3), 10).tolist() == [3, 3, 3]
    assert frame_budgets(torch.tensor([0.7]), 196).tolist() == [196]  # one frame: the whole budget
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        frame_budgets(torch.tensor([1.5]), 10)
    with pytest.raises(ValueError, match="no frames"):
        frame_budgets(torch.tensor([]), 10)


@pytest.mark.parametrize("n, grid", [(1, (1, 1)), (12, (4, 3)), (16, (4, 4)), (20, (5, 4)), (196, (14, 14))])
def test_grid_rule(n, grid):
    assert frame_grid(n) == grid and grid[0] * grid[1] <= n


def test_resize_modes():
    x = torch.randn(6, 6, 8)
    bilinear = resize_frame(x, (3, 3))
    expected = F.interpolate(x.permute(2, 0, 1)[None], size=(3, 3), mode="bilinear")[0].permute(1, 2, 0)
    torch.testing.assert_close(bilinear, expected)
    torch.testing.assert_close(resize_frame(x, (3, 3), "pool"), x.view(3, 2, 3, 2, 8).mean(dim=(1, 3)))
    assert torch.equal(resize_frame(x, (2, 2), "uniform"), x[[0, 5]][:, [0, 5]])
