"""What `internvlx eval` prints and writes: a table per run, runs side by side, the JSON record and the plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_file
from .runner import DatasetResult, EvalRun

JSON_FORMAT = "internvlx-eval"
JSON_VERSION = 1


def _tokens(result: DatasetResult) -> str:
    return " | ".join(f"{tokens:.1f}" for _, tokens in result.visual_tokens_per_sample)


def _groups_note(runs: list[EvalRun]) -> str | None:
    for run in runs:
        for result in run.datasets:
            if len(result.visual_tokens_per_sample) > 1:
                groups = " | ".join(group for group, _ in result.visual_tokens_per_sample)
                return f"visual tokens per LLM layer group (LVTC): {groups}"
    return None


def _layout(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in
                         enumerate(zip(cells, widths))).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _overall(run: EvalRun) -> DatasetResult | None:
    """The sample-weighted mean of datasets that share one metric (none for a single dataset or mixed metrics)."""
    if len(run.datasets) < 2 or len({d.metric for d in run.datasets}) > 1:
        return None
    n = sum(d.samples for d in run.datasets)
    groups = [(group, sum(d.samples * dict(d.visual_tokens_per_sample)[group] for d in run.datasets) / n)
              for group, _ in run.datasets[0].visual_tokens_per_sample]
    return DatasetResult("all", run.datasets[0].metric, sum(d.accuracy * d.samples for d in run.datasets) / n, n,
                         sum(d.tiles_per_sample * d.samples for d in run.datasets) / n, groups,
                         sum(d.seconds_per_sample * d.samples for d in run.datasets) / n)


def describe_options(options: dict[str, Any]) -> str:
    decoding = "greedy" if options.get("num_beams", 1) == 1 else f"beam search ({options['num_beams']} beams)"
    budgets = sorted(set((options.get("max_tiles_per_dataset") or {}).values())) or [options["max_tiles"]]
    limit = f"max {budgets[0]} tiles" if len(budgets) == 1 else f"max {'/'.join(map(str, budgets))} tiles by dataset"
    return (f"{decoding}, max {options['max_new_tokens']} new tokens, tiling {options['tiling']} ({limit}), "
            f"{options['dtype']} on {options['device']}")


def format_run(run: EvalRun) -> str:
    """One run: per dataset the metric, score, samples, tiles, visual tokens and seconds per sample."""
    header = ["dataset", "metric", "score", "samples", "tiles/sample", "visual tokens/sample", "s/sample"]
    rows = []
    overall = _overall(run)
    for result in run.datasets + ([overall] if overall else []):
        rows.append([result.name, result.metric, f"{result.accuracy:.3f}", str(result.samples),
                     f"{result.tiles_per_sample:.2f}", _tokens(result), f"{result.seconds_per_sample:.4f}"])
    lines = [f"{run.label}: {describe_options(run.options)}", *_layout(header, rows, {2, 3, 4, 5, 6})]
    note = _groups_note([run])
    return "\n".join(lines + ([note] if note else []))


def format_comparison(runs: list[EvalRun]) -> str:
    """Several runs side by side: per dataset, each run's score and visual tokens per sample."""
    names = [d.name for d in runs[0].datasets]
    header = ["dataset", "metric"]
    for run in runs:
        header += [f"{run.label} score", "visual tokens"]
    rows = []
    overalls = [_overall(run) for run in runs]
    for name in names + (["all"] if all(overalls) else []):
        results = [run.dataset(name) if name != "all" else overall for run, overall in zip(runs, overalls)]
        row = [name, results[0].metric]
        for result in results:
            row += [f"{result.accuracy:.3f}", _tokens(result)]
        rows.append(row)
    lines = [f"{run.label}: {run.checkpoint}, {describe_options(run.options)}" for run in runs]
    lines += [""] + _layout(header, rows, set(range(2, len(header))))
    note = _groups_note(runs)
    return "\n".join(lines + ([note] if note else []))


def to_json(runs: list[EvalRun], data: str, predictions: bool = True) -> dict[str, Any]:
    """The record `--json` writes (and `internvlx card --results` reads)."""
    return {"format": JSON_FORMAT, "version": JSON_VERSION, "data": data,
            "runs": [run.to_dict(predictions) for run in runs]}


def write_json(record: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib, which is not installed; install it with "
                          "`pip install 'internvlx-hf[plot]'` (or leave out --plot)") from None


def plot_runs(runs: list[EvalRun], path: str | os.PathLike) -> Path:
    """Score against visual tokens per sample (the input ids' count): a line per dataset through the runs."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    figure = runs_figure(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
    plt.close(figure)
    return path


def runs_figure(runs: list[EvalRun]):
    """The figure of `plot_runs`: a line (colour) per dataset, a marker per run, one legend for each."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8.5, 4.5))
    # Runs are told apart by their marker, named in a legend of their own: text next to the points overlapped as
    # soon as two runs had similar token counts.
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
    for name in [d.name for d in runs[0].datasets]:
        points = sorted((run.dataset(name).visual_tokens, run.dataset(name).accuracy, index)
                        for index, run in enumerate(runs))
        line, = axes.plot([p[0] for p in points], [p[1] for p in points], label=name)
        for x, y, index in points:
            axes.plot([x], [y], marker=markers[index % len(markers)], color=line.get_color(), linestyle="none")
    axes.set_xlabel("visual tokens per sample")
    axes.set_ylabel("score")
    axes.set_title("internvlx eval")
    axes.grid(alpha=0.3)
    datasets_legend = axes.legend(fontsize=8, title="dataset", title_fontsize=8)
    axes.add_artist(datasets_legend)
    handles = [plt.Line2D([], [], marker=markers[i % len(markers)], color="0.35", linestyle="none", label=run.label)
               for i, run in enumerate(runs)]
    # Outside the axes, so that neither legend can cover the points or the other legend.
    axes.legend(handles=handles, fontsize=8, title="run", title_fontsize=8, loc="upper left",
                bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    datasets_legend.set_bbox_to_anchor((1.02, 0.0), transform=axes.transAxes)
    datasets_legend.set_loc("lower left")
    figure.tight_layout()
    return figure


__all__ = ["JSON_FORMAT", "describe_options", "format_comparison", "format_run", "plot_runs", "require_matplotlib",
           "runs_figure", "to_json", "write_json"]
