"""InternVL2.5 / InternVL3 sources (OpenGVLab's `InternVLChatModel` layout): converted checkpoints against golden runs
of the reference code (`scripts/make_internvl25_fixtures.py`): InternLM2.5 and Qwen2.5 LLMs, InternViT-300M-V2_5-
and 6B-V2_5-style vision towers, the `internvl2_5` template."""

from __future__ import annotations

import json

import pytest
import torch

import golden
from conftest import require_fixture
from internvlx_hf.conversion import convert
from parity import run_isolated_script, run_parity

FIXTURES = list(golden.V25_FIXTURES)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            dst = tmp_path_factory.mktemp("converted_v25") / name
            cache[name] = (dst, convert(require_fixture(name), dst, progress=False))
        return cache[name]

    return get


@pytest.mark.parametrize("name", FIXTURES)
def test_converted_checkpoint_matches_reference(name, converted, tmp_path):
    """Loaded with trust_remote_code where internvlx_hf cannot be imported: logits within 1e-5 of the reference (at
    the golden positions), the 8 greedy tokens, chat()'s answer, the tokenizer ids of the internvl2_5 prompt, and the
    processor's prompt, ids and pixel values (bit-exact, per tile)."""
    dst, report = converted(name)
    ref = golden.model_reference(name)
    assert report.dropped == {} and report.new == {}
    assert report.template == "internvl2_5" and report.eos_token == "<|im_end|>"
    result, outputs = run_parity(dst, ref, tmp_path)
    assert result["class"] == "InternVLXForConditionalGeneration"
    ref.logits.assert_close(outputs["logits"], atol=1e-5)
    assert result["generated"] == ref.generated_ids[0].tolist()
    assert result["eos_token"] == ["<|im_end|>"] + (["</s>"] if "internlm2" in name else [])
    assert result["chat"] == ref.chat_response
    assert result["tokenizer_ids"] == ref.input_ids[0].tolist()
    assert result["prompt"] == ref.meta["prompt_with_image_tag"]
    assert torch.equal(outputs["processor_input_ids"], ref.input_ids)
    ref.pixels.assert_equal(outputs["processor_pixel_values"], what="the converted processor's pixel_values")


TEMPLATE_SCRIPT = r"""
import json, sys
from transformers import AutoProcessor

dst, cases_path = sys.argv[1:3]
processor = AutoProcessor.from_pretrained(dst, trust_remote_code=True)
out = []
for case in json.load(open(cases_path)):
    messages = [] if case["system_message"] is None else [{"role": "system", "content": case["system_message"]}]
    turns = case["turns"]
    generation_prompt = turns[-1][1] is None
    messages += [{"role": role, "content": text} for role, text in (turns[:-1] if generation_prompt else turns)]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    # and as vLLM's chat route: the tokenizer's rendering (which writes the BOS) tokenized without special tokens
    chat = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    out.append([prompt, processor.tokenizer(prompt)["input_ids"],
                processor.tokenizer(chat, add_special_tokens=False)["input_ids"]])
print("RESULT" + json.dumps({"rendered": out}))
"""


@pytest.mark.parametrize("name", ["internvl2_5_internlm2_5", "internvl3_qwen2_5"])
def test_internvl2_5_template_matches_the_reference_conversations(name, converted, tmp_path):
    """The converted chat template renders what the reference conversation.py `internvl2_5` renders (its default
    system message, a custom one, an empty one, multi-turn histories; `<|im_end|>\\n` between turns), and the
    tokenizer gives the reference ids for it (sentencepiece and byte-level BPE)."""
    dst, _ = converted(name)
    cases = golden.model_reference(name).meta["template_cases"]
    (tmp_path / "cases.json").write_text(json.dumps(cases, ensure_ascii=False))
    result = run_isolated_script(TEMPLATE_SCRIPT, [str(dst), str(tmp_path / "cases.json")], tmp_path)["rendered"]
    assert [prompt for prompt, _, _ in result] == [case["prompt"] for case in cases]
    assert [ids for _, ids, _ in result] == [case["input_ids"] for case in cases]
    assert [ids for _, _, ids in result] == [case["input_ids"] for case in cases]
    assert "<|im_end|>\n<|im_start|>assistant\n" in cases[0]["prompt"]  # the template's own separator is covered


def test_vision_tower_layouts(converted):
    """InternViT-300M-448px-V2_5 keeps LayerNorm and qkv biases; InternViT-6B-448px-V2_5 has RMSNorm, q/k RMSNorm and
    no qkv bias: each arrives as the matching InternVLVisionConfig (the parity test above checks the numbers)."""
    layouts = {}
    for name in FIXTURES:
        dst, _ = converted(name)
        vision = json.loads((dst / "config.json").read_text())["vision_config"]
        layouts[name] = (vision["norm_type"], vision["use_qk_norm"], vision["attention_bias"])
    assert layouts == {"internvl2_5_internlm2_5": ("layer_norm", False, True),
                       "internvl3_qwen2_5": ("layer_norm", False, True),
                       "internvl2_5_vit6b_qwen2_5": ("rms_norm", True, False)}
    src = json.loads((require_fixture("internvl2_5_vit6b_qwen2_5") / "config.json").read_text())["vision_config"]
    assert (src["norm_type"], src["qk_normalization"], src["qkv_bias"]) == ("rms_norm", True, False)


def test_internvl3_9b_internlm3_is_refused_with_the_reason(tmp_path):
    """InternVL3-9B's InternLM3 has no reference code in OpenGVLab/InternVL to check a conversion against: one clear
    error, and nothing written."""
    from internvlx_hf.conversion import ConversionError

    src = tmp_path / "InternVL3-9B"
    import shutil

    shutil.copytree(require_fixture("internvl3_qwen2_5"), src)
    config = json.loads((src / "config.json").read_text())
    config["llm_config"]["architectures"] = ["InternLM3ForCausalLM"]
    config["llm_config"]["model_type"] = "internlm3"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError) as error:
        convert(src, tmp_path / "dst", progress=False)
    assert str(error.value).startswith("llm_config names InternLM3ForCausalLM (InternVL3-9B), which `internvlx "
                                       "convert` does not support")
    assert not (tmp_path / "dst").exists()


def _llm_alone(dst, max_position_embeddings: int):
    """The converted checkpoint's LLM as a plain transformers causal LM with a shorter max_position_embeddings."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    text = json.loads((dst / "config.json").read_text())["text_config"]
    config = AutoConfig.for_model(**text)
    config.max_position_embeddings = max_position_embeddings
    weights = {}
    for name, tensor in load_file(str(dst / "model.safetensors")).items():
        if name.startswith("model.language_model."):
            weights["model." + name[len("model.language_model."):]] = tensor
        elif name == "lm_head.weight":
            weights[name] = tensor
    model = AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(weights, strict=True)
    return model, text


def test_qwen2_5_rope_scaling_is_what_the_reference_does(converted):
    """InternVL2.5/3 write Qwen2.5's rope_scaling (dynamic, factor 2) into llm_config; the reference's Qwen2
    (transformers 4.37.2) ignores it. rope_scaling_check: the LLM alone with max_position_embeddings 128 and 200 tokens,
    where a dynamic NTK scaling would change every position past 128: the converted LLM matches the reference's
    forward and its 8 cached greedy steps, and the summary says why the key was not carried over."""
    dst, report = converted("internvl3_qwen2_5")
    ref = golden.rope_check("internvl3_qwen2_5", "rope_scaling_check")
    assert "rotary_class" in ref.info and ref.info["rotary_class"] == "Qwen2RotaryEmbedding"
    model, text = _llm_alone(dst, 128)
    assert text["rope_parameters"]["rope_type"] == "default"
    assert any(note.startswith("llm_config.rope_scaling {'factor': 2.0, 'rope_type': 'dynamic', 'type': 'dynamic'} "
                               "not carried over") for note in report.notes)
    input_ids, attention_mask = ref.tensors["input_ids"], ref.tensors["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    ref.logits["logits"].assert_close(logits, atol=1e-5)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert out.sequences[0, 200:].tolist() == ref.tensors["generated_ids"][0].tolist()
    assert (torch.stack(out.scores, 1)[0] - ref.tensors["generation_scores"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("value", ["You are a tiny test model.", None])
def test_config_system_message_is_reported(value, tmp_path):
    """A `system_message` in config.json is what the reference chat() writes (null as the text 'None'); the converted
    chat template keeps the template default and the summary says so; given as the first message, the custom one
    renders the reference's prompt and ids."""
    import shutil

    from transformers import AutoProcessor

    ref = golden.model_reference("internvl3_qwen2_5")
    case = next(c for c in ref.meta["config_system_message_cases"] if c["config_system_message"] == value)
    src = tmp_path / "src"
    shutil.copytree(require_fixture("internvl3_qwen2_5"), src)
    config = json.loads((src / "config.json").read_text())
    config["system_message"] = value
    (src / "config.json").write_text(json.dumps(config))
    report = convert(src, tmp_path / "dst", progress=False)
    processor = AutoProcessor.from_pretrained(str(tmp_path / "dst"))
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ref.question}]}]
    default = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert default == ref.meta["prompt_with_image_tag"]
    if value is None:
        assert case["prompt_with_image_tag"].startswith("<|im_start|>system\nNone<|im_end|>\n")
        assert "config.system_message is null: OpenGVLab's chat() would write the text 'None' as the system message; " \
               "the chat template writes the internvl2_5 default system message instead" in report.notes
        return
    assert f"config.system_message {value!r} is not the internvl2_5 default: the chat template keeps the default; " \
           "pass it as the first (system) message, or set model.system_message for chat()" in report.notes
    prompt = processor.apply_chat_template([{"role": "system", "content": value}] + user, add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == case["prompt_with_image_tag"]
    inputs = processor(images=[golden.fixture_path("images", "img6.jpg")], text=prompt, max_tiles=ref.max_tiles,
                       return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == case["input_ids"]


def test_convert_help_lists_the_families(capsys):
    from internvlx_hf.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["convert", "--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    families = [line.split()[0] for line in lines if line.startswith("  InternVL")]
    assert families == ["InternVL2", "InternVL2.5", "InternVL3", "InternVL3.5"]
    assert any("not InternVL3-9B" in line for line in lines)
    assert any(line.strip() == "internvlx convert ./InternVL3-8B ./InternVL3-8B-hf" for line in lines)
