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


def local_model_folder(model: str | os.PathLike, name: str = "MODEL") -> Path | None:
    """The folder ``model`` names, or None for a Hub id; `FileNotFoundError` for a file, or for a missing path that
    cannot be a Hub id. No download and no heavy import: the command line checks its MODEL arguments with it before
    loading torch (``name``: how the message calls the argument)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{name} {str(model)!r} is a file; pass the checkpoint folder that holds config.json.")
    text = str(model)
    if not looks_like_repo_id(text) or os.sep in text.replace("/", "") or text.count("/") > 1:
        raise FileNotFoundError(f"{name} {text!r}: no such folder; pass a checkpoint folder or a Hub id (owner/name).")
    return None


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
    path = local_model_folder(model)
    if path is not None:
        return path
    name = str(model)

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


# Keys every internvlx-hf config.json holds (save_pretrained writes them all). InternVLXConfig would fill a missing
# one with InternVL2-2B's value (a hidden size of 4096, say) and the weights would no longer fit, so they are checked
# here, once, for every command that reads a checkpoint.
_POSITIVE_INT = "a positive integer"
_SIZE = "a positive integer or a [height, width] pair"
REQUIRED_CONFIG_KEYS: dict[str, str] = {
    "image_token_id": "an integer >= 0",
    "text_config": "an object",
    "text_config.model_type": "a string",
    "text_config.vocab_size": _POSITIVE_INT,
    "text_config.hidden_size": _POSITIVE_INT,
    "text_config.intermediate_size": _POSITIVE_INT,
    "text_config.num_hidden_layers": _POSITIVE_INT,
    "text_config.num_attention_heads": _POSITIVE_INT,
    "vision_config": "an object",
    "vision_config.hidden_size": _POSITIVE_INT,
    "vision_config.intermediate_size": _POSITIVE_INT,
    "vision_config.num_hidden_layers": _POSITIVE_INT,
    "vision_config.num_attention_heads": _POSITIVE_INT,
    "vision_config.image_size": _SIZE,
    "vision_config.patch_size": _SIZE,
}
# Keys InternVLXConfig (or the LLM's config class) has a default for: when present, of the right type.
OPTIONAL_CONFIG_KEYS: dict[str, str] = {
    "downsample_ratio": "a number",
    "select_layer": "an integer",
    "projector_type": "a string",
    "pvtc_num_layers": _POSITIVE_INT,
    "pvtc_num_heads": _POSITIVE_INT,
    "lvtc": "an object or null",
    "text_config.num_key_value_heads": _POSITIVE_INT,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TYPE_CHECKS = {
    "an integer": _is_int,
    "an integer >= 0": lambda v: _is_int(v) and v >= 0,
    _POSITIVE_INT: lambda v: _is_int(v) and v > 0,
    _SIZE: lambda v: (_is_int(v) and v > 0) or (isinstance(v, list) and len(v) == 2
                                                 and all(_is_int(x) and x > 0 for x in v)),
    "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "a string": lambda v: isinstance(v, str) and bool(v),
    "an object": lambda v: isinstance(v, dict),
    "an object or null": lambda v: v is None or isinstance(v, dict),
}

_MISSING = object()
DAMAGED_HINT = ("the file is damaged; restore it from where the checkpoint came from, or convert / train the "
                "checkpoint again")


def _lookup(config: dict[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def config_key_problem(config: dict[str, Any]) -> str | None:
    """The first key of an internvlx-hf config.json (as a dict) that is missing or of the wrong type, as
    ``"text_config.hidden_size is missing"`` / ``"... must be a positive integer, got '64' (str)"``; None if none."""
    for key, expected in (*REQUIRED_CONFIG_KEYS.items(), *OPTIONAL_CONFIG_KEYS.items()):
        value = _lookup(config, key)
        if value is _MISSING:
            if key in REQUIRED_CONFIG_KEYS:
                return f"{key} is missing"
            continue
        if not _TYPE_CHECKS[expected](value):
            return f"{key} must be {expected}, got {json.dumps(value)[:40]} ({type(value).__name__})"
    return None


def json_error_text(error: json.JSONDecodeError) -> str:
    """``(line X col Y): message``: where a JSON file stops being valid."""
    return f"(line {error.lineno} col {error.colno}): {error.msg}"


def read_internvlx_config(folder: str | os.PathLike, name: str) -> dict[str, Any]:
    """The config.json of the internvlx-hf checkpoint folder ``folder``, as a dict, checked before any work is done:
    valid JSON, ``model_type`` internvlx, and every key in `REQUIRED_CONFIG_KEYS` / `OPTIONAL_CONFIG_KEYS` present
    with its type.

    ``name`` says in errors which argument gave the folder (e.g. ``"--model 'out'"``).

    Raises:
        FileNotFoundError: the folder holds no config.json.
        ValueError: config.json is not valid JSON (the message gives line and column), not a JSON object, describes
            another model type (e.g. an OpenGVLab InternVL2 checkpoint, which `internvlx convert` turns into an
            internvlx-hf one), or lacks a key / has one of the wrong type (the message names it).
    """
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{name}: no config.json in {folder}; give the folder of an internvlx-hf checkpoint "
                                "(made by `internvlx convert` or `internvlx train`)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}: {config_file} is not valid JSON {json_error_text(error)}; {DAMAGED_HINT}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{name}: {config_file} is not UTF-8 text; {DAMAGED_HINT}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{name}: {config_file} holds a JSON {type(config).__name__}, not an object; {DAMAGED_HINT}")
    model_type = config.get("model_type")
    if model_type != "internvlx":
        raise ValueError(f"{name}: config.json has model_type {model_type!r}, not 'internvlx'; convert OpenGVLab "
                         "InternVL2 / InternVL-X checkpoints first with `internvlx convert SRC DST`")
    problem = config_key_problem(config)
    if problem is not None:
        raise ValueError(f"{name}: {config_file}: {problem}; {DAMAGED_HINT}")
    return config


def check_model_argument(model: str | os.PathLike, name: str = "MODEL") -> None:
    """What can be said of a MODEL argument without the Hub and without importing anything heavy: a local folder must
    hold an internvlx-hf config.json (`read_internvlx_config`), and anything else must be spelled as a Hub id
    (`local_model_folder`). The command line runs it before torch loads, so that the mistakes users make most (a
    wrong path, a folder that is no checkpoint) are reported at once."""
    folder = local_model_folder(model, name)
    if folder is not None:
        read_internvlx_config(folder, f"{name} {str(model)!r}")


__all__ = ["DAMAGED_HINT", "OPTIONAL_CONFIG_KEYS", "REQUIRED_CONFIG_KEYS", "check_model_argument", "config_key_problem",
           "json_error_text", "local_model_folder", "looks_like_repo_id", "read_internvlx_config", "resolve_model"]
