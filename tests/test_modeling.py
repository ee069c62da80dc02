"""InternVL-X model (issue 2): config, forward/backward, save/load, remote code, generation, PVTC parity."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration, PVTCProjector
from internvlx_hf.conversion.key_mapping import PVTC_REFERENCE_KEY_MAPPING, map_state_dict
from internvlx_hf.modeling.modeling_internvlx import pixel_shuffle

from conftest import remote_code_imports, require_fixture, run_isolated_python
from tiny import (
    IMAGE_TOKEN_ID,
    assert_left_padded_batch_equals_alone,
    greedy_by_recomputation,
    greedy_with_cache,
    left_pad,
    pixels,
    prompt_ids,
    tiny_config,
    tiny_model,
)

# ----------------------------------------------------------------------------------------------------------- config


def test_config_defaults_are_internvl2_2b():
    config = InternVLXConfig()
    assert config.image_seq_length == 256
    assert config.vision_config.hidden_size == 1024 and config.vision_config.num_hidden_layers == 24
    assert config.text_config.model_type == "llama" and config.text_config.num_hidden_layers == 24
    assert config.text_config.hidden_size == 2048 and config.text_config.num_key_value_heads == 8
    assert config.projector_type == "mlp" and config.lvtc is None and config.select_layer == -1


def test_image_seq_length_is_derived_and_checked():
    assert InternVLXConfig(downsample_ratio=1.0).image_seq_length == 1024
    assert InternVLXConfig(downsample_ratio=0.25).image_seq_length == 64
    with pytest.raises(ValueError, match="image_seq_length=100 conflicts .* give 256 tokens per tile"):
        InternVLXConfig(image_seq_length=100)
    with pytest.raises(ValueError, match="downsample_ratio=0.3 does not divide the 32x32 ViT grid"):
        InternVLXConfig(downsample_ratio=0.3)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="projector_type must be one of"):
        InternVLXConfig(projector_type="conv")
    with pytest.raises(ValueError, match="needs a 'model_type'"):
        InternVLXConfig(text_config={"hidden_size": 8})


@pytest.mark.parametrize("llm", ["llama", "qwen2", "phi3"])
def test_config_round_trip_and_auto_map(tmp_path, llm):
    config = tiny_config(llm=llm, lvtc={"expand_layer": 2})
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "internvlx"
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_internvlx.InternVLXConfig",
        "AutoModel": "modeling_internvlx.InternVLXForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_internvlx.InternVLXForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_internvlx.InternVLXForConditionalGeneration",
    }
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, InternVLXConfig)
    assert reloaded.text_config.model_type == llm
    assert reloaded.lvtc == config.lvtc and reloaded.lvtc["expand_layer"] == 2


def test_auto_classes_resolve_to_conditional_generation():
    config = tiny_config()
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        assert type(auto.from_config(config)) is InternVLXForConditionalGeneration


# ---------------------------------------------------------------------------------------------------- forward/train


@pytest.mark.parametrize("projector", ["mlp", "pvtc"])
def test_forward_backward_every_parameter_gets_a_gradient(projector):
    model = tiny_model(projector).train()
    ids = torch.tensor([prompt_ids(2, seed=1), prompt_ids(2, seed=2)])
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(input_ids=ids, pixel_values=pixels(4, seed=3), labels=labels)
    assert out.logits.shape == (2, ids.shape[1], 128)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = tiny_model()
    ids = torch.tensor([prompt_ids(1, seed=4)])
    labels = ids.clone()
    labels[0, :6] = -100
    out = model(input_ids=ids, pixel_values=pixels(1, seed=5), labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_logits_to_keep_gives_the_last_logits_only():
    model = tiny_model("pvtc")
    ids, pv = torch.tensor([prompt_ids(2, seed=6)]), pixels(2, seed=7)
    full = model(input_ids=ids, pixel_values=pv).logits
    last = model(input_ids=ids, pixel_values=pv, logits_to_keep=1).logits
    assert last.shape == (1, 1, 128)
    torch.testing.assert_close(last[:, -1], full[:, -1])


def test_placeholder_feature_count_mismatch_is_a_clear_error():
    model = tiny_model()
    ids = torch.tensor([prompt_ids(2, seed=8)])  # 8 image tokens = 2 tiles
    with pytest.raises(ValueError, match=r"input has 8 image tokens .* the 3 tiles give 12 features"):
        model(input_ids=ids, pixel_values=pixels(3, seed=9))
    with pytest.raises(ValueError, match="8 image tokens but no pixel_values"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="num_patches sums to 3 tiles but pixel_values holds 2"):
        model(input_ids=ids, pixel_values=pixels(2, seed=9), num_patches=torch.tensor([3]))


def test_inputs_embeds_path_equals_input_ids_path():
    model = tiny_model()
    ids, pv = torch.tensor([prompt_ids(1, seed=10)]), pixels(1, seed=11)
    a = model(input_ids=ids, pixel_values=pv).logits
    b = model(inputs_embeds=model.get_input_embeddings()(ids), pixel_values=pv).logits
    torch.testing.assert_close(a, b)


def test_image_flags_drop_dummy_tiles():
    model = tiny_model()
    ids, pv = torch.tensor([prompt_ids(1, seed=12)]), pixels(2, seed=13)
    kept = model(input_ids=ids, pixel_values=pv[1:]).logits
    flagged = model(input_ids=ids, pixel_values=pv, image_flags=torch.tensor([0, 1])).logits
    torch.testing.assert_close(kept, flagged)


def test_pixel_shuffle_matches_internvl2_v2_order():
    grid = torch.arange(4 * 4 * 1, dtype=torch.float32).reshape(1, 4, 4, 1)
    merged = pixel_shuffle(grid, 2)
    # token (0, 1) holds patches (0,2), (0,3), (1,2), (1,3): top-left, top-right, bottom-left, bottom-right.
    assert merged[0, 0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]
    assert merged[0, 1, 0].tolist() == [8.0, 9.0, 12.0, 13.0]


@pytest.mark.parametrize("attn", ["sdpa"])
def test_attention_implementations_agree(attn):
    eager, other = tiny_model("pvtc", attn="eager"), tiny_model("pvtc", attn=attn)
    ids, mask = left_pad([prompt_ids(1, seed=14), prompt_ids(2, seed=15, n_text=9)])
    pv = pixels(3, seed=16)
    torch.testing.assert_close(
        other(input_ids=ids, attention_mask=mask, pixel_values=pv).logits[mask.bool()],
        eager(input_ids=ids, attention_mask=mask, pixel_values=pv).logits[mask.bool()],
        atol=1e-5, rtol=1e-5,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("projector,lvtc", [("mlp", None), ("pvtc", {"expand_layer": 2})])
def test_half_precision_forward_and_generate(dtype, projector, lvtc):
    model = tiny_model(projector, lvtc=lvtc)
    ids, pv = torch.tensor([prompt_ids(1, seed=17)]), pixels(1, seed=18)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pv).logits
        half = model.to(dtype)(input_ids=ids, pixel_values=pv).logits  # float32 pixels are cast to the tower
    assert half.dtype == dtype
    assert (half.float() - ref).abs().max() < 0.1  # half precision rounding only, not a different model
    out = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        model = tiny_model("pvtc").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        ids = torch.tensor([prompt_ids(2, seed=19)])
        model(input_ids=ids, pixel_values=pixels(2, seed=20), labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)


def test_no_split_modules_cover_vision_projector_and_llm_layers():
    model = tiny_model()
    assert {"InternVLVisionLayer", "InternVLXMLPProjector", "LlamaDecoderLayer"} <= set(model._no_split_modules)


# ------------------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("projector,llm", [("mlp", "llama"), ("pvtc", "qwen2")])
def test_save_and_from_pretrained_give_identical_logits(tmp_path, projector, llm):
    model = tiny_model(projector, llm=llm)
    ids, pv = torch.tensor([prompt_ids(2, seed=21)]), pixels(2, seed=22)
    expected = model(input_ids=ids, pixel_values=pv).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_internvlx.py").exists() and (tmp_path / "configuration_internvlx.py").exists()
    reloaded = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is InternVLXForConditionalGeneration
    if llm == "qwen2":  # tied embeddings stay tied after the round trip
        assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(reloaded(input_ids=ids, pixel_values=pv).logits, expected, rtol=0, atol=0)


def _remote_code_check(tmp_path, model, ids, pv, extra_check=""):
    """Save ``model``, then reload it in a fresh interpreter without internvlx_hf and compare logits exactly."""
    expected = model(input_ids=ids, pixel_values=pv).logits
    model.save_pretrained(tmp_path / "ckpt")
    save_file({"ids": ids, "pv": pv, "expected": expected.contiguous()}, tmp_path / "io.safetensors")
    code = f"""
import torch
from safetensors.torch import load_file
from transformers import AutoModel
t = load_file("io.safetensors")
model = AutoModel.from_pretrained("ckpt", trust_remote_code=True, attn_implementation="eager").eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    logits = model(input_ids=t["ids"], pixel_values=t["pv"]).logits
print("MAXDIFF", float((logits - t["expected"]).abs().max()))
{extra_check}
"""
    result = run_isolated_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_remote_code_load_without_the_plugin(tmp_path):
    model = tiny_model("pvtc")
    ids, pv = torch.tensor([prompt_ids(2, seed=23)]), pixels(2, seed=24)
    stdout = _remote_code_check(tmp_path, model, ids, pv)
    assert "MAXDIFF 0.0" in stdout
    for name in ("modeling_internvlx.py", "configuration_internvlx.py"):
        third_party = remote_code_imports(tmp_path / "ckpt" / name) - set(sys.stdlib_module_names) - {"."}
        assert third_party <= {"torch", "transformers"}, (name, third_party)


# --------------------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("projector", ["mlp", "pvtc"])
def test_greedy_generate_with_cache_equals_recomputation(projector):
    model = tiny_model(projector)
    ids, pv = prompt_ids(2, seed=25), pixels(2, seed=26)
    assert greedy_with_cache(model, ids, pv, 20) == greedy_by_recomputation(model, ids, pv, 20)


def test_left_padded_batch_equals_each_prompt_alone():
    model = tiny_model("pvtc")
    prompts = [prompt_ids(t, seed=30 + t, n_text=3 + 2 * t) for t in (1, 2, 3)]
    images = [pixels(t, seed=40 + t) for t in (1, 2, 3)]
    assert_left_padded_batch_equals_alone(model, prompts, images, steps=10)


# ------------------------------------------------------------------------------------------------------ PVTC parity


def test_pvtc_projector_matches_the_reference_fixture():
    path = require_fixture("internvlx_pvtc", "pvtc_projector.safetensors")
    tensors = load_file(path)
    info = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["info"])
    vit, llm = int(info["vit_hidden_size"]), int(info["llm_hidden_size"])
    projector = PVTCProjector(vit, llm, grid=32, window=2, num_layers=1, num_heads=int(info["num_heads"]))
    projector.load_state_dict(map_state_dict(tensors, PVTC_REFERENCE_KEY_MAPPING, "projector."), strict=True)
    with torch.no_grad():
        output = projector(tensors["vit_embeds"])
    assert output.shape == (3, 256, llm)
    torch.testing.assert_close(output.reshape(3, 16, 16, llm), tensors["output"], atol=1e-5, rtol=0)


def test_pvtc_mapping_covers_every_reference_key():
    tensors = load_file(require_fixture("internvlx_pvtc", "pvtc_projector.safetensors"))
    mapped = map_state_dict(tensors, PVTC_REFERENCE_KEY_MAPPING, "projector.")
    assert len(mapped) == sum(k.startswith("projector.") for k in tensors)
    assert set(mapped) == set(PVTCProjector(64, 64, 32, 2, 1, 16).state_dict())


def test_image_token_id_defaults_to_internvl2_img_context():
    assert InternVLXConfig().image_token_id == 92546
    assert tiny_config().image_token_id == IMAGE_TOKEN_ID


def test_device_map_auto_loads_and_matches(tmp_path):
    pytest.importorskip("accelerate", reason="device_map needs accelerate (a dependency of peft)")
    tiny_model("pvtc").save_pretrained(tmp_path)
    ids, pv = torch.tensor([prompt_ids(1, seed=60)]), pixels(1, seed=61)
    placed = AutoModel.from_pretrained(tmp_path, device_map="auto", attn_implementation="eager").eval()
    assert placed.device.type in ("cpu", "cuda")
    plain = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    # Same files loaded two ways must agree bit for bit (no_grad on both sides: PyTorch's CPU SDPA, used in
    # PVTC, picks its kernel by whether the inputs require grad).
    with torch.no_grad():
        expected = plain(input_ids=ids, pixel_values=pv).logits
        logits = placed(input_ids=ids.to(placed.device), pixel_values=pv.to(placed.device)).logits.cpu()
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("lvtc", [None, {"expand_layer": 2}])
def test_trainer_num_items_in_batch_normalises_the_summed_loss(lvtc):
    model = tiny_model(lvtc=lvtc)
    ids, pv = torch.tensor([prompt_ids(1, seed=62)]), pixels(1, seed=63)
    mean_loss = model(input_ids=ids, pixel_values=pv, labels=ids).loss
    summed = model(input_ids=ids, pixel_values=pv, labels=ids, num_items_in_batch=torch.tensor(5)).loss
    torch.testing.assert_close(summed, mean_loss * (ids.shape[1] - 1) / 5)
