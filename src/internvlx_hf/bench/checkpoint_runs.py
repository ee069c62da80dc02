"""Prefill, train-step and peak-memory measurements of a checkpoint against its plain variants.

Workloads (one prompt of ``tiles`` tiles and ``text_tokens`` text tokens, `variants.sample`; ``tiles`` defaults to
the folder's own tile budget, `variants.default_tiles`, since at one tile LVTC's fixed extra work can outweigh its
saving and the figure would not say what the checkpoint costs on the images it is made for):

- ``prefill``: one forward pass without labels under ``torch.no_grad()`` (what a server does before the first token).
- ``train-step``: forward with labels on the text positions, backward, gradients dropped (an optimizer step's cost
  does not depend on the token count, so it is left out).

Timing (`time_variants`): the variants are called in interleaved rounds (`harness.time_rounds`), so a change of load
on a shared machine hits all of them alike, until every figure is precise or a time budget is spent; every figure
comes with its interval, and a ratio to plain-1024 (an InternVL3.5-Flash folder: to its router off) whose interval
holds 1.0 is flagged as within the noise (`harness.spread`).

InternVL3.5-Flash (`routing`): the router runs inside each timed forward, as in `generate()`, on the prompt's tiles
(noise, or --image's), and its decisions (tiles compressed, the tokens the LLM received) go into the rows, so that a
ratio is read with what the router kept of that very prompt.

Memory (`memory_variants`): on CUDA, ``torch.cuda.max_memory_allocated`` around one workload call after a warm-up.
On CPU, torch has no allocator statistics, and a process's resident set (what this command measured before) ranks
variants by the allocator's slack and by what imports left behind, not by what they hold (it ranked plain-1024 below
plain-256); so the figure is the peak of the bytes of tensors alive during the call (`TensorPeak`): activations,
saved-for-backward tensors, gradients, temporaries, what a variant holds. It is exact and the same on every call,
but it leaves out kernels' internal scratch and the allocator's slack.
"""

from __future__ import annotations

import sys

from .harness import MIN_ROUNDS, Progress, spread, time_rounds
from .variants import build_variants, check_folder, default_tiles, image_tiles, sample, tokens_per_tile

WORKLOADS = ("prefill", "train-step")
REFERENCE = "plain-1024"
# what an InternVL3.5-Flash folder's router saves is measured against its router off
FLASH_REFERENCE = "router-off"
TIME_BUDGET_S = 60.0
PRECISION = 0.02
MEASURE_CUDA = "cuda max_memory_allocated"
MEASURE_CPU = "peak bytes of live tensors (torch dispatch)"


def _workload(model, name: str, inputs: dict):
    import torch

    if name == "prefill":
        def run():
            with torch.no_grad():
                model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], use_cache=False)
    else:
        def run():
            model.zero_grad(set_to_none=True)
            model(**inputs, use_cache=False).loss.backward()
    return run


def _check_sizes(tiles: int, text_tokens: int) -> None:
    if tiles < 1:
        raise ValueError(f"--tiles must be >= 1, got {tiles}.")
    if text_tokens < 8:
        raise ValueError(f"--text-tokens must be >= 8 (the image follows the first 8), got {text_tokens}.")


def resolve_tiles(folder, tiles: int | None, image=None) -> tuple[int, str, object]:
    """``(tiles, why, pixel_values)``: ``image``'s tiles through the folder's processor (--image), else ``tiles``
    noise tiles as given (--tiles), else as many as the folder's budget (`variants.default_tiles`); pixel_values
    None stands for the noise tiles of `variants.sample`."""
    if image is not None:
        if tiles is not None:
            raise ValueError("--tiles and --image: the image's tiles are what the folder's processor makes of it; "
                             "pass one of them.")
        pixel_values, why = image_tiles(folder, image)
        return int(pixel_values.shape[0]), why, pixel_values
    if tiles is not None:
        return tiles, "--tiles", None
    return (*default_tiles(folder), None)


def reference_of(names: list[str]) -> str:
    """The variant every ratio is taken against: plain-1024, else router-off, else the first."""
    for name in (REFERENCE, FLASH_REFERENCE):
        if name in names:
            return name
    return names[0]


def routing(model, inputs: dict) -> dict | None:
    """What an InternVL3.5-Flash model's LLM receives for ``inputs``: ``tiles``, ``tiles_compressed`` (its router's
    decisions; none with the router off) and ``llm_tokens`` (the prompt it shortens to); None for other models."""
    import torch

    vir = getattr(model.config, "vir", None)
    if vir is None:
        return None
    tiles = int(inputs["pixel_values"].shape[0])
    if not vir.enabled:
        return {"tiles": tiles, "tiles_compressed": 0, "llm_tokens": int(inputs["input_ids"].shape[1])}
    with torch.no_grad():
        routed = model.model.route(inputs["input_ids"], inputs["pixel_values"])
    return {"tiles": tiles, "tiles_compressed": int(routed.compressed.sum()),
            "llm_tokens": int(routed.input_ids.shape[1])}


def _stderr(name: str, enabled: bool):
    if not enabled:
        return None
    return lambda line: print(f"[{name}] {line}", file=sys.stderr, flush=True)


def _inputs(model, tiles: int, text_tokens: int, device: str, pixel_values) -> dict:
    if pixel_values is not None:
        pixel_values = pixel_values.to(device, next(model.parameters()).dtype)
    return sample(model, tiles, text_tokens, device, pixel_values=pixel_values)


def time_variants(folder, workload: str, names=None, device: str = "cpu", dtype: str = "float32",
                  tiles: int | None = None, text_tokens: int = 64, warmup: int = 1, repeats: int | None = None,
                  time_budget: float = TIME_BUDGET_S, precision: float = PRECISION,
                  progress: bool = True, image=None) -> tuple[list[dict], dict]:
    """``(rows, run)``: one row per variant, and how the run went.

    A row: ``tokens_per_tile``, ``prompt_tokens``, the `harness.spread` figures of its seconds per call
    (``median_s``, ``min_s`` / ``max_s``, ``low_s`` / ``high_s``, ``coverage``, ``rounds``, ``times_s``) and, against
    plain-1024 (router-off for an InternVL3.5-Flash folder; else the first variant), ``vs_<reference>`` (the median
    of the per-round ratios), ``vs_<reference>_low`` / ``_high`` (its interval), ``vs_<reference>_min`` / ``_max``
    and ``within_noise``; for a Flash folder also ``tiles_compressed`` and ``llm_tokens`` (`routing`). ``run``:
    ``tiles``, ``tiles_from``, ``rounds``, ``stopped``, ``elapsed_s``, ``spread``, ``reference``. ``repeats``: None
    runs rounds until ``precision`` or ``time_budget`` (`harness.time_rounds`). ``names``: the folder's
    `variants.default_variants` when None. ``image``: a file whose tiles make the prompt, instead of noise."""
    tiles, tiles_from, pixel_values = resolve_tiles(folder, tiles, image)
    _check_sizes(tiles, text_tokens)
    models = build_variants(folder, names, device, dtype)
    names = list(models)
    reference = names.index(reference_of(names))
    inputs = {name: _inputs(model, tiles, text_tokens, device, pixel_values) for name, model in models.items()}
    routed = {name: routing(model, inputs[name]) for name, model in models.items()}
    if workload == "train-step":
        for model in models.values():  # shared modules: all variants train, none mixes modes within a round
            model.train()
    calls = [_workload(models[name], workload, inputs[name]) for name in names]
    say = _stderr(workload, progress)
    if say is not None:
        say(f"{len(names)} variants, {tiles} tiles ({tiles_from}); "
            + (f"{repeats} rounds" if repeats is not None else
               f"rounds until every figure is within ±{precision:.0%} or {time_budget:g} s"))
    try:
        timing = time_rounds(calls, warmup=warmup, repeats=repeats, time_budget=time_budget, precision=precision,
                             reference=reference, device=device, progress=say)
    finally:
        for model in models.values():
            model.zero_grad(set_to_none=True)
            model.eval()
    figures = spread(timing["times"], reference)
    ref = names[reference]
    rows = []
    for name, figure in zip(names, figures):
        row = {"variant": name, "tokens_per_tile": tokens_per_tile(models[name]),
               "prompt_tokens": int(inputs[name]["input_ids"].shape[1])}
        if routed[name] is not None:
            row.update(routed[name])
        row.update({k: figure[k] for k in ("median_s", "min_s", "max_s", "low_s", "high_s", "coverage", "rounds",
                                           "times_s")})
        row[f"vs_{ref}"] = figure["ratio"]
        for key in ("low", "high", "min", "max"):
            row[f"vs_{ref}_{key}"] = figure[f"ratio_{key}"]
        row["within_noise"] = figure["within_noise"]
        rows.append(row)
    run = {"tiles": tiles, "tiles_from": tiles_from, "reference": ref, "warmup": warmup,
           **{k: timing[k] for k in ("rounds", "stopped", "elapsed_s", "spread")},
           "lvtc": {name: getattr(models[name].config, "lvtc", None) is not None for name in names},
           "router": _router_run(models, routed, pixel_values is None)}
    if say is not None:
        say(f"{timing['rounds']} rounds in {timing['elapsed_s']:.1f} s, stopped by {timing['stopped']}")
    return rows, run


def _router_run(models: dict, routed: dict, noise: bool) -> dict | None:
    """The router's settings and where its decisions came from, for the notes (None where no variant runs one)."""
    flash = [name for name, model in models.items() if routed[name] is not None and model.config.vir.enabled]
    if not flash:
        return None
    vir = models[flash[0]].config.vir
    return {"variants": flash, "noise": noise, "relative_threshold": vir.relative_threshold,
            "absolute_threshold": vir.absolute_threshold,
            "decisions": {name: routed[name] for name in flash}}


def router_notes(run: dict) -> list[str]:
    """What an InternVL3.5-Flash folder's router decided on the prompt's tiles, and on what."""
    router = run.get("router")
    if not router:
        return []
    lines = []
    for name, decided in router["decisions"].items():
        lines.append(f"router ({name}): {decided['tiles_compressed']} of {decided['tiles']} tiles compressed (p0 above "
                     f"the {router['relative_threshold']:g} quantile of the tiles' scores and >= "
                     f"{router['absolute_threshold']:g}); the LLM got {decided['llm_tokens']} tokens")
    if router["noise"]:
        lines.append("the tiles are seeded noise, not an image: on real images the router may decide otherwise "
                     "(`internvlx tokens FOLDER --image ...` shows its decisions on yours); --image FILE benches one")
    return lines


def _coverage(rows: list[dict]) -> str:
    """The intervals' coverage as said: "95%" when every interval covers at least that (the order statistics give
    a little more, 96.9% at 6 rounds), else the lowest."""
    coverage = min(r["coverage"] for r in rows)
    return "95%" if coverage >= 0.95 else f"{coverage:.0%}"


def _range(low: float, high: float) -> str:
    return f"{low:.4g}-{high:.4g}"


def timing_table(rows: list[dict], reference: str) -> tuple[list[dict], list[str]]:
    """The printed table's rows and columns: each median with its interval, each ratio with its interval."""
    key = f"vs_{reference}"
    table = [{"variant": r["variant"], "tokens_per_tile": r["tokens_per_tile"], "prompt_tokens": r["prompt_tokens"],
              **_router_cells(r),
              "median_s": r["median_s"], "interval_s": _range(r["low_s"], r["high_s"]), key: r[key],
              f"{key} interval": "-" if r["within_noise"] is None else _range(r[f"{key}_low"], r[f"{key}_high"])}
             for r in rows]
    return table, list(table[0])


def _router_cells(row: dict) -> dict:
    """An InternVL3.5-Flash variant's table cells: its router's decisions on the prompt's tiles (compressed / tiles)
    and the tokens its LLM received; nothing for other variants."""
    if "llm_tokens" not in row:
        return {}
    return {"compressed": f"{row['tiles_compressed']}/{row['tiles']}", "llm_tokens": row["llm_tokens"]}


def timing_notes(rows: list[dict], run: dict, workload: str, precision: float = PRECISION) -> list[str]:
    """The lines printed under the table: what was measured, how sure it is, and which ratios say nothing."""
    ref, tiles = run["reference"], run["tiles"]
    coverage = min(r["coverage"] for r in rows)
    lines = [f"tiles: {tiles} ({run['tiles_from']})", *router_notes(run)]
    how = {"precision": f"every figure within ±{precision:.0%}",
           "time budget": f"time budget reached, figures within ±{run['spread']:.1%}",
           "repeats": "--repeats"}[run["stopped"]]
    lines.append(f"rounds: {run['rounds']} interleaved after {run['warmup']} warm-up ({how}, "
                 f"{run['elapsed_s']:.1f} s); intervals: {_coverage(rows)} of the median; ratios: median of the "
                 "per-round ratios")
    if coverage < 0.95:
        lines.append(f"with {run['rounds']} rounds an interval covers only {coverage:.0%}; --repeats auto (or "
                     f">= {MIN_ROUNDS}) gives 95%")
    key = f"vs_{ref}"
    for row in rows:
        if row["within_noise"] is None:
            continue
        figure = f"{row[key]:.3g}x {ref} (interval {row[key + '_low']:.3g}-{row[key + '_high']:.3g})"
        if row["within_noise"]:
            lines.append(f"within the noise: {row['variant']} at {figure}: these rounds cannot tell it from {ref};"
                         " a longer --time-budget or more --tiles can")
        elif row[key + "_low"] > 1.0 and run["lvtc"].get(row["variant"]):
            plural = "" if tiles == 1 else "s"
            lines.append(f"{row['variant']} takes longer than {ref} here, {figure}: at {tiles} tile{plural} LVTC's "
                         f"extra work (the HR projector, the expansion at layer k) outweighs what its short layers "
                         f"save in {workload}; the saving grows with the tiles (--tiles)")
        elif row[key + "_low"] > 1.0 and row.get("tiles_compressed") is not None and row["variant"] in (
                (run.get("router") or {}).get("variants", ())):
            saved = (f"what its {row['tiles_compressed']} compressed tiles save" if row["tiles_compressed"] else
                     "nothing: it compressed no tile, so")
            lines.append(f"{row['variant']} takes longer than {ref} here, {figure}: the router's work (its pooling and "
                         f"gating on every tile, the compressed projector) outweighs {saved} in {workload}")
        elif row[key + "_low"] > 1.0:
            lines.append(f"{row['variant']} takes longer than {ref} here, {figure}")
    return lines


def plot_timing(path, rows: list[dict], reference: str, title: str):
    """Two panels: seconds per call (median, error bars: its interval) and the ratio to the reference (median of
    the per-round ratios, error bars: its interval; a dashed line at 1.0, so a bar that crosses it is noise)."""
    from .harness import figure

    with figure(path, 1, 2, figsize=(max(7.0, 2.2 * len(rows) + 3), 3.6), dpi=100) as (fig, axes):
        draw_timing(axes, rows, reference)
        fig.suptitle(title)
    return path


def draw_timing(axes, rows: list[dict], reference: str) -> None:
    key = f"vs_{reference}"
    names = [r["variant"] for r in rows]
    seconds, ratios = axes
    medians = [r["median_s"] for r in rows]
    seconds.bar(names, medians, color="#4c72b0", yerr=[[m - r["low_s"] for m, r in zip(medians, rows)],
                                                       [r["high_s"] - m for m, r in zip(medians, rows)]],
                capsize=4, ecolor="black")
    seconds.set_ylabel(f"seconds per call (median, {_coverage(rows)} interval)")
    values = [r[key] for r in rows]
    ratios.bar(names, values, color="#dd8452", yerr=[[v - r[key + "_low"] for v, r in zip(values, rows)],
                                                     [r[key + "_high"] - v for v, r in zip(values, rows)]],
               capsize=4, ecolor="black")
    ratios.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ratios.set_ylabel(f"time / {reference} (per-round ratios)")
    for axis in axes:
        axis.tick_params(axis="x", labelrotation=0)


def tensor_peak():
    """A `TorchDispatchMode` that counts the bytes of the tensor storages allocated while it is on and still alive,
    and their peak (``.peak``): activations, saved-for-backward tensors, gradients and temporaries. Views and in-place
    results share a storage and count once; storages that existed before (the weights) not at all. (As
    ``benchmarks/bench_models.py``'s PeakMemory; built in a function so that importing this module needs no torch.)"""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class TensorPeak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.peak, self._sizes = 0, 0, {}

        def _free(self, key: int) -> None:
            self.live -= self._sizes.pop(key, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                     if isinstance(t, torch.Tensor)}
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                    storage = tensor.untyped_storage()
                    key = storage.data_ptr()
                    if key and key not in self._sizes and key not in given:
                        self._sizes[key] = storage.nbytes()
                        self.live += storage.nbytes()
                        weakref.finalize(storage, self._free, key)
            self.peak = max(self.peak, self.live)
            return out

    return TensorPeak()


def measure_memory(model, workload: str, inputs: dict, device: str) -> dict:
    """Peak memory of one call of ``workload`` after a warm-up call: ``{"peak_bytes", "workload_bytes",
    "weights_bytes", "measure"}`` (see the module docstring for what is counted where)."""
    import itertools

    import torch

    if workload == "train-step":
        model.train()
    run = _workload(model, workload, inputs)
    weights = sum(t.nbytes for t in itertools.chain(model.parameters(), model.buffers()))
    try:
        run()  # warm-up: lazy initialisations are not the workload's
        model.zero_grad(set_to_none=True)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            run()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            return {"peak_bytes": peak, "workload_bytes": peak - before, "weights_bytes": weights,
                    "measure": MEASURE_CUDA}
        tracker = tensor_peak()
        with tracker:
            run()
        return {"peak_bytes": weights + tracker.peak, "workload_bytes": tracker.peak, "weights_bytes": weights,
                "measure": MEASURE_CPU}
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def memory_variants(folder, workloads=WORKLOADS, names=None, device: str = "cpu", dtype: str = "float32",
                    tiles: int | None = None, text_tokens: int = 64, progress: bool = True, image=None
                    ) -> tuple[list[dict], dict]:
    """``(rows, run)``: one row per (variant, workload) with ``peak_mib`` (weights + the call's peak),
    ``workload_mib`` (the call's peak), ``weights_mib`` and ``measure`` (what the figures are), and for an
    InternVL3.5-Flash folder ``tiles``, ``tiles_compressed`` and ``llm_tokens`` (`routing`); ``run``: ``tiles``,
    ``tiles_from``, ``router``. One call each: the figures do not vary from call to call, so they have no spread."""
    tiles, tiles_from, pixel_values = resolve_tiles(folder, tiles, image)
    _check_sizes(tiles, text_tokens)
    check_folder(folder)
    models = build_variants(folder, names, device, dtype)
    inputs = {name: _inputs(model, tiles, text_tokens, device, pixel_values) for name, model in models.items()}
    routed = {name: routing(model, inputs[name]) for name, model in models.items()}
    jobs = [(name, workload) for workload in workloads for name in models]
    bar = Progress(len(jobs), "memory", enabled=progress)
    rows = []
    for name, workload in jobs:
        model = models[name]
        result = measure_memory(model, workload, inputs[name], device)
        rows.append({"variant": name, "workload": workload, **(routed[name] or {}),
                     "peak_mib": result["peak_bytes"] / 2**20, "workload_mib": result["workload_bytes"] / 2**20,
                     "weights_mib": result["weights_bytes"] / 2**20, "measure": result["measure"]})
        bar.step(f"{name} {workload}: {rows[-1]['workload_mib']:.1f} MiB")
    return rows, {"tiles": tiles, "tiles_from": tiles_from, "router": _router_run(models, routed, pixel_values is None)}


def memory_table(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The printed memory table: variant, workload, (a Flash folder: the router's decisions and the LLM's tokens),
    then the figures."""
    table = [{"variant": r["variant"], "workload": r["workload"], **_router_cells(r),
              **{k: r[k] for k in ("workload_mib", "weights_mib", "peak_mib", "measure")}} for r in rows]
    return table, list(table[0])


def memory_notes(rows: list[dict], run: dict) -> list[str]:
    """The lines printed under the memory table: the tiles, and what the figures are."""
    lines = [f"tiles: {run['tiles']} ({run['tiles_from']})", *router_notes(run)]
    if any(r["measure"] == MEASURE_CPU for r in rows):
        lines.append(f"memory on CPU: {MEASURE_CPU} during one call after a warm-up: exact, the same on every call "
                     "(no spread), without kernels' scratch and the allocator's slack")
    else:
        lines.append(f"memory: {MEASURE_CUDA} during one call after a warm-up, above what was allocated before it")
    lines.append("workload_mib ranks what each variant holds for the prompt; weights_mib differs by projector only "
                 "(the variants share the rest); peak_mib = the two together")
    return lines


def plot_memory(path, rows: list[dict], title: str):
    """One panel per workload (each on its own scale: a prefill's megabytes are not lost next to a train step's),
    horizontal bars, one per variant: the labels sit on the y axis, one per line, so they cannot run into each
    other however many variants there are; each bar is labelled with its figure."""
    from .harness import figure

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    per_panel = max(sum(r["workload"] == w for r in rows) for w in workloads)
    with figure(path, len(workloads), 1, figsize=(7.0, 0.9 + len(workloads) * (0.6 + 0.4 * per_panel)), dpi=100,
                squeeze=False) as (fig, axes):
        for axis, workload in zip(axes[:, 0], workloads):
            draw_memory(axis, [r for r in rows if r["workload"] == workload])
        fig.suptitle(title)
    return path


def draw_memory(axes, rows: list[dict]) -> None:
    """Bars of ``workload_mib`` (what the call holds), first row on top, as in the table."""
    colors = {"this": "#4c72b0", "plain-256": "#55a868", "plain-1024": "#c44e52", "router-off": "#55a868"}
    positions = list(range(len(rows)))[::-1]
    values = [r["workload_mib"] for r in rows]
    bars = axes.barh(positions, values, color=[colors.get(r["variant"], "#8172b3") for r in rows])
    axes.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=3)
    axes.set_yticks(positions, [r["variant"] for r in rows])
    axes.set_xlim(0, max(values + [1e-9]) * 1.18)  # room for the bar labels
    measure = "live tensors" if rows[0]["measure"] == MEASURE_CPU else "cuda max_memory_allocated"
    axes.set_title(f"{rows[0]['workload']}: MiB held during the call ({measure})", fontsize=10)
