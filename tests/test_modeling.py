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
from internvlx_hf.modeling.projectors import pixel_shuffle

from conftest import remote_code_imports, require_fixture, run_remote_logits
from tiny import (
    IMAGE_TOKEN_ID,
    assert_greedy_with_cache_equals_recomputation,
    assert_left_padded_batch_equals_alone,
    enable_checkpointing,
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
    assert reloaded.lvtc == config.lvtc and reloaded.lvtc.expand_layer == 2


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


def test_loss_is_shifted_cross_entropy_ignoring_minus_100_and_image_placeholders():
    model = tiny_model()
    ids = torch.tensor([prompt_ids(1, seed=4)])
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(input_ids=ids, pixel_values=pixels(1, seed=5), labels=labels)
    # <IMG_CONTEXT> is replaced by visual features: never a target, even when labels=input_ids
    target = labels[0, 1:].masked_fill(labels[0, 1:] == IMAGE_TOKEN_ID, -100)
    assert int((target == -100).sum()) == 2 + 4
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], target, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("lvtc", [None, {"expand_layer": 2}])
def test_labels_equal_to_input_ids_do_not_train_on_img_tags_when_the_config_names_them(lvtc):
    """With `image_start_token_id` / `image_end_token_id` set (conversion fills them), `<img>` and `</img>` are
    ignored like `<IMG_CONTEXT>`; TRL's collators and `labels=input_ids` users then train on text only."""
    start, end = 101, 102
    model = tiny_model(lvtc=lvtc, image_start_token_id=start, image_end_token_id=end)
    assert model.placeholder_label_ids() == [IMAGE_TOKEN_ID, start, end]
    ids = torch.tensor([[1, 5, 6, start] + [IMAGE_TOKEN_ID] * 8 + [end, 7, 8, 9]])
    pv = pixels(2, seed=6)
    masked = ids.masked_fill((ids == IMAGE_TOKEN_ID) | (ids == start) | (ids == end), -100)
    loss = model(input_ids=ids, pixel_values=pv, labels=ids).loss
    torch.testing.assert_close(loss, model(input_ids=ids, pixel_values=pv, labels=masked).loss, rtol=0, atol=0)
    logits = model(input_ids=ids, pixel_values=pv).logits
    text_only = torch.nn.functional.cross_entropy(logits[0, :-1], masked[0, 1:], ignore_index=-100)
    torch.testing.assert_close(loss, text_only)


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
def test_half_precision_matches_float32(dtype, projector, lvtc):
    """Half precision is the same model up to rounding: logits within 4 machine epsilons of the logit scale (measured:
    bf16 <= 1.7 eps, fp16 <= 1.2 eps over 5 seeds; eps = 2^-8 for bf16, 2^-11 for fp16) and the same greedy tokens."""
    model = tiny_model(projector, lvtc=lvtc)
    ids, pv = torch.tensor([prompt_ids(1, seed=17)]), pixels(1, seed=18)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pv).logits
        ref_tokens = greedy_with_cache(model, ids[0].tolist(), pv, 5)
        half = model.to(dtype)(input_ids=ids, pixel_values=pv).logits  # float32 pixels are cast to the tower
    assert half.dtype == dtype
    tolerance = 4 * torch.finfo(dtype).eps * float(ref.abs().max())
    max_diff = float((half.float() - ref).abs().max())
    print(f"{dtype} {projector} lvtc={lvtc is not None}: max |logits - float32| = {max_diff:.2e} (bar {tolerance:.2e})")
    assert max_diff <= tolerance
    assert greedy_with_cache(model, ids[0].tolist(), pv, 5) == ref_tokens


def run_with_checkpointing(model, **inputs) -> dict[str, int]:
    """Forward + backward with activation checkpointing on; returns how often each checkpointed layer handed its
    forward to transformers' checkpoint function (the function `activation_checkpointing_enable` installs;
    `gradient_checkpointing_enable` before transformers 5.23)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable_checkpointing(model)
    calls = {}
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer):
            def counted(*args, _name=name, _checkpoint=module._gradient_checkpointing_func, **kwargs):
                calls[_name] = calls.get(_name, 0) + 1
                return _checkpoint(*args, **kwargs)
            module._gradient_checkpointing_func = counted
    model(**inputs).loss.backward()
    return calls


def test_gradient_checkpointing_is_active_and_gives_the_same_gradients():
    def grads(checkpointing):
        model = tiny_model("pvtc").train()
        ids = torch.tensor([prompt_ids(2, seed=19)])
        inputs = dict(input_ids=ids, pixel_values=pixels(2, seed=20), labels=ids)
        if checkpointing:
            calls = run_with_checkpointing(model, **inputs)
            # every ViT and LLM layer ran through the checkpoint function, once each in the forward
            assert calls == {**{f"model.vision_tower.encoder.layer.{i}": 1 for i in range(2)},
                             **{f"model.language_model.layers.{i}": 1 for i in range(4)}}
        else:
            model(**inputs).loss.backward()
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
    return run_remote_logits(tmp_path, extra_check)


def reported_max_diff(stdout: str) -> float:
    """The number the remote-code check printed (``MAXDIFF <float>``)."""
    lines = [line for line in stdout.splitlines() if line.startswith("MAXDIFF ")]
    assert len(lines) == 1, stdout
    return float(lines[0].split()[1])


@pytest.mark.oldest
def test_remote_code_load_without_the_plugin(tmp_path):
    model = tiny_model("pvtc")
    ids, pv = torch.tensor([prompt_ids(2, seed=23)]), pixels(2, seed=24)
    stdout = _remote_code_check(tmp_path, model, ids, pv)
    assert reported_max_diff(stdout) == 0.0  # bit-identical logits
    for name in ("modeling_internvlx.py", "configuration_internvlx.py", "projectors.py", "lvtc.py", "lvtc_cache.py",
                 "outputs.py", "chat.py", "compat.py", "input_checks.py", "placeholders.py"):
        third_party = remote_code_imports(tmp_path / "ckpt" / name) - set(sys.stdlib_module_names) - {"."}
        assert third_party <= {"torch", "transformers"}, (name, third_party)


# --------------------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("projector", ["mlp", "pvtc"])
def test_greedy_generate_with_cache_equals_recomputation(projector):
    model = tiny_model(projector)
    ids, pv = prompt_ids(2, seed=25), pixels(2, seed=26)
    assert_greedy_with_cache_equals_recomputation(model, ids, pv, 20)


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
    max_diff = float((output.reshape(3, 16, 16, llm) - tensors["output"]).abs().max())
    print(f"PVTC projector vs reference: max |diff| = {max_diff:.2e} (bar 1e-5)")
    torch.testing.assert_close(output.reshape(3, 16, 16, llm), tensors["output"], atol=1e-5, rtol=0)


def test_pvtc_mapping_covers_every_reference_key():
    tensors = load_file(require_fixture("internvlx_pvtc", "pvtc_projector.safetensors"))
    mapped = map_state_dict(tensors, PVTC_REFERENCE_KEY_MAPPING, "projector.")
    assert len(mapped) == sum(k.startswith("projector.") for k in tensors)
    assert set(mapped) == set(PVTCProjector(64, 64, 32, 2, 1, 16).state_dict())


def test_image_token_id_defaults_to_internvl2_img_context():
    assert InternVLXConfig().image_token_id == 92546
    assert tiny_config().image_token_id == IMAGE_TOKEN_ID


@pytest.mark.parametrize("lvtc", [None, {"expand_layer": 2, "num_lr_projectors": 2}])
@pytest.mark.parametrize("device_map", ["auto", "disk-offload"])
def test_device_map_loads_and_matches(tmp_path, lvtc, device_map):
    """Loading through a device_map. "disk-offload" puts the layers from k on (and the HR projector) on disk, so
    accelerate dispatches the model with hooks that load each offloaded module's weights and align its inputs at
    every call, also for the layers LVTC runs one by one. On one CPU this checks the dispatch path and that outputs
    stay bit-identical; the cross-device moves of the projector outputs and LVTC tensors (to the device of the layer
    that consumes them, as transformers' InternVL does) are no-ops here and need two GPUs to be exercised."""
    tiny_model("pvtc", lvtc=lvtc).save_pretrained(tmp_path)
    extra = {}
    if device_map == "disk-offload":
        device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                      "model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": "cpu",
                      "model.language_model.layers.1": "cpu", "model.language_model.layers.2": "disk",
                      "model.language_model.layers.3": "disk", "model.language_model.norm": "cpu",
                      "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
        if lvtc is not None:
            device_map.update({"model.lvtc_lr_projectors": "cpu", "model.lvtc_hr_projector": "disk"})
        extra = {"offload_folder": str(tmp_path / "offload")}
    ids, pv = torch.tensor([prompt_ids(2, seed=60)]), pixels(2, seed=61)
    placed = AutoModel.from_pretrained(tmp_path, device_map=device_map, attn_implementation="eager", **extra).eval()
    assert placed.device.type in ("cpu", "cuda")
    if extra:  # dispatched: the offloaded layers run through accelerate's hooks
        assert type(placed.model.language_model.layers[3]._hf_hook).__name__ == "AlignDevicesHook"
    plain = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    # Same files loaded two ways must agree bit for bit (no_grad on both sides: PyTorch's CPU SDPA, used in
    # PVTC, picks its kernel by whether the inputs require grad).
    with torch.no_grad():
        expected = plain(input_ids=ids, pixel_values=pv).logits
        logits = placed(input_ids=ids.to(placed.device), pixel_values=pv.to(placed.device)).logits.cpu()
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    tokens = placed.generate(input_ids=ids, pixel_values=pv, max_new_tokens=4, do_sample=False)
    assert tokens.tolist() == plain.generate(input_ids=ids, pixel_values=pv, max_new_tokens=4, do_sample=False).tolist()


@pytest.mark.parametrize("lvtc", [None, {"expand_layer": 2}])
def test_trainer_num_items_in_batch_normalises_the_summed_loss(lvtc):
    model = tiny_model(lvtc=lvtc)
    ids, pv = torch.tensor([prompt_ids(1, seed=62)]), pixels(1, seed=63)
    mean_loss = model(input_ids=ids, pixel_values=pv, labels=ids).loss
    summed = model(input_ids=ids, pixel_values=pv, labels=ids, num_items_in_batch=torch.tensor(5)).loss
    targets = int((ids[0, 1:] != IMAGE_TOKEN_ID).sum())  # image placeholders are no targets
    torch.testing.assert_close(summed, mean_loss * targets / 5)


# ----------------------------------------------------------------------------------- bad model inputs (issue 8)


def _bad_input_error(model, **inputs):
    """The error a forward raises; the vision tower must not have run (all checks come before heavy work)."""
    calls = []
    hook = model.model.vision_tower.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises((ValueError, TypeError)) as info:
            model(**inputs)
    finally:
        hook.remove()
    assert calls == [], "the vision tower ran before the input was rejected"
    return info


@pytest.mark.parametrize("lvtc", [None, {"expand_layer": 2}])
@pytest.mark.parametrize("pixel_values,message", [
    (torch.zeros(0, 3, 56, 56), r"pixel_values holds 0 tiles; for text-only inputs pass pixel_values=None"),
    (torch.zeros(2, 3, 64, 64), r"pixel_values tiles are 64x64 but this model takes 56x56 tiles \(tiles, 3, 56, 56\)"),
    (torch.zeros(2, 1, 56, 56), r"pixel_values has 1 channels .* takes 3 \(RGB\)"),
    (torch.zeros(3, 56, 56), r"pixel_values must have shape \(tiles, 3, 56, 56\), got \(3, 56, 56\) \(one image: add"),
    (torch.zeros(1, 2, 3, 56, 56), r"pixel_values must have shape \(tiles, 3, 56, 56\), got \(1, 2, 3, 56, 56\)"),
    ([[0.0]], r"pixel_values must be a torch.Tensor"),
])
def test_bad_pixel_values_are_named_before_the_vision_tower_runs(lvtc, pixel_values, message):
    model = tiny_model(lvtc=lvtc)
    ids = torch.tensor([prompt_ids(2, seed=70)])
    info = _bad_input_error(model, input_ids=ids, pixel_values=pixel_values)
    assert info.match(message)


def test_ids_outside_the_vocabulary_are_named():
    model = tiny_model()
    for bad in (128, -1):
        ids = torch.tensor([[1, 5, bad, 7]])
        info = _bad_input_error(model, input_ids=ids)
        assert info.match(rf"input_ids contains id {bad} \(1 id\(s\) in all\) outside the vocabulary of 128 tokens")


def test_image_flags_must_have_one_flag_per_tile():
    model = tiny_model()
    ids = torch.tensor([prompt_ids(1, seed=71)])
    info = _bad_input_error(model, input_ids=ids, pixel_values=pixels(2, seed=72), image_flags=torch.tensor([1]))
    assert info.match(r"image_flags has 1 entries but pixel_values holds 2 tiles")


@pytest.mark.parametrize("lvtc", [None, {"expand_layer": 2}])
def test_image_runs_must_hold_whole_tiles(lvtc):
    """A run of 6 and a run of 2 (4 tokens per tile) add up to 2 tiles but split one between two images."""
    model = tiny_model(lvtc=lvtc)
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN_ID] * 6 + [7] + [IMAGE_TOKEN_ID] * 2 + [8]])
    info = _bad_input_error(model, input_ids=ids, pixel_values=pixels(2, seed=73))
    assert info.match(r"Row 0 has a run of 6 image tokens at position 2, which is not a whole number of tiles "
                      r"\(4 image tokens per tile\)")


def test_num_patches_and_tile_grid_are_checked_against_the_prompt():
    model = tiny_model()
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN_ID] * 4 + [7] + [IMAGE_TOKEN_ID] * 12 + [8]])  # images of 1 and 3 tiles
    pv = pixels(4, seed=74)
    expected = model(input_ids=ids, pixel_values=pv).logits
    good = model(input_ids=ids, pixel_values=pv, num_patches=torch.tensor([1, 3]), tile_grid=torch.tensor([[1, 1],
                                                                                                          [2, 1]]))
    torch.testing.assert_close(good.logits, expected, rtol=0, atol=0)
    info = _bad_input_error(model, input_ids=ids, pixel_values=pv, num_patches=torch.tensor([2, 2]))
    assert info.match(r"num_patches \[2, 2\] .* does not match the prompt's <IMG_CONTEXT> runs of \[4, 12\] tokens")
    info = _bad_input_error(model, input_ids=ids, pixel_values=pv, num_patches=torch.tensor([1, 3]),
                            tile_grid=torch.tensor([[1, 1], [2, 2]]))
    assert info.match(r"tile_grid \[\[1, 1\], \[2, 2\]\] .* does not match num_patches \[1, 3\]")
    info = _bad_input_error(model, input_ids=ids, pixel_values=pv, tile_grid=torch.tensor([[2, 2], [2, 1]]))
    assert info.match(r"tile_grid \[\[2, 2\], \[2, 1\]\] .* does not match 4 tiles in pixel_values")
