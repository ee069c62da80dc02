"""Issue 56 step 2: does the compiled prototype's forward read anything back to the host, and does it recompile?

In-process engine (tiny Qwen2 + LVTC k=2 of tests/test_vllm_lvtc_savings.py, compilation on, compile cache off so
the warm-up traces afresh): dynamo's counters after start and after the requests (frames traced, graph breaks,
recompiles), dynamo's settings that turn host reads inside the compiled region into graph breaks (errors under vLLM's
fullgraph compile), what the short builder built per step, and whether the rows it reads are the runner's M-RoPE
buffer (the private dependency). Tokens and logprobs vs transformers.
Run: OMP_NUM_THREADS=1 PYTHONPATH=src:. flock /work/.vllm-lock /work/main/.venv-vllm/bin/python \
     experiments/issue56/host_read_probe.py [OUT.json]"""
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def counters():
    from torch._dynamo.utils import counters as c

    return {key: dict(value) for key, value in c.items() if value}


def main():
    import torch

    spec = importlib.util.spec_from_file_location("bench", str(ROOT / "benchmarks/bench_vllm_lvtc_savings.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from internvlx_hf.vllm import saving

    builds = []
    layout = saving.short_layout

    def recording(rows, cm, short_per_tile, block_size):
        out = layout(rows, cm, short_per_tile, block_size)
        builds.append({"long_tokens": cm.num_actual_tokens, "live_tokens": int(out["gather"].shape[0]),
                       "short_seq_lens": out["seq_lens"].tolist(), "long_seq_lens": cm.seq_lens.tolist()})
        return out

    saving.short_layout = recording
    saving.register()
    folder = bench.build_checkpoint(Path(tempfile.mkdtemp()) / "qwen2-lvtc", **bench.PARITY_MODELS["qwen2-lvtc"][0])
    from vllm import LLM, SamplingParams
    from vllm_engine import _inputs

    options = dict(bench.TINY_ENGINE, enforce_eager=False, hf_overrides={"architectures": [saving.ARCHITECTURE]})
    llm = LLM(str(folder), **options)
    after_start = counters()
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    front = runner.get_model().lvtc
    dynamo = torch._dynamo.config
    settings = {"capture_scalar_outputs": dynamo.capture_scalar_outputs,
                "capture_dynamic_output_shape_ops": dynamo.capture_dynamic_output_shape_ops,
                "compilation_mode": str(runner.vllm_config.compilation_config.mode)}
    buffer_is_runner_rows = front.channel.buffer is not None and \
        front.channel.buffer.data_ptr() == runner.mrope_positions.gpu.data_ptr()
    builds.clear()
    requests = [bench.REQUESTS["12 tiles"], bench.REQUESTS["text"]]
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=1, ignore_eos=True)
    outs = llm.generate([_inputs(r) for r in requests], params, use_tqdm=False)
    after_requests = counters()
    rows = {}
    for request, out in zip(requests, outs):
        prompt_ids, tokens, logprobs = bench.reference(folder, request, max_new_tokens=4)
        got = out.outputs[0]
        diff = max(abs(step[t].logprob - r) for step, t, r in zip(got.logprobs, got.token_ids, logprobs))
        rows[request.get("name", str(len(rows)))] = {"tokens": list(got.token_ids), "transformers": tokens,
                                                     "max_logprob_diff": diff}
    result = {"settings": settings, "buffer_is_runner_mrope_positions": buffer_is_runner_rows,
              "dynamo_counters_after_start": after_start, "dynamo_counters_after_requests": after_requests,
              "builder_steps": builds, "requests": rows}
    print(json.dumps(result, indent=1, default=str))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
