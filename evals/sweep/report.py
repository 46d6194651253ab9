"""The sweep's report: results.json, results.csv, results.md, two plots, kept-patch images.

- ``accuracy_vs_tokens.png``: lmms-eval's metric against the visual tokens kept, one line per
  method, one panel per task; the unpruned model is a star with a dashed level line.
- ``prefill_vs_tokens.png``: time to first token (vision encoder + LLM prefill) against the
  visual tokens kept, laid out the same way.
- ``kept_patches/<task>_doc<id>.png``: the image as the model saw it, then one panel per
  configuration with the patches it dropped darkened (the set after its last stage).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

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
        plot_vs_tokens(rows, column, label, out_dir / name)
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


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """The headline columns as a GitHub markdown table."""
    header = "| config | task | accuracy | visual tokens kept | prefill GFLOPs | TTFT ms | decode tok/s | peak mem MB |"
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        tokens = f"{_fmt(row['visual_tokens_kept'])} / {_fmt(row['visual_tokens_in'])}"
        flops = f"{_fmt(row['prefill_gflops'], 3)} / {_fmt(row['prefill_gflops_unpruned'], 3)}"
        cells = [
            row["config"],
            row["task"],
            _fmt(row["accuracy"], 4),
            tokens,
            flops,
            _fmt(row["ttft_ms"]),
            _fmt(row["decode_tokens_per_s"]),
            _fmt(row["peak_memory_mb"], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_markdown(rows, path: Path) -> Path:
    path.write_text(markdown_table(rows))
    return path


# -- plots --------------------------------------------------------------------------------------
def series(rows: list[dict], column: str) -> dict:
    """task -> method -> [(visual tokens kept, value)] sorted by tokens (rows lacking either skipped)."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        x, y = row.get("visual_tokens_kept"), row.get(column)
        if x is not None and y is not None:
            out[row["task"]][row["method"]].append((float(x), float(y)))
    return {task: {m: sorted(points) for m, points in methods.items()} for task, methods in out.items()}


def plot_vs_tokens(rows: list[dict], column: str, ylabel: str, path: Path) -> dict:
    """One panel per task, one line per method; returns the plotted :func:`series`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(rows, column)
    tasks = sorted(data) or ["(no data)"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, points in sorted(data.get(task, {}).items()):
            xs, ys = zip(*points)
            if method == "none":
                ax.plot(xs, ys, "k*", markersize=12, label="unpruned")
                ax.axhline(ys[0], color="k", linestyle="--", linewidth=0.8)
            else:
                ax.plot(xs, ys, marker="o", label=method)
        ax.set_title(task)
        ax.set_xlabel("visual tokens kept (mean per sample)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if data.get(task):
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return data


# -- kept patches -------------------------------------------------------------------------------
def kept_mask(kept: list[int], grid: tuple[int, int], num_prefix: int) -> np.ndarray:
    """(rows, cols) bool: which patches of the grid are kept (prefix tokens such as [CLS] ignored)."""
    rows, cols = grid
    mask = np.zeros(rows * cols, dtype=bool)
    patches = np.asarray([i - num_prefix for i in kept if num_prefix <= i < num_prefix + rows * cols], dtype=int)
    mask[patches] = True
    return mask.reshape(rows, cols)


def overlay(image: np.ndarray, mask: np.ndarray, scale: int) -> np.ndarray:
    """Upscale ``image`` (H, W, 3) by ``scale`` and darken the patches where ``mask`` is False."""
    height, width = image.shape[:2]
    rows, cols = mask.shape
    block = (-(-height // rows), -(-width // cols))  # ceil: patches tile the image exactly when they divide it
    pixel_mask = np.kron(mask, np.ones(block, dtype=bool))[:height, :width]
    shaded = np.where(pixel_mask[..., None], image, (image * 0.2).astype(image.dtype))
    return shaded.repeat(scale, axis=0).repeat(scale, axis=1)


def draw_kept_patches(runs: list[dict], examples_dir: Path, out_dir: Path) -> list[Path]:
    """One image per (task, sample): the input, then each configuration's kept patches."""
    from PIL import Image, ImageDraw

    by_sample = defaultdict(list)
    for run in runs:
        for example in run.get("examples", []):
            by_sample[(example["task"], example["doc_id"])].append(example)
    written = []
    for (task, doc_id), examples in sorted(by_sample.items(), key=lambda item: (item[0][0], str(item[0][1]))):
        source = examples_dir / examples[0]["image_file"]
        if not source.exists():
            continue
        image = np.asarray(Image.open(source).convert("RGB"))
        scale = max(1, 192 // max(image.shape[:2]))
        panels = [("input", image.repeat(scale, axis=0).repeat(scale, axis=1))]
        for example in examples:
            kept = example["stages"][-1]["kept"]
            mask = kept_mask(kept, tuple(example["grid"]), example["num_prefix"])
            panels.append((f"{example['method']} ({len(kept)}/{example['num_tokens']})", overlay(image, mask, scale)))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{task}_doc{doc_id}.png"
        _panel_strip(panels, Image, ImageDraw).save(path)
        written.append(path)
    return written


def _panel_strip(panels, Image, ImageDraw):
    """Panels side by side, each with its title above."""
    title_height, pad = 16, 6
    height = max(p.shape[0] for _, p in panels) + title_height
    width = sum(p.shape[1] + pad for _, p in panels) + pad
    canvas = Image.new("RGB", (width, height + pad), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for title, pixels in panels:
        canvas.paste(Image.fromarray(pixels), (x, title_height))
        draw.text((x, 2), title[: max(8, pixels.shape[1] // 6)], fill="black")
        x += pixels.shape[1] + pad
    return canvas
