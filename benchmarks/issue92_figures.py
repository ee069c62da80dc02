"""Issue 92's CPU figures (LVTC's saving path against plain-1024 on vLLM, before and after the review's fixes),
recomputed from what `bench_vllm_lvtc_savings.py savings` printed in each run (kept verbatim under "printed" in
`benchmarks/results/issue92.json`): the figures beside them in that file and the table in
`experiments/vllm-lvtc-gpu-runners/README.md` are this script's, not copies by hand.

    python benchmarks/issue92_figures.py            # the README's table, from the printed lines
    python benchmarks/issue92_figures.py --write    # rewrite the JSON's figures from its printed lines

Each figure is named for what it is: a ratio of medians per request size; requests/s as the benchmark's summary line
gives it (the mean of its rounds' ratios) with the two rounds' ratios, and as its target line computed it (the ratio
of the rounds' summed requests/s); a chat figure's ratio with its 95% interval of the median.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "issue92.json"
ROWS = ("before", "after")


def figures(printed: list[str]) -> dict:
    """The figures of one run's printed lines."""
    kv, prefill, rps, chat, targets = {}, {}, [], {}, {}
    for line in printed:
        if match := re.match(r"\| lvtc-saving \| (\d+) tiles? \| \d+ \| ([\d.]+) \| \d+ \| [\d.]+ \| ([\d.]+) \|$", line):
            kv[match[1]], prefill[match[1]] = float(match[2]), float(match[3])
        elif match := re.match(r"requests/s, LVTC / plain-1024: ([\d.]+) \(rounds \[([\d.]+), ([\d.]+)\]\)", line):
            rps.append({"mean_of_rounds": float(match[1]), "rounds": [float(match[2]), float(match[3])]})
        elif match := re.match(r"(chat [\w -]+?) prefill s +\S+ +\S+ +\S+ +\S+ +([\d.]+) +([\d.]+)-([\d.]+) ", line):
            chat[match[1]] = {"ratio": float(match[2]), "interval_95": [float(match[3]), float(match[4])]}
        elif match := re.match(r"target ([\w -]+?): ([\d.]+) ", line):
            targets[match[1]] = float(match[2])
    if len(rps) != 2 or len(kv) != 3 or len(chat) != 3:
        raise ValueError(f"the printed lines hold {len(kv)} sizes, {len(rps)} requests/s lines and {len(chat)} chat "
                         "rows; expected 3, 2 and 3")
    return {"kv_blocks_ratio": kv, "prefill_ratio": prefill,
            "requests_per_s_ratio": {"4": rps[0], "16": rps[1]},
            "requests_per_s_ratio_target_line": targets.get("requests_per_s_ratio"), "chat": chat}


def table(runs: dict) -> str:
    """The README's table, the before and after runs side by side."""
    def sizes(run, key):
        return " / ".join(f"{run[key][n]:.3f}" for n in ("1", "3", "6"))

    def rate(run, at):
        value = run["requests_per_s_ratio"][at]
        low, high = sorted(value["rounds"])
        return f"{value['mean_of_rounds']:.3f} (rounds {low:.3f}, {high:.3f})"

    def chat(run, name):
        value = run["chat"][name]
        return f"{value['ratio']:.3f} ({value['interval_95'][0]:.3f}-{value['interval_95'][1]:.3f})"

    before, after = (figures(runs[name]["printed"]) for name in ROWS)
    lines = ["| figure (LVTC saving / plain-1024) | before (ba13343) | after |", "|---|---|---|",
             f"| KV per request, 1 / 3 / 6 tiles | {sizes(before, 'kv_blocks_ratio')} | "
             f"{sizes(after, 'kv_blocks_ratio')} |",
             f"| prefill, 1 / 3 / 6 tiles | {sizes(before, 'prefill_ratio')} | {sizes(after, 'prefill_ratio')} |"]
    for at in ("4", "16"):
        lines.append(f"| requests/s at {at} (mean of 2 rounds' ratios) | {rate(before, at)} | {rate(after, at)} |")
    for name, label in (("chat turns 2-4", "chat turns 2-4 prefill"), ("chat whole", "whole chat prefill")):
        lines.append(f"| {label} (95% interval of the median) | {chat(before, name)} | {chat(after, name)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--write", action="store_true", help="rewrite the JSON's figures from its printed lines")
    args = parser.parse_args()
    data = json.loads(RESULTS.read_text())
    if args.write:
        for run in data["runs"].values():
            for key in ("kv_blocks_ratio", "prefill_ratio", "requests_per_s_ratio", "requests_per_s_ratio_target_line",
                        "chat"):
                run.pop(key, None)
            run["figures"] = figures(run["printed"])
        RESULTS.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(table(data["runs"]))


if __name__ == "__main__":
    main()
