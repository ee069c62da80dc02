"""Load transformers' own ``ModelTesterMixin`` for the installed transformers version.

The wheel of transformers has no tests; its source distribution on the package registry ships
``tests/test_modeling_common.py`` (``ModelTesterMixin``) but not ``tests/generation/test_utils.py`` nor
``tests/exporters/test_export.py``, which that module imports. ``load_test_modeling_common()`` downloads the sdist
of exactly the installed version with pip, extracts that one file into a package ``hf_tests`` in a cache folder,
adds the two documented stand-ins beside it (``stand_in_*.py`` here) and imports it.

The cache folder is ``$INTERNVLX_TEST_CACHE`` or ``<repo>/build/transformers-tests`` (``build/`` is git-ignored);
the download (~10 MB, a few seconds) happens once per transformers version.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
PACKAGE = "hf_tests"
# file in the sdist -> name inside the package; the stand-ins are named so that pytest does not collect them here
STAND_INS = {
    "stand_in_generation_test_utils.py": ("generation", "test_utils.py"),
    "stand_in_exporters_test_export.py": ("exporters", "test_export.py"),
}


class SdistUnavailable(RuntimeError):
    """The transformers source distribution could not be downloaded (no network, registry down, ...)."""


def cache_root() -> Path:
    default = REPO_ROOT / "build" / "transformers-tests"
    return Path(os.environ.get("INTERNVLX_TEST_CACHE", default)) / f"transformers-{transformers.__version__}"


def _download_test_modeling_common(target: Path) -> None:
    version = transformers.__version__
    with tempfile.TemporaryDirectory(prefix="transformers-sdist-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   f"transformers=={version}", "-d", tmp]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as err:
            raise SdistUnavailable(f"`{' '.join(command)}` did not finish in 300 s") from err
        archives = sorted(Path(tmp).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SdistUnavailable(f"`pip download transformers=={version}` (source distribution) failed: {last[0]}")
        member = f"transformers-{version}/tests/test_modeling_common.py"
        with tarfile.open(archives[0]) as archive:
            try:
                source = archive.extractfile(member)
            except KeyError as err:
                raise SdistUnavailable(f"the transformers {version} sdist has no {member}") from err
            partial = target.with_suffix(f".{os.getpid()}.partial")  # parallel test runs write their own copy
            partial.write_bytes(source.read())
            partial.replace(target)  # complete or absent, never half-written


def register_markers(config) -> None:
    """Declare the pytest markers transformers' test module uses (``@mark.flash_attn_test``, ...): this project runs
    pytest with ``--strict-markers``, and transformers declares them in its own (unshipped) conftest."""
    source = (cache_root() / PACKAGE / "test_modeling_common.py").read_text()
    known = {line.split(":")[0].strip() for line in config.getini("markers")}
    for name in sorted(set(re.findall(r"\bmark\.([a-z_][a-z0-9_]*)", source)) - known):
        config.addinivalue_line("markers", f"{name}: used by transformers' ModelTesterMixin")


def load_test_modeling_common(pytest_config=None):
    """Import transformers' ``tests/test_modeling_common.py`` (for the installed version); raise
    ``SdistUnavailable`` when its source distribution cannot be downloaded. ``pytest_config``: the running pytest's
    config, whose markers are extended first (``register_markers``)."""
    root = cache_root()
    package = root / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").touch()
    target = package / "test_modeling_common.py"
    if not target.exists():
        _download_test_modeling_common(target)
    for stand_in, (subpackage, name) in STAND_INS.items():
        folder = package / subpackage
        folder.mkdir(exist_ok=True)
        (folder / "__init__.py").touch()
        shutil.copyfile(HERE / stand_in, folder / name)
    if pytest_config is not None:
        register_markers(pytest_config)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")
