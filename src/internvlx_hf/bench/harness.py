"""One timing, results and plot module for `internvlx bench` and `benchmarks/*.py`.

- `time_call`: warm-up calls, then ``repeats`` timed calls; the median is the figure (CUDA work is synchronized);
  `time_interleaved`: the same for several candidates, round-robin.
- `time_rounds`: round-robin too, but until every figure is precise (or a time budget is spent), and
  `spread`: each candidate's median with its range and interval, and its ratio to a reference from paired rounds,
  flagged when that ratio is within the noise (`median_interval`: the distribution-free interval both use).
- `environment`: what a number depends on (versions, commit, device, dtype, threads), stored next to it.
- `write_results`: one JSON file ``{"benchmark", "environment", "settings", "rows"}``, written atomically.
- `format_table` / `plot_rows` / `figure`: the printed table and, on request, a PNG (matplotlib, imported only then):
  a bar chart of rows, or the benchmark's own drawing in a `figure` block.
- `Progress`: one line on stderr per finished step of a long run.
"""

from __future__ import annotations

import json
import math
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


# The fewest rounds whose min..max interval of the median covers 95% (1 - 2 / 2**6 = 96.9%): `time_rounds` never
# stops before it, so an "auto" figure always has a 95% interval.
MIN_ROUNDS = 6
CONFIDENCE = 0.95


def _order_index(n: int, confidence: float) -> int:
    """The largest k (1-based) whose order statistics x_(k) .. x_(n+1-k) cover the median with ``confidence``:
    coverage 1 - 2 P(Binomial(n, 1/2) <= k - 1), exact up to 300 values, the normal approximation beyond (where it
    is within one rank of exact and the exact sum would cost O(n) per round)."""
    if n > 300:
        z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
        return max(1, int(math.floor(n / 2 - z * math.sqrt(n) / 2)))
    best, cdf = 1, 0.0  # cdf: P(B <= k)
    for k in range((n + 1) // 2):
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2))
        if 1 - 2 * cdf < confidence:  # the coverage of x_(k+1) .. x_(n-k)
            break
        best = k + 1
    return best


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """``(low, high, coverage)``: the distribution-free interval of the median of ``values`` (order statistics; no
    assumption about the noise's shape: timings are skewed, with rare slow calls). ``coverage`` is how often such an
    interval holds the true median: ``confidence`` or a little more from 6 values on; below 6 no interval reaches
    95%, and min..max is given with its own, lower, coverage (3 values: 0.75)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median_interval of no values")
    k = _order_index(n, confidence)
    if n > 300:
        coverage = confidence
    else:
        coverage = 1 - 2 * sum(math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
                                        - n * math.log(2)) for j in range(k))
    return ordered[k - 1], ordered[n - k], max(0.0, coverage)


def spread(times: Sequence[Sequence[float]], reference: int | None = None,
           confidence: float = CONFIDENCE) -> list[dict]:
    """Each candidate's figures from per-round ``times`` (one list per candidate; entry i of every list was timed in
    round i): ``median_s``, its range ``min_s`` / ``max_s``, its interval ``low_s`` / ``high_s`` (`median_interval`)
    with ``coverage``, ``times_s`` and ``rounds``. With a ``reference`` candidate, also its ratio to it: ``ratio``,
    the median of the per-round ratios (the two calls of a round share the machine's load of that moment, so a
    slow spell cancels out of their ratio instead of widening both medians), ``ratio_low`` / ``ratio_high`` (its
    interval), ``ratio_min`` / ``ratio_max`` (their range) and ``within_noise``: whether that interval holds 1.0,
    i.e. these rounds cannot tell the two apart (None for the reference itself)."""
    rows = []
    for i, sample in enumerate(times):
        low, high, coverage = median_interval(sample, confidence)
        row = {"median_s": statistics.median(sample), "min_s": min(sample), "max_s": max(sample), "low_s": low,
               "high_s": high, "coverage": coverage, "rounds": len(sample), "times_s": list(sample)}
        if reference is not None:
            base = times[reference]
            if len(base) != len(sample):
                raise ValueError(f"candidate {i} has {len(sample)} rounds, the reference {len(base)}")
            ratios = [t / b for t, b in zip(sample, base)]
            ratio_low, ratio_high, _ = median_interval(ratios, confidence)
            row.update(ratio=statistics.median(ratios), ratio_low=ratio_low, ratio_high=ratio_high,
                       ratio_min=min(ratios), ratio_max=max(ratios),
                       within_noise=None if i == reference else ratio_low <= 1.0 <= ratio_high)
        rows.append(row)
    return rows


def relative_spread(rows: Sequence[dict]) -> float:
    """The widest relative half-width of the figures of `spread`'s ``rows``: each median's interval and each ratio's
    (the reference's ratio is 1.0 by construction and left out)."""
    widest = 0.0
    for row in rows:
        widest = max(widest, (row["high_s"] - row["low_s"]) / 2 / row["median_s"] if row["median_s"] > 0 else 0.0)
        if row.get("within_noise") is not None and row["ratio"] > 0:
            widest = max(widest, (row["ratio_high"] - row["ratio_low"]) / 2 / row["ratio"])
    return widest


def time_rounds(fns: Sequence[Callable[[], Any]], *, warmup: int = 1, repeats: int | None = None,
                time_budget: float = 60.0, precision: float = 0.02, min_rounds: int = MIN_ROUNDS,
                reference: int | None = None, device: str | None = None,
                before_round: Callable[[], Any] | None = None, progress: Callable[[str], Any] | None = None,
                timer: Callable[[], float] = time.perf_counter) -> dict:
    """Round-robin timing (every round calls each of ``fns`` once, so a change of load hits all alike), after
    ``warmup`` untimed rounds. ``repeats``: that many rounds; None ("auto"): rounds until every figure of `spread`
    is within ``precision`` of itself (`relative_spread`), at least ``min_rounds`` of them, or until the next round
    would pass ``time_budget`` seconds (warm-up included; ``min_rounds`` wins over the budget, so every figure has
    an interval). ``progress`` gets a line now and then; ``timer`` is the clock (a test gives its own).

    Returns ``{"times": [per-candidate lists], "rounds", "stopped": "repeats" | "precision" | "time budget",
    "elapsed_s", "spread"}`` (``spread``: the final `relative_spread`)."""
    if warmup < 0 or (repeats is not None and repeats < 1) or min_rounds < 1 or precision <= 0 or time_budget < 0:
        raise ValueError(f"need warmup >= 0, repeats >= 1 or None, min_rounds >= 1, precision > 0, time_budget >= 0; "
                         f"got warmup={warmup}, repeats={repeats}, min_rounds={min_rounds}, precision={precision}, "
                         f"time_budget={time_budget}")
    start = timer()
    for _ in range(warmup):
        if before_round is not None:
            before_round()
        for fn in fns:
            fn()
    _synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    said, stopped, widest = timer(), "repeats", math.inf
    while True:
        round_start = timer()
        if before_round is not None:
            before_round()
        for fn, bucket in zip(fns, times):
            _synchronize(device)
            begin = timer()
            fn()
            _synchronize(device)
            bucket.append(timer() - begin)
        now = timer()
        rounds = len(times[0])
        if repeats is not None:
            if rounds >= repeats:
                break
            continue
        if rounds >= min_rounds:
            # the figures sort every round's times: beyond 100 rounds they are looked at as the count grows by 2%,
            # so that thousands of millisecond calls do not spend the budget sorting
            if rounds < 100 or rounds % (rounds // 50) == 0:
                widest = relative_spread(spread(times, reference))
                if widest <= precision:
                    stopped = "precision"
                    break
            if now - start + (now - round_start) > time_budget:
                stopped = "time budget"
                break
        if progress is not None and now - said >= 2.0:
            spread_text = f"±{widest:.1%} (goal ±{precision:.0%})" if rounds >= min_rounds else "warming the figures"
            progress(f"round {rounds}: {spread_text}, {now - start:.0f} s of {time_budget:g} s")
            said = now
    if stopped != "precision":
        widest = relative_spread(spread(times, reference))
    return {"times": times, "rounds": len(times[0]), "stopped": stopped, "elapsed_s": timer() - start,
            "spread": widest}


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
