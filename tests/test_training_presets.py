"""Presets (stage1 / stage2 / stage2-frozen-vit / full / lora): what trains, frozen weights bit-identical, LoRA targets
and merging."""

from __future__ import annotations

import json
import re

import pytest
import torch

import training_helpers as th
from internvlx_hf.training import (
    PRESETS,
    InternVLXDataCollator,
    InternVLXDataset,
    InternVLXTrainer,
    LoraSettings,
    apply_preset,
    format_trainable,
    lora_target_modules,
    trainable_parameters,
)
from internvlx_hf.training.presets import module_group

LVTC = {"projector": "pvtc", "lvtc": "k=2,T=2"}


def _counts(model):
    return {row.group: (row.trainable, row.total) for row in trainable_parameters(model)}


def test_presets_train_the_paper_stages():
    expected = {  # (trainable, total) per group of the converted InternVL2 (Qwen2) fixture
        "stage1": {"vision": (0, 170560), "projector": (21120, 21120), "llm": (0, 144704), "lm_head": (0, 51968)},
        "stage2": {"vision": (170560, 170560), "projector": (21120, 21120), "llm": (144704, 144704),
                   "lm_head": (51968, 51968)},
        "stage2-frozen-vit": {"vision": (0, 170560), "projector": (21120, 21120), "llm": (144704, 144704),
                              "lm_head": (51968, 51968)},
        "full": {"vision": (170560, 170560), "projector": (21120, 21120), "llm": (144704, 144704),
                 "lm_head": (51968, 51968)},
        # LoRA r=16 on q/k/v/o (64x64, 64x32, 64x32, 64x64) and gate/up/down (64x176) of 2 layers
        "lora": {"vision": (0, 170560), "projector": (21120, 21120), "llm": (37376, 144704 + 37376),
                 "lm_head": (0, 51968)},
    }
    for preset, counts in expected.items():
        model, _ = th.load(th.converted("internvl2_qwen2"))
        assert _counts(apply_preset(model, preset)) == counts, preset
    lora_per_layer = 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 176) * 3)
    assert lora_per_layer * 2 == 37376
    text = format_trainable(model, "lora")
    assert "  llm                          37,376        182,080" in text
    assert text.endswith("58,496        425,728  (13.74% trainable)")

    # An upgraded checkpoint: stage 1 trains the PVTC projector and LVTC's LR and HR projectors only.
    model, _ = th.load(th.converted("internvl2_internlm2", **LVTC))
    assert _counts(apply_preset(model, "stage1")) == {
        "vision": (0, 170560), "projector": (172800, 172800), "lvtc_lr_projectors": (172800, 172800),
        "lvtc_hr_projector": (8448, 8448), "llm": (0, 190848), "lm_head": (0, 52160)}


def test_lora_targets(tmp_path):
    model, _ = th.load(th.converted("internvl2_internlm2", **LVTC))
    llm = lora_target_modules(model)
    assert len(llm) == 3 * 7 and all(re.fullmatch(r"model\.language_model\.layers\.\d\.(self_attn|mlp)\.\w+", n)
                                     for n in llm)
    vision = lora_target_modules(model, "vision")
    assert {n.split(".")[-1] for n in vision} == {"q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"}
    assert lora_target_modules(model, "q_proj,vision.fc1") == [
        *(f"model.language_model.layers.{i}.self_attn.q_proj" for i in range(3)),
        *(f"model.vision_tower.encoder.layer.{i}.mlp.fc1" for i in range(2))]
    with pytest.raises(ValueError, match=r"lora_target item 'qkv' matches no Linear layer of the llm; its Linear "
                                         r"layers are named \['down_proj', 'gate_proj', 'k_proj', 'o_proj'"):
        lora_target_modules(model, "qkv")

    # The PVTC projector also has q_proj/k_proj/v_proj: it is trained in full, never given adapters, also when the
    # saved adapter is loaded again (the saved targets are a regex, not peft's bare "q_proj" names).
    peft_model = apply_preset(model, "lora")
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_parameters() if ".lora_A." in name}
    assert {n.removeprefix("base_model.model.") for n in adapted} == set(llm)
    assert {module_group(n) for n, p in peft_model.named_parameters() if p.requires_grad} == {
        "projector", "lvtc_lr_projectors", "lvtc_hr_projector", "llm"}
    peft_model.save_pretrained(tmp_path / "adapter")
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(th.load(th.converted("internvl2_internlm2", **LVTC))[0], tmp_path / "adapter")
    assert {n for n, _ in reloaded.named_parameters() if ".lora_A." in n} == \
        {n for n, _ in peft_model.named_parameters() if ".lora_A." in n}


def test_lora_with_frozen_projectors_saves_adapters_only(tmp_path):
    """`--lora_projectors freeze`: only the adapters train and the saved adapter has no `modules_to_save` (vLLM's LoRA
    refuses one that has); the default trains the projectors in full."""
    model, _ = th.load(th.converted("internvl2_internlm2", **LVTC))
    peft_model = apply_preset(model, "lora", LoraSettings(projectors="freeze"))
    assert {module_group(n) for n, p in peft_model.named_parameters() if p.requires_grad} == {"llm"}
    assert all(".lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] is None
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert f.keys() and all(".lora_A." in k or ".lora_B." in k for k in f.keys())

    default = apply_preset(th.load(th.converted("internvl2_internlm2", **LVTC))[0], "lora")
    assert default.peft_config["default"].modules_to_save == [
        "model.multi_modal_projector", "model.lvtc_lr_projectors.0", "model.lvtc_hr_projector"]
    with pytest.raises(ValueError, match=r"lora_projectors must be one of \['train', 'freeze'\], got 'frozen'"):
        apply_preset(th.load(th.converted("internvl2_internlm2", **LVTC))[0], "lora", LoraSettings(projectors="frozen"))


# What each preset trains, as the docs state it (not as presets.py computes it): parameter-name prefixes of the
# documented groups, and per preset whether each group trains. For `lora`, the LLM's own weights stay frozen and
# only its adapters train.
GROUPS = {
    "vision tower": "model.vision_tower.",
    "PVTC / MLP projector": "model.multi_modal_projector.",
    "LVTC LR projectors": "model.lvtc_lr_projectors.",
    "LVTC HR projector": "model.lvtc_hr_projector.",
    "LLM": "model.language_model.",
    "lm_head": "lm_head.",
}
PROJECTORS = {"PVTC / MLP projector": True, "LVTC LR projectors": True, "LVTC HR projector": True}
DOCUMENTED = {
    "stage1": {"vision tower": False, **PROJECTORS, "LLM": False, "lm_head": False},
    "stage2": {"vision tower": True, **PROJECTORS, "LLM": True, "lm_head": True},
    "stage2-frozen-vit": {"vision tower": False, **PROJECTORS, "LLM": True, "lm_head": True},
    "full": {"vision tower": True, **PROJECTORS, "LLM": True, "lm_head": True},
    "lora": {"vision tower": False, **PROJECTORS, "LLM": False, "lm_head": False},
}


def test_the_documented_table_covers_every_preset():
    # qlora (lora on a 4-bit base, which needs bitsandbytes) is checked in tests/test_quantization.py, ViCO's presets
    # (a model with a router) in tests/test_vico.py
    assert set(DOCUMENTED) == set(PRESETS) - {"qlora", "vico", "vico-projector", "vico-router"}


def _group(name: str) -> str:
    matches = [group for group, prefix in GROUPS.items() if name.startswith(prefix)]
    assert len(matches) == 1, f"{name} is in no documented group"
    return matches[0]


def _train_one_step(model, processor, tmp_path):
    """One Trainer step on four rows of the colour task; the trainer and its dataset."""
    data = th.write_jsonl(tmp_path / "d.jsonl", th.colour_rows(tmp_path, 4))
    dataset = InternVLXDataset(str(data), processor, progress=False)
    trainer = InternVLXTrainer(model=model, args=th.training_args(tmp_path / "out", max_steps=1, learning_rate=1e-2),
                               train_dataset=dataset, data_collator=InternVLXDataCollator(processor),
                               processing_class=processor)
    trainer.train()
    return trainer, dataset


@pytest.mark.parametrize("preset", sorted(DOCUMENTED))
def test_presets_train_the_documented_groups_and_nothing_else(preset, tmp_path):
    # An upgraded checkpoint (PVTC projector, LVTC's LR and HR projectors), so that every group exists.
    model, processor = th.load(th.converted("internvl2_internlm2", **LVTC))
    before = th.snapshot(model)
    assert {_group(name) for name in before} == set(GROUPS)
    model = apply_preset(model, preset)
    trainer, dataset = _train_one_step(model, processor, tmp_path)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    parameters = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters()}
    if preset == "lora":
        adapters = {n: p for n, p in parameters.items() if ".lora_" in n}
        assert {_group(n) for n in adapters} == {"LLM"}
        assert all(id(p) in optimized for p in adapters.values())
        assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in adapters.items() if ".lora_B." in n)
        # The projectors train as peft's copies (modules_to_save); the originals and the base weights stay frozen.
        copies = {n.replace(".modules_to_save.default.", "."): p for n, p in parameters.items()
                  if ".modules_to_save.default." in n}
        assert {_group(n) for n in copies} == {g for g, trains in DOCUMENTED[preset].items() if trains}
        assert all(id(p) in optimized for p in copies.values())
        assert all(any(not torch.equal(p, before[n]) for n, p in copies.items() if _group(n) == g) for g in PROJECTORS)
        parameters = {n.replace(".base_layer.", ".").replace(".original_module.", "."): p
                      for n, p in parameters.items() if ".lora_" not in n and ".modules_to_save." not in n}
    assert parameters.keys() == before.keys()
    changed = {group: False for group in GROUPS}
    for name, parameter in parameters.items():
        group = _group(name)
        changed[group] |= not torch.equal(parameter.detach(), before[name])
        trains = DOCUMENTED[preset][group] and preset != "lora"
        assert parameter.requires_grad == trains and (id(parameter) in optimized) == trains, f"{preset}: {name}"
        if not trains:
            assert torch.equal(parameter.detach(), before[name]), f"{preset}: frozen {name} ({group}) changed"
    # Every group that trains learned in this step (LVTC's new branches start with a zeroed output layer, so some of
    # their layers get no gradient before the second step; the group as a whole moves at once).
    assert changed == {group: DOCUMENTED[preset][group] and preset != "lora" for group in GROUPS}


def test_lora_adapters_merge_into_the_same_logits(tmp_path):
    model, processor = th.load(th.converted("internvl2_qwen2"))
    model = apply_preset(model, "lora")
    trainer, dataset = _train_one_step(model, processor, tmp_path)
    batch = InternVLXDataCollator(processor)([dataset[0], dataset[1]])
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        merged = model.merge_and_unload()(**batch).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
