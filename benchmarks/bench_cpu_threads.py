"""CPU fine-tuning: torch's thread count on a busy machine, and the tokens the chat template's default system message
adds (issue 51, "Also found"; docs/fine-tuning-scale.md, "On a CPU").

Threads. The same `internvlx train` run (the shipped demo model, ``--steps`` steps of ``--batch`` rows of the synthetic
visual QA, then ``--eval-questions`` held-out questions scored by generation, `--eval_data`), each a process of its
own, round-robin over ``--rounds`` rounds so that a drifting machine load hits every setting alike:

  1 thread     ``--threads 1``
  N threads    ``--threads N``, N = the cores this process may use: torch's own default (one per core)
  default      no flag and no OMP_NUM_THREADS: what `internvlx train` chooses (`cpu_threads`: torch's count lowered
               to the cores free at the start, from the 1-minute load average)

Per run: seconds per training step (the Trainer's ``train_runtime`` / steps), seconds per held-out question
(generation), the threads the run used and the load average at its start. Nothing else is controlled: the machine's
other jobs are whatever they are (the load average says how busy it was); ratios within a round compare settings.

System message. A training row without a system turn is rendered with the chat template's default system message
(InternVL2's, about 150 tokens with the demo tokenizer); ``{"from": "system", "value": ""}`` renders an empty one.
Tokens per row of both, and the seconds per step of each (``--threads 1``, the same rows otherwise).

    python benchmarks/bench_cpu_threads.py --json benchmarks/results/cpu-training.json \\
        --markdown benchmarks/results/cpu-training.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from internvlx_hf.bench.harness import Progress, environment, write_results, write_text  # noqa: E402


def make_data(folder: Path, n_train: int, n_test: int) -> dict[str, Path]:
    from internvlx_hf.training import generate_dataset

    return {
        "default system": generate_dataset(folder / "train-default-system", n=n_train, seed=0, system_message=None),
        "empty system": generate_dataset(folder / "train-empty-system", n=n_train, seed=0, system_message=""),
        "test": generate_dataset(folder / "test", n=n_test, seed=1, system_message=""),
    }


def run_train(args, data: Path, test: Path | None, threads: int | None, out: Path) -> dict:
    """One `internvlx train` process; its step time, eval time per question, threads and the load at its start."""
    from internvlx_hf.demo import DEMO_MODEL_DIR

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    command = [sys.executable, "-m", "internvlx_hf", "train", "--model", str(DEMO_MODEL_DIR), "--data", str(data),
               "--output_dir", str(out), "--overwrite_output_dir", "--preset", "stage2",
               "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch),
               "--learning_rate", "1e-4", "--seed", "0", "--logging_steps", str(args.steps),
               "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"]
    if test is not None:
        command += ["--eval_data", str(test), "--eval_max_new_tokens", "8"]
    if threads is not None:
        command += ["--threads", str(threads)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=str(out.parent))
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"internvlx train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    used = next((line for line in proc.stdout.splitlines() if line.startswith("CPU threads: ")), "")
    state = json.loads((out / "trainer_state.json").read_text())
    train = next(e for e in state["log_history"] if "train_runtime" in e)
    evals = [v for e in state["log_history"] for k, v in e.items() if k.endswith("_seconds_per_sample")]
    return {"threads_flag": threads, "threads_used": int(used.split()[2]) if used else None, "reason": used,
            "load_at_start": round(load, 2), "s_per_step": train["train_runtime"] / args.steps,
            "eval_s_per_question": evals[-1] if evals else None, "process_s": round(wall, 1)}


def system_tokens(data: dict[str, Path]) -> dict:
    """Tokens per training row (image tokens included) with the template's default system message and with an empty
    system turn, as the collator encodes them."""
    from internvlx_hf import InternVLXProcessor
    from internvlx_hf.demo import DEMO_MODEL_DIR
    from internvlx_hf.training import InternVLXDataset

    processor = InternVLXProcessor.from_pretrained(DEMO_MODEL_DIR)
    out = {}
    for name in ("default system", "empty system"):
        dataset = InternVLXDataset(str(data[name]), processor, progress=False, lengths="exact", cache_dir=False)
        lengths = dataset.lengths
        out[name] = {"tokens_per_row": statistics.mean(lengths), "image_tokens_per_row":
                     processor.image_seq_length}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--eval-questions", type=int, default=20)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-cpu-threads-"))
    data = make_data(work / "data", n_train=args.steps * args.batch, n_test=args.eval_questions)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = {"1 thread": 1, f"{cores} threads": cores, "default": None}
    runs = []
    progress = Progress(args.rounds * (len(settings) + 2), "cpu threads")
    for round_ in range(args.rounds):
        for name, threads in settings.items():
            row = run_train(args, data["default system"], data["test"], threads, work / f"out-{round_}")
            runs.append({"round": round_, "setting": name, **row})
            progress.step(f"round {round_}, {name}: {row['s_per_step']:.3f} s per step")
        for name in ("default system", "empty system"):
            row = run_train(args, data[name], None, 1, work / f"out-{round_}")
            runs.append({"round": round_, "setting": f"{name}, 1 thread", **row})
            progress.step(f"round {round_}, {name}: {row['s_per_step']:.3f} s per step")
    tokens = system_tokens(data)
    summary = {}
    for name in list(settings) + ["default system, 1 thread", "empty system, 1 thread"]:
        rows = [r for r in runs if r["setting"] == name]
        summary[name] = {"s_per_step": statistics.median(r["s_per_step"] for r in rows),
                         "eval_s_per_question": statistics.median(r["eval_s_per_question"] for r in rows)
                         if rows[0]["eval_s_per_question"] is not None else None,
                         "threads_used": sorted({r["threads_used"] for r in rows}),
                         "load_at_start": [r["load_at_start"] for r in rows]}
    one = summary["1 thread"]
    for entry in summary.values():
        entry["step_vs_1_thread"] = entry["s_per_step"] / one["s_per_step"]
    result = {"runs": runs, "summary": summary, "system_tokens": tokens,
              "settings": {"steps": args.steps, "batch": args.batch, "rounds": args.rounds,
                           "eval_questions": args.eval_questions, "cores": cores,
                           "machine": f"{os.cpu_count()} cores",
                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
              "environment": environment("cpu")}
    lines = [f"## Threads: the demo model, {args.steps} steps of {args.batch} rows, {args.eval_questions} held-out "
             f"questions (median of {args.rounds} rounds)", "",
             "| setting | threads used | s per step | vs 1 thread | eval s per question | load average at the starts |",
             "|---|---|---|---|---|---|"]
    for name, entry in summary.items():
        if "system" in name:
            continue
        lines.append(f"| {name} | {', '.join(map(str, entry['threads_used']))} | {entry['s_per_step']:.3f} | "
                     f"{entry['step_vs_1_thread']:.2f}x | {entry['eval_s_per_question']:.4f} | "
                     f"{', '.join(f'{x:.1f}' for x in entry['load_at_start'])} |")
    default, empty = summary["default system, 1 thread"], summary["empty system, 1 thread"]
    lines += ["", "## The chat template's default system message (1 thread)", "",
              "| rows | tokens per row (image tokens included) | s per step |", "|---|---|---|",
              f"| no system turn (the template's default message) | {tokens['default system']['tokens_per_row']:.0f} | "
              f"{default['s_per_step']:.3f} |",
              f"| an empty system turn | {tokens['empty system']['tokens_per_row']:.0f} | {empty['s_per_step']:.3f} |",
              "", f"Step time with the default message / with an empty one: "
              f"{default['s_per_step'] / empty['s_per_step']:.2f}x"]
    text = "\n".join(lines)
    print(text)
    if args.json:
        write_results(args.json, result)
    if args.markdown:
        command = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
        write_text(args.markdown, "# CPU fine-tuning: threads and the system message "
                   f"({result['settings']['date'][:10]})\n\nCommand: `python benchmarks/bench_cpu_threads.py "
                   f"{command}`\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
