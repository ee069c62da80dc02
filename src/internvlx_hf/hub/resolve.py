"""MODEL arguments: a local checkpoint folder, or a Hub id downloaded with `huggingface_hub.snapshot_download`."""

from __future__ import annotations

import os
import re
from pathlib import Path

# The checkpoint-folder check lives in internvlx_hf.checkpoints; these names stay importable from here.
from ..checkpoints import (
    DAMAGED_HINT,
    OPTIONAL_CONFIG_KEYS,
    REQUIRED_CONFIG_KEYS,
    config_key_problem,
    json_error_text,
)
from ..checkpoints import read_checkpoint_config as read_internvlx_config

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
        raise FileNotFoundError(f"{name} {text!r}: no such folder; pass a checkpoint folder or a Hub id (owner/name)."
                                + _did_you_mean(path))
    if path.parent != Path(".") and path.parent.is_dir():
        # `converted/internvl2_qwen` where `converted/` is a local folder: a mistyped path, never a Hub id
        raise FileNotFoundError(f"{name} {text!r}: no such folder in {str(path.parent)!r}." + _did_you_mean(path))
    hint = _did_you_mean(path)
    if hint:  # a name close to a local folder's: a typo, not a Hub id without an owner
        raise FileNotFoundError(f"{name} {text!r}: no such folder." + hint + " (A Hub id is owner/name.)")
    return None


def _did_you_mean(path: Path) -> str:
    """`` Did you mean 'x'?`` for the folders beside `path` whose names are close to its name, or ''."""
    import difflib

    parent = path.parent if str(path.parent) else Path(".")
    try:
        names = [entry.name for entry in parent.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.75)
    if not close:
        return ""
    shown = [str(parent / name) if parent != Path(".") else name for name in close]
    return " Did you mean " + " or ".join(repr(name) for name in shown) + "?"


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
