"""Shared test helpers.

Golden fixtures live outside the project (``$INTERNVLX_FIXTURES``, default ``../shared/fixtures`` beside the
checkout). Where they are absent, parity tests skip with a reason; ``.ci/run`` sets
``INTERNVLX_REQUIRE_FIXTURES=1`` so that the same absence fails the run instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def fixtures_root() -> Path:
    return Path(os.environ.get("INTERNVLX_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures")).resolve()


def require_fixture(*parts: str) -> Path:
    """Path of a fixture file/folder; skip (or fail under CI's flag) when it is missing."""
    path = fixtures_root().joinpath(*parts)
    if not path.exists():
        reason = f"golden fixture {path} not found (set INTERNVLX_FIXTURES to the shared fixtures folder)"
        if os.environ.get("INTERNVLX_REQUIRE_FIXTURES") == "1":
            pytest.fail(reason + "; INTERNVLX_REQUIRE_FIXTURES=1 makes this a failure")
        pytest.skip(reason)
    return path


def remote_code_imports(path: Path) -> set[str]:
    """Top-level names a remote-code file imports (``"."`` for single-dot relative imports)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                names.add("." * node.level)
            names.add("." if node.level == 1 else node.module.split(".")[0])
    return names


def run_isolated_python(code: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``internvlx_hf`` cannot be imported.

    The package is hidden by a meta-path finder installed before anything else runs, so the test proves that a
    saved checkpoint works through ``trust_remote_code=True`` alone (as on a machine without the plugin).
    """
    prelude = (
        "import sys, importlib.abc\n"
        "class _Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'internvlx_hf' or name.startswith('internvlx_hf.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (hidden by the test)')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(Path(cwd) / "hf_modules")
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
