"""CI's times and counts, read from what `.ci/run` printed: its `[ci step] NAME: N s` lines and each pytest run's
summary line. The figures in docs/testing.md's CI table are this script's, from the logs kept in
`benchmarks/results/ci/` (one per run: its `[ci step]` lines and pytest summaries, `--keep`).

    python scripts/ci_times.py --keep FULL.log LABEL   # keep a run's step and summary lines as LABEL.log
    python scripts/ci_times.py                 # the table, from every kept log
    python scripts/ci_times.py --write         # the same, written into docs/testing.md between its markers

A run's total is the sum of the foreground's steps (the main environment, the oldest transformers' tests, the DeepSpeed
tests, the foreground's vLLM tests and the wait for the background), which is `.ci/run`'s wall time.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "benchmarks" / "results" / "ci"
GUIDE = ROOT / "docs" / "testing.md"
BEGIN, END = "<!-- ci-times -->", "<!-- /ci-times -->"

#: column -> the starts of its `[ci step]` names (the foreground's vLLM step ran vLLM's compile path test beside the
#: OpenAI servers' module until e8005d2, which the background runs since)
STEPS = {
    "main env": ("main environment",),
    "oldest": ("oldest transformers",),
    "DeepSpeed": ("DeepSpeed tests",),
    "vLLM in the foreground": ("vLLM's compile path", "the OpenAI servers' module"),
    "waiting": ("waiting for the vLLM tests",),
    "vLLM env": ("vLLM environment",),
    "vLLM tests": ("vLLM tests",),
    "families": ("vLLM families",),
}
FOREGROUND = ("main env", "oldest", "DeepSpeed", "vLLM in the foreground", "waiting")


def read_log(path: Path) -> dict:
    """The steps' seconds, the pytest runs' counts and whether the run passed, from one `.ci/run` log."""
    text = path.read_text(encoding="utf-8", errors="replace")
    steps = {}
    for name, seconds in re.findall(r"^\[ci step\] (.+?): (\d+) s$", text, re.M):
        column = next((column for column, starts in STEPS.items() if name.startswith(starts)), None)
        if column is not None:
            steps[column] = int(seconds)
    counts = []
    for line in re.findall(r"^=*\s*(\d+ (?:passed|failed).*? in [\d.]+s.*?)\s*=*$", text, re.M):
        passed = re.search(r"(\d+) passed", line)
        failed = re.search(r"(\d+) failed", line)
        counts.append({"passed": int(passed[1]) if passed else 0, "failed": int(failed[1]) if failed else 0})
    missing = [column for column in STEPS if column not in steps]
    if missing:
        raise ValueError(f"{path}: no [ci step] line for {missing}; is it a whole log of .ci/run?")
    return {"label": path.stem, "steps": steps, "total": sum(steps[column] for column in FOREGROUND),
            "passed": sum(c["passed"] for c in counts), "failed": sum(c["failed"] for c in counts)}


def table(runs: list[dict]) -> str:
    columns = list(STEPS)
    lines = ["| run (log in benchmarks/results/ci/) | total | " + " | ".join(columns) + " | passed | failed |",
             "|---" * (len(columns) + 4) + "|"]
    for run in runs:
        lines.append(f"| {run['label']} | {run['total']:,} | " + " | ".join(f"{run['steps'][c]:,}" for c in columns)
                     + f" | {run['passed']:,} | {run['failed']} |")
    return "\n".join(lines)


def runs() -> list[dict]:
    return [read_log(path) for path in sorted(LOGS.glob("*.log"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--write", action="store_true", help="write the table into docs/testing.md")
    parser.add_argument("--keep", nargs=2, metavar=("FULL_LOG", "LABEL"),
                        help="keep FULL_LOG's [ci step] lines and pytest summaries as benchmarks/results/ci/LABEL.log")
    args = parser.parse_args()
    if args.keep:
        full, label = args.keep
        kept = [line for line in Path(full).read_text(encoding="utf-8", errors="replace").splitlines()
                if line.startswith("[ci step]") or re.match(r"^=*\s*\d+ (passed|failed).* in [\d.]+s", line)]
        LOGS.mkdir(parents=True, exist_ok=True)
        (LOGS / f"{label}.log").write_text("\n".join(kept) + "\n", encoding="utf-8")
    rendered = table(runs())
    if args.write:
        guide = GUIDE.read_text(encoding="utf-8")
        start, end = guide.index(BEGIN) + len(BEGIN), guide.index(END)
        GUIDE.write_text(guide[:start] + "\n" + rendered + "\n" + guide[end:], encoding="utf-8")
    print(rendered)


if __name__ == "__main__":
    main()
