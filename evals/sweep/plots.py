"""A metric against the visual tokens kept: one panel per task, one line per method or label.

The one plot of every sweep: ``vtprune eval`` draws its ``accuracy_vs_tokens.png`` and
``prefill_vs_tokens.png`` with it, the reference-model sweep (``make demo``) its
``accuracy_vs_tokens.png``. In-LLM methods are dashed with square markers (their first layers
still see every token), a ``positions=original`` variant is dotted with hollow markers, and the
unpruned model is a black star with a thin dashed level line.

matplotlib is an optional dependency (``pip install 'vtprune[eval]'`` or ``'vtprune[plot]'``):
it is imported only when a plot is drawn.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend, or an error that names the extra to install."""
    try:
        import matplotlib
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the sweep plots need matplotlib, an optional dependency: pip install 'vtprune[eval]' "
            "(or 'vtprune[plot]' for the plots alone)"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series(rows: list[dict], y: str, x: str = "visual_tokens_kept", line: str = "method", scale: float = 1.0) -> dict:
    """task -> line -> [(x, y * scale)] sorted by x; rows lacking x or y (not applicable, failed) are left out."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get(x) is not None and row.get(y) is not None:
            out[row.get("task", "")][row[line]].append((float(row[x]), scale * float(row[y])))
    return {task: {name: sorted(points) for name, points in lines.items()} for task, lines in out.items()}


def plot_vs_tokens(
    rows: list[dict],
    path,
    *,
    y: str,
    ylabel: str,
    x: str = "visual_tokens_kept",
    xlabel: str = "visual tokens kept (mean per sample)",
    line: str = "method",
    scale: float = 1.0,
    baseline: str = "none",
    log_x: bool = False,
) -> dict:
    """Draw ``y`` (times ``scale``) against ``x``, one line per value of ``line``; returns the plotted :func:`series`.

    Rows carry ``method`` (the registered name; ``baseline`` for the unpruned model) and, when
    there are several, ``task`` (one panel each). ``log_x``: a log axis, ticked at the token
    counts of the pre-LLM methods.
    """
    import vtprune

    plt = pyplot()
    data = series(rows, y, x, line, scale)
    method_of = {row[line]: row["method"] for row in rows}
    in_llm = {name for name, info in vtprune.methods().items() if info["stage"] == "in_llm"}
    methods = sorted({method_of[name] for lines in data.values() for name in lines} - {baseline})
    colours = {method: plt.get_cmap("tab10")(i % 10) for i, method in enumerate(methods)}
    tasks = sorted(data) or ["(no data)"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3 + 5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        ticks = set()
        for name, points in sorted(data.get(task, {}).items()):
            method = method_of[name]
            xs, ys = zip(*points)
            if method not in in_llm:  # the in-LLM methods' per-layer means fall between these
                ticks.update(round(value) for value in xs)
            if method == baseline:
                ax.plot(xs, ys, "k*", markersize=12, label=f"{name} ({xs[0]:.0f} tokens)")
                ax.axhline(ys[0], color="k", linestyle="--", linewidth=0.6)
                continue
            original = "positions=original" in name
            ax.plot(
                xs,
                ys,
                marker="s" if method in in_llm else "o",
                linestyle=":" if original else ("--" if method in in_llm else "-"),
                fillstyle="none" if original else "full",
                color=colours[method],
                label=name + (" (in LLM)" if method in in_llm else ""),
            )
        if log_x:
            ax.set_xscale("log")
            if ticks:
                ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
            ax.minorticks_off()
        ax.set_title(task)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if data:
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return data
