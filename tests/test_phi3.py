"""InternVL2-4B (Phi-3, 'su' rope, LlamaTokenizer legacy=False): the converted ``internvl2_phi3`` fixture against its
reference run (prompt ids, pixels, logits, greedy tokens, chat() answer, the su rope switch during cached decoding)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import golden
from internvlx_hf.conversion import convert
from parity import run_parity

FIXTURE = "internvl2_phi3"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = tmp_path_factory.mktemp("phi3") / FIXTURE
    report = convert(golden.fixture_path(FIXTURE), dst, progress=False)
    return dst, report


def test_conversion_summary(converted):
    dst, report = converted
    assert report.dropped == {} and report.new == {}
    assert report.text_model_type == "phi3"
    assert (report.eos_token, report.eos_token_id) == ("<|end|>", 807)  # the phi3-chat separator, not <|endoftext|>
    assert "InternVLXLlamaTokenizerFast" in report.tokenizer and "legacy=False" in report.tokenizer
    config = json.loads((dst / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"] == [None, "tokenization_internvlx.InternVLXLlamaTokenizerFast"]
    assert (config["legacy"], config["pad_token"]) == (False, "<|endoftext|>")
    assert (dst / "tokenization_internvlx.py").is_file() and not (dst / "tokenizer.model").exists()
    rope = json.loads((dst / "config.json").read_text())["text_config"]["rope_parameters"]
    assert rope["rope_type"] == "longrope" and rope["original_max_position_embeddings"] == 512
    assert rope["factor"] == 65536 / 512  # max_position_embeddings / original: what transformers takes when absent


_LOAD_PHI3 = """
import json, sys
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
print(json.dumps({"module": type(model).__module__.split(".")[0],
                  "factor": model.config.text_config.rope_parameters.get("factor")}))
"""


def test_phi3_loads_without_the_rope_warning(converted, tmp_path):
    """transformers warns on every load of a longrope config without `factor` ("This model config has set a
    `rope_parameters['original_max_position_embeddings']` field ..."): a converted folder loads without it, with the
    remote code alone and, for a folder converted before the factor was written, with the package; the scaling is
    the same either way."""
    import os
    import shutil
    import subprocess
    import sys

    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from conftest import REPO_ROOT, run_isolated_python

    dst, _ = converted
    result = run_isolated_python("import sys\nsys.argv = ['', %r]\n" % str(dst) + _LOAD_PHI3, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"module": "transformers_modules", "factor": 128.0}
    assert "original_max_position_embeddings" not in result.stderr, result.stderr[-2000:]

    old = tmp_path / "converted-before"
    shutil.copytree(dst, old)
    config = json.loads((old / "config.json").read_text())
    del config["text_config"]["rope_parameters"]["factor"]
    (old / "config.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", "import internvlx_hf\n" + _LOAD_PHI3.replace(
        "trust_remote_code=True", "trust_remote_code=False"), str(old)], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"module": "internvlx_hf", "factor": 128.0}
    assert "original_max_position_embeddings" not in result.stderr, result.stderr[-2000:]

    # the same frequencies and attention scaling as without the factor (transformers' own derivation)
    text = {**config["text_config"]}
    derived = Phi3RotaryEmbedding(Phi3Config(**text))
    written = Phi3RotaryEmbedding(Phi3Config(**{**text, "rope_parameters": {**text["rope_parameters"],
                                                                             "factor": 128.0}}))
    assert derived.attention_scaling == written.attention_scaling and derived.attention_scaling > 1
    assert torch.equal(derived.inv_freq, written.inv_freq)


def test_the_installed_package_loads_it_without_trust_remote_code(converted):
    """`import internvlx_hf` registers the Phi-3 tokenizer class, so no interactive remote-code question appears."""
    from transformers import AutoProcessor, AutoTokenizer

    import internvlx_hf

    dst, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(str(dst))
    assert type(tokenizer) is internvlx_hf.InternVLXLlamaTokenizerFast
    processor = AutoProcessor.from_pretrained(str(dst))
    assert type(processor.tokenizer) is internvlx_hf.InternVLXLlamaTokenizerFast
    assert tokenizer("<|system|>\nHi")["input_ids"] == [1, 741, 806, 13, 789, 750]


def test_converted_phi3_matches_reference(converted, tmp_path):
    """Loaded with trust_remote_code alone (internvlx_hf hidden): the processor gives the reference prompt, ids and
    pixel values (sha256 of the float32 tensor), the tokenizer the reference ids (they start <s> ▁ <|system|>), the
    logits match within 1e-4, the 8 greedy tokens and chat()'s answer are the reference's."""
    dst, _ = converted
    ref = golden.model_reference(FIXTURE)
    result, outputs = run_parity(dst, ref, tmp_path)

    assert result["class"] == "InternVLXForConditionalGeneration"
    assert result["tokenizer_class"] == "InternVLXLlamaTokenizerFast"
    expected_ids = ref.input_ids[0].tolist()
    assert expected_ids[:4] == [1, 741, 806, 13]  # <s> ▁ <|system|> \n: the lone "▁" is part of the reference input
    assert result["tokenizer_ids"] == expected_ids
    assert result["prompt"] == ref.meta["prompt_with_image_tag"]
    assert torch.equal(outputs["processor_input_ids"], ref.input_ids)
    pixel_values = outputs["processor_pixel_values"]
    ref.pixels.assert_equal(pixel_values, what="the converted processor's pixel_values")
    assert golden.tensor_sha256(pixel_values) == ref.meta["preprocess"]["pixel_values_sha256"]
    worst = ref.logits.assert_close(outputs["logits"], atol=1e-4)
    assert worst < 1e-4
    assert result["generated"] == ref.generated_ids[0].tolist() == ref.meta["generation"]["generated_ids"]
    assert result["eos_token"] == ["<|end|>", "<|endoftext|>"]  # the template's end of turn, then the eos
    assert result["decoded"] == ref.meta["generation"]["generated_text"]
    assert result["chat"] == ref.chat_response


# ------------------------------------------------------------------------------------------------ su rope switch


def _text_model_with_original_length(dst: Path, original: int):
    """The converted model with the LLM's original_max_position_embeddings overridden, as the fixture's
    rope_su_check did with the reference Phi3ForCausalLM (everything else unchanged)."""
    from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration

    config = InternVLXConfig.from_pretrained(dst)
    text = config.get_text_config()
    text.original_max_position_embeddings = original
    # the reference derives the su scaling from the two lengths; the converted config writes it out as `factor`
    text.rope_parameters = {**text.rope_parameters, "original_max_position_embeddings": original,
                            "factor": text.max_position_embeddings / original}
    return InternVLXForConditionalGeneration.from_pretrained(dst, config=config, dtype=torch.float32).eval()


def test_su_rope_switches_from_short_to_long_factors(converted):
    """rope_su_check: original_max_position_embeddings 96; a 72-token forward (short factors), 40 greedy steps with
    the KV cache whose positions cross 96 at step 25 (each step picks its factors from its own positions while the
    cached keys keep their rotation), and a 150-token forward (long factors)."""
    dst, _ = converted
    rope = golden.rope_check(FIXTURE, "rope_su_check")
    original = rope.info["original_max_position_embeddings_override"]
    model = _text_model_with_original_length(dst, original)
    input_ids, attention_mask = rope.tensors["input_ids"], rope.tensors["attention_mask"]
    # step k feeds position 71 + k: steps 0..24 stay within 96 positions (short factors), 25..39 do not (long)
    assert (original, input_ids.shape[1], rope.info["max_new_tokens"]) == (96, 72, 40)
    with torch.no_grad():
        short = model(input_ids=input_ids, attention_mask=attention_mask).logits
        long = model(input_ids=rope.tensors["input_ids_long"],
                     attention_mask=torch.ones_like(rope.tensors["input_ids_long"])).logits
    assert rope.logits["logits"].assert_close(short, atol=1e-4) < 1e-4
    assert rope.logits["logits_long"].assert_close(long, atol=1e-4) < 1e-4

    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=40, do_sample=False,
                         eos_token_id=807, pad_token_id=800, output_scores=True, return_dict_in_generate=True)
    assert out.sequences[0, input_ids.shape[1]:].tolist() == rope.tensors["generated_ids"][0].tolist()
    scores = torch.stack(out.scores, 1)[0]
    per_step = (scores - rope.tensors["generation_scores"]).abs().amax(dim=-1)
    assert per_step.max().item() < 1e-4, per_step
    # the check has teeth: decoding everything with the long factors (what recomputing the sequence would do)
    # departs from the reference from the first long step on, by far more than the tolerance
    with torch.no_grad():
        recomputed = model(input_ids=out.sequences[:, :-1]).logits[0, input_ids.shape[1] - 1:]
    assert (recomputed - rope.tensors["generation_scores"]).abs().amax().item() > 0.1
