"""One timing, results and plot module for `internvlx bench` and `benchmarks/*.py`.

- `time_call`: warm-up calls, then ``repeats`` timed calls; the median is the figure (CUDA work is synchronized);
  `time_interleaved`: the same for several candidates, round-robin.
- `environment`: what a number depends on (versions, commit, device, dtype, threads), stored next to it.
- `write_results`: one JSON file ``{"benchmark", "environment", "settings", "rows"}``, written atomically.
- `format_table` / `plot_rows` / `figure`: the printed table and, on request, a PNG (matplotlib, imported only then):
  a bar chart of rows, or the benchmark's own drawing in a `figure` block.
- `Progress`: one line on stderr per finished step of a long run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class BenchError(RuntimeError):
    """A measurement that cannot give a true figure (a failed request, a failed child process); the message says
    which and why."""


def _synchronize(device: str | None) -> None:
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3, device: str | None = None) -> dict:
    """Seconds per call of ``fn``: ``{"median_s", "min_s", "max_s", "times_s"}`` over ``repeats`` calls after
    ``warmup`` untimed ones (which absorb one-time costs: allocator growth, kernel selection, lazy imports)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - begin)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def time_interleaved(fns: Sequence[Callable[[], Any]], *, warmup: int = 1, repeats: int = 3,
                     device: str | None = None, before_round: Callable[[], Any] | None = None) -> list[dict]:
    """`time_call` for several candidates at once, round-robin (each round calls every candidate once), so that a
    change of load on the machine hits them alike; one result per candidate, in order. ``before_round``, if given, is
    called untimed before every round (warm-up rounds included): new inputs that all candidates of the round share."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    for _ in range(warmup):
        if before_round is not None:
            before_round()
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        if before_round is not None:
            before_round()
        for fn, bucket in zip(fns, times):
            _synchronize(device)
            begin = time.perf_counter()
            fn()
            _synchronize(device)
            bucket.append(time.perf_counter() - begin)
    return [{"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "times_s": t} for t in times]


def _commit() -> str | None:
    """The git commit of the checkout this package runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: str | None = None, dtype: str | None = None) -> dict:
    """Versions, commit, host and the device / dtype / thread count a measurement ran with."""
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "commit": _commit(), "device": device, "dtype": dtype}
    try:
        import torch

        env["torch"] = torch.__version__
        env["threads"] = torch.get_num_threads()
        if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
            env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    except ImportError:
        env["torch"] = None
        env["threads"] = os.cpu_count()
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    from .. import __version__

    env["internvlx_hf"] = __version__
    return env


def results(benchmark: str, rows: Sequence[dict], settings: dict, env: dict | None = None) -> dict:
    return {"benchmark": benchmark, "environment": env if env is not None else environment(
        settings.get("device"), settings.get("dtype")), "settings": dict(settings), "rows": [dict(r) for r in rows]}


def write_text(path: str | os.PathLike, text: str, make_parents: bool = True) -> Path:
    """Writes ``text`` through a temporary file beside ``path``, so a failed run leaves no half-written file."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the folder {path.parent} does not exist; create it first.")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_results(path: str | os.PathLike, data: dict) -> Path:
    """Writes ``data`` as indented JSON (`write_text`); the folder must exist (a typo is not silently created)."""
    return write_text(path, json.dumps(data, indent=2) + "\n", make_parents=False)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Rows as an aligned text table (numbers right-aligned), the columns in ``columns`` order."""
    columns = list(columns or (rows[0].keys() if rows else []))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


@contextmanager
def figure(path: str | os.PathLike, nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (6.4, 4.8),
           dpi: int = 110, squeeze: bool = True, tight: bool = True):
    """``(figure, axes)`` of ``plt.subplots`` (matplotlib imported only here, off-screen); the benchmark draws in the
    block, and the picture is saved as PNG at ``path`` when it ends (through a temporary file: a failed drawing
    leaves no half-written picture) and closed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from error
    path = Path(path)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=squeeze)
    try:
        yield fig, axes
        if tight:
            fig.tight_layout()
        tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)


def plot_rows(path: str | os.PathLike, rows: Sequence[dict], label: str, value: str, title: str,
              ylabel: str | None = None) -> Path:
    """A bar chart of ``row[value]`` per ``row[label]``, saved as PNG (`figure`)."""
    with figure(path, figsize=(max(4.0, 1.2 * len(rows) + 2), 3.5), dpi=100) as (_, axes):
        axes.bar([str(row[label]) for row in rows], [row[value] or 0 for row in rows], color="#4c72b0")
        axes.set_title(title)
        axes.set_ylabel(ylabel or value)
    return Path(path)


class Progress:
    """``[i/n] what (elapsed)`` on stderr after each step, so a long run shows it is alive."""

    def __init__(self, total: int, name: str, enabled: bool = True, stream=None):
        self.total, self.name, self.enabled, self.done = total, name, enabled, 0
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            print(f"[{self.name} {self.done}/{self.total}] {what} ({time.perf_counter() - self.start:.1f} s)",
                  file=self.stream, flush=True)

    def wrap(self, items: Iterable, describe: Callable[[Any], str] = str):
        for item in items:
            yield item
            self.step(describe(item))
