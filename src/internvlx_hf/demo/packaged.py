"""The demo model's files as the package ships them, and the self-contained checkpoint folder made from them.

``model/`` (next to this file, `DEMO_MODEL_DIR`) holds the weights, config, generation config, tokenizer, chat
template, processor config, the recipe and held-out scores (``demo_model.json``) and the provenance record: no code.
Where internvlx-hf is imported, that folder loads as it is (the package registers its classes with the Auto classes).
Clients that load it on their own (lmms-eval, transformers' ``pipeline``, a venv without the package, all with
``trust_remote_code=True``) need the remote-code files next to the weights: `demo_model_dir` and `save_demo_model`
add them from the package's own modules (`internvlx_hf.remote_code`, what conversion and training write too), so the
model's code exists once, in ``modeling/`` and ``processing/``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ..atomic import staged_cache_folder, staged_folder
from ..remote_code import remote_code_sources, save_remote_code

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"


def packaged_files() -> list[Path]:
    """The files of `DEMO_MODEL_DIR`, sorted by name."""
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{DEMO_MODEL_DIR}: no demo model there (config.json missing); regenerate it with "
                                "`python scripts/make_demo_model.py`")
    return sorted(p for p in DEMO_MODEL_DIR.iterdir() if p.is_file() and not p.name.startswith("."))


def _content_key() -> str:
    """A digest of everything a demo model folder is made of (packaged files and remote-code sources), so that a
    cached folder is reused only while neither the model nor the package's code changed."""
    digest = hashlib.sha256()
    for path in packaged_files() + remote_code_sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _write_demo_model(folder: Path) -> None:
    for path in packaged_files():
        shutil.copyfile(path, folder / path.name)
    save_remote_code(folder)


def default_cache_dir() -> Path:
    """Where `demo_model_dir` keeps its folder: ``internvlx_hf/`` under the Hugging Face home (``$HF_HOME``,
    default ``~/.cache/huggingface``), next to transformers' own cache of remote code."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "internvlx_hf"


def demo_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo model as a complete checkpoint folder (its files plus the package's remote code), written once into
    ``cache_dir`` (default: `default_cache_dir`) under a name that is a digest of its content, and reused after.

    The folder appears whole or not at all, and processes that ask for it at the same time share one. Where the cache
    cannot be written (a read-only home), the folder goes into a new private temporary folder instead.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"demo-model-{_content_key()}"
    if (target / "config.json").is_file():
        return target
    try:
        with staged_cache_folder(target) as tmp:
            _write_demo_model(tmp)
    except PermissionError:
        if cache_dir is not None:
            raise
        target = Path(tempfile.mkdtemp(prefix="internvlx-demo-model-"))
        _write_demo_model(target)
    return target


def save_demo_model(dst: str | os.PathLike) -> Path:
    """Write the demo model as a self-contained checkpoint folder ``dst`` (which must not exist or be empty): what
    lmms-eval, ``pipeline`` and a venv without internvlx-hf load with ``trust_remote_code=True``."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} is a file; give the path of a new folder")
    if dst.is_dir() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; give a new folder, or empty it first")
    with staged_folder(dst) as tmp:
        _write_demo_model(tmp)
    return dst


__all__ = ["DEMO_MODEL_DIR", "default_cache_dir", "demo_model_dir", "packaged_files", "save_demo_model"]
