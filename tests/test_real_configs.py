"""Real InternVL config.json files convert to our config, and the model built from it has the original's size.

The fixtures (`tests/fixtures/real_configs/`, provenance in its SOURCES.md) are the public checkpoints' own
configs. The original's parameter count comes from closed-form formulas over the config (`reference_counts.py`),
which are checked here against the tensors of the reference-made fixtures; ours from the model that
`internvlx_hf.conversion.sizes` builds on the meta device.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from internvlx_hf.conversion import ConversionError
from internvlx_hf.conversion.sizes import size_from_config
from reference_counts import mlp1, reference_count

FIXTURES = Path(__file__).parent / "fixtures"
REAL = FIXTURES / "real_configs"
CONFIGS = sorted(path.name for path in REAL.glob("*.json"))


def _load(name: str) -> dict:
    return json.loads((REAL / name).read_text())


def test_every_config_is_recorded_with_its_hash():
    rows = dict(re.findall(r"^\| `([^`]+\.json)` \|.*\| ([0-9a-f]{64}) \|$", (REAL / "SOURCES.md").read_text(), re.M))
    assert sorted(rows) == CONFIGS
    for name, digest in rows.items():
        assert hashlib.sha256((REAL / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("fixture", ["internvl2_internlm2", "internvl2_phi3", "internvl2_qwen2"])
def test_reference_formula_counts_the_reference_tensors(fixture):
    """The formulas count what the reference model saves (InternLM2, Phi-3, Qwen2 layouts, made by OpenGVLab code)."""
    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    with safe_open(str(FIXTURES / fixture / "model.safetensors"), "pt") as weights:
        saved = sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    assert reference_count(config).total == saved


# Counts of the real checkpoints (measured with the formulas; the meta-device model must agree exactly).
EXPECTED = {
    "InternVL2-1B.json": (304_012_288, 4_482_816, 629_663_872),
    "InternVL2-1B.tie-true-copy.json": (304_012_288, 4_482_816, 493_780_992),
    "InternVL2-2B.json": (304_012_288, 12_595_200, 1_889_146_880),
    "InternVL3-1B.json": (304_012_288, 4_482_816, 629_697_920),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_converted_model_has_the_original_parameter_count(name):
    config = _load(name)
    reference = reference_count(config)
    assert (reference.vision, reference.projector, reference.llm) == EXPECTED[name]
    size = size_from_config(config, name=name)
    assert size.num_parameters == reference.total
    assert size.new_parameters == 0
    assert size.config.projector_type == "mlp" and size.config.lvtc is None
    assert size.config.template == config["template"]
    assert size.config.tie_word_embeddings == config["llm_config"].get("tie_word_embeddings", False)


# "Model Size" in the checkpoint's model card, else the size in its name (billions).
PUBLISHED = {"InternVL2-1B": ("card", 0.9), "InternVL2-2B": ("name", 2), "InternVL3-1B": ("name", 1)}


@pytest.mark.parametrize("name", ["InternVL2-1B.json", "InternVL2-2B.json", "InternVL3-1B.json"])
def test_count_matches_the_published_size(name):
    total = reference_count(_load(name)).total
    where, billions = PUBLISHED[name.removesuffix(".json")]
    if where == "card":
        assert round(total / 1e9, 1) == billions
    else:
        assert round(total / 1e9) == billions


def test_tied_copy_is_smaller_by_exactly_the_lm_head():
    untied = reference_count(_load("InternVL2-1B.json"))
    tied = reference_count(_load("InternVL2-1B.tie-true-copy.json"))
    llm = _load("InternVL2-1B.json")["llm_config"]
    assert untied.total - tied.total == llm["vocab_size"] * llm["hidden_size"]
    assert round(tied.total / 1e9, 1) == 0.8  # not the card's 0.9B: the Hub checkpoint is the untied one


@pytest.mark.parametrize("name", CONFIGS)
def test_lvtc_upgrade_adds_exactly_the_lvtc_projectors(name):
    config = _load(name)
    reference = reference_count(config)
    vision, llm = config["vision_config"]["hidden_size"], config["llm_config"]["hidden_size"]
    size = size_from_config(config, lvtc="k=18,T=3", name=name)
    lvtc = size.config.lvtc
    assert (lvtc.expand_layer, lvtc.num_lr_projectors) == (18, 3)
    # The HR projector (pixel shuffle at hr_downsample_ratio) and T-1 extra LR projectors, all InternVL2 MLPs.
    added = mlp1(vision, lvtc.hr_downsample_ratio, llm) + 2 * mlp1(vision, lvtc.lr_downsample_ratio, llm)
    assert size.new_parameters == added
    assert size.num_parameters == reference.total + added


@pytest.mark.parametrize("name", CONFIGS)
def test_pvtc_upgrade_replaces_mlp1_with_the_new_projector(name):
    config = _load(name)
    reference = reference_count(config)
    size = size_from_config(config, projector="pvtc", name=name)
    assert size.config.projector_type == "pvtc"
    # PVTC for a 1024-wide ViT and an 896-wide LLM (Qwen2-0.5B), or InternVL2-2B's 2048-wide InternLM2
    assert size.new_parameters == {896: 31_436_032, 2048: 147_343_360}[config["llm_config"]["hidden_size"]]
    assert size.num_parameters == reference.total - reference.projector + size.new_parameters


def test_pvtc_and_lvtc_together_add_both():
    config = _load("InternVL2-1B.json")
    pvtc = size_from_config(config, projector="pvtc")
    both = size_from_config(config, projector="pvtc", lvtc="k=18,T=2")
    lvtc = size_from_config(config, lvtc="k=18,T=2")
    assert both.new_parameters > pvtc.new_parameters
    assert both.num_parameters - pvtc.num_parameters == both.new_parameters - pvtc.new_parameters
    assert lvtc.new_parameters == mlp1(1024, 1.0, 896) + mlp1(1024, 0.5, 896)


def test_notes_report_what_is_not_carried():
    assert size_from_config(_load("InternVL3-1B.json")).notes == [
        "llm_config.rope_scaling {'factor': 2.0, 'rope_type': 'dynamic', 'type': 'dynamic'} not carried over: the "
        "reference Qwen2 (transformers 4.37.2, the version OpenGVLab's InternVL code pins) has no rope scaling, so it "
        "ignores it; plain rope at every length, as the reference",
        "config.system_message is null: OpenGVLab's chat() would write the text 'None' as the system message; the "
        "chat template writes the internvl2_5 default system message instead",
        "vision drop_path_rate=0.1 not carried (stochastic depth, training only; InternVLVisionModel has none)",
    ]
    assert size_from_config(_load("InternVL2-1B.json")).notes == []


def test_unsupported_llm_is_refused_with_the_supported_list():
    # InternVL3-9B's LLM is InternLM3 (its model card); its config.json could not be found (SOURCES.md), so the
    # refusal is shown on the InternVL3-1B config with only the LLM class changed.
    config = copy.deepcopy(_load("InternVL3-1B.json"))
    config["llm_config"]["architectures"] = ["InternLM3ForCausalLM"]
    with pytest.raises(ConversionError) as error:
        size_from_config(config)
    assert str(error.value) == (
        "llm_config names InternLM3ForCausalLM (InternVL3-9B), which `internvlx convert` does not support: "
        "OpenGVLab's InternVLChatModel code has no InternLM3 to check a conversion against. The other InternVL3 "
        "sizes (Qwen2.5 LLMs) convert."
    )


def test_bad_options_are_refused_before_building():
    config = _load("InternVL2-1B.json")
    with pytest.raises(ConversionError, match=r"--lvtc k=24: the LLM has 24 layers, so k .* must lie in 1\.\.23"):
        size_from_config(config, lvtc="k=24")
    with pytest.raises(ConversionError, match="source_projector must be 'mlp' or 'pvtc', got 'linear'"):
        size_from_config(config, source_projector="linear")
    broken = copy.deepcopy(config)
    del broken["vision_config"]["num_hidden_layers"]
    with pytest.raises(ConversionError, match="vision_config lacks num_hidden_layers"):
        size_from_config(broken, name="InternVL2-1B/config.json")


def test_docs_table_is_the_script_output():
    from conftest import load_script

    root = FIXTURES.parents[1]
    script = load_script(root / "scripts" / "real_config_table.py")
    docs = (root / "docs" / "checkpoints.md").read_text()
    table = docs.split("<!-- table: scripts/real_config_table.py -->\n")[1].split("<!-- end table -->")[0]
    expected = ["| " + " | ".join(script.row(path)) + " |" for path in sorted(REAL.glob("*.json"))]
    assert table.splitlines()[2:] == expected
