"""MODEL arguments: a local checkpoint folder, or a Hub id downloaded with `huggingface_hub.snapshot_download`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

# owner/name as the Hub spells repository ids (letters, digits, '-', '_', '.'), optionally without an owner.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def looks_like_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and not model.startswith((".", "/")) and "--" not in model


def resolve_model(model: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """The local folder of ``model``: the folder itself, or a snapshot of the Hub repository ``model``.

    Args:
        model: a checkpoint folder, or a Hub id such as ``"OpenGVLab/InternVL2-2B"`` (downloaded into the Hugging
            Face cache, or taken from it when already there).
        allow_patterns: only download these files (e.g. configs for `internvlx tokens`).

    Raises:
        FileNotFoundError: neither a folder nor a Hub id, the repository does not exist, or the Hub cannot be
            reached (offline) and the files are not in the cache.
    """
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"MODEL {str(model)!r} is a file; pass the checkpoint folder that holds config.json.")
    name = str(model)
    if not looks_like_repo_id(name) or os.sep in name.replace("/", "") or name.count("/") > 1:
        raise FileNotFoundError(f"MODEL {name!r}: no such folder; pass a checkpoint folder or a Hub id (owner/name).")

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns))
    except GatedRepoError:
        raise FileNotFoundError(f"MODEL {name!r} is a gated Hub repository: accept its terms on huggingface.co and "
                                "log in (`hf auth login`), or pass a local folder.") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise FileNotFoundError(f"MODEL {name!r}: no such local folder, and no such model on the Hub (or it is "
                                "private: log in with `hf auth login`).") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise FileNotFoundError(f"MODEL {name!r} is not a local folder and not in the Hugging Face cache, and {why}; "
                                f"download it where the Hub is reachable (`hf download {name} --local-dir DIR`) and "
                                "pass DIR.") from None


def read_internvlx_config(folder: str | os.PathLike, name: str) -> dict[str, Any]:
    """The config.json of the internvlx-hf checkpoint folder ``folder``, as a dict.

    ``name`` says in errors which argument gave the folder (e.g. ``"--model 'out'"``).

    Raises:
        FileNotFoundError: the folder holds no config.json.
        ValueError: config.json is not a JSON object, or describes another model type (e.g. an OpenGVLab
            InternVL2 checkpoint, which `internvlx convert` turns into an internvlx-hf one).
    """
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{name}: no config.json in {folder}; give the folder of an internvlx-hf checkpoint "
                                "(made by `internvlx convert` or `internvlx train`)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        config = None
    if not isinstance(config, dict):
        raise ValueError(f"{name}: {config_file} is not a JSON object; the checkpoint is damaged (convert or train "
                         "it again)")
    model_type = config.get("model_type")
    if model_type != "internvlx":
        raise ValueError(f"{name}: config.json has model_type {model_type!r}, not 'internvlx'; convert OpenGVLab "
                         "InternVL2 / InternVL-X checkpoints first with `internvlx convert SRC DST`")
    return config


__all__ = ["looks_like_repo_id", "read_internvlx_config", "resolve_model"]
