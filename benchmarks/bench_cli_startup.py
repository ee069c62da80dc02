"""How long `internvlx` takes to answer `--help` and argument errors, against a command that imports torch.

Each case runs in a fresh interpreter (``python -m internvlx_hf ...``), REPEATS times, from bytecode; the table
shows the median wall time and its ratio to loading the model classes (`from internvlx_hf import
InternVLXForConditionalGeneration`: torch, transformers and the Auto registration, what every command that works on
a model pays first). `--help` and an argument error also run on the package at commit OLD (`git archive`), the last
one that imported everything at `import internvlx_hf`: a before/after in one run, on the same machine and load.

    python benchmarks/bench_cli_startup.py [--repeats 3] [--old 0b9a898] [--out benchmarks/results/cli-startup.json]
    python benchmarks/bench_cli_startup.py --report-only     # rewrite the table from the JSON

Results go to benchmarks/results/cli-startup.json (and .md); docs/benchmarks.md shows them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OLD = "0b9a898"  # the last commit whose `import internvlx_hf` imported torch and transformers

# (label, argv after `python`, expected exit status, also timed on OLD). Before, every `internvlx` run paid the
# import of the classes first, whatever the command; OLD is timed on two of them.
CASES = [
    ("python -c pass (the interpreter alone)", ["-c", "pass"], 0, False),
    ("internvlx --help", ["-m", "internvlx_hf", "--help"], 0, True),
    ("internvlx chat --help", ["-m", "internvlx_hf", "chat", "--help"], 0, False),
    ("internvlx chat (argument error: no MODEL)", ["-m", "internvlx_hf", "chat"], 2, True),
    ("internvlx convert --lvtc SRC DST (argument error)", ["-m", "internvlx_hf", "convert", "--lvtc", "SRC", "DST"],
     2, False),
    ("internvlx train --help (TrainingArguments: imports torch)", ["-m", "internvlx_hf", "train", "--help"], 0,
     False),
    ("load the model classes (what a command that runs pays)",
     ["-c", "from internvlx_hf import InternVLXForConditionalGeneration"], 0, False),
]
REFERENCE = CASES[-1][0]


def _time(argv: list[str], src: Path, expected: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *argv], env=env, cwd=src.parent, capture_output=True, text=True,
                            timeout=600)
    seconds = time.perf_counter() - start
    if result.returncode != expected:
        raise RuntimeError(f"{argv} exited {result.returncode}, expected {expected}: {result.stderr[-2000:]}")
    return seconds


def _old_source(commit: str, folder: Path) -> Path:
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "src"], cwd=REPO, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder / "src"


def measure(repeats: int, old: str) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"now": REPO / "src", f"old ({old})": _old_source(old, Path(tmp))}
        for src in versions.values():  # both versions run from bytecode
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True)
        for label, argv, expected, before_too in CASES:
            for version, src in versions.items() if before_too else [("now", REPO / "src")]:
                times = [_time(argv, src, expected) for _ in range(repeats)]
                rows.append({"case": label, "version": version, "median_s": statistics.median(times),
                             "runs_s": [round(t, 3) for t in times]})
                print(f"{label:60s} {version:14s} {statistics.median(times):7.3f} s", flush=True)
    return {"repeats": repeats, "old": old, "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "rows": rows}


def report(results: dict) -> str:
    reference = next(r["median_s"] for r in results["rows"] if r["case"] == REFERENCE and r["version"] == "now")
    lines = [
        f"`internvlx` start-up: median wall seconds of {results['repeats']} fresh interpreters per case "
        f"(Python {results['python']}, {results['cpus']} shared cores, load average "
        f"{results['load_average'][0]:.1f} at the end); ratio = time / loading the model classes "
        f"now ({reference:.2f} s)",
        "",
        "| case | now (s) | now / model classes | before, " + f"{results['old']} (s) |",
        "|---|---|---|---|",
    ]
    by_case: dict[str, dict[str, float]] = {}
    for row in results["rows"]:
        by_case.setdefault(row["case"], {})[row["version"].split()[0]] = row["median_s"]
    for case, times in by_case.items():
        before = f"{times['old']:.2f}" if "old" in times else ""
        lines.append(f"| {case} | {times['now']:.2f} | {times['now'] / reference:.2f} | {before} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old", default=OLD, help="commit of the eager package (default %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cli-startup.json")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads(args.out.read_text())
    else:
        results = measure(args.repeats, args.old)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    table = report(results)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
