"""A checkpoint folder written before `modeling/` was split by job (issue 59) still loads, with the same logits.

Such a folder holds the remote code of that time: one `modeling_internvlx.py` (with projectors, LVTC, outputs and the
model in it) and `configuration_internvlx.py`. `tests/legacy/pre_split_remote_code.tar.xz` holds those two files as
commit 7456652 (main before the split) wrote them (`git show 7456652:src/internvlx_hf/modeling/<name>`); shipped
rather than read from git history, which a shallow CI clone lacks. The weights and config.json are written here by
today's code: the config and the parameter names did not change with the split.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModel

from internvlx_hf import InternVLXForConditionalGeneration

from conftest import run_isolated_python
from tiny import pixels, prompt_ids, tiny_model

ARCHIVE = Path(__file__).parent / "legacy" / "pre_split_remote_code.tar.xz"
SPLIT_FILES = ("projectors.py", "lvtc.py", "outputs.py")
LVTC = {"expand_layer": 2, "num_lr_projectors": 2, "inject_start": 1, "hr_scale": "rms"}


def _pre_split_folder(model, folder: Path) -> None:
    model.save_pretrained(folder)
    assert all((folder / name).is_file() for name in SPLIT_FILES)  # what a folder holds today
    for name in SPLIT_FILES:
        (folder / name).unlink()
    with tarfile.open(ARCHIVE) as archive:
        assert sorted(archive.getnames()) == ["configuration_internvlx.py", "modeling_internvlx.py"]
        for member in archive.getmembers():  # two plain files; no extraction filter needed (absent before 3.10.12)
            (folder / member.name).write_bytes(archive.extractfile(member).read())
    assert "class PVTCProjector" in (folder / "modeling_internvlx.py").read_text()  # the one-file version


def test_a_folder_written_before_the_split_loads_with_identical_logits(tmp_path):
    model = tiny_model("pvtc", lvtc=LVTC)
    ids, pv = torch.tensor([prompt_ids(2, seed=61)]), pixels(2, seed=62)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pv).logits
    _pre_split_folder(model, tmp_path / "ckpt")
    save_file({"ids": ids, "pv": pv, "expected": expected.contiguous()}, tmp_path / "io.safetensors")
    # remote code alone, where internvlx_hf cannot be imported
    code = """
import torch
from safetensors.torch import load_file
from transformers import AutoModel
t = load_file("io.safetensors")
model = AutoModel.from_pretrained("ckpt", trust_remote_code=True, attn_implementation="eager").eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    logits = model(input_ids=t["ids"], pixel_values=t["pv"]).logits
print("MAXDIFF", repr(float((logits - t["expected"]).abs().max())))
"""
    result = run_isolated_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MAXDIFF 0.0" in result.stdout.splitlines()
    # the package's own classes, through AutoModel without trust_remote_code
    reloaded = AutoModel.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()
    assert type(reloaded) is InternVLXForConditionalGeneration
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, pixel_values=pv).logits, expected, rtol=0, atol=0)
