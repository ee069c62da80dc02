"""LVTC on vLLM in a conversation: prefix caching and chunked prefill as vLLM sets them (its defaults), the LVTC
checkpoint on the saving path against plain-1024 of the same weights (`bench_vllm_lvtc_savings.py`'s savings
model: 448px tiles, a Qwen2 LLM of 8 layers 768 wide, LVTC from layer 6, its HR projector as plain-1024's projector).

Both engines in one child process (`vllm_conversation_engine.py`), timed in rounds on images neither has seen, the
engines in turn (order alternating), each figure a median over rounds with its 95% interval, each LVTC / plain-1024
ratio the median of the rounds' ratios (`internvlx_hf.bench.harness.spread`):

- chat: a 4-turn conversation about one 6-tile image, each engine keeping its own (its answers of 128 tokens, in
  words that tokenize back to the same tokens, resent in the next turn's whole prompt, as a chat client does): the
  seconds to each turn's first token (its prefill, what the prefix cache shortens) for turn 1, turns 2-4 and the
  whole chat; and what the prefix cache served each turn;
- users: 8 people asking different questions about one 6-tile image, the first alone, then 7 at once;
- decode: the p95 of the seconds between tokens of 4 decoding streams while a 6-tile request arrives.

    .venv-vllm/bin/python benchmarks/bench_vllm_lvtc_conversation.py --rounds 5
    .venv/bin/python benchmarks/bench_vllm_lvtc_conversation.py \
        --plot-from benchmarks/results/vllm-lvtc-conversation.json

Writes benchmarks/results/vllm-lvtc-conversation.json (the plot: .png beside it); prints a table.
`bench_vllm_lvtc_savings.py savings` times the same work (`measure`) after its one-request figures, in one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent / "src"))

from internvlx_hf.bench.harness import format_table, spread, write_text  # noqa: E402

#: vLLM's defaults but for what the tiny test machine needs: float32 (CPU), a prompt length for a 6-tile chat, one
#: image per prompt
ENGINE = dict(dtype="float32", max_model_len=8192, limit_mm_per_prompt={"image": 1, "video": 0})
IMAGE = [2240, 448]  # 5 tiles + the thumbnail


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def figures(results: dict, names: list[str]) -> list[dict]:
    """One row per figure: each engine's median (interval) and LVTC's ratio to plain-1024 (interval, noise flag)."""
    def per_round(name: str, key: str):
        return results[name][key]

    measures = {
        "chat turn 1 prefill s": lambda n: [turns[0] for turns in per_round(n, "chat_s")],
        "chat turns 2-4 prefill s": lambda n: [sum(turns[1:]) for turns in per_round(n, "chat_s")],
        "chat whole prefill s": lambda n: [sum(turns) for turns in per_round(n, "chat_s")],
        "users first s": lambda n: per_round(n, "users_first_s"),
        "users other 7 s": lambda n: per_round(n, "users_rest_s"),
        "decode p95 gap s": lambda n: [percentile(gaps, 0.95) for gaps in per_round(n, "decode_gaps_s")],
        "decode max gap s": lambda n: [max(gaps) for gaps in per_round(n, "decode_gaps_s")],
    }
    rows = []
    for figure, measure in measures.items():
        try:
            times = [measure(name) for name in names]
        except (KeyError, ValueError):
            continue
        if not all(times):
            continue
        plain, lvtc = spread(times, reference=0)
        rows.append({"figure": figure, "plain-1024": plain["median_s"],
                     "plain interval": f"{plain['low_s']:.3f}-{plain['high_s']:.3f}",
                     "lvtc": lvtc["median_s"], "lvtc interval": f"{lvtc['low_s']:.3f}-{lvtc['high_s']:.3f}",
                     "ratio": lvtc["ratio"], "ratio interval": f"{lvtc['ratio_low']:.3f}-{lvtc['ratio_high']:.3f}",
                     "within noise": lvtc["within_noise"], "rounds": lvtc["rounds"]})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from internvlx_hf.bench.harness import figure

    shown = [row for row in rows if row["figure"] != "decode max gap s"]
    with figure(path, figsize=(7.5, 3.8)) as (fig, ax):
        ratios = [row["ratio"] for row in shown]
        low = [row["ratio"] - float(row["ratio interval"].split("-")[0]) for row in shown]
        high = [float(row["ratio interval"].split("-")[1]) - row["ratio"] for row in shown]
        ax.barh([row["figure"] for row in shown], ratios, xerr=[low, high], color="tab:blue", capsize=3)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("LVTC (saving path) / plain-1024, median of per-round ratios (95% interval)")
        ax.set_title("LVTC on vLLM in a conversation, vLLM's defaults (CPU)")
        ax.invert_yaxis()


def measure(folders: dict, rounds: int, work: list[str], answer_tokens: int, root: Path) -> dict:
    """Time `work` (chat, users, decode) on plain-1024 and LVTC (`folders` of `vllm_lvtc_checkpoints`'s
    `savings_checkpoints`) in one child process; the results file's contents (rows, engines, cache hits, raw times).
    `bench_vllm_lvtc_savings.py savings` calls it too, so that one run records both benchmarks' figures."""
    import vllm

    chosen = {"chat": {"turns": 4, "answer_tokens": answer_tokens}, "users": {"users": 8, "max_tokens": 16},
              "decode": {}}
    chosen = {key: value for key, value in chosen.items() if key in work}
    engines = [{"name": "plain-1024", "checkpoint": str(folders["plain-1024"]), "options": ENGINE},
               {"name": "lvtc", "checkpoint": str(folders["lvtc"]), "options": ENGINE}]
    spec = {"engines": engines, "rounds": rounds, "image": IMAGE, "work": chosen}
    (root / "conversation-spec.json").write_text(json.dumps(spec))
    child = subprocess.Popen([sys.executable, str(HERE / "vllm_conversation_engine.py"),
                              str(root / "conversation-spec.json"), str(root / "conversation-out.json")], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = []
    for line in child.stdout:
        log.append(line)
        if line.startswith("[engine]") or "InternVL-X" in line or line.startswith("  - "):
            print(line, end="", flush=True)
    if child.wait() != 0:
        raise SystemExit("engine process failed; its last output:\n" + "".join(log[-60:]))
    results = json.loads((root / "conversation-out.json").read_text())
    names = ["plain-1024", "lvtc"]
    rows = figures(results, names)
    for name in names:
        turns = results[name]["chat_cached"]
        if turns:
            print(f"{name}: prefix-cache tokens per chat turn, each round: {turns}; engine {results[name]['engine']}")
    return {"experiment": "LVTC (saving path) against plain-1024 of the same weights in a conversation, vLLM's "
                          "defaults (prefix caching and chunked prefill on), one run, engines interleaved",
            "date": datetime.date.today().isoformat(), "vllm": vllm.__version__,
            "image": IMAGE, "work": chosen, "engine_options": ENGINE, "rows": rows,
            "engines": {name: results[name]["engine"] for name in names},
            "cached_tokens": {name: {"chat": results[name]["chat_cached"], "users": results[name]["users_cached"]}
                              for name in names},
            "chat_prompt_tokens": {name: results[name]["chat_prompt_tokens"] for name in names},
            "raw": {name: {key: value for key, value in results[name].items() if key.endswith("_s")}
                    for name in names}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", default="chat,users,decode", help="which of chat, users, decode to time")
    parser.add_argument("--size", default="wide", help="the LLM width (vllm_lvtc_checkpoints.SIZES)")
    parser.add_argument("--answer-tokens", type=int, default=128, help="chat: tokens of each answer")
    parser.add_argument("--out", default="vllm-lvtc-conversation")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--plot-from", metavar="JSON", help="only draw the plot of a results file (in an environment "
                        "with matplotlib, e.g. the main one; vLLM's has none)")
    args = parser.parse_args(argv)
    if args.plot_from:
        path = Path(args.plot_from)
        plot(json.loads(path.read_text())["rows"], path.with_suffix(".png"))
        print(f"written: {path.with_suffix('.png')}")
        return
    sys.path.insert(0, str(HERE))
    from vllm_lvtc_checkpoints import SIZES, savings_checkpoints

    with tempfile.TemporaryDirectory() as tmp:
        folders = savings_checkpoints(Path(tmp), SIZES[args.size])
        out = measure(folders, args.rounds, args.work.split(","), args.answer_tokens, Path(tmp))
    out["model"] = args.size
    write_text(RESULTS / f"{args.out}.json", json.dumps(out, indent=1) + "\n")
    print(format_table(out["rows"]))
    print(f"written: benchmarks/results/{args.out}.json")
    if args.plot:
        try:
            plot(out["rows"], RESULTS / f"{args.out}.png")
            print(f"written: benchmarks/results/{args.out}.png")
        except ImportError:
            print(f"no matplotlib here: .venv/bin/python {Path(__file__).relative_to(HERE.parent)} --plot-from "
                  f"benchmarks/results/{args.out}.json")


if __name__ == "__main__":
    main()
