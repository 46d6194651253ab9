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
  The 1-D text row of a 4-row input gets the classic 1-D renumbering. Decode steps move down by
  how far the last column (a real token) moved, so ``generate`` (which continues at the last
  prompt column + 1) continues right after the pruned prompt.

Rewritten tokens (QuoTA's resized frames, :func:`write_replaced`): a selection that overwrites
visual columns also gives their M-RoPE positions. A resized frame can be taller, wider or
smaller than the frames it replaces; Qwen2-VL's ``get_rope_index`` starts the text after an
image / video at its first value + its larger spatial side (height or width, not frames), so
the columns after a rewritten block move by the change of that side, and the text after it
starts where the model's own rule would start it for the new grids. "compact" then closes the
values no kept token uses (e.g. the temporal values of dropped frames).
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
    cut: SequenceCut, positions: torch.Tensor, mode: str, real: torch.Tensor, replaced=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions after ``cut`` and the decode shift this cut adds.

    positions: (B, L) or (R, B, L) before the cut; real: (B, L') bool, the real (unpadded) columns
    after the cut. replaced: None, or ((B, L') bool rewritten columns after the cut, (3, n) their
    M-RoPE rows in column order), see :func:`write_replaced`. Returns (positions after the cut,
    shift): shift is (B, 1) or (R, B, 1), to be subtracted from the unpruned-numbering positions of
    later decode steps.
    """
    gathered = gather_rows(cut, positions)
    if replaced is not None and (positions.dim() != 3 or mode != "compact"):
        raise NotImplementedError(
            "rewritten tokens bring M-RoPE positions: they need (3, B, L) / (4, B, L) position ids and "
            "positions='compact'"
        )
    if mode != "compact":
        return gathered, zero_shift(gathered)
    if positions.dim() == 2:
        return gathered - cut.removed_before * cut.valid, cut.removed[:, None]
    mrope = gathered[-3:]  # (3, B, L')
    bound = positions.shape[-1]  # M-RoPE values are below the unpruned length (each token advances them by <= 1)
    written = mrope
    if replaced is not None:
        written = write_replaced(mrope, *replaced, real)
        bound = max(bound, int(written.max()) + 1)  # resized frames may reach further (prefill: one host read)
    new_mrope = compact_values(written, real, bound).to(positions.dtype)
    # decode steps continue after the last column (a real token): shift by how far it moved
    shift_mrope = (mrope[..., -1:] - new_mrope[..., -1:]).to(positions.dtype)
    if positions.shape[0] == 3:
        return new_mrope, shift_mrope
    text = gathered[0] - cut.removed_before * cut.valid  # the 1-D text row: classic renumbering
    new = torch.cat([text[None], new_mrope], dim=0)
    return new, torch.cat([cut.removed[None, :, None].to(positions.dtype), shift_mrope], dim=0)


def compact_values(mrope: torch.Tensor, real: torch.Tensor, bound: int) -> torch.Tensor:
    """(3, B, L) M-RoPE rows, all values below ``bound`` -> each value of a real column replaced by
    its rank among the values the sample's real columns use (over the three rows); padding
    columns unchanged."""
    batch, length = real.shape
    values = mrope.clamp(0, bound).permute(1, 0, 2).reshape(batch, 3 * length)  # (B, 3 L)
    used = torch.zeros(batch, bound + 1, dtype=torch.long, device=mrope.device)
    used.scatter_add_(1, values, real.repeat(1, 3).long())
    rank = (used > 0).long().cumsum(dim=1) - 1  # (B, V): each used value's rank
    renumbered = rank.gather(1, values).view(batch, 3, length).permute(1, 0, 2)
    return torch.where(real[None], renumbered, mrope)


def write_replaced(mrope: torch.Tensor, replaced: torch.Tensor, values: torch.Tensor, real: torch.Tensor):
    """Write rewritten columns' M-RoPE rows and renumber the columns after them.

    mrope: (3, B, L) rows (temporal, height, width); replaced: (B, L) bool; values: (3, n) the
    replaced columns' rows, in column order; real: (B, L) bool. A run of replaced columns (one
    rewritten image or video) can span more or fewer height / width values than the block it
    replaces. The model numbers the text after a block from the block's first value + its larger
    spatial side (``get_rope_index``); so every column after a run moves (all rows) by the run's
    largest height / width value + 1 minus the value of the next real unreplaced column (the text
    after it), summed over the runs before it. Returns the new (3, B, L) rows.
    """
    mrope = mrope.clone()
    mrope[:, replaced] = values.to(mrope)
    batch, length = replaced.shape
    low, high = torch.iinfo(mrope.dtype).min, torch.iinfo(mrope.dtype).max
    following = torch.where(real & ~replaced, mrope.amin(dim=0), high).flip(1).cummin(dim=1).values.flip(1)  # (B, L)
    move = torch.where(replaced & (following < high), mrope[1:].amax(dim=0) + 1 - following, low)  # (B, L)
    starts = replaced & ~torch.cat([torch.zeros_like(replaced[:, :1]), replaced[:, :-1]], dim=1)
    run = starts.long().cumsum(dim=1)  # (B, L): the run a column is in or follows (1-based; 0: none yet)
    per_run = torch.full((batch, length + 1), low, dtype=mrope.dtype, device=mrope.device)
    per_run.scatter_reduce_(1, run, move, "amax")
    per_run = torch.where(per_run == low, 0, per_run)  # runs with nothing real after them, and "no run"
    shift = per_run.cumsum(dim=1).gather(1, run - replaced.long())  # a run's own columns: earlier runs only
    return mrope + shift[None]
