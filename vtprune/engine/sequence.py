"""Cutting tokens out of a merged (text + image) sequence, batched and sync-free.

Conventions: B samples, L columns before the cut, L' after. ``keep`` is a (B, L) bool mask of
the columns to keep (text and padding columns are always kept). Samples that lose different
numbers of tokens are re-aligned by adding padding columns on the left (mask 0), so each
sample's kept columns end at the last column, as left padding for generation requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceCut:
    """Where every column of the cut sequence comes from.

    source: (B, L') original column of each new column, -1 for added padding columns.
    removed_before: (B, L') how many columns were removed before each kept column.
    removed: (B,) columns removed per sample.
    """

    source: torch.Tensor
    removed_before: torch.Tensor
    removed: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.source >= 0

    def gather(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """Apply the cut to a (B, L, ...) tensor; added padding columns get ``fill``."""
        index = self.source.clamp(min=0)
        index = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
        gathered = values.gather(1, index)
        valid = self.valid.view(*self.valid.shape, *([1] * (values.dim() - 2)))
        return torch.where(valid, gathered, torch.as_tensor(fill, dtype=values.dtype, device=values.device))

    def gather_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Cut (B, L) labels: -100 on added padding and on the label of column 0.

        Column 0's label is never a loss term (no column predicts it); a sample re-aligned behind
        added padding would otherwise have it scored as predicted from a padding column.
        """
        return self.gather(labels, fill=-100).masked_fill(self.source == 0, -100)


def plan_cut(keep: torch.Tensor) -> SequenceCut:
    """(B, L) bool -> :class:`SequenceCut`. Reads one scalar (the new length) on the host."""
    batch, length = keep.shape
    counts = keep.sum(dim=1)
    new_length = int(counts.max())  # the cut's output shape: the one host sync of a prefill
    dest = keep.long().cumsum(dim=1) - 1 + (new_length - counts)[:, None]
    dest = torch.where(keep, dest, new_length)  # dropped columns go to a dump column
    columns = torch.arange(length, device=keep.device).expand(batch, length)
    source = torch.full((batch, new_length + 1), -1, dtype=torch.long, device=keep.device)
    source.scatter_(1, dest, torch.where(keep, columns, -1))
    source = source[:, :new_length]
    removed_cum = (~keep).long().cumsum(dim=1)
    removed_before = removed_cum.gather(1, source.clamp(min=0))
    return SequenceCut(source=source, removed_before=removed_before, removed=length - counts)
