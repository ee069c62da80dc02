"""Presets (stage1 / stage2 / full / lora): what trains, frozen weights bit-identical, LoRA targets and merging."""

from __future__ import annotations

import re

import pytest
import torch

import training_helpers as th
from internvlx_hf.training import (
    InternVLXDataCollator,
    InternVLXDataset,
    InternVLXTrainer,
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
        "stage2": {"vision": (0, 170560), "projector": (21120, 21120), "llm": (144704, 144704),
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


@pytest.mark.parametrize("preset", ["stage1", "stage2", "full", "lora"])
def test_frozen_parameters_stay_bit_identical(preset, tmp_path):
    model, processor = th.load(th.converted("internvl2_qwen2"))
    before = th.snapshot(model)
    model = apply_preset(model, preset)
    trainable = {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}
    data = th.write_jsonl(tmp_path / "d.jsonl", th.colour_rows(tmp_path, 4))
    dataset = InternVLXDataset(str(data), processor, progress=False)
    trainer = InternVLXTrainer(model=model, args=th.training_args(tmp_path / "out", max_steps=1, learning_rate=1e-2),
                               train_dataset=dataset, data_collator=InternVLXDataCollator(processor),
                               processing_class=processor)
    trainer.train()
    after = {n.removeprefix("base_model.model."): p.detach() for n, p in model.named_parameters()}
    if preset == "lora":  # the base weights of adapted layers and the frozen copies of the projector
        after = {n.replace(".base_layer.", ".").replace(".original_module.", "."): p for n, p in after.items()}
        trained_copies = {n.replace(".modules_to_save.default.", "."): p for n, p in after.items()
                          if ".modules_to_save.default." in n}
        for name, value in trained_copies.items():
            assert not torch.equal(value, before[name]), f"{name} did not train"
    frozen = [name for name in before if name not in trainable]
    assert frozen or preset == "full"
    for name in frozen:
        assert torch.equal(after[name], before[name]), f"{preset}: frozen {name} changed"
    for name in trainable:
        if name in before:
            assert not torch.equal(after[name], before[name]), f"{preset}: {name} did not train"
        else:  # LoRA matrices: B starts at zero
            assert ".lora_" in name or ".modules_to_save." in name
    if preset == "lora":
        assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in after.items() if ".lora_B." in n)

        # The merged model computes what the adapted one does.
        batch = InternVLXDataCollator(processor)([dataset[0], dataset[1]])
        model.eval()
        with torch.no_grad():
            adapted = model(**batch).logits
            merged = model.merge_and_unload()(**batch).logits
        torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
