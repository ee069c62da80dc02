"""The short version of benchmarks/bench_learnability.py: a few dozen steps of the real training pipeline
(synthetic InternVL meta/JSONL -> InternVLXDataset -> InternVLXDataCollator -> HF Trainer via `train()`) bring the
loss of a freshly initialised tiny model well below its start, for every projector / LVTC setting."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from internvlx_hf.demo.recipe import (
    CONFIGS,
    DataSpec,
    TinySpec,
    TrainSpec,
    build_checkpoint,
    evaluate,
    load_tokenizer_processor,
    make_datasets,
    read_records,
    train_checkpoint,
)
from conftest import load_script
from tiny import left_pad, pixels, prompt_ids, tiny_model

# Shallower than the benchmark's models (3 LLM layers, 1 ViT layer), so that four settings train in under a minute.
SMALL = dict(layers=3, vision_layers=1)
SETTINGS = {
    "mlp": TinySpec(projector="mlp", **SMALL),
    "pvtc": TinySpec(projector="pvtc", **SMALL),
    "lvtc": TinySpec(projector="mlp", lvtc_k=2, **SMALL),
    "pvtc+lvtc": TinySpec(projector="pvtc", lvtc_k=2, **SMALL),
}
STEPS = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("learnability")
    spec = SETTINGS["mlp"]
    data_spec = DataSpec(n_basic=192, n_fine=32, fine_repeat=2, n_test=10)
    train_meta, _ = make_datasets(root / "data", spec, data_spec)
    return root, train_meta, load_tokenizer_processor()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_few_dozen_steps_bring_the_loss_well_below_its_start(name, data):
    root, train_meta, base = data
    torch.set_num_threads(1)  # as measured (float sums depend on the thread count); conftest restores it
    start = build_checkpoint(root / f"init-{name}", SETTINGS[name], base, seed=0)
    metrics = train_checkpoint(start, train_meta, root / f"out-{name}",
                               TrainSpec(steps=STEPS, batch_size=16), progress=False)
    result = metrics.pop("result")
    losses = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
    assert len(losses) == 10  # logged every 4 steps
    # An untrained model is near ln(812) = 6.7 nats on the answer tokens; the answers come from ~30 words, and
    # the end-of-turn token follows every answer, so a model that learns anything is far below that.
    assert losses[0] > 5.0, losses
    assert losses[-1] < 0.25 * losses[0], losses  # measured: 6.6-6.9 -> 1.0-1.2 (seed 0)
    assert losses[-1] < 1.8, losses
    config = json.loads((root / f"out-{name}" / "config.json").read_text())
    assert config["projector_type"] == SETTINGS[name].projector
    assert (config["lvtc"] or {}).get("expand_layer") == SETTINGS[name].lvtc_k


def test_the_benchmark_configurations_are_the_issue_ones():
    assert list(CONFIGS) == ["plain-256", "plain-1024", "pvtc-256", "lvtc-256-1024", "pvtc+lvtc"]
    assert CONFIGS["plain-1024"].downsample_ratio == 1.0
    assert {CONFIGS[n].downsample_ratio for n in ("plain-256", "pvtc-256", "lvtc-256-1024", "pvtc+lvtc")} == {0.5}
    assert CONFIGS["lvtc-256-1024"].lvtc_k == CONFIGS["pvtc+lvtc"].lvtc_k == 5
    assert replace(CONFIGS["pvtc+lvtc"], lvtc_k=None) == CONFIGS["pvtc-256"]


def test_datasets_of_other_sizes_never_reuse_each_others_files(data):
    root, train_meta, _ = data

    def fine_entry(meta):
        return next(entry for name, entry in json.loads(meta.read_text()).items() if name.startswith("fine"))

    other_meta, _ = make_datasets(root / "data", SETTINGS["mlp"],
                                  DataSpec(n_basic=192, n_fine=12, fine_repeat=3, n_test=10))
    assert other_meta != train_meta
    assert (fine_entry(other_meta)["length"], fine_entry(other_meta)["repeat_time"]) == (12, 3)
    assert (fine_entry(train_meta)["length"], fine_entry(train_meta)["repeat_time"]) == (32, 2)


def test_the_hr_ablation_changes_the_hr_features_only():
    """The benchmark's `hr_features` (how it tells whether a trained LVTC model reads through its HR tokens): "zeroed"
    is exactly a model whose HR projector outputs zeros, "other image" changes the logits, and leaving the context
    restores the model."""
    bench = load_script("benchmarks/bench_learnability.py")
    model = tiny_model("mlp", lvtc={"expand_layer": 2})
    ids, mask = left_pad([prompt_ids(1, seed=1), prompt_ids(1, seed=2, n_text=7)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2, seed=3))
    silent = copy.deepcopy(model)
    last = silent.model.lvtc_hr_projector.linear_2
    torch.nn.init.zeros_(last.weight), torch.nn.init.zeros_(last.bias)
    with torch.no_grad():
        intact = model(**inputs).logits
        with bench.hr_features(model, "intact"):
            assert torch.equal(model(**inputs).logits, intact)
        with bench.hr_features(model, "zeroed"):
            zeroed = model(**inputs).logits
        with bench.hr_features(model, "other image"):
            other = model(**inputs).logits
        assert torch.equal(zeroed, silent(**inputs).logits)
        assert not torch.allclose(zeroed, intact, atol=1e-4) and not torch.allclose(other, intact, atol=1e-4)
        assert torch.equal(model(**inputs).logits, intact)
    assert bench.HR_MODES == ("intact", "zeroed", "other image")


def test_evaluate_scores_the_chosen_tasks_of_the_same_samples(data):
    from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor

    root, _, base = data
    _, test_meta = make_datasets(root / "data", SETTINGS["mlp"], DataSpec(n_basic=192, n_fine=32, fine_repeat=2,
                                                                          n_test=10))
    folder = build_checkpoint(root / "init-evaluate", SETTINGS["lvtc"], base, seed=0)
    model = InternVLXForConditionalGeneration.from_pretrained(folder)
    processor = InternVLXProcessor.from_pretrained(folder)
    tasks = [r["task"] for r in read_records(test_meta)[0]]
    everything = evaluate(model, processor, test_meta, limit=7, progress=False)
    fine = evaluate(model, processor, test_meta, limit=7, tasks=("fine",), progress=False)
    assert fine["n"] == tasks[:7].count("fine") >= 1
    assert fine["accuracy"] == {"fine": everything["accuracy"]["fine"]}
    assert tasks[:4] == ["colour", "shape", "position", "count"]  # the tasks take turns
    with pytest.raises(ValueError, match=r"tasks=\['fine'\]: no such sample"):
        evaluate(model, processor, test_meta, limit=4, tasks=("fine",), progress=False)


def test_the_demo_recipe_trains_on_empty_and_default_system_blocks(data):
    root, train_meta, _ = data
    spec = DataSpec(n_basic=12, n_fine=4, fine_repeat=2, n_test=10, system_prompts="empty+default")
    meta, test_meta = make_datasets(root / "data", SETTINGS["mlp"], spec)
    assert meta != train_meta and meta.name.endswith("-sys-empty+default.json")
    assert test_meta == make_datasets(root / "data", SETTINGS["mlp"], replace(spec, system_prompts="empty"))[1]
    systems = []
    for entry in json.loads(meta.read_text()).values():
        for line in Path(entry["annotation"]).read_text().splitlines():
            first = json.loads(line)["conversations"][0]
            systems.append(first["value"] if first["from"] == "system" else None)
    assert (systems.count(""), systems.count(None)) == (11, 5)  # 12 basic + 4 fine samples
    with pytest.raises(ValueError, match=r"system_prompts='none' is not one of \['empty', 'empty\+default'\]"):
        make_datasets(root / "data", SETTINGS["mlp"], replace(spec, system_prompts="none"))
