"""Users asking about one new image at once, on the savings model (448px tiles: 256 -> 1024 per tile, a Qwen2 LLM of
8 layers 768 wide, LVTC from layer 6): do the requests that share the image's step answer as they do with prefix
caching off?

Per block size, two engines (prefix caching on, off), each answering the same rounds: 4 requests per round (3 the same
question, 1 another) about a new 1-tile image, sent together in one `LLM.generate` call. Reports per block size and
round the largest |difference| of the top-5 logprobs of each step between the two engines, whether the greedy tokens
agree, the tokens each request was served from the cache, and the admissions the scheduler put off a step.

    .venv-vllm/bin/python experiments/vllm-lvtc-concurrency/same_step.py --rounds 10 --out same-step
    # the plugin of another commit (a checkout of it: `git worktree add /tmp/old 3781ac5`):
    .venv-vllm/bin/python experiments/vllm-lvtc-concurrency/same_step.py --plugin /tmp/old/src --out same-step-3781ac5

Writes benchmarks/results/vllm-lvtc-<OUT>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
QUESTIONS = ("What is in the picture?",) * 3 + ("Which colours are in it?",)
TOP = 5


def child(spec_path: str, out_path: str) -> None:
    """One engine answering the rounds (run in a process of its own, the engine core in it)."""
    from vllm import LLM, SamplingParams

    sys.path.insert(0, str(ROOT / "tests"))
    from vllm_engine import _inputs
    from vllm_helpers import request_spec

    spec = json.loads(Path(spec_path).read_text())
    llm = LLM(spec["checkpoint"], **spec["engine"])
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=TOP, ignore_eos=True)
    rounds = []
    for number in range(spec["rounds"]):
        requests = [request_spec(f"<image>\n{question}", images=[(448, 448, 500 + number)]) for question in QUESTIONS]
        outputs = llm.generate([_inputs(request) for request in requests], params, use_tqdm=False)
        rounds.append([{"cached": out.num_cached_tokens, "tokens": list(out.outputs[0].token_ids),
                        "top": [sorted((e.logprob for e in step.values() if e.rank <= TOP), reverse=True)
                                for step in out.outputs[0].logprobs]} for out in outputs])
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    Path(out_path).write_text(json.dumps({"rounds": rounds, "deferrals": getattr(scheduler, "deferrals", None)}))


def run_engine(folder: Path, engine: dict, rounds: int, plugin: str | None, work: Path) -> dict:
    spec, out = work / "spec.json", work / "out.json"
    spec.write_text(json.dumps({"checkpoint": str(folder), "engine": engine, "rounds": rounds}))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "4",
           "VLLM_CPU_CI_ENV": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if plugin:
        env["PYTHONPATH"] = plugin + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, __file__, "--child", str(spec), str(out)], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise SystemExit(f"engine failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return json.loads(out.read_text())


def compare(on: dict, off: dict) -> list[dict]:
    rows = []
    for number, (ours, theirs) in enumerate(zip(on["rounds"], off["rounds"])):
        gaps = [abs(a - b) for got, want in zip(ours, theirs) for s, t in zip(got["top"], want["top"])
                for a, b in zip(s, t)]
        rows.append({"round": number + 1, "max |dlogprob|": max(gaps),
                     "greedy tokens equal": all(a["tokens"] == b["tokens"] for a, b in zip(ours, theirs)),
                     "cached tokens": [answer["cached"] for answer in ours]})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--blocks", default="32,64,128", help="block sizes, comma-separated")
    parser.add_argument("--plugin", help="a folder put first on the engines' PYTHONPATH (another commit's src/)")
    parser.add_argument("--out", default="same-step")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    spec = importlib.util.spec_from_file_location("bench_savings", ROOT / "benchmarks" / "bench_vllm_lvtc_savings.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from internvlx_hf.bench.harness import format_table

    started = datetime.datetime.now(datetime.timezone.utc)
    result = {"experiment": __doc__.split("\n\n")[0], "plugin": args.plugin or "this checkout",
              "started": started.isoformat(timespec="seconds"), "rounds": args.rounds, "blocks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = bench.savings_checkpoints(Path(tmp), bench.SIZES["wide"])["lvtc"]
        for block in map(int, args.blocks.split(",")):
            engines = {}
            for caching in (True, False):
                work = Path(tmp) / f"{block}-{caching}"
                work.mkdir()
                engine = dict(bench.SAVINGS_ENGINE, block_size=block, enable_prefix_caching=caching,
                              enforce_eager=True)
                engines[caching] = run_engine(folder, engine, args.rounds, args.plugin, work)
                print(f"[engine] block {block}, prefix caching {'on' if caching else 'off'}: done", flush=True)
            rows = compare(engines[True], engines[False])
            result["blocks"][block] = {"rows": rows, "deferrals": engines[True]["deferrals"],
                                       "max": max(row["max |dlogprob|"] for row in rows),
                                       "rounds within 1e-4": sum(row["max |dlogprob|"] <= 1e-4 for row in rows)}
            print(f"block size {block} (admissions put off a step: {engines[True]['deferrals']})")
            print(format_table(rows))
    result["ended"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    path = RESULTS / f"vllm-lvtc-{args.out}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"written: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
