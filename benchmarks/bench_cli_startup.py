"""How long `internvlx` takes to answer `--help` and argument errors, against a command that imports torch.

Each case runs in a fresh interpreter (``python -m internvlx_hf ...``), REPEATS times, from bytecode; the table
shows the median wall time and its ratio to loading the model classes (`from internvlx_hf import
InternVLXForConditionalGeneration`: torch, transformers and the Auto registration, what every command that works on
a model pays first). Some cases also run on the package at an earlier commit (`git archive`): `--help` and an
argument error at OLD, the last one that imported everything at `import internvlx_hf`, and `train --help` and a
train argument error at TRAIN_OLD, the last one that built train's flags from transformers' TrainingArguments
(torch) instead of the shipped train_flags.json: a before/after in one run, on the same machine and load.

    python benchmarks/bench_cli_startup.py [--repeats 3] [--old 0b9a898] [--train-old 9043b13]
        [--out benchmarks/results/cli-startup.json]
    python benchmarks/bench_cli_startup.py --report-only     # rewrite the table from the JSON

Results go to benchmarks/results/cli-startup.json (and .md); docs/benchmarks.md shows them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from internvlx_hf.bench.harness import time_call, write_text

REPO = Path(__file__).resolve().parents[1]
OLD = "0b9a898"  # the last commit whose `import internvlx_hf` imported torch and transformers
TRAIN_OLD = "9043b13"  # the last commit whose `train --help` built its flags from TrainingArguments (torch)

# (label, argv after `python`, expected exit status, earlier commit also timed or None). Before OLD, every
# `internvlx` run paid the import of the classes first, whatever the command; before TRAIN_OLD, `train` did.
CASES = [
    ("python -c pass (the interpreter alone)", ["-c", "pass"], 0, None),
    ("internvlx --help", ["-m", "internvlx_hf", "--help"], 0, "OLD"),
    ("internvlx chat --help", ["-m", "internvlx_hf", "chat", "--help"], 0, None),
    ("internvlx chat (argument error: no MODEL)", ["-m", "internvlx_hf", "chat"], 2, "OLD"),
    ("internvlx convert --lvtc SRC DST (argument error)", ["-m", "internvlx_hf", "convert", "--lvtc", "SRC", "DST"],
     2, None),
    ("internvlx train --help (flags from train_flags.json)", ["-m", "internvlx_hf", "train", "--help"], 0,
     "TRAIN_OLD"),
    ("internvlx train --learning_rate abc (argument error)",
     ["-m", "internvlx_hf", "train", "--learning_rate", "abc"], 2, "TRAIN_OLD"),
    ("load the model classes (what a command that runs pays)",
     ["-c", "from internvlx_hf import InternVLXForConditionalGeneration"], 0, None),
]
REFERENCE = CASES[-1][0]


def source_at(commit: str, work: Path) -> Path:
    """The package as it was at ``commit`` (git archive), extracted once under ``work``."""
    folder = work / f"src-{commit}"
    if not (folder / "src").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder / "src"


def _run(argv: list[str], src: Path, expected: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, *argv], env=env, cwd=src.parent, capture_output=True, text=True,
                            timeout=600)
    if result.returncode != expected:
        raise RuntimeError(f"{argv} exited {result.returncode}, expected {expected}: {result.stderr[-2000:]}")


def measure(repeats: int, commits: dict[str, str]) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"now": REPO / "src"}
        sources.update({commit: source_at(commit, Path(tmp)) for commit in commits.values()})
        for src in sources.values():  # every version runs from bytecode
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True)
        for label, argv, expected, before in CASES:
            for version in ["now"] + ([commits[before]] if before else []):
                timing = time_call(lambda: _run(argv, sources[version], expected), warmup=0, repeats=repeats)
                rows.append({"case": label, "version": version, "median_s": timing["median_s"],
                             "runs_s": [round(t, 3) for t in timing["times_s"]]})
                print(f"{label:60s} {version:8s} {timing['median_s']:7.3f} s", flush=True)
    return {"repeats": repeats, "commits": commits, "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "rows": rows}


def report(results: dict) -> str:
    reference = next(r["median_s"] for r in results["rows"] if r["case"] == REFERENCE and r["version"] == "now")
    lines = [
        f"`internvlx` start-up: median wall seconds of {results['repeats']} fresh interpreters per case "
        f"(Python {results['python']}, {results['cpus']} shared cores, load average "
        f"{results['load_average'][0]:.1f} at the end); ratio = time / loading the model classes "
        f"now ({reference:.2f} s)",
        "",
        "| case | now (s) | now / model classes | before (s) | before / now | at commit |",
        "|---|---|---|---|---|---|",
    ]
    by_case: dict[str, dict[str, float]] = {}
    for row in results["rows"]:
        by_case.setdefault(row["case"], {})[row["version"]] = row["median_s"]
    for case, times in by_case.items():
        now = times.pop("now")
        before = [f"{seconds:.2f} | {seconds / now:.0f}x | {commit}" for commit, seconds in times.items()]
        lines.append(f"| {case} | {now:.2f} | {now / reference:.2f} | {before[0] if before else ' | | '} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old", default=OLD, help="commit of the eager package (default %(default)s)")
    parser.add_argument("--train-old", default=TRAIN_OLD,
                        help="commit whose train built its flags from TrainingArguments (default %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cli-startup.json")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads(args.out.read_text())
    else:
        results = measure(args.repeats, {"OLD": args.old, "TRAIN_OLD": args.train_old})
        write_text(args.out, json.dumps(results, indent=1) + "\n")
    table = report(results)
    write_text(args.out.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
