"""Issue 56 step 2: the compiled LVTC-saving prototype (`src/internvlx_hf/vllm/saving.py`) against transformers.

One engine (tiny Qwen2 + LVTC k=2 of tests/test_vllm_lvtc_savings.py, float32, compilation on: no enforce_eager)
answers the "12 tiles" and "text" requests (alone, then together); prints tokens and logprobs vs transformers, the KV
blocks each request held per group, and what the engine log says about compilation. `--parity MODEL`: instead, that
model of bench_vllm_lvtc_savings.py's PARITY_MODELS with all its requests. `--preempt`: issue 52's preemption case
(stress: a KV pool of 19 blocks, 7 image requests at once, 48 tokens; qwen2-lvtc). `--multiprocess` (step 3): the
engine core in a process of its own (vLLM's default; the blocks held are not readable there).
Run: OMP_NUM_THREADS=1 PYTHONPATH=src:. flock /work/.vllm-lock /work/main/.venv-vllm/bin/python \
     experiments/issue56/compiled_probe.py [OUT.json] [--parity MODEL]"""
import importlib.util
import json
import math
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def main():
    spec = importlib.util.spec_from_file_location("bench", str(ROOT / "benchmarks/bench_vllm_lvtc_savings.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from internvlx_hf.vllm.saving import ARCHITECTURE

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    model = sys.argv[sys.argv.index("--parity") + 1] if "--parity" in sys.argv else "qwen2-lvtc"
    args = [a for a in args if a != model]
    names = bench.PARITY_MODELS[model][1] if "--parity" in sys.argv else ["12 tiles", "text"]
    root = Path(tempfile.mkdtemp())
    folder = bench.build_checkpoint(root / model, **bench.PARITY_MODELS[model][0])
    requests = [bench.REQUESTS[name] for name in names]
    engine = dict(bench.TINY_ENGINE, enforce_eager=False, hf_overrides={"architectures": [ARCHITECTURE]})
    max_tokens = 4
    if "--preempt" in sys.argv:  # bench_vllm_lvtc_savings.py stress's first case
        requests = [bench.request_spec(f"Look {i}: <image>\nDescribe.", images=[(1232, 112, 20 + i)])
                    for i in range(6)] + [bench.REQUESTS["two images"]]
        names = [f"look {i}" for i in range(6)] + ["two images"]
        engine.update(num_gpu_blocks_override=19, max_model_len=1024)
        max_tokens = 48
    run = {"engines": [{"name": "compiled", "checkpoint": str(folder), "engine": engine, "requests": requests}],
           "max_tokens": max_tokens}
    multiprocess = "--multiprocess" in sys.argv
    result = bench.run_engines(run, root, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocess else "0"})
    result = result["compiled"]
    groups = result["info"].get("groups")
    log = (root / "engine.log").read_text()
    out = {"model": model, "engine": {k: v for k, v in engine.items() if k != "hf_overrides"},
           "architecture": ARCHITECTURE, "multiprocess": multiprocess, "groups": groups,
           "preemptions": result.get("preemptions"), "startup_s": round(result["info"]["startup_s"]), "requests": {}}
    out["log"] = sorted({line.strip()[-160:] for line in log.splitlines()
                         if re.search(r"compil|Compil|recompil|DYNAMO|graph break|Warming", line)})
    for index, request in enumerate(requests):
        prompt_ids, tokens, logprobs = bench.reference(folder, request, max_new_tokens=max_tokens)
        row = {"transformers_tokens": tokens, "short_prompt_tokens": len(prompt_ids)}
        for mode in ("alone", "together"):
            got = result[mode][index]
            row[mode] = {"tokens": got["tokens"], "tokens_equal": got["tokens"] == tokens,
                         "max_logprob_diff": max(abs(a - b) for a, b in zip(got["logprobs"], logprobs)),
                         "blocks_held": got["blocks_held"], "long_prompt_tokens": got["prompt_tokens"]}
        got = result["alone"][index]
        long_tokens, short_tokens = got["prompt_tokens"] + max_tokens - 1, len(prompt_ids) + max_tokens - 1
        row["blocks_needed"] = [math.ceil((short_tokens if g["spec"] == "LVTCShortSpec" else long_tokens)
                                          / g["block_size"]) for g in groups or []]
        out["requests"][names[index]] = row
    print(json.dumps(out, indent=1))
    if args:
        Path(args[0]).write_text(json.dumps(out, indent=1) + "\n")
    print("engine log:", root / "engine.log")


if __name__ == "__main__":
    main()
