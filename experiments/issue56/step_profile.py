"""Issue 56 step 5 probe: where a batch of one-tile requests spends its time on vLLM, plain-1024 against LVTC's saving
path (the savings bench's mid-size checkpoints, vLLM's defaults, the engine core in this process so that cProfile sees
the model runner). Prints, per engine: the batch's time with `max_tokens=1` and with `--tokens`, the decode time per
step derived from the two, and cProfile's cumulative time of the runner's `execute_model` and of the ViT (vLLM's
`intern_vit.py`) over one profiled batch; for the saving path also its short builders, KV writes and scheduler.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv-vllm/bin/python experiments/issue56/step_profile.py --concurrency 16
"""

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

import torch  # noqa: E402

import bench_vllm_lvtc_savings as bench  # noqa: E402
import vllm_lvtc_savings_engine as engine  # noqa: E402
from vllm_helpers import request_spec  # noqa: E402


def cumulative(stats: pstats.Stats, file_suffix: str, function: str) -> float:
    """The cumulative time of the outermost `function` of a file (the largest: the others run inside it)."""
    return max((row[3] for (file, _, name), row in stats.stats.items()
                if file.endswith(file_suffix) and name == function), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folders = bench.savings_checkpoints(Path(tmp), bench.SIZES["mid"])  # the size of the recorded profile
        llms = {name: engine.start({"name": name, "checkpoint": str(folders[key]), "engine": bench.SAVINGS_ENGINE})[0]
                for name, key in (("plain-1024", "plain-1024"), ("lvtc-saving", "lvtc"))}

        load = [request_spec("<image>\nWhat is in the picture?", images=[(448, 448, 100 + i)])
                for i in range(args.concurrency)]

        def batch(salt: int) -> list:  # images new to the engines in every call (the bench's `fresh`)
            return [engine._inputs(engine.fresh(request, salt)) for request in load]

        salt = 0
        times = {name: {"prefill": [], "full": []} for name in llms}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name, llm in llms.items():
                for kind, tokens in (("prefill", 1), ("full", args.tokens)):
                    salt += 1
                    seconds = engine.timed(llm, batch(salt), tokens)[0]
                    if round_:
                        times[name][kind].append(seconds)
        for name, llm in llms.items():
            prefill, full = (statistics.median(times[name][k]) for k in ("prefill", "full"))
            salt += 1
            profile = cProfile.Profile()
            profile.enable()
            profiled = engine.timed(llm, batch(salt), args.tokens)[0]
            profile.disable()
            stats = pstats.Stats(profile)
            decode_ms = (full - prefill) / (args.tokens - 1) * 1e3
            print(f"{name}: {args.concurrency} requests, max_tokens=1 {prefill:.3f} s, max_tokens={args.tokens} "
                  f"{full:.3f} s ({args.concurrency / full:.3f} req/s), decode {decode_ms:.1f} ms per step; profiled "
                  f"batch of {profiled:.2f} s: the runner's execute_model "
                  f"{cumulative(stats, 'gpu_model_runner.py', 'execute_model'):.2f} s, of which the ViT "
                  f"{cumulative(stats, 'intern_vit.py', 'forward'):.2f}"
                  " s", flush=True)
            if name == "lvtc-saving":  # the saving path's own Python work around the compiled layers
                steps = max(row[0] for (file, _, function), row in stats.stats.items()
                            if file.endswith("gpu_model_runner.py") and function == "execute_model")
                own = {f: cumulative(stats, "vllm/saving.py", f) for f in ("build", "do_kv_cache_update", "schedule")}
                print(f"{name}: {steps} steps; the short builders {own['build']:.3f} s, the short KV writes "
                      f"{own['do_kv_cache_update']:.3f} s, the scheduler's override {own['schedule']:.3f} s (with "
                      "vLLM's schedule inside)", flush=True)


if __name__ == "__main__":
    main()
