"""Position ids through a cut: 1-D (B, L) rotary positions and multi-row (M-RoPE) positions.

Most LLMs take (B, L) position ids. Qwen2-VL's M-RoPE takes (3, B, L) (temporal, height, width
rows; text tokens have three equal rows), and ``generate`` passes (4, B, L): a 1-D text row in
front, which the model uses for its mask and hands to the decoder layers, then the three M-RoPE
rows. Both pruning engines call :func:`cut_positions` and keep the returned ``shift``: what
decode steps (whose positions the model or ``generate`` computes in the unpruned numbering)
subtract to continue the pruned numbering.

Modes:
- ``"original"``: every kept token keeps its position ids (all rows); decode steps unchanged.
- ``"compact"`` on 1-D positions: each kept column moves down by the columns removed before it;
  decode steps move down by all columns removed (the classic renumbering).
- ``"compact"`` on M-RoPE rows: the position *values* no kept token uses any more are closed up:
  every value v becomes its rank among the values the sample's kept real tokens use (over the
  three rows). A kept visual token keeps its (t, h, w) structure relative to its neighbours, and
  the text after an image moves down only when whole rows, columns or frames of it are gone
  (an M-RoPE image of h x w tokens spans max(h, w) position values, not h * w, so dropping
  scattered tokens frees no value). On 1-D positions this rule is exactly the classic one.
  The 1-D text row of a 4-row input gets the classic 1-D renumbering.
"""

from __future__ import annotations

import torch

from vtprune.engine.sequence import SequenceCut


def expand_positions(positions: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(B or 1, L) -> (B, L); (R, B or 1, L) -> (R, B, L)."""
    if positions.dim() == 3:
        return positions.expand(-1, batch, length)
    return positions.expand(batch, length)


def check_positions(positions: torch.Tensor) -> None:
    if positions.dim() == 2 or (positions.dim() == 3 and positions.shape[0] in (3, 4)):
        return
    raise NotImplementedError(
        f"vtprune expects (B, L) position ids, or (3, B, L) / (4, B, L) M-RoPE position ids; "
        f"got shape {tuple(positions.shape)}"
    )


def gather_rows(cut: SequenceCut, positions: torch.Tensor) -> torch.Tensor:
    """Apply the cut to (B, L) or (R, B, L) position ids (added padding columns get 0)."""
    if positions.dim() == 2:
        return cut.gather(positions)
    return cut.gather(positions.permute(1, 2, 0)).permute(2, 0, 1)


def zero_shift(positions: torch.Tensor) -> torch.Tensor:
    """The decode shift of a stage that renumbers nothing: (B, 1) or (R, B, 1) zeros."""
    return torch.zeros_like(positions[..., :1])


def cut_positions(
    cut: SequenceCut, positions: torch.Tensor, mode: str, real: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions after ``cut`` and the decode shift this cut adds.

    positions: (B, L) or (R, B, L) before the cut; real: (B, L') bool, the real (unpadded) columns
    after the cut. Returns (positions after the cut, shift): shift is (B, 1) or (R, B, 1), to be
    subtracted from the unpruned-numbering positions of later decode steps.
    """
    gathered = gather_rows(cut, positions)
    if mode != "compact":
        return gathered, zero_shift(gathered)
    if positions.dim() == 2:
        return gathered - cut.removed_before * cut.valid, cut.removed[:, None]
    rows = gathered.shape[0]
    mrope = gathered[-3:]  # (3, B, L')
    batch, length = real.shape
    bound = positions.shape[-1]  # M-RoPE values are below the unpruned length (each token advances them by <= 1)
    values = mrope.clamp(0, bound).permute(1, 0, 2).reshape(batch, 3 * length)  # (B, 3 L')
    live = real.repeat(1, 3).long()
    used = torch.zeros(batch, bound + 1, dtype=torch.long, device=positions.device)
    used.scatter_add_(1, values, live)
    rank = (used > 0).long().cumsum(dim=1) - 1  # (B, V): each used value's rank
    renumbered = rank.gather(1, values).view(batch, 3, length).permute(1, 0, 2)
    new_mrope = torch.where(real[None], renumbered, mrope)
    # decode steps continue after the last column (a real token): shift by how far it moved
    shift_mrope = (mrope[..., -1:] - new_mrope[..., -1:]).to(positions.dtype)
    if rows == 3:
        return new_mrope.to(positions.dtype), shift_mrope
    text = gathered[0] - cut.removed_before * cut.valid
    new = torch.cat([text[None], new_mrope.to(positions.dtype)], dim=0)
    return new, torch.cat([cut.removed[None, :, None].to(positions.dtype), shift_mrope], dim=0)
