"""Publishing: `internvlx card` (ModelCard), the push preflight, `internvlx push` against a stand-in for the Hub API,
and `push_to_hub` of the model and processor carrying their remote code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import RepoUrl
from PIL import Image

from internvlx_hf.cli import main
from internvlx_hf.hub import RELATIONS, build_model_card, load_results, preflight, write_model_card
from internvlx_hf.hub.card import usage_snippet
from internvlx_hf.provenance import (PROVENANCE_FILE, read_provenance, record_conversion, record_training,
                                     write_provenance)

from conftest import REPO_ROOT, require_fixture, run_isolated_python

REMOTE_CODE = ["chat.py", "chat_templates.py", "compat.py", "configuration_internvlx.py", "generation.py",
               "image_processing_internvlx.py", "input_checks.py", "lvtc.py", "lvtc_cache.py", "modeling_internvlx.py",
               "outputs.py", "placeholders.py", "processing_internvlx.py", "projectors.py", "video.py", "vir.py",
               "vir_routing.py"]


def _convert(tmp_path_factory, fixture, name, **options):
    from internvlx_hf.conversion import convert

    dst = tmp_path_factory.mktemp("hub") / name
    convert(require_fixture(fixture), dst, progress=False, **options)
    record_conversion(dst, source=str(require_fixture(fixture)), base_model="OpenGVLab/InternVL2-1B",
                      details={"llm": "Qwen2ForCausalLM -> qwen2", "projector": options.get("projector", "keep"),
                               "dtype": "float32"})
    return dst


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Plain InternVL2 (mlp projector, ratio tiling, no LVTC), 2 shards + index."""
    return _convert(tmp_path_factory, "internvl2_qwen2", "qwen2", max_shard_size="1MB")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """InternVL-X source (PVTC, edge tiling) with LVTC added."""
    return _convert(tmp_path_factory, "internvlx_pvtc", "pvtc_lvtc", lvtc="k=2")


def _copy(folder, tmp_path, name="model") -> Path:
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return dst


def _front_matter(card_text: str) -> dict:
    assert card_text.startswith("---\n")
    return yaml.safe_load(card_text.split("---\n")[1])


# --------------------------------------------------------------------------------------------------------- card


def test_card_metadata_of_a_converted_checkpoint(converted, tmp_path):
    folder = _copy(converted, tmp_path)
    assert main(["card", str(folder), "--license", "mit", "--repo-id", "me/tiny-internvl2"]) == 0
    text = (folder / "README.md").read_text()
    meta = _front_matter(text)
    assert meta == {
        "base_model": "OpenGVLab/InternVL2-1B",
        "base_model_relation": "finetune",
        "library_name": "transformers",
        "license": "mit",
        "pipeline_tag": "image-text-to-text",
        "tags": ["internvl-x", "internvl2", "custom_code"],  # no compression used: mlp, no LVTC, ratio tiling
    }
    assert ModelCard.load(folder / "README.md").data.base_model == "OpenGVLab/InternVL2-1B"
    assert "| `<IMG_CONTEXT>` tokens per tile | 256 |" in text
    assert "| 1024x768 | 4x3 | 13 | 3328 |" in text  # ratio tiling, 12 tiles + thumbnail
    assert "**Conversion** (`internvlx convert`) from `OpenGVLab/InternVL2-1B`" in text
    assert "## Results" not in text
    assert str(require_fixture("internvl2_qwen2").parent) not in text  # local paths are not published


def test_card_tags_and_settings_of_a_compressed_checkpoint(compressed):
    card = build_model_card(compressed, license="apache-2.0")
    assert card.data.tags == ["internvl-x", "internvl2", "custom_code", "pvtc", "lvtc", "rvtc"]
    text = card.content
    assert "| LVTC | on (paper Sec. 3.2): layers < k = 2 of 3 see 256 tokens per tile, layers >= k see 1024" in text
    assert "edge (RVTC, paper Sec. 3.3" in text and "1 to 6 tiles of 448px" in text
    assert "| 1024x768 | 3x2 | 7 | 1792 | 7168 |" in text  # edge: min(6, 3*2) tiles -> 3x2 + thumbnail
    assert f'model_id = "{compressed}"' in text  # no --repo-id: the snippet loads the folder


def _record_training(folder, output, lora=None, datasets=("lmms-lab/textvqa",)):
    record_training(folder, started_from=folder, details={"preset": "stage2", "data": ["train.jsonl"],
                                                          "datasets": list(datasets), "steps": 100, "lora": lora,
                                                          "output": output})


@pytest.mark.parametrize("output, lora, expected_relation, expected_tags", [
    ("full", None, "finetune", []),
    ("merged", {"r": 8}, "finetune", ["lora"]),
])
def test_card_relation_after_training(converted, tmp_path, output, lora, expected_relation, expected_tags):
    folder = _copy(converted, tmp_path)
    _record_training(folder, output, lora)
    card = build_model_card(folder, license="mit")
    assert (card.data.base_model, card.data.base_model_relation) == ("OpenGVLab/InternVL2-1B", expected_relation)
    assert card.data.datasets == ["lmms-lab/textvqa"]
    assert card.data.tags[3:] == expected_tags
    assert "**Training run 1** (`internvlx train`" in card.content and "- preset: stage2" in card.content
    assert "- steps: 100" in card.content
    # --base-model and --relation override the rules
    card = build_model_card(folder, license="mit", base_model="me/other", relation="merge")
    assert (card.data.base_model, card.data.base_model_relation) == ("me/other", "merge")


def test_card_without_a_record_has_no_base_model(converted, tmp_path):
    folder = _copy(converted, tmp_path)
    (folder / PROVENANCE_FILE).unlink()
    card = build_model_card(folder, license="mit")
    assert card.data.base_model is None and getattr(card.data, "base_model_relation", None) is None
    assert "has no `internvlx_provenance.json`" in card.content
    card = build_model_card(folder, license="mit", base_model="OpenGVLab/InternVL2-1B")
    assert card.data.base_model == "OpenGVLab/InternVL2-1B" and getattr(card.data, "base_model_relation", None) is None


def test_card_rules_are_the_documented_relations():
    from internvlx_hf.cli.card import RELATIONS as CLI_RELATIONS

    assert CLI_RELATIONS == RELATIONS == ("finetune", "adapter", "merge", "quantized")


def _lora_adapter(converted, folder):
    from peft import LoraConfig, get_peft_model

    from internvlx_hf import InternVLXForConditionalGeneration

    torch.manual_seed(0)
    model = InternVLXForConditionalGeneration.from_pretrained(converted)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "me/tiny-internvl2"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    write_provenance(folder, json.loads((converted / PROVENANCE_FILE).read_text()))
    _record_training(folder, "adapter", lora={"r": 4})
    record = json.loads((folder / PROVENANCE_FILE).read_text())
    record["training"][-1]["started_from"] = str(converted)
    write_provenance(folder, record)


def test_card_of_a_lora_adapter(converted, tmp_path):
    adapter = tmp_path / "adapter"
    _lora_adapter(converted, adapter)
    card = build_model_card(adapter, license="mit", repo_id="me/tiny-lora")
    assert (card.data.base_model, card.data.base_model_relation, card.data.library_name) == \
        ("me/tiny-internvl2", "adapter", "peft")  # the base is where adapter_config.json points
    assert 'adapter_id = "me/tiny-lora"' in card.content and 'base_id = "me/tiny-internvl2"' in card.content
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(converted)  # a local path: the card cannot name the base
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pass --base-model OWNER/NAME"):
        build_model_card(adapter, license="mit")
    assert build_model_card(adapter, license="mit", base_model="me/base").data.base_model == "me/base"


def _write_image(folder: Path) -> None:
    data = torch.randint(0, 256, (300, 300, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    Image.fromarray(data.numpy()).save(folder / "image.jpg")


def test_card_usage_snippets_run_without_the_package(converted, tmp_path):
    """The usage snippets of a model's card and of a LoRA adapter's card, taken from the cards as they are, load
    `me/tiny-internvl2` and `me/tiny-lora` (here local folders of those names) in a process where internvlx_hf
    cannot be imported, and answer with generate() and chat(). One process runs both (the imports dominate)."""
    adapter = tmp_path / "adapter"
    _lora_adapter(converted, adapter)
    snippets = [usage_snippet(build_model_card(converted, license="mit", repo_id="me/tiny-internvl2").content),
                usage_snippet(build_model_card(adapter, license="mit", repo_id="me/tiny-lora").content)]
    assert 'model_id = "me/tiny-internvl2"' in snippets[0] and 'adapter_id = "me/tiny-lora"' in snippets[1]
    (tmp_path / "me").mkdir()
    (tmp_path / "me" / "tiny-internvl2").symlink_to(converted, target_is_directory=True)
    (tmp_path / "me" / "tiny-lora").symlink_to(adapter, target_is_directory=True)
    _write_image(tmp_path)
    code = "".join(f"exec({snippet!r}, {{}})\nprint('--- snippet {i} done')\n" for i, snippet in enumerate(snippets))
    result = run_isolated_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = result.stdout.split("--- snippet 0 done\n")
    assert len(outputs) == 2 and outputs[1].endswith("--- snippet 1 done\n")
    for output in (outputs[0], outputs[1].split("--- snippet 1 done")[0]):
        assert len(output.strip().splitlines()) >= 3, result.stdout  # generate, chat, follow-up chat


def test_card_results_from_json_and_csv(converted, tmp_path):
    rows = [{"benchmark": "TextVQA", "metric": "accuracy", "value": 71.25, "dataset_id": "lmms-lab/textvqa",
             "split": "val"},
            {"benchmark": "MME", "metric": "perception", "value": 1520, "notes": "VLMEvalKit, greedy"}]
    (tmp_path / "r.json").write_text(json.dumps({"results": rows}))
    (tmp_path / "r.csv").write_text("benchmark,metric,value,dataset_id,split,notes\n"
                                    "TextVQA,accuracy,71.25,lmms-lab/textvqa,val,\n"
                                    "MME,perception,1520,,,\"VLMEvalKit, greedy\"\n")
    assert load_results(tmp_path / "r.json") == load_results(tmp_path / "r.csv")
    folder = _copy(converted, tmp_path)
    assert main(["card", str(folder), "--license", "mit", "--results", str(tmp_path / "r.csv")]) == 0
    text = (folder / "README.md").read_text()
    assert "| TextVQA | accuracy | 71.25 | val |  |" in text
    assert "| MME | perception | 1520 |  | VLMEvalKit, greedy |" in text
    index = _front_matter(text)["model-index"][0]  # only the row with a dataset_id
    assert index["name"] == "model"
    assert [r["metrics"][0]["value"] for r in index["results"]] == [71.25]
    assert index["results"][0]["dataset"] == {"name": "TextVQA", "type": "lmms-lab/textvqa", "split": "val"}


@pytest.mark.parametrize("name, content, message", [
    ("a.json", "[{\"benchmark\": \"MME\", \"metric\": \"acc\"}]", "row 1: missing value"),
    ("a.json", "[{\"benchmark\": \"MME\", \"metric\": \"acc\", \"value\": \"high\"}]", "row 1: value must be a number"),
    ("a.json", "[{\"benchmark\": \"MME\", \"metric\": \"acc\", \"value\": 1, \"score\": 2}]",
     "unknown column(s) ['score']"),
    ("a.json", "{\"rows\": []}", "exactly one key, \"results\""),
    ("a.json", "[]", "holds no results"),
    ("a.json", "{not json", "is not valid JSON"),
    ("a.csv", "benchmark,metric,value\nMME,acc,n/a\n", "row 1: value 'n/a' is not a number"),
    ("a.csv", "benchmark,metric,value\nMME,acc,1,extra\n", "line 2: more values than the 3 columns"),
    ("a.csv", "benchmark,metric\nMME,acc\n", "row 1: missing value"),
    ("a.yaml", "x", "unknown format '.yaml'"),
])
def test_results_file_errors_name_file_row_and_column(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError) as error:
        load_results(tmp_path / name)
    assert message in str(error.value) and str(tmp_path / name) in str(error.value)


def test_card_errors_are_one_line_and_nothing_is_overwritten(converted, tmp_path, capsys):
    folder = _copy(converted, tmp_path)
    (folder / "README.md").write_text("my own card\n")
    cases = [
        (["card", str(folder), "--license", "mit"], "README.md exists; pass --overwrite"),
        (["card", str(folder), "--license", "MIT License", "--output", "-"], "is not a Hub license id"),
        (["card", str(folder), "--license", "mit", "--base-model", "not an id", "--output", "-"], "not a Hub model id"),
        (["card", str(tmp_path / "nope"), "--license", "mit"], "no such folder"),
        (["card", str(folder), "--license", "mit", "--results", str(tmp_path / "r.json")], "no such file"),
        (["card", str(tmp_path / "llava"), "--license", "mit", "--output", "-"],
         "model_type 'llava', not 'internvlx'"),
    ]
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text('{"model_type": "llava"}')
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("internvlx card: error: ") and message in err and err.count("\n") == 1, err
    assert (folder / "README.md").read_text() == "my own card\n"
    assert main(["card", str(folder), "--license", "mit", "--overwrite"]) == 0
    assert (folder / "README.md").read_text().startswith("---\n")
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_write_model_card_is_atomic(converted, tmp_path, monkeypatch):
    card = build_model_card(converted, license="mit")

    def failing_save(self, path):
        Path(path).write_text("half a card")
        raise OSError("disk full")

    monkeypatch.setattr(ModelCard, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_model_card(card, tmp_path / "README.md")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- preflight


def _ready(converted, tmp_path, repo_id="me/tiny-internvl2") -> Path:
    folder = _copy(converted, tmp_path)
    write_model_card(build_model_card(folder, license="mit", repo_id=repo_id), folder / "README.md")
    return folder


def _break_remote_import(folder):
    path = folder / "processing_internvlx.py"
    path.write_text("from internvlx_hf.processing import chat_templates  # noqa\n" + path.read_text())


def _break_shapes(folder):
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 200
    (folder / "config.json").write_text(json.dumps(config))


def _break_auto_map_class(folder):
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "modeling_internvlx.NoSuchModel"
    (folder / "config.json").write_text(json.dumps(config))


BREAKAGES = {
    "missing remote-code file": (lambda f: (f / "modeling_internvlx.py").unlink(),
                                 "modeling_internvlx.py: missing remote-code file (needed by config.json auto_map)"),
    "missing sibling module": (lambda f: (f / "chat_templates.py").unlink(),
                               "chat_templates.py: missing remote-code file (needed by processing_internvlx.py)"),
    "remote code imports internvlx_hf": (_break_remote_import,
                                         "processing_internvlx.py: imports 'internvlx_hf.processing' (line 1)"),
    "auto_map class not defined": (_break_auto_map_class, "modeling_internvlx.py: defines no class 'NoSuchModel'"),
    "no tokenizer": (lambda f: (f / "tokenizer.json").unlink(), ".: no tokenizer"),
    "no processor config": (lambda f: (f / "processor_config.json").unlink(), ".: no processor config"),
    "index names a missing shard": (lambda f: (f / "model-00002-of-00002.safetensors").unlink(),
                                    "model.safetensors.index.json: names the shard model-00002-of-00002.safetensors"),
    "shapes differ from config": (_break_shapes, "model.safetensors.index.json: 6 tensor(s) do not match "
                                                 "config.json's shapes: model.language_model.layers.0.mlp.down_proj"),
    "no card": (lambda f: (f / "README.md").unlink(), "README.md: no model card; write one with `internvlx card"),
    "card loads another id": (lambda f: write_model_card(build_model_card(f, license="mit", repo_id="me/other"),
                                                         f / "README.md", overwrite=True),
                              "README.md: the usage snippet loads 'me/other', not 'me/tiny-internvl2'"),
    "pickle file": (lambda f: (f / "pytorch_model.bin").write_bytes(b"\x80\x04."),
                    "pytorch_model.bin: a pickle file (loading it can run arbitrary code); convert it to safetensors"),
}


def test_preflight_passes_a_converted_folder(converted, tmp_path):
    assert preflight(_ready(converted, tmp_path), "me/tiny-internvl2") == []


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_preflight_catches_each_kind_of_broken_folder(converted, tmp_path, breakage):
    folder = _ready(converted, tmp_path)
    break_it, expected = BREAKAGES[breakage]
    break_it(folder)
    problems = [str(p) for p in preflight(folder, "me/tiny-internvl2")]
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_preflight_of_an_adapter_folder(converted, tmp_path):
    adapter = tmp_path / "adapter"
    _lora_adapter(converted, adapter)
    write_model_card(build_model_card(adapter, license="mit", repo_id="me/tiny-lora"), adapter / "README.md",
                     overwrite=True)
    assert preflight(adapter, "me/tiny-lora") == []
    (adapter / "adapter_model.safetensors").unlink()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(converted)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    problems = [str(p) for p in preflight(adapter, "me/tiny-lora")]
    # a local base path is fine while the card names the base on the Hub: push uploads adapter_config.json with it
    assert len(problems) == 1 and problems[0].startswith("adapter_model.safetensors: missing")
    (adapter / "README.md").write_text("# an adapter\n")  # a card without metadata names no base model
    problems = [str(p) for p in preflight(adapter, "me/tiny-lora")]
    assert problems[1] == (
        f"adapter_config.json: base_model_name_or_path is {str(converted)!r}, not a Hub id, and the card names no "
        "base_model, so PeftModel cannot find the base model; write the card with `internvlx card "
        f"{adapter} --base-model OWNER/NAME --license ID --overwrite` (push uploads adapter_config.json with that "
        "id).") and len(problems) == 2


# -------------------------------------------------------------------------------------------------------- push


class FakeHub:
    """Stands in for the Hub API: records create_repo / create_branch / create_commit and keeps the uploaded files
    (the content each CommitOperationAdd carries: a file's path, or bytes)."""

    def __init__(self, monkeypatch, root: Path):
        self.calls: list[tuple[str, dict]] = []
        self.root = root

        def create_repo(api, repo_id, **kwargs):
            self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, **kwargs):
            self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def create_commit(api, **kwargs):
            self.calls.append(("create_commit", kwargs))
            target = self.root / kwargs["repo_id"] / (kwargs.get("revision") or "main")
            for operation in kwargs["operations"]:
                path = target / operation.path_in_repo
                path.parent.mkdir(parents=True, exist_ok=True)
                content = operation.path_or_fileobj
                path.write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())
            return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/1",
                                           "pr_url": "https://huggingface.co/pr/1" if kwargs.get("create_pr")
                                           else None})()

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)

    def files(self, repo_id, revision="main") -> list[str]:
        folder = self.root / repo_id / revision
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_push_uploads_the_folder_to_the_repo_and_branch(converted, tmp_path, monkeypatch, capsys):
    hub = FakeHub(monkeypatch, tmp_path / "hub")
    folder = _ready(converted, tmp_path)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "modeling_internvlx.cpython-311.pyc").write_bytes(b"cache")
    assert main(["push", str(folder), "me/tiny-internvl2", "--private", "--revision", "stage2"]) == 0
    assert [name for name, _ in hub.calls] == ["create_repo", "create_branch", "create_commit"]
    assert hub.calls[0][1] == {"repo_id": "me/tiny-internvl2", "private": True, "exist_ok": True, "repo_type": "model"}
    assert hub.calls[1][1] == {"repo_id": "me/tiny-internvl2", "branch": "stage2", "exist_ok": True,
                               "repo_type": "model"}
    upload = hub.calls[2][1]
    assert (upload["repo_id"], upload["revision"], upload["create_pr"]) == ("me/tiny-internvl2", "stage2", False)
    expected = sorted(["README.md", "chat_template.jinja", "config.json", "generation_config.json",
                       PROVENANCE_FILE, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                       "model.safetensors.index.json", "processor_config.json", "tokenizer.json",
                       "tokenizer_config.json", *REMOTE_CODE])
    assert hub.files("me/tiny-internvl2", "stage2") == expected  # the Python cache stays home
    out = capsys.readouterr().out
    assert f"Preflight passed: {len(expected)} files" in out
    assert "Uploaded to https://huggingface.co/me/tiny-internvl2/commit/1" in out


def test_push_as_a_pull_request_and_dry_run(converted, tmp_path, monkeypatch, capsys):
    hub = FakeHub(monkeypatch, tmp_path / "hub")
    folder = _ready(converted, tmp_path)
    assert main(["push", str(folder), "me/tiny-internvl2", "--create-pr"]) == 0
    assert [name for name, _ in hub.calls] == ["create_repo", "create_commit"]  # a PR targets main: no branch
    assert hub.calls[0][1]["private"] is None
    assert (hub.calls[1][1]["revision"], hub.calls[1][1]["create_pr"]) == (None, True)
    assert "Uploaded to https://huggingface.co/pr/1" in capsys.readouterr().out
    hub.calls.clear()
    assert main(["push", str(folder), "me/tiny-internvl2", "--dry-run"]) == 0
    assert hub.calls == []
    assert "  modeling_internvlx.py\n" in capsys.readouterr().out


def test_push_refuses_a_broken_folder_listing_every_problem(converted, tmp_path, monkeypatch, capsys):
    hub = FakeHub(monkeypatch, tmp_path / "hub")
    folder = _ready(converted, tmp_path)
    for breakage in ("missing remote-code file", "no tokenizer", "pickle file"):
        BREAKAGES[breakage][0](folder)
    assert main(["push", str(folder), "me/tiny-internvl2"]) == 2
    assert hub.calls == []  # nothing created, nothing uploaded
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == f"internvlx push: error: 3 problem(s) in {folder} (listed above); nothing was uploaded."
    assert [line.split(": ")[1] for line in lines[:-1]] == [
        f"{folder}/pytorch_model.bin", f"{folder}/modeling_internvlx.py", str(folder)]


def test_push_argument_errors(converted, tmp_path, monkeypatch, capsys):
    hub = FakeHub(monkeypatch, tmp_path / "hub")
    cases = [
        (["push", str(converted), "no-owner"], "is not a Hub model id"),
        (["push", str(converted), "me/x", "--create-pr", "--revision", "dev"], "cannot go to --revision 'dev'"),
        (["push", str(tmp_path / "nope"), "me/x"], "no such folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("internvlx push: error: ") and message in err and err.count("\n") == 1, err
    assert hub.calls == []


def test_push_to_hub_of_model_and_processor_carries_the_remote_code(converted, tmp_path, monkeypatch):
    """transformers' own `push_to_hub` (save_pretrained into a temporary folder, then create_commit) uploads the
    remote-code files, and what it uploads passes the preflight."""
    import huggingface_hub.constants

    from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor

    repo = tmp_path / "hub"
    repo.mkdir()

    def create_commit(api, repo_id, operations, **kwargs):
        assert repo_id == "me/pushed" and kwargs.get("revision") is None
        for op in operations:
            shutil.copy2(op.path_or_fileobj, repo / op.path_in_repo)

    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no existing card to fetch

    InternVLXForConditionalGeneration.from_pretrained(converted).push_to_hub("me/pushed")
    model_files = {p.name for p in repo.iterdir()}
    assert {"configuration_internvlx.py", "modeling_internvlx.py", "config.json"} <= model_files
    InternVLXProcessor.from_pretrained(converted).push_to_hub("me/pushed")
    files = {p.name for p in repo.iterdir()}
    assert set(REMOTE_CODE) <= files
    package = REPO_ROOT / "src" / "internvlx_hf"
    for name in REMOTE_CODE:
        source = package / "modeling" / name
        source = source if source.is_file() else package / "processing" / name
        assert (repo / name).read_bytes() == source.read_bytes(), name
    assert preflight(repo) == []


def test_a_training_output_publishes_the_model_not_the_training_state(tmp_path, monkeypatch, capsys):
    """`internvlx train --preset lora` writes OUT (the merged model), OUT/adapter and OUT/checkpoint-*: push sends
    the model and leaves the rest home (listing it); the adapter folder publishes as it is, after `internvlx card
    --base-model`, with adapter_config.json naming that Hub id. (`--lora_projectors freeze`: the adapter holds LoRA
    weights only, the kind vLLM serves unmerged.)"""
    import training_helpers as th

    hub = FakeHub(monkeypatch, tmp_path / "hub")
    rows = th.colour_rows(tmp_path / "data", 4)
    data = th.write_jsonl(tmp_path / "data" / "colours.jsonl", rows)
    out = tmp_path / "out"
    assert main(["train", "--model", str(th.converted("internvl2_qwen2")), "--data", str(data), "--output_dir",
                 str(out), "--preset", "lora", "--max_steps", "2", "--save_steps", "1", "--use_cpu", "--report_to",
                 "none", "--disable_tqdm", "true", "--per_device_train_batch_size", "2", "--lora_projectors",
                 "freeze"]) == 0
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] is None
    assert read_provenance(out)["training"][-1]["lora"]["modules_to_save"] == []
    # peft's template card and its auto_mapping (which names internvlx_hf) are not left in the adapter folders
    for folder in (adapter, out / "checkpoint-1"):
        assert not (folder / "README.md").exists()
        assert json.loads((folder / "adapter_config.json").read_text())["auto_mapping"] is None
    local_base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(local_base).is_absolute()
    capsys.readouterr()

    assert main(["card", str(adapter), "--license", "mit", "--repo-id", "me/tiny-lora", "--base-model",
                 "me/tiny-internvl2"]) == 0
    assert main(["push", str(adapter), "me/tiny-lora"]) == 0
    printed = capsys.readouterr().out
    assert "  adapter_config.json: uploaded with base_model_name_or_path 'me/tiny-internvl2', the card's " \
           "base_model, instead of the local path\n" in printed
    assert "Left out (not uploaded):\n  training_args.bin: the Trainer's training state (a pickle; not needed to " \
           "use the model)\n" in printed
    assert hub.files("me/tiny-lora") == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", PROVENANCE_FILE,
         "processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_templates.py",
         "image_processing_internvlx.py", "processing_internvlx.py", "video.py"])
    uploaded = json.loads((tmp_path / "hub" / "me" / "tiny-lora" / "main" / "adapter_config.json").read_text())
    assert uploaded["base_model_name_or_path"] == "me/tiny-internvl2"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == local_base

    assert main(["card", str(out), "--license", "mit", "--repo-id", "me/tiny-merged"]) == 0
    capsys.readouterr()
    assert main(["push", str(out), "me/tiny-merged", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith(
        "Left out (not uploaded):\n"
        "  adapter/: the LoRA adapter this merged model was made with; publish it on its own (`internvlx card` and "
        "`internvlx push` on that folder)\n"
        "  checkpoint-1/: a training checkpoint; --include-checkpoints uploads it (without its training state)\n"
        "  checkpoint-2/: a training checkpoint; --include-checkpoints uploads it (without its training state)\n")
    assert main(["push", str(out), "me/tiny-merged", "--include-checkpoints"]) == 0
    files = hub.files("me/tiny-merged")
    assert {"model.safetensors", "config.json", "checkpoint-1/adapter_model.safetensors",
            "checkpoint-2/trainer_state.json"} <= set(files)
    assert [f for f in files if f.endswith((".bin", ".pt", ".pth")) or f.startswith("adapter/")] == []
