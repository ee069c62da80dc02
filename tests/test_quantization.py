"""4-bit / 8-bit loading (bitsandbytes) and `internvlx train --preset qlora`, on the packaged demo model (PVTC + LVTC)
and tiny models; the kept-in-full-precision list against real module names; the error without bitsandbytes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import REPO_ROOT
from internvlx_hf import InternVLXForConditionalGeneration
from internvlx_hf.cli import main
from internvlx_hf.demo import demo_model_dir, answer, demo_samples
from internvlx_hf.quantization import (
    INSTALL_HINT,
    bitsandbytes_config,
    check_kept_modules,
    quantized_linear_names,
    skip_modules,
)
from internvlx_hf.training.synthetic_vqa import generate_dataset
from tiny import tiny_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                reason="bitsandbytes is not installed (pip install 'internvlx-hf[quantization]')")

KEPT_DEMO = ["model.multi_modal_projector", "model.lvtc_hr_projector", "lm_head"]


def _under(name: str, prefixes) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _linears(model) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


@pytest.fixture(scope="module")
def demo_config():
    from internvlx_hf import InternVLXConfig

    return InternVLXConfig.from_pretrained(demo_model_dir())


# (projector, lvtc) -> the prefixes kept: the LVTC ones only where the model builds them (the first LR projector is
# multi_modal_projector; no HR projector when expand_layer == depth).
TINY = {
    "mlp": (dict(projector="mlp"), ["model.multi_modal_projector", "lm_head"]),
    "pvtc": (dict(projector="pvtc"), ["model.multi_modal_projector", "lm_head"]),
    "pvtc+lvtc": (dict(projector="pvtc", lvtc={"expand_layer": 3, "num_lr_projectors": 3, "hr_projector_type": "pvtc"}),
                  ["model.multi_modal_projector", "model.lvtc_lr_projectors", "model.lvtc_hr_projector", "lm_head"]),
    "lvtc, no expansion": (dict(projector="mlp", lvtc={"expand_layer": 4, "num_lr_projectors": 2}),
                           ["model.multi_modal_projector", "model.lvtc_lr_projectors", "lm_head"]),
}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("setup", list(TINY))
def test_kept_modules_match_real_modules(setup, bits, tmp_path):
    """Every kept prefix names a module with Linears in it; after loading, exactly the Linears outside the kept
    prefixes are bitsandbytes layers, and the kept ones are plain nn.Linear (transformers matched the prefixes)."""
    kwargs, expected = TINY[setup]
    model = tiny_model(**kwargs)
    assert skip_modules(model.config) == expected
    modules = dict(model.named_modules())
    for prefix in expected:
        assert any(isinstance(m, nn.Linear) for m in modules[prefix].modules()), prefix
    linears = _linears(model)
    model.save_pretrained(tmp_path)

    # The list for a GPU: on CPU, 4-bit also keeps the tiny model's 32-wide layers (see the odd-widths tests below);
    # loading without a forward works either way.
    config = bitsandbytes_config(bits, model.config, device="cuda")
    assert config.llm_int8_skip_modules == expected
    loaded = InternVLXForConditionalGeneration.from_pretrained(tmp_path, quantization_config=config)
    quantized = set(quantized_linear_names(loaded))
    assert quantized == {name for name in linears if not _under(name, expected)}
    assert any(name.startswith("model.language_model.") for name in quantized)
    assert any(name.startswith("model.vision_tower.") for name in quantized)
    assert all(type(module) is nn.Linear for name, module in loaded.named_modules() if _under(name, expected)
               and name in linears)
    check_kept_modules(loaded, expected)

    # the vision tower on request
    kept = bitsandbytes_config(bits, model.config, keep_vision_tower=True, device="cuda").llm_int8_skip_modules
    assert kept == [*expected[:-1], "model.vision_tower", "lm_head"]


def test_bare_names_match_nothing_and_are_caught(tmp_path):
    """The pitfall the full prefixes avoid: transformers matches a skip entry from the start of a module name (or as
    its suffix), so a bare `multi_modal_projector` keeps nothing; check_kept_modules says so instead of letting the
    projector be quantized."""
    model = tiny_model("pvtc")
    model.save_pretrained(tmp_path)
    from transformers import BitsAndBytesConfig

    bare = ["multi_modal_projector", "lm_head"]
    loaded = InternVLXForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=bare))
    assert any(name.startswith("model.multi_modal_projector.") for name in quantized_linear_names(loaded))
    with pytest.raises(RuntimeError, match=r"prefixes matching no module \['multi_modal_projector'\], quantized "
                                           r"modules under the kept prefixes \[\]"):
        check_kept_modules(loaded, bare)
    with pytest.raises(RuntimeError, match=r"prefixes matching no module \[\], quantized modules under the kept "
                                           r"prefixes \['model.multi_modal_projector."):
        check_kept_modules(loaded, ["model.multi_modal_projector"])


def test_bits_must_be_4_or_8(demo_config):
    with pytest.raises(ValueError, match=r"bits must be 4 or 8 \(bitsandbytes' 4-bit nf4 or 8-bit LLM.int8\(\)\), "
                                         r"got 16"):
        bitsandbytes_config(16, demo_config)


def test_demo_skip_list(demo_config):
    """The demo model (PVTC, LVTC with one LR projector: lvtc_lr_projectors is empty) keeps these three."""
    assert skip_modules(demo_config) == KEPT_DEMO
    config = bitsandbytes_config(4, demo_config)
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert bitsandbytes_config(8, demo_config).load_in_8bit


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_demo_model_answers_the_demo_questions(bits):
    """`load_checkpoint` (chat, eval) with --load-in-4bit / --load-in-8bit: the PVTC + LVTC demo model answers
    the demo's five questions right (8-bit would fail inside bitsandbytes on PVTC's 4-D windows if the projectors
    were quantized), at a fraction of the float32 footprint."""
    from internvlx_hf.loading import load_checkpoint

    model, processor = load_checkpoint(str(demo_model_dir()), "float32", "cpu", load_in_bits=bits)
    quantized = quantized_linear_names(model)
    assert quantized and not any(_under(name, KEPT_DEMO) for name in quantized)
    assert getattr(model, f"is_loaded_in_{bits}bit")
    # The quantized weights take 1/2 (4-bit) or 1 (8-bit) byte instead of 4; everything else stays float32.
    full = InternVLXForConditionalGeneration.from_pretrained(demo_model_dir())
    weights = sum(dict(full.named_modules())[name].weight.numel() for name in quantized)
    assert weights == 983_040
    assert full.get_memory_footprint() - model.get_memory_footprint() == weights * {4: 3.5, 8: 3}[bits]
    samples = demo_samples()
    answers = [answer(model, processor, sample.image, sample.question).answer for sample in samples]
    assert answers == [sample.expected for sample in samples]


def test_chat_cli_load_in_8bit(tmp_path, capsys):
    sample = next(s for s in demo_samples() if s.task == "count")
    image = tmp_path / "count.png"
    sample.image.save(image)
    assert main(["chat", str(demo_model_dir()), "--image", str(image), sample.question, "--load-in-8bit",
                 "--device", "cpu", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == sample.expected


def test_eval_cli_load_in_4bit(tmp_path, capsys):
    meta = generate_dataset(tmp_path / "colour", n=8, tasks=["colour"], seed=12345, image_size=112,
                            system_message="", name="colour")
    scores = tmp_path / "scores.json"
    assert main(["eval", str(demo_model_dir()), str(meta), "--load-in-4bit", "--device", "cpu", "--json", str(scores),
                 "--no-progress"]) == 0
    (dataset,) = json.loads(scores.read_text())["runs"][0]["datasets"]
    assert (dataset["name"], dataset["accuracy"]) == ("colour", 1.0)


def test_without_bitsandbytes_the_flags_name_the_extra(tmp_path):
    """Where `import bitsandbytes` fails (simulated in a fresh interpreter), each flag that needs it stops before any
    loading with one line naming the extra."""
    meta = generate_dataset(tmp_path / "data", n=2, tasks=["colour"], seed=1, image_size=112, system_message="",
                            name="colour")
    runs = [
        (["chat", str(demo_model_dir()), "--load-in-8bit", "How many shapes?"], "--load-in-8bit"),
        (["eval", str(demo_model_dir()), str(meta), "--load-in-4bit"], "--load-in-4bit"),
        (["train", "--model", str(demo_model_dir()), "--data", str(meta), "--preset", "qlora", "--output_dir",
          str(tmp_path / "out")], "--preset qlora"),
    ]
    code = ("import sys\nsys.modules['bitsandbytes'] = None  # import bitsandbytes -> ImportError\n"
            "from internvlx_hf.cli import main\n"
            f"for argv in {[argv for argv, _ in runs]!r}:\n"
            "    print(main(argv), flush=True)\n    print('--', file=sys.stderr, flush=True)\n"
            # the loader that chat and eval share says it too (for callers that skip the commands' early check)
            "from internvlx_hf.loading import load_checkpoint\n"
            "from internvlx_hf.quantization import QuantizationUnavailable\n"
            "try:\n"
            f"    load_checkpoint({str(demo_model_dir())!r}, device='cpu', load_in_bits=4)\n"
            "except QuantizationUnavailable as error:\n    print(f'internvlx load: error: {error}', file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["2", "2", "2"], result.stderr[-3000:]
    errors = [part.strip().splitlines() for part in result.stderr.split("--\n")]
    assert len(errors) == 4, result.stderr[-3000:]
    for (argv, flag), lines in zip([*runs, (["load"], "--load-in-4bit")], errors):
        assert lines[-1].startswith(f"internvlx {argv[0]}: error: {flag} needs bitsandbytes, which is not installed "
                                    "here ("), lines
        assert lines[-1].endswith(f"install the extra: {INSTALL_HINT}"), lines
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_qlora_preset_needs_a_4bit_model():
    from internvlx_hf.training import apply_preset

    with pytest.raises(ValueError, match="preset 'qlora' trains LoRA on a 4-bit base: load the model with "
                                         r"quantization_config=internvlx_hf.quantization.bitsandbytes_config\(4, "):
        apply_preset(tiny_model(), "qlora")


def test_qlora_preset_trains_what_lora_trains_on_a_4bit_base():
    """The documented table: LoRA adapters on the LLM's Linears (4-bit base layers), the projectors as trainable
    float32 copies (peft's modules_to_save), everything else frozen."""
    from internvlx_hf.training import apply_preset
    from internvlx_hf.training.presets import module_group

    base = InternVLXForConditionalGeneration.from_pretrained(
        demo_model_dir(), quantization_config=bitsandbytes_config(4, InternVLXForConditionalGeneration.config_class
                                                                .from_pretrained(demo_model_dir())))
    model = apply_preset(base, "qlora")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapters = {name for name in trainable if ".lora_" in name}
    copies = trainable - adapters
    assert {module_group(name) for name in adapters} == {"llm"} and len(adapters) == 6 * 7 * 2
    assert all(".modules_to_save.default." in name for name in copies)
    assert {module_group(name) for name in copies} == {"projector", "lvtc_hr_projector"}
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if name in trainable)
    adapted = {name.rsplit(".lora_A", 1)[0] + ".base_layer" for name in adapters if ".lora_A." in name}
    assert adapted <= set(quantized_linear_names(model))


def test_train_qlora_learns_and_saves_what_lora_saves(tmp_path, capsys):
    """`internvlx train --preset qlora` on the demo model (4-bit nf4 base) with a task it never saw: the loss falls;
    OUT/adapter is the PEFT adapter (projectors in full), OUT the adapter merged into the float32 base, which loads
    without bitsandbytes and gives the base + adapter's logits."""
    from internvlx_hf.provenance import read_provenance

    meta = generate_dataset(tmp_path / "data", n=16, tasks=["bits-count"], seed=7, image_size=112,
                            system_message="", name="dots")
    out = tmp_path / "out"
    assert main(["train", "--model", str(demo_model_dir()), "--data", str(meta), "--preset", "qlora",
                 "--output_dir", str(out), "--max_steps", "6", "--learning_rate", "2e-3", "--save_steps", "3",
                 "--use_cpu", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true", "--logging_steps", "1",
                 "--per_device_train_batch_size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "Trainable parameters (preset qlora)" in printed
    full = InternVLXForConditionalGeneration.from_pretrained(demo_model_dir())
    llm_total = sum(p.numel() for n, p in full.named_parameters() if n.startswith("model.language_model."))
    assert f"llm {196_608:,} {llm_total + 196_608:,}" in " ".join(printed.split())  # 4-bit weights counted unpacked

    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses

    record = read_provenance(out)["training"][-1]
    assert record["preset"] == "qlora" and record["output"] == "merged" and record["lora"]["r"] == 16
    assert record["quantization"] == {"bits": 4, "quant_type": "nf4", "double_quant": True,
                                      "compute_dtype": "float32", "kept_in_full_precision": KEPT_DEMO}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out / "adapter"))
    assert {"adapter_model.safetensors", "processor_config.json"} <= set(os.listdir(out / "checkpoint-3"))
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(demo_model_dir())
    assert set(adapter_config["modules_to_save"]) == {"model.multi_modal_projector", "model.lvtc_hr_projector"}
    merged_config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in merged_config and merged_config["dtype"] == "float32"

    # OUT (merged) and OUT/adapter (base + adapter, through transformers' PEFT integration) load without
    # bitsandbytes, as plain float32 models, and agree; training changed the model. (transformers 5.16-5.17 leave the
    # adapter's modules_to_save untrained: there the adapter goes on through peft, docs/fine-tuning.md.)
    code = f"""
import json, sys
sys.modules['bitsandbytes'] = None
import torch, transformers
from packaging.version import Version
from peft import PeftModel
from transformers import AutoModel, AutoProcessor
from internvlx_hf.demo import demo_samples
image = demo_samples()[0].image
logits = {{}}
for folder in [{str(out)!r}, {str(out / 'adapter')!r}, {str(demo_model_dir())!r}]:
    if folder.endswith("adapter") and Version(transformers.__version__) < Version("5.18"):
        base = AutoModel.from_pretrained({str(demo_model_dir())!r}, trust_remote_code=True)
        model = PeftModel.from_pretrained(base, folder).eval()
    else:
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "How many dots?"}}]}}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits[folder] = model(**inputs).logits[0, -1].tolist()
print(json.dumps(logits))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = {key: torch.tensor(value) for key, value in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    torch.testing.assert_close(logits[str(out / "adapter")], logits[str(out)], rtol=0, atol=1e-4)
    assert not torch.allclose(logits[str(out)], logits[str(demo_model_dir())], atol=1e-2)


def test_one_function_builds_the_quantized_loading_arguments(demo_config):
    """`quantized_loading_kwargs`, which chat, eval and serve load with: the checkpoint's config and its
    BitsAndBytesConfig, 4-bit layers computing in the loading dtype (a name or a torch dtype; float32 for auto)."""
    from internvlx_hf.quantization import quantized_loading_kwargs

    assert quantized_loading_kwargs(demo_model_dir(), None) == {}
    kwargs = quantized_loading_kwargs(demo_model_dir(), 4, torch.bfloat16)
    assert kwargs["config"].to_diff_dict() == demo_config.to_diff_dict() and kwargs["config"].model_type == "internvlx"
    assert (kwargs["quantization_config"].load_in_4bit, kwargs["quantization_config"].bnb_4bit_compute_dtype) == (
        True, torch.bfloat16)
    for dtype, compute in (("float16", torch.float16), ("auto", torch.float32)):
        assert quantized_loading_kwargs(demo_model_dir(), 4, dtype)["quantization_config"].bnb_4bit_compute_dtype \
            == compute
    eight = quantized_loading_kwargs(demo_model_dir(), 8, what="--load-in-8bit")["quantization_config"]
    assert eight.load_in_8bit and eight.llm_int8_skip_modules == KEPT_DEMO
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantized_loading_kwargs(demo_model_dir(), 2)


def test_serve_load_in_4bit_gives_the_server_the_chat_quantization_config(demo_config):
    """`internvlx serve --load-in-4bit` hands transformers' server the same BitsAndBytesConfig as `chat`'s loader."""
    from internvlx_hf.cli import build_parser
    from internvlx_hf.cli.serve import model_loading_kwargs

    args = build_parser().parse_args(["serve", str(demo_model_dir()), "--load-in-4bit", "--dtype", "float32"])
    kwargs = model_loading_kwargs(args)
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.llm_int8_skip_modules == KEPT_DEMO
    assert config.bnb_4bit_compute_dtype == torch.float32
    args = build_parser().parse_args(["serve", str(demo_model_dir())])
    assert model_loading_kwargs(args) == {}


# Widths that bitsandbytes' CPU 4-bit path cannot take: out_features 40 / in_features 40 (not multiples of 32 / 64),
# an MLP of 72, and the tiny vision tower's 32-wide layers (in_features below the 64-value block).
def _odd_model():
    from tiny import tiny_config

    config = tiny_config()
    config.text_config.hidden_size, config.text_config.intermediate_size = 40, 72
    torch.manual_seed(0)
    return InternVLXForConditionalGeneration(config).eval()


def _odd_checkpoint(tmp_path):
    model = _odd_model()
    model.save_pretrained(tmp_path)
    return model.config


def test_cpu_4bit_misfits_name_every_layer_bitsandbytes_cannot_run(tmp_path):
    config = _odd_checkpoint(tmp_path)
    from internvlx_hf.quantization import cpu_4bit_misfits

    skip = skip_modules(config)
    misfits = cpu_4bit_misfits(config, skip)
    model = _odd_model()
    expected = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
                and not _under(name, skip) and (module.out_features % 32 or module.in_features % 64)]
    assert misfits == expected
    assert "model.language_model.layers.0.mlp.down_proj" in misfits  # 72 -> 40
    assert "model.vision_tower.encoder.layer.0.attention.q_proj" in misfits  # 32 -> 32
    # The demo model's widths all fit: nothing extra is kept there.
    from internvlx_hf import InternVLXConfig

    demo = InternVLXConfig.from_pretrained(demo_model_dir())
    assert cpu_4bit_misfits(demo, skip_modules(demo)) == []


@pytest.mark.parametrize("bits", [4, 8])
def test_odd_widths_load_on_cpu_and_generate(bits, tmp_path, caplog):
    """--load-in-4bit on CPU once stopped at the first forward inside bitsandbytes (an AssertionError or a reshape
    error) on layers whose widths are not multiples of 32 / 64: they are kept in full precision, logged once."""
    import logging

    from internvlx_hf.loading import load_checkpoint
    from tiny import pixels, prompt_ids

    config = _odd_checkpoint(tmp_path)
    from internvlx_hf.quantization import cpu_4bit_misfits

    misfits = cpu_4bit_misfits(config, skip_modules(config))
    with caplog.at_level(logging.WARNING, logger="internvlx_hf.quantization"):
        model, _ = load_checkpoint(str(tmp_path), "float32", "cpu", processor=False, load_in_bits=bits)
    lines = [record.getMessage() for record in caplog.records if record.name == "internvlx_hf.quantization"]
    quantized = quantized_linear_names(model)
    if bits == 4:
        assert len(lines) == 1 and lines[0].endswith(", ".join(misfits))
        assert quantized and not set(quantized) & set(misfits)
    else:
        assert lines == [] and set(misfits) <= set(quantized)
    full = _odd_model()
    ids = torch.tensor([prompt_ids(1, 0)])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, pixel_values=pixels(1, 0), max_new_tokens=3, do_sample=False)
        reference = full.generate(input_ids=ids, pixel_values=pixels(1, 0), max_new_tokens=3, do_sample=False)
    assert out.shape == reference.shape == (1, ids.shape[1] + 3)


def test_chat_cli_load_in_4bit_with_odd_widths(tmp_path, capsys, caplog):
    """The issue's command: `internvlx chat --load-in-4bit` on CPU with a model whose LLM widths bitsandbytes' CPU
    4-bit path cannot take (an MLP of 200) answered with bitsandbytes' AssertionError and "unexpected error":
    it answers now, and the log line names the layers kept in full precision."""
    import logging
    import shutil

    from internvlx_hf import InternVLXConfig

    demo = demo_model_dir()
    config = InternVLXConfig.from_pretrained(demo)
    config.text_config.intermediate_size = 200
    torch.manual_seed(0)
    InternVLXForConditionalGeneration(config).save_pretrained(tmp_path / "odd")
    for path in demo.iterdir():
        if path.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(path, tmp_path / "odd" / path.name)
    image = tmp_path / "q.png"
    demo_samples()[0].image.save(image)
    with caplog.at_level(logging.WARNING, logger="internvlx_hf.quantization"):
        assert main(["chat", str(tmp_path / "odd"), "--image", str(image), "What colour?", "--load-in-4bit",
                     "--device", "cpu", "--max-new-tokens", "3"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "internvlx_hf.quantization"]
    assert len(lines) == 1 and lines[0].startswith("4-bit on CPU: keeping ")
    kept = lines[0].split(": ")[-1].split(", ")
    layers = config.text_config.num_hidden_layers
    assert kept == [f"model.language_model.layers.{i}.mlp.{name}" for i in range(layers)
                    for name in ("gate_proj", "up_proj", "down_proj")]  # 128 -> 200 -> 128; attention is 128 wide


def test_bitsandbytes_note_about_an_optional_kernel_is_kept_out_of_any_output():
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" when it is imported on a CPU
    with AVX512-BF16 (peft imports it, so `internvlx_hf.training` does): importing the package keeps that note out,
    whatever runs next (a script, the README's data generator), and leaves bitsandbytes' other warnings."""
    code = ("import logging, internvlx_hf\n"
            "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
            "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s.', 'No module named kernels')\n"
            "log.warning('another note')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "kernels-community" not in result.stderr and "another note" in result.stderr
