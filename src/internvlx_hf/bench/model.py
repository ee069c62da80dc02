"""Prefill, train-step and peak-memory measurements of a checkpoint against its plain variants.

Workloads (one prompt of ``tiles`` tiles and ``text_tokens`` text tokens, `variants.sample`):

- ``prefill``: one forward pass without labels under ``torch.no_grad()`` (what a server does before the first token).
- ``train-step``: forward with labels at every position, backward, gradients dropped (an optimizer step's cost does
  not depend on the token count, so it is left out).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` around one workload call after a warm-up (bytes the tensors
took; the caching allocator may reserve more). On CPU, each variant runs in a child process, and the figure is the
growth of the process's peak resident set (``resource.getrusage`` ``ru_maxrss``) from after the model is built to
after the workload: resident memory, so it includes the allocator's slack, and a child per variant keeps one
variant's peak from hiding another's.
"""

from __future__ import annotations

import json
import subprocess
import sys

from .harness import BenchError, Progress, time_call
from .variants import VARIANTS, build_variants, check_folder, sample, tokens_per_tile

WORKLOADS = ("prefill", "train-step")


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


def time_variants(folder, workload: str, names=VARIANTS, device: str = "cpu", dtype: str = "float32", tiles: int = 1,
                  text_tokens: int = 64, warmup: int = 1, repeats: int = 3, progress: bool = True) -> list[dict]:
    """One row per variant: tokens, median seconds per call, and the ratio to plain-1024 (to the first variant
    when plain-1024 is not measured)."""
    _check_sizes(tiles, text_tokens)
    models = build_variants(folder, names, device, dtype)
    bar = Progress(len(models), workload, enabled=progress)
    rows = []
    for name, model in models.items():
        inputs = sample(model, tiles, text_tokens, device)
        if workload == "train-step":
            model.train()
        timing = time_call(_workload(model, workload, inputs), warmup=warmup, repeats=repeats, device=device)
        model.eval()
        rows.append({"variant": name, "tokens_per_tile": tokens_per_tile(model),
                     "prompt_tokens": int(inputs["input_ids"].shape[1]), "median_s": timing["median_s"],
                     "min_s": timing["min_s"], "times_s": timing["times_s"]})
        bar.step(f"{name}: {timing['median_s']:.4g} s")
        if workload == "train-step":
            model.zero_grad(set_to_none=True)
    reference = next((r for r in rows if r["variant"] == "plain-1024"), rows[0])
    for row in rows:
        row["vs_" + reference["variant"]] = row["median_s"] / reference["median_s"]
    return rows


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def measure_memory(folder, variant: str, workload: str, device: str, dtype: str, tiles: int,
                   text_tokens: int) -> dict:
    """Peak memory of one variant's workload in this process (see the module docstring for what is counted)."""
    import torch

    model = build_variants(folder, [variant], device, dtype)[variant]
    inputs = sample(model, tiles, text_tokens, device)
    if workload == "train-step":
        model.train()
    run = _workload(model, workload, inputs)
    if str(device).startswith("cuda"):
        run()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": peak, "workload_bytes": peak - before, "measure": "cuda max_memory_allocated"}
    before = _peak_rss_bytes()
    run()
    peak = _peak_rss_bytes()
    return {"peak_bytes": peak, "workload_bytes": peak - before, "measure": "peak RSS (ru_maxrss), child process"}


def memory_variants(folder, workloads=WORKLOADS, names=VARIANTS, device: str = "cpu", dtype: str = "float32",
                    tiles: int = 1, text_tokens: int = 64, progress: bool = True) -> list[dict]:
    """One row per (variant, workload): peak and workload bytes (in MiB), each CPU measurement in its own child."""
    _check_sizes(tiles, text_tokens)
    check_folder(folder)  # said here, not as a child's traceback
    jobs = [(name, workload) for workload in workloads for name in names]
    bar = Progress(len(jobs), "memory", enabled=progress)
    rows = []
    for name, workload in jobs:
        if str(device).startswith("cuda"):
            result = measure_memory(folder, name, workload, device, dtype, tiles, text_tokens)
        else:
            spec = json.dumps(dict(folder=str(folder), variant=name, workload=workload, device=device, dtype=dtype,
                                   tiles=tiles, text_tokens=text_tokens))
            child = subprocess.run([sys.executable, "-m", "internvlx_hf.bench.model", spec], capture_output=True,
                                   text=True)
            if child.returncode != 0:
                raise BenchError(f"memory of {name} / {workload} failed in its child process: "
                                 f"{child.stderr.strip()[-1500:]}")
            result = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append({"variant": name, "workload": workload, "peak_mib": result["peak_bytes"] / 2**20,
                     "workload_mib": result["workload_bytes"] / 2**20, "measure": result["measure"]})
        bar.step(f"{name} {workload}: {rows[-1]['workload_mib']:.1f} MiB")
    return rows


if __name__ == "__main__":  # the child process of `memory_variants` on CPU
    spec = json.loads(sys.argv[1])
    print(json.dumps(measure_memory(**spec)))
