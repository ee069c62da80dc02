"""Issue 56 step 1 engine probe (channel B): can the short builder read the step's M-RoPE rows on the host before
forward, from the runner buffer the model saw on its first (profile) forward?  Also: does vLLM give the short layers (own Attention backend subclass) their own attention
group and metadata builder, and what does that builder receive? Research probe (not a benchmark); runs the issue-52 model eager.
Run: PYTHONPATH=src:. flock /work/.vllm-lock .venv-vllm python experiments/issue56/channel_b_probe.py"""
import json, os, sys, tempfile, time
from pathlib import Path
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks")); sys.path.insert(0, str(ROOT / "tests"))

def main():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench", str(ROOT / "benchmarks/bench_vllm_lvtc_savings.py"))
    bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
    import lvtc_savings_vllm as saving
    from vllm.v1.attention.backend import subclass_attention_backend
    from vllm.v1.attention.selector import get_attn_backend
    log = []

    def short_backend():
        base = get_attn_backend(32, __import__("torch").float32, "auto")
        Builder = base.get_builder_cls()
        class LVTCShortBuilder(Builder):
            def build(self, common_prefix_len, cm, fast_build=False):
                rows = None if seen["buffer"] is None or cm.positions is None else \
                    seen["buffer"][:, :cm.num_actual_tokens].clone()
                if rows is not None:
                    code = rows[2]
                    hr_only = (code < 0) & ((-1 - code) >= self.kv_cache_spec.short_per_tile)
                    live = ~hr_only
                    short_seq = int(rows[1][live].max()) + 1
                    seen.setdefault("builder_rows", []).append(rows)
                else:
                    short_seq = None
                log.append({"short_live_tokens": None if rows is None else int(live.sum()),
                            "short_seq_len": short_seq,"num_reqs": cm.num_reqs, "num_actual_tokens": cm.num_actual_tokens,
                            "query_start_loc_cpu": cm.query_start_loc_cpu.tolist(),
                            "seq_lens": cm.seq_lens.tolist(),
                            "positions_head": None if cm.positions is None else cm.positions[:cm.num_actual_tokens].tolist()[:6],
                            "slot_mapping_head": cm.slot_mapping[:6].tolist(),
                            "block_table_shape": list(cm.block_table_tensor.shape),
                            "req_idx": None if cm.req_idx is None else list(cm.req_idx),
                            "mm_req_doc_ranges": cm.mm_req_doc_ranges})
                return super().build(common_prefix_len, cm, fast_build)
        return subclass_attention_backend(name_prefix="LVTCShort_", attention_backend_cls=base,
                                          builder_cls=LVTCShortBuilder)
    Attention = saving.Attention
    made = {}
    def init(self, *a, **k):
        if "b" not in made:
            made["b"] = short_backend()
        k["attn_backend"] = made["b"]
        Attention.__init__(self, *a, **k)
    saving.LVTCShortAttention.__init__ = init
    seen = {"buffer": None, "forward_rows": []}
    forward = saving.SavingRunner.forward
    def recording_forward(self, positions, inputs_embeds):
        if seen["buffer"] is None:
            seen["buffer"] = positions._base if positions._base is not None else positions
        seen["forward_rows"].append(positions.clone())
        return forward(self, positions, inputs_embeds)
    saving.SavingRunner.forward = recording_forward
    saving.register()
    folder = bench.build_checkpoint(Path(tempfile.mkdtemp()) / "ckpt", **bench.PARITY_MODELS["qwen2-lvtc"][0])
    from vllm import LLM, SamplingParams
    from vllm_engine import _inputs
    options = dict(bench.TINY_ENGINE); options["hf_overrides"] = {"architectures": [saving.ARCHITECTURE]}
    if "--compile-mode" in sys.argv:
        # vLLM's compilation mode on (its CPU warm-up forward runs before the first step); the research SavingRunner
        # itself is a plain module, so the compute stays eager: this checks only when the buffer becomes visible
        options["enforce_eager"] = False
        hook = saving.SavingConfigHook.verify_and_update_config
        def no_eager_check(vllm_config):
            vllm_config.model_config.enforce_eager = True
            try:
                hook(vllm_config)
            finally:
                vllm_config.model_config.enforce_eager = False
        saving.SavingConfigHook.verify_and_update_config = staticmethod(no_eager_check)
    t = time.time(); llm = LLM(str(folder), **options); startup = time.time() - t
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    groups = [[{"backend": g.backend.get_name(), "backend_cls": g.backend.__name__,
                "builder": type(g.get_metadata_builder(0)).__name__, "layers": g.layer_names,
                "spec": type(g.kv_cache_spec).__name__} for g in gs] for gs in runner.attn_groups]
    log.clear()
    request = bench.REQUESTS["12 tiles"]
    out = llm.generate(_inputs(request), SamplingParams(max_tokens=4, temperature=0, logprobs=1), use_tqdm=False)
    prompt_ids, tokens, logprobs = bench.reference(folder, request, max_new_tokens=4)
    got = list(out[0].outputs[0].token_ids)
    pairs = [(b, f) for b, f in zip(seen.get("builder_rows", []), seen["forward_rows"][-len(seen.get("builder_rows", [])):])]
    same = [bool(b.shape == f.shape and (b == f).all()) for b, f in pairs]
    print(json.dumps({"builder_rows_equal_forward_rows": same, "startup_s": round(startup), "attn_groups": groups, "builder_calls": log,
                      "tokens_vllm": got, "tokens_transformers": tokens}, indent=1, default=str))

if __name__ == "__main__":
    main()
