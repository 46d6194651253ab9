"""Tables and files of a sweep; ``vtprune eval``'s report.

:class:`Table` renders rows as Markdown or as fixed-width text, from a list of :class:`Column`;
the ``vtprune eval`` report, the reference-model sweep (:mod:`vtprune.evals.reference.evaluate`)
and ``make demo`` each give their columns. :func:`write_report` writes ``vtprune eval``'s outputs:

- ``results.json`` / ``results.csv`` (:data:`COLUMNS`) and ``results.md`` (:data:`REPORT_TABLE`);
- ``accuracy_vs_tokens.png``: lmms-eval's metric against the visual tokens kept, one line per
  method, one panel per task; ``prefill_vs_tokens.png``: time to first token (vision encoder +
  LLM prefill) laid out the same way (:mod:`vtprune.evals.sweep.plots`);
- ``kept_patches/<task>_doc<id>.png``: the image as the model saw it, then one panel per
  configuration with the patches it dropped darkened (:mod:`vtprune.evals.sweep.kept_patches`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vtprune.evals.sweep.kept_patches import draw_kept_patches
from vtprune.evals.sweep.plots import plot_vs_tokens

COLUMNS = (
    "config",
    "method",
    "options",
    "task",
    "metric",
    "accuracy",
    "samples",
    "visual_tokens_in",
    "visual_tokens_kept",
    "llm_prompt_tokens",
    "prefill_gflops",
    "prefill_gflops_unpruned",
    "ttft_ms",
    "ttft_ms_median",
    "decode_tokens_per_s",
    "peak_memory_mb",
    "memory_kind",
    "wall_s",
)
PLOTS = {
    "accuracy_vs_tokens.png": ("accuracy", "accuracy (lmms-eval metric)"),
    "prefill_vs_tokens.png": ("ttft_ms", "time to first token / prefill (ms)"),
}


@dataclass(frozen=True)
class Column:
    """One column: its header and its cell for a row; ``width`` and ``align`` lay it out as fixed-width text."""

    header: str
    cell: Callable[[dict], str]
    width: int = 0
    align: str = ">"


def message(row: dict) -> str | None:
    """What a row without figures says instead: why its method does not apply, or the error it hit."""
    if "not_applicable" in row:
        return f"not applicable: {row['not_applicable']}"
    if "error" in row:
        return f"error: {row['error']}"
    return None


@dataclass(frozen=True)
class Table:
    """Rows as Markdown or fixed-width text. A row without figures (:func:`message`) shows its
    message in column ``message_at`` and nothing after it."""

    columns: tuple[Column, ...]
    message_at: int | None = None

    def cells(self, row: dict) -> list[str]:
        """The row's cell per column."""
        note = message(row)
        if note is None or self.message_at is None:
            return [column.cell(row) for column in self.columns]
        before = [column.cell(row) for column in self.columns[: self.message_at]]
        return before + [note] + [""] * (len(self.columns) - self.message_at - 1)

    def markdown_header(self) -> str:
        return self._markdown_line([c.header for c in self.columns]) + "\n|" + "---|" * len(self.columns)

    def markdown_row(self, row: dict) -> str:
        return self._markdown_line(self.cells(row))

    def markdown(self, rows: list[dict]) -> str:
        return "\n".join([self.markdown_header(), *(self.markdown_row(row) for row in rows)])

    def text_header(self) -> str:
        return self._text_line([c.header for c in self.columns])

    def text_row(self, row: dict) -> str:
        cells = self.cells(row)
        if message(row) is None or self.message_at is None:
            return self._text_line(cells)
        shown = [(c, cell) for c, cell in zip(self.columns, cells[: self.message_at]) if cell]  # before the message
        return " ".join([*(f"{cell:{c.align}{c.width}}" for c, cell in shown), cells[self.message_at]])

    @staticmethod
    def _markdown_line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    def _text_line(self, cells: list[str]) -> str:
        return " ".join(f"{cell:{c.align}{c.width}}" for c, cell in zip(self.columns, cells))


def _fmt(value, digits: int = 1) -> str:
    """A figure for a table: ``-`` for a missing one, floats to ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _tokens_cell(row: dict) -> str:
    return f"{_fmt(row['visual_tokens_kept'])} / {_fmt(row['visual_tokens_in'])}"


def _flops_cell(row: dict) -> str:
    return f"{_fmt(row['prefill_gflops'], 3)} / {_fmt(row['prefill_gflops_unpruned'], 3)}"


REPORT_TABLE = Table(
    (
        Column("config", lambda row: row["config"]),
        Column("task", lambda row: row["task"]),
        Column("accuracy", lambda row: _fmt(row["accuracy"], 4)),
        Column("visual tokens kept", _tokens_cell),
        Column("prefill GFLOPs", _flops_cell),
        Column("TTFT ms", lambda row: _fmt(row["ttft_ms"])),
        Column("decode tok/s", lambda row: _fmt(row["decode_tokens_per_s"])),
        Column("peak mem MB", lambda row: _fmt(row["peak_memory_mb"], 0)),
    )
)


def write_report(runs: list[dict], out_dir) -> dict:
    """Write every output of the report for finished ``runs``; returns name -> path."""
    from vtprune.evals.sweep.runner import task_rows

    out_dir = Path(out_dir)
    rows = [row for run in runs for row in task_rows(run)]
    paths = {
        "json": _write_json(rows, out_dir / "results.json"),
        "csv": _write_csv(rows, out_dir / "results.csv"),
        "markdown": _write_markdown(rows, out_dir / "results.md"),
    }
    for name, (column, label) in PLOTS.items():
        plot_vs_tokens(rows, out_dir / name, y=column, ylabel=label)
        paths[name.removesuffix(".png")] = out_dir / name
    paths["kept_patches"] = draw_kept_patches(runs, out_dir / "examples", out_dir / "kept_patches")
    return paths


def _write_json(rows, path: Path) -> Path:
    path.write_text(json.dumps({"columns": list(COLUMNS), "rows": rows}, indent=1))
    return path


def _write_csv(rows, path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: row.get(key) for key in COLUMNS} for row in rows)
    return path


def _write_markdown(rows, path: Path) -> Path:
    path.write_text(REPORT_TABLE.markdown(rows) + "\n")
    return path
