"""Training a router (ViCO, issue 103): a checkpoint gains one (`--add-router`), stage 1's consistency loss and stage
2's labels against computations by hand, the synthetic tile data, and a two-stage `internvlx train --preset vico` run
whose folder is a Flash checkpoint that loads as remote code without the package."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from internvlx_hf.demo.recipe import TinySpec, build_checkpoint, load_tokenizer_processor
from internvlx_hf.training.synthetic_tiles import generate_tile_dataset
from parity import run_isolated_script

#: 112 px tiles, 64 tokens each at full resolution and 16 compressed (the Flash ratio, 4x), a 2-layer LLM of width 128
#: with 32-wide heads (what vLLM's CPU attention takes)
SPEC = TinySpec(projector="mlp", downsample_ratio=1.0, layers=2, max_tiles=2)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("plain") / "model", SPEC, load_tokenizer_processor(), seed=0)


@pytest.fixture(scope="module")
def routed(plain, tmp_path_factory):
    from internvlx_hf.conversion import convert

    dst = tmp_path_factory.mktemp("routed") / "model"
    assert convert(plain, dst, add_router=True, seed=3) is None  # an internvlx-hf SRC: the router alone is added
    return dst


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    return generate_tile_dataset(tmp_path_factory.mktemp("tiles") / "data", n=8, seed=1, tile=112, grid=(2, 1))


def _batch(folder, meta, rows=4):
    from internvlx_hf import InternVLXProcessor
    from internvlx_hf.training import InternVLXDataCollator

    processor = InternVLXProcessor.from_pretrained(folder)
    entry = next(iter(json.loads(Path(meta).read_text()).values()))
    records = [json.loads(line) for line in Path(entry["annotation"]).read_text().splitlines()][:rows]
    for record in records:
        record["image"] = str(Path(entry["root"]) / record["image"])
    return InternVLXDataCollator(processor)(records), records


def test_a_checkpoint_gains_an_untrained_router_off_and_keeps_every_other_tensor(plain, routed):
    """`--add-router` on an internvlx-hf folder: the config's router off (the published thresholds kept for when it
    is trained), every other tensor bit for bit, the router's drawn from the seed; the model answers as before."""
    from internvlx_hf import InternVLXForConditionalGeneration

    config = json.loads((routed / "config.json").read_text())
    assert config["vir"]["enabled"] is False and config["vir"]["absolute_threshold"] == 0.5
    before, after = load_file(str(plain / "model.safetensors")), load_file(str(routed / "model.safetensors"))
    assert set(after) - set(before) and all(key.startswith("model.vir.") for key in set(after) - set(before))
    assert all(torch.equal(after[key], tensor) for key, tensor in before.items())
    assert after["model.vir.pooling.query_token"].std() > 0.5  # drawn as the reference draws it (N(0, 1))
    ids = torch.tensor([[1, 5, 9, 33, 100, 7]])
    with torch.no_grad():
        torch.testing.assert_close(InternVLXForConditionalGeneration.from_pretrained(routed)(input_ids=ids).logits,
                                   InternVLXForConditionalGeneration.from_pretrained(plain)(input_ids=ids).logits)
    record = json.loads((routed / "internvlx_provenance.json").read_text())
    assert record["router"]["added"]["seed"] == 3


def test_adding_a_router_refuses_what_cannot_take_one(routed, tmp_path):
    from internvlx_hf.conversion import ConversionError, convert
    from internvlx_hf.demo import demo_model_dir

    with pytest.raises(ConversionError, match=r"has a router already"):
        convert(routed, tmp_path / "again", add_router=True)
    with pytest.raises(ConversionError, match=r"cannot take InternVL3\.5-Flash's router: .*without LVTC"):
        convert(demo_model_dir(), tmp_path / "demo", add_router=True)
    assert not (tmp_path / "again").exists() and not (tmp_path / "demo").exists()


def test_the_consistency_loss_is_zero_when_no_tile_is_compressed(routed, tiles):
    """Stage 1's teacher is the model with every tile at full resolution: a student that compresses nothing is that
    model, so the KL divergence is 0; compressing every tile moves it."""
    from internvlx_hf import InternVLXForConditionalGeneration
    from internvlx_hf.training.vico import consistency_loss

    model = InternVLXForConditionalGeneration.from_pretrained(routed).eval()
    batch, _ = _batch(routed, tiles)
    tiles_in_batch = 3 * 4  # 2 tiles and the thumbnail a row
    none = consistency_loss(model, batch, torch.zeros(tiles_in_batch, dtype=torch.bool))
    every = consistency_loss(model, batch, torch.ones(tiles_in_batch, dtype=torch.bool))
    assert abs(none.item()) < 1e-6 and every.item() > 1e-4


def test_the_teacher_is_the_model_given_with_its_lora_adapters_off_in_eval_mode(routed, tiles):
    """`vico`: the teacher's logits are the unwrapped model's at full resolution (adapters off, no dropout), bit
    for bit, while the adapters (here moved off zero) change the student's; the model stays in training mode."""
    from internvlx_hf import InternVLXForConditionalGeneration
    from internvlx_hf.training.distillation import labelled_logits
    from internvlx_hf.training.presets import LoraSettings, apply_preset
    from internvlx_hf.training.vico import full_resolution_logits

    batch, _ = _batch(routed, tiles)
    none = torch.zeros(3 * 4, dtype=torch.bool)
    with torch.no_grad():
        given = labelled_logits(InternVLXForConditionalGeneration.from_pretrained(routed).eval(),
                                {**batch, "vir_compressed": none})
    model = apply_preset(InternVLXForConditionalGeneration.from_pretrained(routed), "vico",
                         LoraSettings(dropout=0.5))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    for module in model.modules():  # dropout in the LLM's attention: the teacher must run without it
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    model.train()
    teacher = full_resolution_logits(model, batch)
    assert model.training and torch.equal(teacher, given)
    with torch.no_grad():
        student = labelled_logits(model.eval(), {**batch, "vir_compressed": none})
    assert (student - given).abs().max() > 1e-3
    trainable = {name.split(".modules_to_save")[0].removeprefix("base_model.model.")
                 for name, parameter in model.named_parameters() if parameter.requires_grad and "lora_" not in name}
    assert trainable == {"model.vir.projector", "model.vir.pooling", "model.vir.gating"}
    with pytest.raises(ValueError, match="--lora_projectors freeze: preset vico trains"):
        apply_preset(InternVLXForConditionalGeneration.from_pretrained(routed), "vico",
                     LoraSettings(projectors="freeze"))


def test_stage_two_labels_follow_the_loss_ratio_of_each_tile_computed_by_hand(routed, tiles):
    """Each tile's ratio: the row's answer loss (the model's own loss on that row alone) with that tile alone
    compressed, over the loss with none; the batched computation gives the same (1e-5)."""
    from internvlx_hf import InternVLXForConditionalGeneration
    from internvlx_hf.training.vico import RatioThreshold, loss_ratios

    model = InternVLXForConditionalGeneration.from_pretrained(routed).eval()
    batch, records = _batch(routed, tiles)
    ratios = loss_ratios(model, batch)
    expected = []
    for row in range(len(records)):
        alone = {key: value[row:row + 1] for key, value in batch.items() if key in ("input_ids", "attention_mask",
                                                                                     "labels")}
        alone["pixel_values"] = batch["pixel_values"][3 * row:3 * row + 3]
        with torch.no_grad():
            none = model(**alone, vir_compressed=torch.zeros(3, dtype=torch.bool)).loss
            for tile in range(3):
                one = torch.zeros(3, dtype=torch.bool)
                one[tile] = True
                expected.append(float(model(**alone, vir_compressed=one).loss / none))
    torch.testing.assert_close(ratios, torch.tensor(expected), atol=1e-5, rtol=0)
    # compressible: at or under the median of the ratios seen, or under 1.02 whatever the median
    threshold = RatioThreshold(share=0.5, window=100, tolerance=0.02)
    cut = max(float(torch.quantile(torch.tensor(expected), 0.5)), 1.02)
    assert threshold.labels(ratios).tolist() == [float(r <= cut) for r in expected]


def test_the_tile_data_records_where_the_answer_is(tiles):
    """Every row's image is the grid it says, with the letter page in its answer tile and filler elsewhere; the
    processor cuts it back into those tiles (the meta's max_dynamic_patch)."""
    from PIL import Image

    from internvlx_hf.processing.image_processing_internvlx import get_tile_grid

    entry = next(iter(json.loads(Path(tiles).read_text()).values()))
    assert entry["max_dynamic_patch"] == 2
    for line in Path(entry["annotation"]).read_text().splitlines():
        record = json.loads(line)
        info = record["tiles"]
        image = Image.open(Path(entry["root"]) / record["image"])
        assert get_tile_grid(image.width, image.height, "ratio", 1, 2, 112) == tuple(info["grid"]) == (2, 1)
        (answer,) = info["answer"]
        assert info["kinds"][answer] == "page" and info["kinds"].count("page") == 1
        page = image.crop((112 * answer, 0, 112 * answer + 112, 112))
        assert (230, 0, 0) in {colour for _, colour in page.getcolors(112 * 112)}  # the red box
        assert re.fullmatch(r"[A-Z]", record["conversations"][-1]["value"])


_LOAD = r"""
import json, sys, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
folder, image = sys.argv[1:3]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
question = {"type": "text", "text": "Which letter is in the red box?"}
messages = [{"role": "user", "content": [{"type": "image"}, question]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=[Image.open(image)], text=prompt, return_tensors="pt")
routing = model.model.route(inputs["input_ids"], inputs["pixel_values"])
out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
new = out.shape[1] - inputs["input_ids"].shape[1]
print("RESULT" + json.dumps({"module": type(model).__module__, "enabled": model.config.vir.enabled,
                             "compressed": routing.compressed.tolist(), "new": new}))
"""


@pytest.mark.parametrize("preset", ["vico", "vico-projector"])
def test_a_two_stage_vico_run_writes_a_flash_checkpoint_that_loads_anywhere(preset, routed, tiles, tmp_path, capsys):
    """`internvlx train --preset vico` on the tile data: stage 1 trains the 64-token projector and LoRA adapters on the
    LLM (merged into its linears; OUT/adapter beside), stage 2 the router's pooling and gate only, the ViT bit for bit
    (`vico-projector`: the LLM too); OUT has the router on and loads as remote code without the package, routing and
    generating."""
    from internvlx_hf.cli import main

    out = tmp_path / "out"
    assert main(["train", "--model", str(routed), "--data", str(tiles), "--preset", preset, "--output_dir", str(out),
                 "--max_steps", "4", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--use_cpu",
                 "--report_to", "none", "--seed", "0", "--disable_tqdm", "true", "--logging_steps", "1",
                 "--save_strategy", "no"]) == 0
    printed = capsys.readouterr().out
    assert f"Trainable parameters (preset {preset})" in printed
    state = json.loads((out / "trainer_state.json").read_text())
    stages = [entry["vico_stage"] for entry in state["log_history"] if "loss" in entry]
    assert stages == [1, 1, 2, 2]
    assert all(0.0 <= entry["vico_compressible"] <= 1.0 for entry in state["log_history"]
               if entry.get("vico_stage") == 2 and "loss" in entry)
    before, after = load_file(str(routed / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    trained = ("model.vir.projector.", "model.vir.pooling.", "model.vir.gating.")
    assert any(key.startswith("model.vir.gating.") for key in changed)
    assert any(key.startswith("model.vir.projector.") for key in changed)
    if preset == "vico-projector":
        assert all(key.startswith(trained) for key in changed), changed
    else:  # the LoRA targets: every attention and MLP linear of the LLM's layers, merged
        llm = {key for key in changed if key.startswith("model.language_model.")}
        assert llm and all(re.search(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", key) for key in llm)
        assert all(key.startswith(trained) for key in changed - llm), changed - llm
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["vir"]["enabled"] is True
    entry = next(iter(json.loads(Path(tiles).read_text()).values()))
    image = Path(entry["root"]) / json.loads(Path(entry["annotation"]).read_text().splitlines()[0])["image"]
    result = run_isolated_script(_LOAD, [str(out), str(image)], tmp_path)
    assert result["module"].startswith("transformers_modules") and result["enabled"] is True
    assert len(result["compressed"]) == 3 and result["new"] == 2


def test_the_guides_vico_tables_are_the_benchmarks_outputs():
    """docs/flash.md's costs table is `benchmarks/vico_costs.py`'s output (and its committed JSON's), its measured
    tables those `benchmarks/bench_vico.py` wrote into `benchmarks/results/vico.json`, whose targets are all met."""
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("vico_costs", REPO_ROOT / "benchmarks" / "vico_costs.py")
    vico_costs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vico_costs)
    guide = (REPO_ROOT / "docs" / "flash.md").read_text(encoding="utf-8")
    costs = vico_costs.table(vico_costs.costs())
    assert costs in guide
    assert json.loads((REPO_ROOT / "benchmarks" / "results" / "vico-costs.json").read_text())["table"] == costs
    measured = json.loads((REPO_ROOT / "benchmarks" / "results" / "vico.json").read_text())
    assert measured["table"] in guide
    assert [target["met"] for target in measured["targets"]] == [True] * 4, measured["targets"]


@pytest.mark.parametrize("preset,groups", [
    ("vico", {"compressed_projector", "router", "llm"}),  # the LLM's: LoRA adapters alone
    ("vico-projector", {"compressed_projector", "router"}),
    ("vico-router", {"router"}),
])
def test_each_vico_preset_trains_what_the_presets_table_says(routed, preset, groups):
    """docs/fine-tuning.md's rows: `vico` the compressed tiles' projector, the router and LoRA on the LLM's linears,
    `vico-projector` the first two, `vico-router` the router alone (its pooling and gate: the projector is not the
    router's); a model without a router is refused with the way to add one."""
    from internvlx_hf import InternVLXForConditionalGeneration
    from internvlx_hf.demo import demo_model_dir
    from internvlx_hf.training.presets import apply_preset, module_group

    model = apply_preset(InternVLXForConditionalGeneration.from_pretrained(routed), preset)
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert {module_group(name) for name in trained} == groups
    assert all("lora_" in name for name in trained if module_group(name) == "llm")
    if preset == "vico-router":
        assert not any(".vir.projector." in name for name in trained)
    with pytest.raises(ValueError, match=r"has none \(config\.vir is None\): add one first, `internvlx convert SRC "
                                         r"DST --add-router`"):
        apply_preset(InternVLXForConditionalGeneration.from_pretrained(demo_model_dir()), preset)


def test_a_batch_of_text_rows_gives_both_stages_a_zero_loss_and_teacher_is_refused_before_any_work(routed, tmp_path,
                                                                                                 capsys):
    """Rows without an image (a mixed data set can batch them alone): stage 1's divergence and stage 2's labels have
    nothing to compare, so each stage's loss is 0 and backpropagates; `--teacher` is refused before the data is
    read (ViCO's teacher is the model itself)."""
    from transformers import TrainingArguments

    from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor
    from internvlx_hf.cli import main
    from internvlx_hf.training import InternVLXDataCollator
    from internvlx_hf.training.presets import apply_preset
    from internvlx_hf.training.vico import ViCOSettings, ViCOTrainer

    processor = InternVLXProcessor.from_pretrained(routed)
    rows = [{"conversations": [{"from": "human", "value": "Say A."}, {"from": "gpt", "value": "A"}]}] * 2
    batch = InternVLXDataCollator(processor)(rows)
    model = apply_preset(InternVLXForConditionalGeneration.from_pretrained(routed), "vico-projector")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=2)
    for router_only in (False, True):
        trainer = ViCOTrainer(model=model, args=args, settings=ViCOSettings(), router_only=router_only)
        trainer.state.max_steps, trainer.state.global_step = 2, 0
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        assert trainer.stage() == (2 if router_only else 1) and loss.item() == pytest.approx(0.0, abs=1e-6)
    capsys.readouterr()  # (the models loaded above)
    assert main(["train", "--model", str(routed), "--data", str(tmp_path / "missing.jsonl"), "--preset", "vico",
                 "--teacher", str(routed), "--output_dir", str(tmp_path / "out2")]) == 2
    assert capsys.readouterr().err.strip() == ("internvlx train: error: --preset vico takes its teacher from the model "
                                               "itself (every tile at full resolution); drop --teacher")
