"""The scripts in `examples/` run as the README shows them and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_quickstart_runs_and_removes_its_temporary_folder(tmp_path):
    """`python examples/quickstart.py` (no folder given) saves, reloads as remote code and prints what the README
    shows; its temporary folder is gone afterwards (it once stayed in /tmp on every run)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "quickstart.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # (DeepSpeed, where installed, logs "[date] [WARNING] [real_accelerator.py...] Setting accelerator to CPU" to
    # stdout when transformers imports it: not the script's output)
    lines = [line for line in result.stdout.splitlines() if "real_accelerator.py" not in line]
    assert lines[0].startswith(f"saved to {scratch}{os.sep}internvlx-")
    assert "(temporary, removed when the script ends; pass a folder to keep it)" in lines[0]
    assert lines[1:3] == ["tokens per tile: 256 (LVTC expands to 1024 from layer 3)",
                          "identical logits after reload: True"]
    # importing transformers' modeling creates torch's compile cache (torchinductor_USER) in TMPDIR: not ours
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]


def test_what_the_readme_commands_write_is_git_ignored():
    """The README's commands are meant to be pasted in the checkout; the folders and files they write (`internvlx
    convert ... converted/...`, the toy data, `--save`, `--output_dir`, `--out`, `--save-images`, `--output_path`)
    are git-ignored, so trying them leaves `git status` clean."""
    import re
    import shutil

    import pytest

    if shutil.which("git") is None or subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--git-dir"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    # (the commands with real paths: `internvlx convert SRC DST`, `--output_dir OUT` in the command table are
    # placeholders)
    patterns = [r"internvlx convert tests/\S+ ([\w./-]+)", r'save_pretrained\("([^"]+)"\)',
                r"--save-images ([\w./-]+)", r"--output_path ([\w./-]+)", r"--save ([\w./-]+)",
                r"--output_dir ([\w./-]+)", r"--out ([\w./-]+)", r"generate_dataset\('([^']+)'"]
    written = sorted({match for pattern in patterns for match in re.findall(pattern, readme) if not match.isupper()})
    assert {"converted/internvl2_qwen2", "demo", "toy", "out", "prefill.json"} <= set(written), written
    result = subprocess.run(["git", "-C", str(REPO_ROOT), "check-ignore", "--no-index", *written],
                            capture_output=True, text=True)
    assert sorted(result.stdout.split()) == written
