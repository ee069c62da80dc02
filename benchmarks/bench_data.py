"""How long a million-row InternVL mix takes to start training, and how fast batches come out of the DataLoader.

Generates an InternVL-format mix of N rows (a meta JSON over three JSONL files: single-image, two-image and text-only
rows of 1-3 turns; a few hundred JPEG files from 448x448 to 1024x768) and reports, side by side in one run:

- seconds from the start of `internvlx train` (`train()` with the parsed options, as the CLI calls it; a converted
  test checkpoint, ``--max_steps 2``, ``--max_length 4096``) to the end of the first optimizer step, and the peak
  RSS per rank, for: the lazy default; ``--group_by_length`` with a first run that builds the exact lengths and a
  second run that reads them from the cache; one process and 2 DDP processes (gloo). The old eager scan (every row
  checked in one process before step 1: the package at commit OLD, taken with `git archive`) runs at a smaller N
  and is extrapolated to N from its rows/s, labelled as such; so is today's full check (``--check_data``,
  `internvlx data check`, all cores). The baseline for RSS growth is the lazy run on a 100-row mix.
- collated training samples (and tiles) per second from the DataLoader with 0 and 2 workers.
- the padding cost of ``--lengths approximate``: padded tokens / real tokens of length-grouped batches (batch 8,
  transformers' `LengthGroupedSampler` order) with approximate lengths against exact ones, on the first 200,000 rows.

    python benchmarks/bench_data.py [--rows 1000000] [--eager-rows 5000] [--out benchmarks/results/data.json]
    python benchmarks/bench_data.py --report-only     # redraw the table and plot from the JSON

Results go to benchmarks/results/data.json (and .md / .png); docs/benchmarks.md shows them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "internvl2_qwen2"
OLD = "80d30df"  # the last commit with the eager scan (every row checked in one process before step 1)
SIZES = [(448, 448), (512, 384), (640, 480), (800, 600), (1024, 768), (768, 1024), (600, 800), (960, 540)]
WORDS = ("the a of in on with red blue green small large left right top bottom chart table figure shows "
         "number value year total what which how many where is are there colour shape object person car sign "
         "text reads answer image picture second first compare between more less than increase decrease").split()


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def _conversation(rng: random.Random, first_prefix: str) -> list[dict]:
    turns = []
    for turn in range(rng.randint(1, 3)):
        question = _sentence(rng, 5, 20)
        turns.append({"from": "human", "value": (first_prefix if turn == 0 else "") + question})
        turns.append({"from": "gpt", "value": _sentence(rng, 3, 60)})
    return turns


def make_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = []
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = rng.randrange(width), rng.randrange(height)
            draw.rectangle([x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)],
                           fill=tuple(rng.randrange(256) for _ in range(3)))
        name = f"img{index:04d}.jpg"
        image.save(folder / name, quality=80)
        names.append(name)
    return names


def make_mix(folder: Path, rows: int, *, images: int = 300, seed: int = 0) -> Path:
    """An InternVL meta JSON over three JSONL files with ``rows`` rows in all; returns the meta's path."""
    folder.mkdir(parents=True, exist_ok=True)
    names = make_images(folder / "images", images, seed)
    rng = random.Random(seed)
    shares = {"vqa": 0.5, "multi": 0.2, "text": 0.3}
    counts = {name: int(rows * share) for name, share in shares.items()}
    counts["vqa"] += rows - sum(counts.values())
    meta = {}
    for name, count in counts.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for index in range(count):
                if name == "vqa":
                    row = {"id": index, "image": rng.choice(names), "conversations": _conversation(rng, "<image>\n")}
                elif name == "multi":
                    row = {"id": index, "image": [rng.choice(names), rng.choice(names)],
                           "conversations": _conversation(rng, "Image-1: <image>\nImage-2: <image>\n")}
                else:
                    row = {"id": index, "conversations": _conversation(rng, "")}
                handle.write(json.dumps(row) + "\n")
        meta[name] = {"root": str(folder / "images"), "annotation": str(folder / f"{name}.jsonl"),
                      "data_augment": False, "repeat_time": 1, "max_dynamic_patch": 6}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return folder / "meta.json"


def converted_checkpoint(folder: Path) -> Path:
    from internvlx_hf.conversion import convert

    if not (folder / "config.json").is_file():
        convert(FIXTURE, folder, progress=False)
    return folder


# --- one training run, in a child process (`python bench_data.py --child OPTIONS_JSON RESULT_PREFIX`) ------------

def _child(options_json: str, prefix: str) -> None:
    started = float(os.environ["BENCH_STARTED"])
    from transformers import TrainerCallback

    from internvlx_hf.training import parse_train_args, train

    class FirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # data read, model loaded, no batch yet
            self.rss_begin = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.seconds = time.time() - started
                self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    first = FirstStep()
    result = train(*parse_train_args(json.loads(options_json)), callbacks=[first], print_fn=None)
    rank = int(os.environ.get("RANK", 0))
    origins = getattr(result.dataset, "lengths_origin", None)
    record = {"rank": rank, "first_step_s": first.seconds, "rss_train_begin_mib": first.rss_begin,
              "rss_first_step_mib": first.rss,
              "rss_end_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "lengths_origin": origins}
    Path(f"{prefix}-rank{rank}.json").write_text(json.dumps(record))
    from internvlx_hf.training import end_distributed

    del result
    end_distributed()


def source_at(commit: str, work: Path) -> Path:
    """The package as it was at ``commit`` (git archive), extracted once under ``work``."""
    folder = work / f"src-{commit}"
    if not (folder / "src").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder / "src"


def run_training(options: dict, work: Path, name: str, processes: int = 1, src: Path = REPO / "src") -> list[dict]:
    prefix = work / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src), "BENCH_STARTED": repr(time.time())}
    if processes == 1:
        command = [sys.executable, __file__, "--child", json.dumps(options), str(prefix)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   __file__, "--child", json.dumps({**options, "ddp_backend": "gloo"}), str(prefix)]
    shutil.rmtree(options["output_dir"], ignore_errors=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return [json.loads(Path(f"{prefix}-rank{rank}.json").read_text()) for rank in range(processes)]


def train_options(model: Path, meta: Path, out: Path, **extra) -> dict:
    return {"model": str(model), "data": str(meta), "output_dir": str(out), "preset": "stage2-frozen-vit",
            "max_steps": 2, "max_length": 4096, "per_device_train_batch_size": 2, "save_strategy": "no",
            "use_cpu": True, "report_to": "none", "disable_tqdm": True, "seed": 0, "logging_steps": 1,
            "dataloader_num_workers": 0, **extra}


# --- in-process measurements -------------------------------------------------------------------------------------

_EAGER = """
import json, sys, time
from internvlx_hf import InternVLXProcessor
from internvlx_hf.training import InternVLXDataset
processor = InternVLXProcessor.from_pretrained(sys.argv[1])
began = time.perf_counter()
dataset = InternVLXDataset(sys.argv[2], processor, max_length=4096, progress=False)
seconds = time.perf_counter() - began
print(json.dumps({"rows": sum(d.rows for d in dataset.summary.datasets), "seconds": seconds}))
"""


def eager_scan_rate(model: Path, meta: Path, src: Path) -> dict:
    """The old path (``src``: the package at commit OLD): every row checked before training, in one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", _EAGER, str(model), str(meta)], env=env, capture_output=True,
                          text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "rows_per_s": result["rows"] / result["seconds"]}


def check_rate(model: Path, meta: Path) -> dict:
    """Today's full check (`InternVLXDataset(check=True)`, what `internvlx data check` runs), all cores."""
    from internvlx_hf import InternVLXProcessor
    from internvlx_hf.bench.harness import time_call
    from internvlx_hf.data import InternVLXDataset

    processor = InternVLXProcessor.from_pretrained(model)
    built = []
    seconds = time_call(lambda: built.append(InternVLXDataset(str(meta), processor, max_length=4096, progress=False,
                                                              check=True)), warmup=0, repeats=1)["median_s"]
    rows = sum(d.rows for d in built[0].summary.datasets)
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}


def loader_rate(model: Path, meta: Path, workers: int, batches: int = 12, batch_size: int = 4) -> dict:
    """Collated samples (and tiles) per second from a DataLoader over the lazy dataset."""
    import torch

    from internvlx_hf import InternVLXProcessor
    from internvlx_hf.bench.harness import time_call
    from internvlx_hf.data import InternVLXDataset
    from internvlx_hf.training import InternVLXDataCollator

    processor = InternVLXProcessor.from_pretrained(model)
    processor.image_processor.max_tiles = 6
    dataset = InternVLXDataset(str(meta), processor, max_length=4096, progress=False)
    collator = InternVLXDataCollator(processor, max_length=4096)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=workers,
                                         sampler=torch.utils.data.RandomSampler(
                                             dataset, generator=torch.Generator().manual_seed(0)))
    iterator = iter(loader)
    next(iterator)  # workers started, first batch
    samples = tiles = 0

    def read_batches() -> None:
        nonlocal samples, tiles
        for _ in range(batches):
            batch = next(iterator)
            samples += batch["input_ids"].shape[0]
            tiles += int(batch["num_patches"].sum()) if "num_patches" in batch else 0

    seconds = time_call(read_batches, warmup=0, repeats=1)["median_s"]
    iterator = None  # the workers stop
    return {"workers": workers, "samples_per_s": samples / seconds, "tiles_per_s": tiles / seconds}


def padding_cost(model: Path, meta: Path, cache: Path, rows: int = 200_000, batch_size: int = 8) -> dict:
    """Padded / real tokens of length-grouped batches when grouped by approximate vs exact lengths."""
    import numpy as np
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from internvlx_hf import InternVLXProcessor
    from internvlx_hf.data import InternVLXDataset

    processor = InternVLXProcessor.from_pretrained(model)
    processor.image_processor.max_tiles = 6
    result = {}
    exact = None
    for mode in ("exact", "approximate"):
        dataset = InternVLXDataset(str(meta), processor, max_length=4096, progress=False, lengths=mode,
                                   cache_dir=cache)
        lengths = np.asarray(dataset.lengths)
        exact = lengths if mode == "exact" else exact
        pick = np.random.default_rng(0).choice(len(lengths), size=min(rows, len(lengths)), replace=False)
        order = get_length_grouped_indices(lengths[pick].tolist(), batch_size,
                                           generator=torch.Generator().manual_seed(0))
        true = exact[pick][order]
        usable = true > 0
        true = np.where(usable, true, 0)
        batches = [true[i:i + batch_size] for i in range(0, len(true), batch_size)]
        padded = sum(int(b.max()) * len(b) for b in batches)
        result[mode] = {"padding_per_real_token": padded / int(true.sum()) - 1.0}
    return result


def main() -> None:
    # (imported here: training children run this file with an older package on the path, which has no harness)
    from internvlx_hf.bench.harness import Progress, environment, time_call, write_text

    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--eager-rows", type=int, default=5000)
    parser.add_argument("--work", type=Path, default=None, help="folder for the generated data (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data.json")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: ddp,loader,padding")
    parser.add_argument("--report-only", action="store_true", help="redraw the table and plot from --out's JSON")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads(args.out.read_text())
        write_text(args.out.with_suffix(".md"), report(results) + "\n")
        print(report(results))
        plot(results, args.out.with_suffix(".png"))
        return
    skip = set(filter(None, args.skip.split(",")))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    model = converted_checkpoint(work / "model")
    results = {"rows": args.rows, "eager_rows": args.eager_rows, "cores": len(os.sched_getaffinity(0)),
               "environment": environment("cpu")}
    progress = Progress(17 - 4 * ("ddp" in skip) - ("loader" in skip) - ("padding" in skip), "data")

    def note(key, value):  # every figure kept as it comes: a long run stopped half-way keeps what it measured
        results[key] = value
        progress.step(f"{key}: {json.dumps(value)}")
        write_text(args.out, json.dumps(results, indent=1) + "\n")

    mixes = []
    note("generate_s", time_call(lambda: mixes.append(make_mix(work / "big", args.rows)), warmup=0,
                                 repeats=1)["median_s"])
    big = mixes[0]
    note("file_mib", sum(f.stat().st_size for f in (work / "big").glob("*.jsonl")) / 2**20)
    small = make_mix(work / "small", args.eager_rows, seed=1)
    empty = make_mix(work / "empty", 100, seed=2)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)

    old = source_at(OLD, work)  # the package before the lazy scan, to time the old eager scan
    note("eager_scan", eager_scan_rate(model, small, old))
    note("eager_first_step_small", run_training(train_options(model, small, work / "o"), work, "eager", src=old))
    note("eager_first_step_small_ddp2",
         run_training(train_options(model, small, work / "o"), work, "eager-ddp", 2, src=old))
    note("check", check_rate(model, small))
    note("lazy_empty", run_training(train_options(model, empty, work / "o"), work, "lazy-empty"))
    note("lazy", run_training(train_options(model, big, work / "o"), work, "lazy"))
    grouped = dict(group_by_length=True, lengths_cache_dir=str(cache))
    first = []
    wall = time_call(lambda: first.append(run_training(train_options(model, big, work / "o", **grouped), work,
                                                       "lengths-first")), warmup=0, repeats=1)["median_s"]
    note("lengths_first", first[0])
    note("lengths_first_wall_s", wall)
    note("lengths_second", run_training(train_options(model, big, work / "o", **grouped), work, "lengths-second"))
    if "ddp" not in skip:
        note("lazy_empty_ddp2", run_training(train_options(model, empty, work / "o"), work, "lazy-empty-ddp", 2))
        note("lazy_ddp2", run_training(train_options(model, big, work / "o"), work, "lazy-ddp", 2))
        shutil.rmtree(cache, ignore_errors=True)
        note("lengths_first_ddp2", run_training(train_options(model, big, work / "o", **grouped), work,
                                                "lengths-first-ddp", 2))
        note("lengths_second_ddp2", run_training(train_options(model, big, work / "o", **grouped), work,
                                                 "lengths-second-ddp", 2))
    if "loader" not in skip:
        note("loader", [loader_rate(model, big, workers) for workers in (0, 2)])
    if "padding" not in skip:
        note("padding", padding_cost(model, big, cache))
    table = report(results)
    write_text(args.out.with_suffix(".md"), table + "\n")
    print(table)
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} (.md, .png)")


def _first(runs: list[dict]) -> float:
    return max(r["first_step_s"] for r in runs)


def _rss(runs: list[dict]) -> float:
    """Peak RSS per rank when training begins (data read, model loaded; the batches' memory comes after)."""
    return max(r["rss_train_begin_mib"] for r in runs)


def rows_of(results: dict) -> list[tuple[str, str, float, float | None, str]]:
    """(path, processes, seconds to the first step, peak RSS per rank, note) for N rows."""
    n, small = results["rows"], results["eager_rows"]
    out = []
    for processes, suffix in (("1", ""), ("2 (DDP)", "_ddp2")):
        if f"lazy{suffix}" not in results:
            continue
        eager = results.get(f"eager_first_step_small{suffix}")
        if eager:
            rate = results["eager_scan"]["rows_per_s"]
            out.append(("old eager scan", processes, _first(eager) + (n - small) / rate, None,
                        f"extrapolated from {small:,} rows at {rate:,.0f} rows/s"))
        empty = results[f"lazy_empty{suffix}"]
        lazy = results[f"lazy{suffix}"]
        out.append(("lazy (default)", processes, _first(lazy), _rss(lazy),
                    f"RSS +{_rss(lazy) - _rss(empty):.0f} MiB over 100 rows"))
        first, second = results[f"lengths_first{suffix}"], results[f"lengths_second{suffix}"]
        origins = sorted({o for r in first for o in (r["lengths_origin"] or [])})
        build = _first(first) - _first(lazy)
        out.append(("group_by_length, 1st run", processes, _first(first), _rss(first),
                    f"builds exact lengths: ~{n / build:,.0f} rows/s; ranks: {', '.join(origins)}"))
        origins = sorted({o for r in second for o in (r["lengths_origin"] or [])})
        out.append(("group_by_length, 2nd run", processes, _first(second), _rss(second),
                    f"lengths from: {', '.join(origins)}"))
    return out


def report(results: dict) -> str:
    n = results["rows"]
    lines = [f"Time to the first optimizer step, {n:,}-row InternVL mix ({results['cores']} cores)", "",
             "| path | processes | seconds to step 1 | peak RSS / rank at train begin (MiB) | note |",
             "|---|---|---|---|---|"]
    for path, processes, seconds, rss, note in rows_of(results):
        lines.append(f"| {path} | {processes} | {seconds:,.1f} | {'' if rss is None else f'{rss:,.0f}'} | {note} |")
    lines += ["", "| rows/s | |", "|---|---|",
              f"| old eager scan (1 process) | {results['eager_scan']['rows_per_s']:,.0f} |",
              f"| full check, `internvlx data check` (all cores) | {results['check']['rows_per_s']:,.0f} |"]
    if "loader" in results:
        lines += ["", "| DataLoader workers | samples/s | tiles/s |", "|---|---|---|"]
        lines += [f"| {r['workers']} | {r['samples_per_s']:.1f} | {r['tiles_per_s']:.1f} |" for r in results["loader"]]
    if "padding" in results:
        lines += ["", "| lengths | padded tokens per real token (batch 8, length-grouped) |", "|---|---|"]
        lines += [f"| {mode} | {v['padding_per_real_token']:.3f} |" for mode, v in results["padding"].items()]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    from internvlx_hf.bench.harness import figure

    rows = rows_of(results)
    labels = [f"{p}\n{'1 process' if procs == '1' else '2 DDP processes'}" for p, procs, *_ in rows]
    seconds = [s for _, _, s, *_ in rows]
    colours = ["#bbbbbb" if p.startswith("old") else "#4477aa" for p, *_ in rows]
    with figure(path, figsize=(9, 0.55 * len(rows) + 1.2), dpi=120) as (fig, ax):
        ax.barh(range(len(rows)), seconds, color=colours)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(right=max(seconds) * 2.2)
        ax.axvline(60, color="#cc3311", linestyle="--", linewidth=1)
        ax.text(60, len(rows) - 0.6, " 60 s target", color="#cc3311", fontsize=8, va="bottom")
        for y, value in enumerate(seconds):
            ax.text(value, y, f" {value:,.0f} s", va="center", fontsize=8)
        ax.set_xlabel("seconds from `internvlx train` to the first optimizer step (log scale; grey: extrapolated)")
        ax.set_title(f"{results['rows']:,}-row InternVL mix, {results['cores']} CPU cores")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        main()
