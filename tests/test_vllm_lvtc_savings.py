"""Issue 52's research code (benchmarks/, not shipped): the layout count of E1, and the experimental LVTC-saving
model's position rows and short-layout token counts, on hand-made layouts whose answers are known. The vLLM parts
skip where vLLM is not installed (they import vLLM's classes; no engine runs)."""

import importlib.util
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, load_script


def test_hr_only_slots_in_whole_blocks():
    """Tiles of 4 LR + 12 HR-only slots with blocks of 4: all HR-only slots lie in whole blocks when the image starts
    on a block boundary, two thirds when it starts 2 slots later (each tile's edges share blocks with LR slots)."""
    bench = load_script("experiments/vllm_lvtc_layout.py")
    aligned = bench.long_layout([(4, 2)], length=4 + 2 * 4 + 3, short=4, long=16)
    assert aligned.tolist()[:24] == [0] * 4 + [1] * 4 + [2] * 12 + [1] * 4
    assert bench.whole_block_share(aligned, 4)[:2] == (1.0, 6)
    shifted = bench.long_layout([(2, 2)], length=2 + 2 * 4 + 3, short=4, long=16)
    share, whole, blocks = bench.whole_block_share(shifted, 4)
    assert (round(share, 4), whole, blocks) == (0.6667, 4, 10)


needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed; .ci/run's vLLM environment has it")


def _saving():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import lvtc_savings_vllm

    return lvtc_savings_vllm


def _features():
    """Text 0-2, `<img>` 3, two tiles of 4 slots (1 LR + 3 HR-only each) at 4-11, `</img>` 12; then text."""
    from vllm.multimodal.inputs import PlaceholderRange

    is_embed = torch.tensor([False] + [True] * 8 + [False])
    return [SimpleNamespace(mm_position=PlaceholderRange(offset=3, length=10, is_embed=is_embed))]


@pytest.mark.vllm
@needs_vllm
def test_saving_positions_are_short_layout_positions_and_decoding_continues_them():
    from internvlx_hf.vllm.layout import LVTCLayout

    saving = _saving()
    layout = LVTCLayout(expand_layer=1, short_side=1, long_side=2, upsample_mode="nearest", hr_scale="none",
                        injection_layers=())
    rows, delta = saving.saving_positions(layout, 16, _features())
    assert delta == -6  # 2 tiles x 3 HR-only slots
    live = [0, 1, 2, 3, 4, 8, 12, 13, 14, 15]  # text, <img>, each tile's LR slot, </img>, text
    assert rows[1, live].tolist() == list(range(10))  # the short layout, as transformers numbers it
    assert rows[2, [4, 5, 8, 11]].tolist() == [-1, -2, -1, -4]  # tile slot codes
    # vLLM continues every row with index + delta: the next token is short position 10
    assert 16 + delta == 10


@pytest.mark.vllm
@needs_vllm
def test_short_layout_manager_counts_only_live_tokens():
    saving = _saving()
    request = SimpleNamespace(mm_features=_features())
    assert saving.hr_only_slots(request, 1, 4) == [5, 6, 7, 9, 10, 11]
    manager = SimpleNamespace(requests={"r": request}, _hr_only={}, short_per_tile=1, long_per_tile=4)
    counts = [saving.LVTCShortManager.short_tokens(manager, "r", n) for n in (3, 5, 8, 12, 16, 17)]
    assert counts == [3, 5, 5, 6, 10, 11]
    with pytest.raises(RuntimeError, match="scheduler did not hand over"):
        saving.LVTCShortManager.short_tokens(SimpleNamespace(requests=None), "r", 3)


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_saving_model_builds_on_the_shipped_plugin_and_answers_as_transformers(tmp_path):
    """The experiment subclasses the shipped plugin's model and replaces its LVTC runner and short layers; a change
    to the plugin's internals breaks it at engine start (it once did: `cannot assign SavingRunner as child module
    'lvtc'`). One engine (tiny Qwen2 + LVTC k=2, bench's settings) serves a 12-tile request: transformers' greedy
    tokens and logprobs, and the KV blocks of each group the request's layouts need (short group: its short-layout
    tokens only)."""
    import math

    bench = load_script("benchmarks/bench_vllm_lvtc_savings.py")
    folder = bench.build_checkpoint(tmp_path / "qwen2-lvtc", **bench.PARITY_MODELS["qwen2-lvtc"][0])
    request = bench.REQUESTS["12 tiles"]
    spec = {"engines": [{"name": "saving", "checkpoint": str(folder), "engine": bench.TINY_ENGINE, "saving": True,
                         "requests": [request]}], "max_tokens": 4}
    result = bench.run_engines(spec, tmp_path)["saving"]
    prompt_ids, tokens, logprobs = bench.reference(folder, request, max_new_tokens=4)
    for got in (result["alone"][0], result["together"][0]):
        assert got["tokens"] == tokens
        assert max(abs(a - b) for a, b in zip(got["logprobs"], logprobs)) <= bench.LOGPROB_ATOL
    groups = result["info"]["groups"]
    assert sorted(g["spec"] for g in groups) == ["FullAttentionSpec", "LVTCShortSpec"]
    got = result["alone"][0]
    long_tokens = got["prompt_tokens"] + 4 - 1  # the last sampled token is never written to the cache
    short_tokens = len(prompt_ids) + 4 - 1  # transformers' prompt is the short layout
    assert got["prompt_tokens"] - len(prompt_ids) == 12 * (64 - 16)  # 12 tiles of 16 LR / 64 long slots
    need = {g["spec"]: math.ceil((short_tokens if g["spec"] == "LVTCShortSpec" else long_tokens) / g["block_size"])
            for g in groups}
    assert got["blocks_held"] == [need[g["spec"]] for g in groups]


@pytest.mark.parametrize("name", ["vllm-lvtc-savings", "vllm-lvtc-savings-rerun", "issue56-step3-compiled",
                                  "issue56-step3-compiled-loaded"])
def test_saving_figures_are_the_run_files(name):
    """The issue's figures file (the recorded run, its re-run on the ported experiment, and issue 56's runs with
    compilation on) holds exactly the headline of the full run file, with the commit whose plugin it measured."""
    import json

    results = REPO_ROOT / "benchmarks" / "results"
    figures = json.loads((results / f"{name}.json").read_text())
    runs = json.loads((results / f"{name}-runs.json").read_text())
    compiled = {"enforce_eager", "requests_per_s_ratio"} if name.startswith("issue56") else set()
    assert set(figures) == {"kv_blocks_ratio", "kv_target", "prefill_ratio", "flops_ratio", "tokens_equal", "vllm",
                            "date", "plugin_commit"} | compiled
    assert figures == runs["figures"]
    head = runs["per_request"]["3 tiles"]
    assert figures["kv_blocks_ratio"] == round(head["lvtc-saving"]["kv_blocks_ratio"], 4)
    assert np.isclose(figures["prefill_ratio"], head["lvtc-saving"]["prefill_ratio"], atol=1e-4)
    if compiled:
        assert figures["enforce_eager"] is False and runs["model"]["engine"]["enforce_eager"] is False
        rps = runs["requests_per_s"]
        assert figures["requests_per_s_ratio"] == {level: round(rps["lvtc-saving"][level] / rps["plain-1024"][level], 4)
                                                   for level in ("4", "16")}


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_compiled_saving_prototype_answers_as_transformers_with_short_kv_only(tmp_path):
    """Issue 56's prototype (`internvlx_hf.vllm.saving`, opt-in architecture) with vLLM's compilation mode on: the
    short layers' metadata, gather index and KV slots come from their own backend's builder (M-RoPE rows read from
    the runner's buffer), the layers run compiled. One engine answers a 12-tile request and a text-only one, alone
    and together: transformers' greedy tokens and logprobs, and the short group holds the short layout's blocks only.
    A wrong short layout (measured: the builder counting each tile's first HR-only slot as live) changes the tokens."""
    import math

    from internvlx_hf.vllm.saving import ARCHITECTURE

    bench = load_script("benchmarks/bench_vllm_lvtc_savings.py")
    folder = bench.build_checkpoint(tmp_path / "qwen2-lvtc", **bench.PARITY_MODELS["qwen2-lvtc"][0])
    requests = [bench.REQUESTS["12 tiles"], bench.REQUESTS["text"]]
    engine = dict(bench.TINY_ENGINE, enforce_eager=False, hf_overrides={"architectures": [ARCHITECTURE]})
    spec = {"engines": [{"name": "compiled", "checkpoint": str(folder), "engine": engine, "requests": requests}],
            "max_tokens": 4}
    result = bench.run_engines(spec, tmp_path)["compiled"]
    log = (tmp_path / "engine.log").read_text()
    assert "'mode': <CompilationMode.DYNAMO_TRACE_ONCE" in log and "Warming up done" in log
    groups = result["info"]["groups"]
    assert sorted(g["spec"] for g in groups) == ["FullAttentionSpec", "LVTCShortSpec"]
    for index, request in enumerate(requests):
        prompt_ids, tokens, logprobs = bench.reference(folder, request, max_new_tokens=4)
        for got in (result["alone"][index], result["together"][index]):
            assert got["tokens"] == tokens
            assert max(abs(a - b) for a, b in zip(got["logprobs"], logprobs)) <= bench.LOGPROB_ATOL
        got = result["alone"][index]
        long_tokens, short_tokens = got["prompt_tokens"] + 3, len(prompt_ids) + 3  # last token never cached
        need = [math.ceil((short_tokens if g["spec"] == "LVTCShortSpec" else long_tokens) / g["block_size"])
                for g in groups]
        assert got["blocks_held"] == need
    assert result["alone"][0]["prompt_tokens"] - 12 * (64 - 16) == 212  # the 12-tile prompt: 788 long, 212 short


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_compiled_saving_prototype_runs_with_the_engine_core_in_its_own_process(tmp_path):
    """vLLM's default process layout (`VLLM_ENABLE_V1_MULTIPROCESSING=1`: engine core and worker in processes of their
    own, as `vllm serve` runs): the plugin's entry point registers the prototype's architecture in each of them and
    importing `saving.py` registers the short group's spec there, so the engine starts and answers as transformers
    does. (Before, with the architecture registered in the caller's process only, the worker stopped at start with
    "Model architectures ['InternVLXLVTCSavingCompiledForConditionalGeneration'] are not supported".)"""
    from internvlx_hf.vllm.saving import ARCHITECTURE

    bench = load_script("benchmarks/bench_vllm_lvtc_savings.py")
    folder = bench.build_checkpoint(tmp_path / "qwen2-lvtc", **bench.PARITY_MODELS["qwen2-lvtc"][0])
    requests = [bench.REQUESTS["12 tiles"], bench.REQUESTS["two images"]]
    engine = dict(bench.TINY_ENGINE, enforce_eager=False, hf_overrides={"architectures": [ARCHITECTURE]})
    spec = {"engines": [{"name": "compiled", "checkpoint": str(folder), "engine": engine, "requests": requests}],
            "max_tokens": 4}
    result = bench.run_engines(spec, tmp_path, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})["compiled"]
    log = (tmp_path / "engine.log").read_text()
    assert result["info"]["multiprocessing"] and "(Worker pid=" in log
    for index, request in enumerate(requests):
        _, tokens, logprobs = bench.reference(folder, request, max_new_tokens=4)
        for got in (result["alone"][index], result["together"][index]):
            assert got["tokens"] == tokens
            assert max(abs(a - b) for a, b in zip(got["logprobs"], logprobs)) <= bench.LOGPROB_ATOL
