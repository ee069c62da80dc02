"""`internvlx data check`, then the first `internvlx train --group_by_length`: before and after the check wrote the
lengths cache.

Generates an InternVL mix of N rows (`bench_data.make_mix`: single-image, two-image and text-only rows over a few
hundred JPEG files) and times, in one run, for the package at commit BEFORE (`git archive`) and for this checkout:

- `internvlx data check META --model M --max_length 4096 --lengths_cache_dir C` (all cores), wall seconds;
- then `train()` with ``--group_by_length`` and the same settings (``--max_steps 2``), seconds from its start to the
  end of the first optimizer step, and where its lengths came from (built, or read from the cache the check wrote);
- a second `--group_by_length` run (lengths from the cache in both), for the cost of reading the cache back (this
  checkout also checks every measured image file's size and modification time then).

    python benchmarks/bench_lengths_cache.py [--rows 50000] [--images 300] [--out benchmarks/results/lengths-cache.json]
    python benchmarks/bench_lengths_cache.py --report-only     # rewrite the table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_data  # noqa: E402

from internvlx_hf.bench.harness import Progress, environment, time_call, write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BEFORE = "b16faf3"  # the last commit whose data check did not write the lengths cache


def data_check(model: Path, meta: Path, cache: Path, src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-m", "internvlx_hf", "data", "check", str(meta), "--model", str(model),
               "--max_length", "4096", "--no-progress"]
    if src == REPO / "src":
        command += ["--lengths_cache_dir", str(cache)]  # the old check has no such flag (and writes no lengths)
    runs = []
    seconds = time_call(lambda: runs.append(subprocess.run(command, env=env, capture_output=True, text=True)),
                        warmup=0, repeats=1)["median_s"]
    done = runs[0]
    if done.returncode != 0:
        raise RuntimeError(f"data check failed:\n{done.stderr[-3000:]}")
    said = [line for line in done.stdout.splitlines() if line.startswith("Lengths written")]
    return {"seconds": seconds, "says": said[0] if said else None}


def run(model: Path, meta: Path, work: Path, src: Path, name: str) -> dict:
    cache = work / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    result = {"check": data_check(model, meta, cache, src)}
    options = bench_data.train_options(model, meta, work / "o", group_by_length=True, lengths_cache_dir=str(cache))
    for run_name in ("first_run", "second_run"):
        (record,) = bench_data.run_training(options, work, f"{name}-{run_name}", src=src)
        result[run_name] = {"first_step_s": record["first_step_s"], "lengths_origin": record["lengths_origin"]}
    return result


def report(results: dict) -> str:
    lines = [f"`internvlx data check`, then `internvlx train --group_by_length` (same settings), {results['rows']:,} "
             f"rows, {results['images']:,} image files, {results['cores']} cores, {results['date']}", ""]
    if results.get("note"):
        lines += [results["note"], ""]
    lines += [
        "| package | data check (s) | 1st group_by_length run: s to step 1 | its lengths | 2nd run: s to step 1 |",
        "|---|---|---|---|---|"]
    for name in ("before", "after"):
        r = results[name]
        origins = ", ".join(r["first_run"]["lengths_origin"])
        lines.append(f"| {r['label']} | {r['check']['seconds']:.1f} | {r['first_run']['first_step_s']:.1f} | "
                     f"{origins} | {r['second_run']['first_step_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lengths-cache.json")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table from --out's JSON")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads(args.out.read_text())
        write_text(args.out.with_suffix(".md"), report(results) + "\n")
        print(report(results))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-lengths-"))
    work.mkdir(parents=True, exist_ok=True)
    model = bench_data.converted_checkpoint(work / "model")
    meta = bench_data.make_mix(work / "mix", args.rows, images=args.images)
    results = {"rows": args.rows, "images": args.images, "cores": len(os.sched_getaffinity(0)),
               "date": time.strftime("%Y-%m-%d"), "load_average_at_start": os.getloadavg()[0],
               "environment": environment("cpu")}
    progress = Progress(2, "lengths cache")
    before = bench_data.source_at(BEFORE, work)
    results["before"] = {"label": f"before ({BEFORE})", **run(model, meta, work, before, "before")}
    progress.step(json.dumps(results["before"]))
    results["after"] = {"label": "after (this checkout)", **run(model, meta, work, REPO / "src", "after")}
    progress.step(json.dumps(results["after"]))
    write_text(args.out, json.dumps(results, indent=1) + "\n")
    write_text(args.out.with_suffix(".md"), report(results) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
