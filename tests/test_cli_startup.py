"""`internvlx` starts without torch/transformers: `--help`, every `COMMAND --help` and argument errors are
answered by argparse alone, and the package's classes and Auto registration load on first use; `train`'s flags
come from the shipped `train_flags.json`, which must be what transformers' TrainingArguments and our dataclasses
give (same help, same values, same errors), and is set aside under another transformers release. And argument
errors that need more than argparse's usage: an option with an optional value that took a positional.

Checked in fresh interpreters (this test process has torch imported already), by which modules got imported:
exact behaviour, no timings (benchmarks/bench_cli_startup.py measures them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from internvlx_hf.cli import _commands, build_parser, main
from internvlx_hf.cli.train import TRAIN, _add_train_arguments
from internvlx_hf.cli.train_flags import (
    REGENERATE,
    FLAGS_JSON,
    add_described_flags,
    environment,
    live_text,
    read_tables,
    tables_text,
)

from conftest import REPO_ROOT

HEAVY = ("torch", "transformers", "numpy", "PIL", "huggingface_hub", "safetensors", "tqdm")

# Runs `internvlx ARGV` for each ARGV of a JSON list in one interpreter; prints, per ARGV, the exit status, the
# first line of stderr and the heavy modules imported so far.
_RUN_CLI = """
import contextlib, io, json, runpy, sys
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["internvlx", *argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("internvlx_hf", run_name="__main__", alter_sys=True)
            code = None
        except SystemExit as stop:
            code = stop.code
    lines = err.getvalue().strip().splitlines()
    results.append({"argv": argv, "code": code, "stdout": out.getvalue(), "last_err": lines[-1] if lines else "",
                    "first_err": lines[0] if lines else "", "err_lines": len(lines), "heavy": sorted(m for m in HEAVY if m in sys.modules)})
print(json.dumps(results))
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=env, timeout=300)


def _run_cli(argvs: list[list[str]]) -> list[dict]:
    result = _python(f"HEAVY = {HEAVY!r}\n{_RUN_CLI}", json.dumps(argvs))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


COMMANDS = [command.name for command in _commands()]

# train_flags.json describes the flags under each transformers release of the supported range (its "environments");
# under another (or torch < 2.8), `train` builds them from TrainingArguments, importing torch (docs/cli.md): what
# depends on the shipped file is checked where it holds, and the other commands everywhere.
FLAGS_HOLD = add_described_flags(argparse.ArgumentParser())
needs_described_flags = pytest.mark.skipif(not FLAGS_HOLD, reason=(
    f"train_flags.json does not describe transformers {importlib.metadata.version('transformers')} with this torch: "
    "`internvlx train` builds its flags from TrainingArguments"))


def test_help_of_the_cli_and_of_every_command_imports_nothing_heavy():
    argvs = [["--help"]] + [[name, "--help"] for name in COMMANDS if FLAGS_HOLD or name != "train"]
    results = _run_cli(argvs)
    assert [r["code"] for r in results] == [0] * len(argvs)
    assert all(f"{name} " in results[0]["stdout"] for name in COMMANDS)
    for name, result in zip([argv[0] for argv in argvs[1:]], results[1:]):
        assert result["stdout"].startswith(f"usage: internvlx {name} "), result["stdout"][:200]
        assert "--debug" in result["stdout"]
    assert results[-1]["heavy"] == []


def test_argument_errors_import_nothing_heavy():
    argvs = [[], ["nonsense"], ["chat"], ["chat", "MODEL", "--max-tiles", "many"], ["convert", "SRC"],
             ["tokens", "--tiling", "diagonal"], ["eval", "--nonsense"], ["train", "--learning_rate", "abc"],
             ["train", "--max_steps", "1.5"], ["train", "--preset", "x"], ["train", "--lr-scheduler-type", "cosin"],
             ["train", "--packing", "train.yaml"], ["train", "--nonsense"],
             ["train", "--model", "m", "--max_steps", "3"], ["demo", "--nonsense"]]
    errors = [
        "internvlx: error: the following arguments are required: COMMAND; see `internvlx --help`",
        "internvlx: error: argument COMMAND: invalid choice: 'nonsense' (choose from 'demo', 'convert', 'export', "
        "'chat', 'serve', 'tokens', 'card', 'push', 'data', 'train', 'eval', 'bench')",
        "internvlx chat: error: the following arguments are required: MODEL; see `internvlx chat --help`",
        "internvlx chat: error: argument --max-tiles: invalid int value: 'many'",
        "internvlx convert: error: the following arguments are required: DST; see `internvlx convert --help`",
        "internvlx tokens: error: argument --tiling: invalid choice: 'diagonal' (choose from 'ratio', 'area', "
        "'edge', 'none')",
        "internvlx eval: error: the following arguments are required: CHECKPOINT, DATA; see `internvlx eval --help`",
        "internvlx train: error: argument --learning_rate/--learning-rate: invalid float value: 'abc'",
        "internvlx train: error: argument --max_steps/--max-steps: invalid int value: '1.5'",
        "internvlx train: error: argument --preset: invalid choice: 'x' (choose from 'stage1', 'stage2', "
        "'stage2-frozen-vit', 'full', 'lora', 'qlora', 'vico', 'vico-projector', 'vico-router')",
        "internvlx train: error: argument --lr_scheduler_type/--lr-scheduler-type: invalid choice: 'cosin' (choose "
        "from 'linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'constant', 'constant_with_warmup', "
        "'inverse_sqrt', 'reduce_lr_on_plateau', 'cosine_with_min_lr', 'cosine_warmup_with_min_lr', "
        "'warmup_stable_decay', 'greedy')",
        "internvlx train: error: argument --packing: Truthy value expected: got train.yaml but expected one of "
        "yes/no, true/false, t/f, y/n, 1/0 (case insensitive); --packing took 'train.yaml' as its PACKING because "
        "its value is optional: did you mean `internvlx train train.yaml --packing`?",
        "internvlx train: error: unrecognized arguments: --nonsense",
        "internvlx train: error: the following options are required: --data, --output_dir (or give them in a "
        "CONFIG.yaml: internvlx train CONFIG.yaml)",
        "internvlx demo: error: unrecognized arguments: --nonsense",
    ]
    cases = [(argv, error) for argv, error in zip(argvs, errors, strict=True) if FLAGS_HOLD or argv[:1] != ["train"]]
    results = _run_cli([argv for argv, _ in cases])
    assert [r["code"] for r in results] == [2] * len(cases)
    assert [r["last_err"] for r in results] == [error for _, error in cases]
    assert results[-1]["heavy"] == []


def test_unknown_flags_name_the_command_and_the_closest_flag():
    argvs = [["train", "--learing_rate", "1e-3"], ["serve", "MODEL", "--api-kye", "k"], ["chat", "MODEL", "--max-tiels",
             "3", "Q"], ["eval", "C", "D", "--max-new-tokes=8"], ["convert", "SRC", "DST", "--projecter", "pvtc"],
             ["serve", "MODEL", "--zzz"]]
    errors = [
        "internvlx train: error: unrecognized arguments: --learing_rate; did you mean --learning_rate?",
        "internvlx serve: error: unrecognized arguments: --api-kye k; did you mean --api-key?",
        "internvlx chat: error: unrecognized arguments: --max-tiels 3 Q; did you mean --max-tiles?",
        "internvlx eval: error: unrecognized arguments: --max-new-tokes=8; did you mean --max-new-tokens?",
        "internvlx convert: error: unrecognized arguments: --projecter pvtc; did you mean --projector?",
        "internvlx serve: error: unrecognized arguments: --zzz",
    ]
    cases = [(argv, error) for argv, error in zip(argvs, errors, strict=True) if FLAGS_HOLD or argv[:1] != ["train"]]
    results = _run_cli([argv for argv, _ in cases])
    assert [(r["code"], r["last_err"]) for r in results] == [(2, error) for _, error in cases]
    assert results[-1]["heavy"] == []


def test_an_abbreviated_flag_is_a_mistake_said_at_once():
    """argparse's abbreviations are off in every parser (`--max_step` is not `--max_steps`, `--repeat` not
    `--repeats`): an abbreviation is an unknown flag, named with the closest one."""
    argvs = [["train", "--model", "m", "--data", "d", "--output_dir", "o", "--max_step", "3"],
             ["bench", "prefill", "DIR", "--repeat", "2"], ["tokens", "--max-tile=3"], ["chat", "M", "--max-new", "4"]]
    errors = ["internvlx train: error: unrecognized arguments: --max_step; did you mean --max_steps?",
              "internvlx bench prefill: error: unrecognized arguments: --repeat 2; did you mean --repeats?",
              "internvlx tokens: error: unrecognized arguments: --max-tile=3; did you mean --max-tiles?",
              "internvlx chat: error: unrecognized arguments: --max-new 4; did you mean --max-new-tokens?"]
    cases = [(argv, error) for argv, error in zip(argvs, errors, strict=True) if FLAGS_HOLD or argv[:1] != ["train"]]
    results = _run_cli([argv for argv, _ in cases])
    assert [(r["code"], r["last_err"]) for r in results] == [(2, error) for _, error in cases]


def test_every_argument_error_is_one_line():
    """argparse's own errors (an invalid choice, a missing argument, an unknown flag) are one line and exit status 2,
    as the CLI's other errors, in every command and in `internvlx` itself: argparse printed its usage block before
    them (`convert --projector pvtx` took 6 lines); a missing argument points at the command's --help instead."""
    argvs = [["convert", "SRC", "DST", "--projector", "pvtx"], ["nonsense"], [], ["bench", "prefill"],
             *([name, "--zzz"] for name in COMMANDS)]
    results = _run_cli(argvs)
    assert [(r["code"], r["err_lines"]) for r in results] == [(2, 1)] * len(argvs), results
    assert [r["last_err"] for r in results[:4]] == [
        "internvlx convert: error: argument --projector: invalid choice: 'pvtx' (choose from 'keep', 'mlp', 'pvtc')",
        "internvlx: error: argument COMMAND: invalid choice: 'nonsense' (choose from 'demo', 'convert', 'export', "
        "'chat', 'serve', 'tokens', 'card', 'push', 'data', 'train', 'eval', 'bench')",
        "internvlx: error: the following arguments are required: COMMAND; see `internvlx --help`",
        "internvlx bench prefill: error: the following arguments are required: FOLDER; see `internvlx bench prefill "
        "--help`"]
    assert all(r["last_err"].startswith(f"internvlx {argv[0]}: error: ") for argv, r in zip(argvs[4:], results[4:]))


def test_another_trainers_name_of_a_flag_suggests_this_ones():
    """`--lr` (what other trainers call the learning rate) is no abbreviation here: the error names
    --learning_rate, not the flags that start with `--lr` (`--lr_scheduler_type`); flags it starts are named once
    each, as the command lists them."""
    argvs = [["train", "--lr", "1e-4"], ["train", "--epochs=3"], ["train", "--batch-size", "4"],
             ["train", "--lr_sched", "cosine"], ["chat", "M", "--lr", "1"]]
    errors = ["internvlx train: error: unrecognized arguments: --lr; did you mean --learning_rate?",
              "internvlx train: error: unrecognized arguments: --epochs=3; did you mean --num_train_epochs?",
              "internvlx train: error: unrecognized arguments: --batch-size; did you mean "
              "--per_device_train_batch_size?",
              "internvlx train: error: unrecognized arguments: --lr_sched; did you mean --lr_scheduler_kwargs or "
              "--lr_scheduler_type?",
              "internvlx chat: error: unrecognized arguments: --lr 1"]
    cases = [(argv, error) for argv, error in zip(argvs, errors, strict=True) if FLAGS_HOLD or argv[:1] != ["train"]]
    results = _run_cli([argv for argv, _ in cases])
    assert [(r["code"], r["last_err"]) for r in results] == [(2, error) for _, error in cases]


def test_a_flag_in_the_other_spelling_is_taken_with_one_line():
    """Every command takes a flag spelt with the other separator (train's `--max_tiles` in `tokens`, which lists
    `--max-tiles`), saying in one line which spelling it lists."""
    results = _run_cli([["chat", "/no/such", "--max_tiles", "3", "Q"], ["eval", "/no/such", "d", "--max_new_tokens=4"]])
    assert [r["code"] for r in results] == [2, 2]
    assert [r["err_lines"] for r in results] == [2, 2]  # the note, then the command's own error (the path)
    assert "MODEL '/no/such': no such folder" in results[0]["last_err"]
    assert [r["first_err"] for r in results] == [
        "internvlx chat: --max_tiles is spelt --max-tiles here; taken as --max-tiles",
        "internvlx eval: --max_new_tokens is spelt --max-new-tokens here; taken as --max-new-tokens"]


def test_every_argument_parser_of_the_project_refuses_abbreviations():
    """Every `ArgumentParser(...)` in src/, benchmarks/, scripts/, examples/ and experiments/ passes
    `allow_abbrev=False` (the commands' subparsers get it from `CommandParser`)."""
    import ast

    missing = []
    for folder in ("src", "benchmarks", "scripts", "examples", "experiments"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                        "ArgumentParser", "HfArgumentParser"):
                    given = {keyword.arg: keyword.value for keyword in node.keywords}
                    if not (isinstance(given.get("allow_abbrev"), ast.Constant) and given["allow_abbrev"].value is False):
                        missing.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    # (the parsers that only describe train's flags, and never parse a command line, are the two in train_flags.py
    # and the one in scripts/transformers_matrix.py)
    described = {"src/internvlx_hf/cli/train_flags.py", "scripts/transformers_matrix.py"}
    assert [place for place in missing if place.split(":")[0] not in described] == []
    assert build_parser().allow_abbrev is False


def test_help_texts_keep_each_quoted_example_on_one_line():
    """No line of any command's --help (at 100 columns) holds an unpaired double quote: an example in quotes is not
    broken across lines (an escape in a description once printed a newline inside one)."""
    argvs = [["--help"]] + [[name, "--help"] for name in COMMANDS if FLAGS_HOLD or name != "train"]
    results = _run_cli(argvs)
    broken = [(argv[0], line) for argv, result in zip(argvs, results) for line in result["stdout"].splitlines()
              if line.count('"') % 2]
    assert broken == []


def test_a_mistyped_local_path_is_never_sent_to_the_hub():
    """A MODEL that looks local (its folder exists, or its name is close to a local folder's) and is not there is an
    error at once, with the folder meant, never a Hub download of the typo (which waited 5.7 s offline and then
    suggested `hf download` of it)."""
    cases = [(["chat", "tests/fixture", "Hi"], "internvlx chat: error: MODEL 'tests/fixture': no such folder in "
                                               "'tests'. Did you mean 'tests/fixtures'?"),
             (["serve", "test"], "internvlx serve: error: MODEL 'test': no such folder. Did you mean 'tests'? (A Hub "
                                 "id is owner/name.)")]
    results = _run_cli([argv for argv, _ in cases])
    assert [(r["code"], r["last_err"], r["heavy"]) for r in results] == [(2, error, []) for _, error in cases]


def test_a_wrong_path_is_reported_before_torch_loads(tmp_path):
    """The mistakes users make most, a wrong MODEL or data path or a folder that is no checkpoint, are reported by
    the command's checks before anything heavy is imported (they took 10-15 s, the time torch and transformers take
    to load)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "data.jsonl").write_text("")
    missing, empty = str(tmp_path / "missing"), str(tmp_path / "empty")
    data = str(tmp_path / "data.jsonl")
    cases = [
        (["chat", missing, "Hi"], f"internvlx chat: error: MODEL {missing!r}: no such folder; pass a checkpoint "
                                  "folder or a Hub id (owner/name)."),
        (["chat", empty, "Hi"], f"internvlx chat: error: MODEL {empty!r}: no config.json in {empty}; give the folder "
                                "of an internvlx-hf checkpoint (made by `internvlx convert` or `internvlx train`)"),
        (["chat", empty, "--image", missing, "Hi"], None),
        (["chat", "owner/model", "--video", missing, "Hi"],
         f"internvlx chat: error: --video {missing!r}: no such file or folder; pass a video file or a folder of "
         "frame images."),
        (["serve", missing], f"internvlx serve: error: MODEL {missing!r}: no such folder; pass a checkpoint folder or "
                             "a Hub id (owner/name)."),
        (["serve", data], f"internvlx serve: error: MODEL {data!r} is a file; pass the checkpoint folder that holds "
                          "config.json."),
        (["eval", missing, data], f"internvlx eval: error: CHECKPOINT {missing!r}: no such folder; pass a checkpoint "
                                  "folder or a Hub id (owner/name)."),
        (["eval", "owner/model", missing], f"internvlx eval: error: DATA {missing!r}: no such file; give an InternVL "
                                           "meta JSON or a JSONL file (several: comma-separated)."),
        (["convert", missing, str(tmp_path / "out")], f"internvlx convert: error: SRC {missing} is not a folder; pass "
                                                      "the local folder of an OpenGVLab InternVL2 model (download it "
                                                      "first, e.g. `hf download OpenGVLab/InternVL2-2B --local-dir "
                                                      "InternVL2-2B`)."),
    ]
    results = _run_cli([argv for argv, _ in cases])
    for (argv, error), result in zip(cases, results):
        assert result["code"] == 2 and result["heavy"] == [], (argv, result)
        if error is not None:
            assert result["last_err"] == error, argv
    assert results[2]["last_err"].startswith(f"internvlx chat: error: MODEL {empty!r}: no config.json")


def test_train_help_lists_the_trainingarguments_flags(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: internvlx train [CONFIG.yaml] --model PATH")
    assert "--learning_rate" in out and "--preset" in out and "--debug" in out


# ------------------------------------------------------------------------ train's flags without transformers


def _train_parser(flags=FLAGS_JSON) -> argparse.ArgumentParser:
    """`internvlx train`'s parser as `internvlx` builds it, with its flags described by the file ``flags``."""
    train = dataclasses.replace(TRAIN, add_arguments=functools.partial(_add_train_arguments, flags=flags))
    commands = next(a for a in build_parser([train])._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["train"]


@needs_described_flags
def test_the_shipped_train_flags_are_what_transformers_and_our_dataclasses_give():
    assert FLAGS_JSON.read_text(encoding="utf-8") == live_text(), (
        f"{FLAGS_JSON.name} does not describe the flags of the installed transformers and of "
        f"internvlx_hf.training.arguments' dataclasses: run `PYTHONPATH=src {REGENERATE}` and commit the file")


@needs_described_flags
def test_train_help_from_the_shipped_flags_is_the_live_parsers_help(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps the help to the terminal's width
    assert add_described_flags(argparse.ArgumentParser())  # written for the installed transformers and torch
    assert not add_described_flags(argparse.ArgumentParser(), tmp_path / "absent.json")
    described, live = _train_parser().format_help(), _train_parser(tmp_path / "absent.json").format_help()
    assert described == live
    assert described.startswith("usage: internvlx train [CONFIG.yaml] --model PATH")
    assert "  --learning_rate LEARNING_RATE, --learning-rate LEARNING_RATE\n" in described


# Valid command lines (every kind of value: strings, numbers, booleans with and without a value, `--no_*`, lists,
# choices, an empty dict, the hyphenated spellings) and argument errors (a converter's, a choice's, a missing value,
# an ambiguous or unknown flag, the optional-value hint, a value converted by accelerate's ParallelismConfig).
TRAIN_ARGVS = [
    ["train.yaml"],
    ["--model", "m", "--data", "a.jsonl,b.json", "--output_dir", "o", "--preset", "lora", "--lora_r", "8",
     "--lora_dropout", "0.1", "--lora_projectors", "freeze", "--packing", "--bf16", "false",
     "--no_remove_unused_columns", "--report_to", "none", "wandb", "--lr_scheduler_type", "cosine", "--optim",
     "adamw_torch", "--include_num_input_tokens_seen",
     "--liger_kernel_config", "", "--max-steps", "10", "--learning-rate", "1e-3", "--debug", "--log_level", "info",
     "--eval_strategy", "steps", "--fsdp", "--tiling", "edge", "--model-dtype", "bfloat16"],
    ["train.yaml", "--fsdp", "full_shard auto_wrap", "--warmup_steps", "0.1", "--seed", "3", "--use_cpu", "t"],
    ["--learning_rate", "abc"], ["--max_steps", "1.5"], ["--preset", "x"], ["--optim", "adam"],
    ["--packing", "maybe"], ["--lora_projectors", "frozen"], ["--packing", "train.yaml"],
    ["--liger_kernel_config", "abc"],
    ["--parallelism_config", "x"], ["--report_to"], ["--learn", "1"], ["--nonsense"], ["a.yaml", "b.yaml"],
]


@pytest.mark.parametrize("argv", TRAIN_ARGVS, ids=" ".join)
def test_train_parses_as_the_live_parser_does(argv, tmp_path, capsys):
    def parse(parser):
        try:
            return vars(parser.parse_args(argv))
        except SystemExit as stop:
            return stop.code, capsys.readouterr().err

    described, live = parse(_train_parser()), parse(_train_parser(tmp_path / "absent.json"))
    assert described == live
    assert isinstance(described, dict) == (argv[0] in ("train.yaml", "--model"))  # the valid ones parse


def test_under_another_transformers_release_train_builds_its_flags_from_transformers(tmp_path, monkeypatch):
    # as a user with a newer transformers sees it: the shipped file describes another release, one flag fewer
    here = environment()
    table = next(table for table in read_tables() if table["environment"] == here)
    table["environment"] = dict(here, transformers="6.0.0")
    training = table["groups"][-1]["actions"]
    training[:] = [spec for spec in training if spec["dest"] != "learning_rate"]
    other = tmp_path / "train_flags.json"
    other.write_text(tables_text([table]))
    assert not add_described_flags(argparse.ArgumentParser(), other)
    parser = _train_parser(other)
    assert parser.parse_args(["--learning_rate", "1e-3"]).learning_rate == 1e-3
    monkeypatch.setenv("COLUMNS", "100")
    assert parser.format_help() == _train_parser().format_help()


def test_package_attributes_load_on_first_use_and_register_the_auto_classes():
    code = """
import sys
import internvlx_hf
print("torch" in sys.modules, "transformers" in sys.modules)
print("InternVLXForConditionalGeneration" in dir(internvlx_hf))
try:
    internvlx_hf.NoSuchThing
except AttributeError as error:
    print(error)
from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
print(type(AutoConfig.for_model("internvlx")).__name__, MODEL_MAPPING[type(AutoConfig.for_model("internvlx"))].__name__,
      InternVLXProcessor in PROCESSOR_MAPPING._extra_content.values(), internvlx_hf.__version__)
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "False False", "True", "module 'internvlx_hf' has no attribute 'NoSuchThing'",
        "InternVLXConfig InternVLXForConditionalGeneration True 0.1.0",
    ]


def test_vllms_tile_geometry_imports_neither_torch_nor_transformers():
    """`token_budget` counts vLLM's prompt length with `vllm.lvtc.geometry`; importing it stays light (it reads a
    config's LVTC settings through the config's own module only when given a config)."""
    result = _python("import sys\nimport internvlx_hf.vllm.lvtc.geometry\n"
                     "print('torch' in sys.modules, 'transformers' in sys.modules, 'vllm' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "False"]


@pytest.mark.oldest
@pytest.mark.parametrize("first_import", [
    "import internvlx_hf\nimport transformers",  # transformers imported after the package: the hook registers
    "import transformers\nimport internvlx_hf",  # before it: the package registers at once
    "from internvlx_hf.processing import InternVLXProcessor",  # a subpackage pulls transformers in
])
def test_importing_the_package_registers_the_auto_classes(first_import):
    code = f"""
{first_import}
import sys
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
print(CONFIG_MAPPING["internvlx"].__name__, [c.__name__ for c in PROCESSOR_MAPPING._extra_content.values()])
print(any(type(finder).__module__ == "internvlx_hf.auto_registration" for finder in sys.meta_path))
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    # registered, and the import hook has removed itself
    assert result.stdout.splitlines() == ["InternVLXConfig ['InternVLXProcessor']", "False"]


# ------------------------------------------------------------------------------------------- argument mistakes


def test_an_optional_value_that_took_a_positional_gets_a_one_line_hint():
    results = _run_cli([["convert", "--lvtc", "./InternVL2-2B", "out dir"], ["convert", "--lvtc", "k=2", "SRC"],
                        ["convert", "--lvtc", "SRC"], ["convert", "SRC", "DST", "--lvtc", "SRC"]])
    hint, forgot_dst, no_dst_either, wrong_spec = results
    assert (hint["code"], hint["err_lines"]) == (2, 1)
    assert hint["last_err"] == (
        "internvlx convert: error: argument --lvtc: invalid SPEC './InternVL2-2B' (comma-separated key=value, e.g. "
        "k=18,T=2); --lvtc took './InternVL2-2B' as its SPEC because its value is optional: did you mean "
        "`internvlx convert ./InternVL2-2B 'out dir' --lvtc`?")
    # a real SPEC and a missing DST, or a line that would not parse either way: argparse's own answer, no hint
    assert forgot_dst["last_err"] == ("internvlx convert: error: the following arguments are required: DST; see "
                                      "`internvlx convert --help`")
    assert no_dst_either["last_err"] == ("internvlx convert: error: argument --lvtc: invalid SPEC 'SRC' "
                                         "(comma-separated key=value, e.g. k=18,T=2)")
    assert wrong_spec["last_err"] == no_dst_either["last_err"]
    assert all(r["code"] == 2 and r["err_lines"] == 1 and r["heavy"] == [] for r in results[1:])


def test_a_trainer_boolean_flag_before_the_config_gets_the_hint(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--packing", "train.yaml"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "internvlx train: error: argument --packing: Truthy value expected: got train.yaml but expected one of "
        "yes/no, true/false, t/f, y/n, 1/0 (case insensitive); --packing took 'train.yaml' as its PACKING because "
        "its value is optional: did you mean `internvlx train train.yaml --packing`?\n")


def test_convert_of_a_missing_folder_suggests_hf_download(capsys, tmp_path):
    assert main(["convert", str(tmp_path / "InternVL2-2B"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"internvlx convert: error: SRC {tmp_path / 'InternVL2-2B'} is not a folder; pass the local folder of an "
        "OpenGVLab InternVL2 model (download it first, e.g. `hf download OpenGVLab/InternVL2-2B --local-dir "
        "InternVL2-2B`).\n")


def test_a_broken_image_is_reported_before_torch_loads(tmp_path):
    """`chat --image` (and `demo --image`) with a file that is no image (or a PNG cut short) is reported by the
    command's checks with Pillow alone; it took 4-8 s (torch, transformers and the model loaded first)."""
    import io

    from PIL import Image

    text, cut = tmp_path / "notes.png", tmp_path / "cut.png"
    text.write_text("not an image")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(png, format="PNG")
    cut.write_bytes(png.getvalue()[:-30])  # the IEND chunk and the end of the pixel data missing
    from internvlx_hf.demo import demo_model_dir

    model = demo_model_dir()
    results = _run_cli([["chat", str(model), "--image", str(path), "Hi"] for path in (text, cut)]
                       + [["demo", "--image", str(text), "--question", "Hi"]])
    assert [result["code"] for result in results] == [2, 2, 2]
    assert results[2]["last_err"] == results[0]["last_err"].replace("internvlx chat:", "internvlx demo:")
    assert results[0]["last_err"] == (
        f"internvlx chat: error: --image {str(text)!r} is not an image Pillow can read (UnidentifiedImageError: "
        f"cannot identify image file {str(text)!r}); give a PNG/JPEG/WebP file.")
    assert results[1]["last_err"].startswith(f"internvlx chat: error: --image {str(cut)!r} is not an image Pillow "
                                             "can read (")
    assert all("torch" not in result["heavy"] and "transformers" not in result["heavy"] for result in results)


def test_the_shipped_train_flags_describe_every_release_of_the_supported_range(monkeypatch):
    """One description per transformers release that scripts/make_train_flags.py lists (every release from
    pyproject's lower bound on), so that `train --help` and flag errors answer without torch under each; under each
    of them `add_described_flags` finds its own, and equal descriptions are stored once."""
    import runpy

    import internvlx_hf.cli.train_flags as train_flags

    releases = runpy.run_path(str(REPO_ROOT / "scripts" / "make_train_flags.py"), run_name="not_main")["RELEASES"]
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"transformers>={releases[0]},' in pyproject
    tables = read_tables()
    assert [table["environment"] for table in tables] == [{"transformers": r, "torch>=2.8": True} for r in releases]
    entries = json.loads(FLAGS_JSON.read_text(encoding="utf-8"))["tables"]
    assert len(entries) == len({json.dumps(entry["groups"]) for entry in entries}) < len(releases)
    for table in tables:
        monkeypatch.setattr(train_flags, "environment", lambda table=table: table["environment"])
        parser = argparse.ArgumentParser()
        assert add_described_flags(parser)
        assert {a.dest for a in parser._actions} - {"help"} == {spec["dest"] for group in table["groups"]
                                                                for spec in group["actions"]}
    monkeypatch.setattr(train_flags, "environment", lambda: {"transformers": releases[0], "torch>=2.8": False})
    assert not add_described_flags(argparse.ArgumentParser())
