"""Checkpoint folders written by earlier layouts of `modeling/` still load, with the same logits.

Such a folder holds the remote code of its time, shipped under `tests/legacy/` (rather than read from git history,
which a shallow CI clone lacks), each archive the files as that commit wrote them
(`git show <commit>:src/internvlx_hf/modeling/<name>`):

- `pre_split_remote_code.tar.xz`: before `modeling/` was split by job (7456652): one `modeling_internvlx.py` (with
  projectors, LVTC, outputs and the model in it) and `configuration_internvlx.py`;
- `pre_lvtc_move_remote_code.tar.xz`: before LVTC's forward moved to `lvtc.py` and `chat()` to `chat.py` (dd186a5):
  five files, no `chat.py`.

The weights and config.json are written here by today's code: the config and the parameter names did not change.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

from internvlx_hf import InternVLXForConditionalGeneration

from conftest import run_remote_logits
from tiny import pixels, prompt_ids, tiny_model

LEGACY = Path(__file__).parent / "legacy"
#: archive -> (the files it holds, the files today's save writes that the archive's code does not use)
ARCHIVES = {
    "pre_split_remote_code.tar.xz": (["configuration_internvlx.py", "modeling_internvlx.py"],
                                     ("projectors.py", "lvtc.py", "lvtc_cache.py", "outputs.py", "chat.py", "compat.py",
                                      "input_checks.py", "placeholders.py")),
    "pre_lvtc_move_remote_code.tar.xz": (["configuration_internvlx.py", "lvtc.py", "modeling_internvlx.py",
                                          "outputs.py", "projectors.py"],
                                         ("chat.py", "compat.py", "input_checks.py", "lvtc_cache.py", "placeholders.py")),
}
LVTC = {"expand_layer": 2, "num_lr_projectors": 2, "inject_start": 1, "hr_scale": "rms"}


def _legacy_folder(model, folder: Path, archive_name: str) -> None:
    files, unused = ARCHIVES[archive_name]
    model.save_pretrained(folder)
    assert all((folder / name).is_file() for name in unused)  # what a folder holds today
    for name in unused:
        (folder / name).unlink()
    with tarfile.open(LEGACY / archive_name) as archive:
        assert sorted(archive.getnames()) == files
        for member in archive.getmembers():  # plain files; no extraction filter needed (absent before 3.10.12)
            (folder / member.name).write_bytes(archive.extractfile(member).read())
    code = (folder / "modeling_internvlx.py").read_text()
    assert ("class PVTCProjector" in code) == (archive_name == "pre_split_remote_code.tar.xz")  # the one-file version
    assert "_lvtc_forward" in code  # LVTC's forward still in the model file


@pytest.mark.parametrize("archive_name", sorted(ARCHIVES))
def test_a_folder_written_by_an_earlier_modeling_layout_loads_with_identical_logits(tmp_path, archive_name):
    model = tiny_model("pvtc", lvtc=LVTC)
    ids, pv = torch.tensor([prompt_ids(2, seed=61)]), pixels(2, seed=62)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pv).logits
    _legacy_folder(model, tmp_path / "ckpt", archive_name)
    save_file({"ids": ids, "pv": pv, "expected": expected.contiguous()}, tmp_path / "io.safetensors")
    # remote code alone, where internvlx_hf cannot be imported
    stdout = run_remote_logits(tmp_path)
    assert "MAXDIFF 0.0" in stdout.splitlines()
    # the package's own classes, through AutoModel without trust_remote_code
    reloaded = AutoModel.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()
    assert type(reloaded) is InternVLXForConditionalGeneration
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, pixel_values=pv).logits, expected, rtol=0, atol=0)


def test_an_earlier_versions_config_class_gives_the_same_lvtc_settings(tmp_path):
    """A folder's own remote config class from before `config.lvtc` held an `LVTCConfig` keeps the dict config.json
    holds (a config built by that class where the package did not register its own, which transformers' Auto classes
    otherwise prefer): code outside the model reads both through `LVTCConfig.of`, with the same settings and the same
    vLLM geometry."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from internvlx_hf import InternVLXConfig
    from internvlx_hf.modeling.configuration_internvlx import LVTCConfig
    from internvlx_hf.vllm.lvtc.geometry import lvtc_geometry_of

    model = tiny_model("pvtc", lvtc=LVTC)
    _legacy_folder(model, tmp_path / "ckpt", "pre_lvtc_move_remote_code.tar.xz")
    earlier_class = get_class_from_dynamic_module("configuration_internvlx.InternVLXConfig", str(tmp_path / "ckpt"))
    earlier = earlier_class.from_pretrained(tmp_path / "ckpt")
    today = InternVLXConfig.from_pretrained(tmp_path / "ckpt")
    assert type(earlier) is not InternVLXConfig and isinstance(earlier.lvtc, dict)  # the class the folder holds
    assert isinstance(today.lvtc, LVTCConfig) and LVTCConfig.of(today) is today.lvtc
    assert LVTCConfig.of(earlier) == today.lvtc == model.config.lvtc
    assert LVTCConfig.of(earlier).injection_layers == [1]
    assert lvtc_geometry_of(earlier) == lvtc_geometry_of(today)
    assert LVTCConfig.of(InternVLXConfig()) is None
