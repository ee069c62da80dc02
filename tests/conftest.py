"""Shared test helpers.

Golden fixtures: the project ships a compact copy in ``tests/fixtures/`` (made by ``scripts/compact_fixtures.py``);
``$INTERNVLX_FIXTURES`` may point at the full ``../shared/fixtures`` instead (then ``internvl2_phi3`` comes from
``$INTERNVLX_FIXTURES_PHI3`` or the sibling ``fixtures_phi3``). ``tests/golden.py`` reads either; ``require_fixture``
gives the real path of a file both keep verbatim (checkpoints, tokenizer files, reference.json, images, ...). A
missing fixture is a test failure, never a skip: the data ships with the project.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import golden
import pytest

# The running session's pytest config: transformers' test module (tests/test_transformers_conformance.py) declares
# its markers on it before import, since this project runs pytest with --strict-markers.
PYTEST_CONFIG = None


def pytest_configure(config):
    global PYTEST_CONFIG
    PYTEST_CONFIG = config


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Tests that pin torch to one thread (for bit-stable float sums) must not slow down the tests after them."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _lengths_cache_of_the_session(tmp_path_factory):
    """Lengths cached without a cache folder given (`internvlx data check`, `--group_by_length`, ``check=True``) go
    to ``$INTERNVLX_CACHE/lengths``: a folder of this test session (subprocesses inherit it), not the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTERNVLX_CACHE", str(tmp_path_factory.mktemp("internvlx-cache")))
        yield


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over `tmp_path` (no network needed): its base URL, e.g. ``http://127.0.0.1:PORT``;
    stopped after the test."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def require_fixture(*parts: str) -> Path:
    """Real path of a fixture file/folder kept verbatim (see `golden.fixture_path`); fails the test if missing."""
    try:
        return golden.fixture_path(*parts)
    except FileNotFoundError as error:
        pytest.fail(str(error))


def pytest_report_header(config):
    try:
        return ["golden fixtures:"] + ["  " + line for line in golden.describe_sources().splitlines()]
    except FileNotFoundError as error:  # a bad INTERNVLX_FIXTURES: say so once, every parity test fails with it
        return [f"golden fixtures: {error}"]


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


def load_script(relative: str | Path):
    """A benchmark or script of the repository (not a package module) imported from its path, e.g.
    ``load_script("benchmarks/bench_learnability.py")`` (an absolute path is taken as it is)."""
    import importlib.util

    path = REPO_ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: What `run_remote_logits` runs: the logits of ``ckpt`` loaded as remote code on the inputs of ``io.safetensors``.
_REMOTE_LOGITS = """
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


def run_remote_logits(cwd: Path, extra_check: str = "") -> str:
    """In ``cwd``: load the folder ``ckpt`` with ``trust_remote_code=True`` where internvlx_hf cannot be imported
    (`run_isolated_python`), run it on ``io.safetensors``' ``ids`` and ``pv`` and print ``MAXDIFF`` against its
    ``expected`` logits, then run ``extra_check``; returns the interpreter's stdout (it must exit 0)."""
    result = run_isolated_python(_REMOTE_LOGITS + extra_check + "\n", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def run_isolated_python(code: str, cwd: Path, timeout: int = 600, args=()) -> subprocess.CompletedProcess:
    """Run ``code`` (with ``sys.argv[1:] = args``) in a fresh interpreter where ``internvlx_hf`` cannot be imported.

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
        [sys.executable, "-c", prelude + code, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
