"""The transformers releases the package declares (pyproject.toml) are the ones measured by
scripts/transformers_matrix.py (benchmarks/results/transformers-matrix.json, the table in docs/testing.md), so is its
torch minimum (transformers-matrix-torchX.json), and what
differs between them works under the installed one: `internvlx train`'s flags are its TrainingArguments' (the shipped
train_flags.json describes each release of the range; under others they are built live), 5.23's names for activation
checkpointing work on every release, and our fallback for a helper older releases lack is transformers' own where
both exist. CI runs the `oldest`-marked tests under the oldest declared release too (.ci/run)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from conftest import REPO_ROOT, load_script
from internvlx_hf.cli import main
from internvlx_hf.cli.train import parse_cli
from internvlx_hf.cli.train_flags import CLI_RESERVED, live_table
from internvlx_hf.training.arguments import ARGUMENT_CLASSES, checkpointing_renames, parse_train_args

MATRIX = REPO_ROOT / "benchmarks" / "results" / "transformers-matrix.json"


def _declared(package: str = "transformers") -> SpecifierSet:
    """The requirement on ``package`` of pyproject.toml's dependencies (one quoted line: "transformers>=A,<B")."""
    (spec,) = re.findall(rf'^\s*"{package}([<>=!~][^"]*)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M)
    return SpecifierSet(spec)


def test_the_declared_range_is_the_measured_range():
    """pyproject.toml's lower bound is the oldest release measured, every release the matrix lists was measured
    and passed every check, and docs/testing.md shows the table the script makes of the results."""
    declared, results = _declared(), json.loads(MATRIX.read_text())
    matrix = load_script("scripts/transformers_matrix.py")
    assert {str(s) for s in declared} == {f">={matrix.RELEASES[0]}", "<6"}
    assert sorted(results["releases"], key=Version) == sorted(matrix.RELEASES, key=Version)
    assert results["checks"] == matrix.CHECKS
    failed = {release: [name for name, check in measured["checks"].items() if not check["ok"]]
              for release, measured in results["releases"].items()}
    assert failed == {release: [] for release in results["releases"]}
    assert all(set(measured["checks"]) == set(matrix.CHECKS) for measured in results["releases"].values())
    assert matrix.table(results) in (REPO_ROOT / "docs" / "testing.md").read_text()


def test_the_declared_torch_minimum_was_measured():
    """pyproject.toml's `torch>=X` is a torch the matrix ran (transformers-matrix-torchX.json) at both ends of the
    transformers range: every check passed there, with the answers, tokens and scores of the default torch."""
    matrix, default = load_script("scripts/transformers_matrix.py"), json.loads(MATRIX.read_text())
    (minimum,) = [spec.version for spec in _declared("torch") if spec.operator == ">="]
    (measured,) = MATRIX.parent.glob(f"transformers-matrix-torch{minimum}*.json")
    results = json.loads(measured.read_text())
    assert Version(results["torch"]) >= Version(minimum) and Version(results["torch"]).release[:2] == \
        Version(minimum).release[:2]
    assert {matrix.RELEASES[0], matrix.RELEASES[-1]} <= set(results["releases"])
    for release, run in results["releases"].items():
        assert run["packages"]["torch"].split("+")[0] == results["torch"]
        assert {name: check["ok"] for name, check in run["checks"].items()} == {name: True for name in matrix.CHECKS}
        expected = default["releases"][release]["checks"]
        for name in ("remote", "demo", "eval", "chat"):
            assert run["checks"][name]["output"] == expected[name]["output"], (release, name)
        for name in ("convert", "convert_new"):
            assert [run["checks"][name]["output"][k] for k in ("generated", "chat")] == \
                [expected[name]["output"][k] for k in ("generated", "chat")], (release, name)
    assert matrix.table(results) in (REPO_ROOT / "docs" / "testing.md").read_text()


@pytest.mark.oldest
def test_the_installed_transformers_is_in_the_declared_range():
    assert Version(transformers.__version__) in _declared(), transformers.__version__


@pytest.mark.oldest
def test_train_flags_are_the_installed_trainingarguments(capsys):
    """Shipped (a release train_flags.json describes) or built live (any other): every field of the argument
    dataclasses is a flag of `internvlx train --help`, and --activation_checkpointing (5.23's name, the docs') turns
    checkpointing on under every release, on the command line and in a CONFIG.yaml."""
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    shown = set(re.findall(r"--([A-Za-z0-9_-]+)", capsys.readouterr().out))
    fields = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init} - CLI_RESERVED
    assert fields - shown == set()
    assert {"activation_checkpointing", "activation-checkpointing", "activation_checkpointing_kwargs"} <= shown
    # and train_flags.json could be written for this release (`python -m internvlx_hf.cli.train_flags`)
    described = live_table()
    assert described["environment"]["transformers"] == transformers.__version__
    assert {f.lstrip("-") for group in described["groups"] for a in group["actions"] for f in a["flags"]} <= shown

    base = ["--model", "m", "--data", "d.jsonl", "--output_dir", "out"]
    for args in (parse_cli([*base, "--activation_checkpointing", "--activation_checkpointing_kwargs",
                            '{"use_reentrant": false}']),
                 parse_train_args({"model": "m", "data": "d.jsonl", "output_dir": "out",
                                   "activation_checkpointing": True,
                                   "activation_checkpointing_kwargs": {"use_reentrant": False}})):
        training = args[3]
        name = checkpointing_renames().get("activation_checkpointing", "activation_checkpointing")
        assert getattr(training, name) is True
        assert getattr(training, name + "_kwargs") == {"use_reentrant": False}


def test_the_slice_logits_to_keep_fallback_is_transformers_own():
    """compat's fallback for transformers 5.16-5.20 gives what transformers' `slice_logits_to_keep`
    (5.21 on) gives, for every kind of `logits_to_keep`."""
    from transformers import modeling_utils

    from internvlx_hf.modeling import compat

    if not hasattr(modeling_utils, "slice_logits_to_keep"):
        pytest.skip(f"transformers {transformers.__version__} has no slice_logits_to_keep (5.21 added it): the "
                    "fallback is what runs here, under every model test")
    hidden = torch.randn(2, 7, 3)
    cases = [0, 1, 3, torch.tensor([0, 4, 6]), torch.tensor([[1, 2], [5, 6]]),
             torch.tensor([[True, False, True, False, False, False, True], [False] * 6 + [True]])]
    for keep in cases:
        assert torch.equal(compat._slice_logits_to_keep(hidden, keep),
                           modeling_utils.slice_logits_to_keep(hidden, keep)), keep
    assert compat.slice_logits_to_keep is modeling_utils.slice_logits_to_keep
