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
                                     ("projectors.py", "lvtc.py", "outputs.py", "chat.py")),
    "pre_lvtc_move_remote_code.tar.xz": (["configuration_internvlx.py", "lvtc.py", "modeling_internvlx.py",
                                          "outputs.py", "projectors.py"], ("chat.py",)),
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
