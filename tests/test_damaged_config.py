"""A damaged config.json (a key missing, of the wrong type, or truncated JSON) stops every command that reads a
checkpoint before any work, with one line naming the file and the key (`read_internvlx_config`)."""

from __future__ import annotations

import json
import shutil

import pytest

import training_helpers as th
from internvlx_hf.cli import main
from internvlx_hf.hub.resolve import REQUIRED_CONFIG_KEYS, read_internvlx_config

DAMAGED = "the file is damaged; restore it from where the checkpoint came from, or convert / train the checkpoint again"


def _without_hidden_size(config_file):
    config = json.loads(config_file.read_text())
    del config["text_config"]["hidden_size"]
    config_file.write_text(json.dumps(config, indent=2))
    return "text_config.hidden_size is missing"


def _string_patch_size(config_file):
    config = json.loads(config_file.read_text())
    config["vision_config"]["patch_size"] = "14"
    config_file.write_text(json.dumps(config, indent=2))
    return 'vision_config.patch_size must be a positive integer or a [height, width] pair, got "14" (str)'


def _truncated(config_file):
    config_file.write_text('{\n  "model_type": "internvlx",\n  "text_config": {\n    "hidden_size": 64,\n')
    return None  # the message is about the file itself


DAMAGES = {"missing key": _without_hidden_size, "wrong type": _string_patch_size, "truncated": _truncated}


@pytest.fixture(params=list(DAMAGES))
def damaged(request, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(th.converted("internvl2_qwen2"), folder)
    problem = DAMAGES[request.param](folder / "config.json")
    config_file = folder / "config.json"
    text = f"{config_file}: {problem}" if problem else \
        f"{config_file} is not valid JSON (line 5 col 1): Expecting property name enclosed in double quotes"
    return folder, text


def test_the_check_names_file_and_key(damaged):
    folder, text = damaged
    with pytest.raises(ValueError) as error:
        read_internvlx_config(folder, "MODEL 'x'")
    assert str(error.value) == f"MODEL 'x': {text}; {DAMAGED}"


@pytest.mark.parametrize("command", ["train", "chat", "demo", "tokens", "card"])
def test_every_command_stops_with_one_line(command, damaged, tmp_path, capsys):
    folder, text = damaged
    argv, name = {
        "train": (["train", "--model", str(folder), "--data", "x.jsonl", "--output_dir", str(tmp_path / "out")],
                  f"--model {str(folder)!r}"),
        "chat": (["chat", str(folder), "Hi"], f"MODEL {str(folder)!r}"),
        "demo": (["demo", "--model", str(folder)], f"--model {str(folder)!r}"),
        "tokens": (["tokens", str(folder), "--image", "800x600"], f"MODEL {str(folder)!r}"),
        "card": (["card", str(folder), "--license", "mit", "--output", "-"], "the card's checkpoint"),
    }[command]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"internvlx {command}: error: {name}: {text}; {DAMAGED}\n"


def test_push_lists_it_as_a_problem(damaged, capsys):
    folder, text = damaged
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# card\n")
    assert main(["push", str(folder), "me/model", "--dry-run"]) == 2
    lines = capsys.readouterr().err.splitlines()
    if "not valid JSON" in text:  # the preflight's check of every JSON file it reads
        expected = f"internvlx push: {text.replace(' is not', ': not')}; restore it or save the model again."
    else:
        expected = f"internvlx push: {text}; {DAMAGED}."
    assert lines == [expected, f"internvlx push: error: 1 problem(s) in {folder} (listed above); nothing was "
                               "uploaded."]


def test_every_required_key_is_checked(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(th.converted("internvl2_qwen2"), folder)
    config = json.loads((folder / "config.json").read_text())
    for key in REQUIRED_CONFIG_KEYS:
        parent, _, leaf = key.rpartition(".")
        broken = json.loads(json.dumps(config))
        del (broken[parent] if parent else broken)[leaf]
        (folder / "config.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=f"^m: {folder / 'config.json'}: {key} is missing; "):
            read_internvlx_config(folder, "m")
