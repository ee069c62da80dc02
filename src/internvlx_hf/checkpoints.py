"""Is this folder a checkpoint? The one check every command that reads a checkpoint folder runs before any work.

A checkpoint folder holds ``config.json``: a JSON object whose ``model_type`` names the model. An internvlx-hf
checkpoint's is ``internvlx``, with every key of `REQUIRED_CONFIG_KEYS` and the keys of `OPTIONAL_CONFIG_KEYS` it
has of the right type.

`read_checkpoint_config` asks in that order and stops at the first answer that is no, with one line naming the
argument the folder came from, the file and the fix. Only the standard library is imported here: the command line
runs the check before torch loads, so that a wrong folder is reported at once. The remote-code files saved next to
checkpoints (``modeling/``, ``processing/``) do not use it: they import only torch, transformers and each other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
MODEL_TYPE = "internvlx"
CHECKPOINT_HINT = "give the folder of an internvlx-hf checkpoint (made by `internvlx convert` or `internvlx train`)"
DAMAGED_HINT = ("the file is damaged; restore it from where the checkpoint came from, or convert / train the "
                "checkpoint again")
# What `internvlx convert` reads (SRC): an OpenGVLab InternVL2 / InternVL-X folder or a transformers-native one.
SOURCE_HINT = ("pass the local folder of an OpenGVLab InternVL2 model (download it first, e.g. `hf download "
               "OpenGVLab/InternVL2-2B --local-dir InternVL2-2B`).")
SOURCE_DAMAGED_HINT = "the file is corrupt or truncated: copy it again from the original checkpoint."

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


# The messages a command may word its own way (`read_checkpoint_config`'s ``wording``); str.format fields: name,
# folder, hint, model_type.
WORDING: dict[str, str] = {
    "folder": "{name} is not a folder; {hint}",
    "config": "{name}: no config.json in {folder}; {hint}",
    "model_type": "{name}: config.json has model_type {model_type!r}, not 'internvlx'; convert OpenGVLab InternVL2 "
                  "/ InternVL-X checkpoints first with `internvlx convert SRC DST`",
}


def read_checkpoint_config(folder: str | os.PathLike, name: str, *, internvlx: bool = True,
                           hint: str = CHECKPOINT_HINT, damaged: str = DAMAGED_HINT,
                           error: type[Exception] | None = None,
                           wording: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The config.json of the checkpoint folder ``folder``, as a dict, once it is one: ``folder`` is a folder,
    config.json is in it and is a JSON object (UTF-8), and with ``internvlx`` its ``model_type`` is internvlx and every
    key of `REQUIRED_CONFIG_KEYS` / `OPTIONAL_CONFIG_KEYS` is there with its type.

    Args:
        name: which argument gave the folder, as the messages start (e.g. ``"--model 'out'"``, ``"SRC out"``).
        internvlx: False for a checkpoint of any model (conversion reads OpenGVLab ones and dispatches on
            ``model_type`` itself).
        hint: what to pass instead, after a missing folder or config.json.
        damaged: what to do about a config.json that cannot be read as a JSON object, or lacks a key.
        error: the exception of every failure (e.g. `ConversionError`); by default `FileNotFoundError` for a missing
            folder or config.json, `ValueError` for the rest.
        wording: messages of `WORDING` that the command words its own way.

    Raises:
        FileNotFoundError, ValueError (or ``error``): the first thing that is wrong, in one line.
    """
    words = {**WORDING, **(wording or {})}
    missing, wrong = (error, error) if error is not None else (FileNotFoundError, ValueError)
    folder = Path(folder)
    if not folder.is_dir():
        raise missing(words["folder"].format(name=name, folder=folder, hint=hint))
    config_file = folder / CONFIG_NAME
    if not config_file.exists():  # a folder named config.json is there, and is reported as unreadable below
        raise missing(words["config"].format(name=name, folder=folder, hint=hint))
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as json_error:
        raise wrong(f"{name}: {config_file} is not valid JSON {json_error_text(json_error)}; {damaged}") from None
    except UnicodeDecodeError:
        raise wrong(f"{name}: {config_file} is not valid JSON (it is not UTF-8 text); {damaged}") from None
    except OSError as os_error:
        raise wrong(f"{name}: cannot read {config_file} ({os_error.strerror or os_error}); check that it is a "
                    "readable file.") from None
    if not isinstance(config, dict):
        raise wrong(f"{name}: {config_file} holds a JSON {type(config).__name__}, not an object; {damaged}")
    if not internvlx:
        return config
    if config.get("model_type") != MODEL_TYPE:
        raise wrong(words["model_type"].format(name=name, folder=folder, hint=hint,
                                               model_type=config.get("model_type")))
    problem = config_key_problem(config)
    if problem is not None:
        raise wrong(f"{name}: {config_file}: {problem}; {damaged}")
    return config


def read_source_config(folder: str | os.PathLike, *, error: type[Exception] | None = None) -> dict[str, Any]:
    """The config.json of the folder `internvlx convert` reads (SRC), checked as any model's is: the converter reads
    its ``model_type`` itself (OpenGVLab's layout, or transformers' native InternVL)."""
    return read_checkpoint_config(folder, f"SRC {folder}", internvlx=False, hint=SOURCE_HINT,
                                  damaged=SOURCE_DAMAGED_HINT, error=error)


__all__ = ["CHECKPOINT_HINT", "CONFIG_NAME", "DAMAGED_HINT", "MODEL_TYPE", "OPTIONAL_CONFIG_KEYS",
           "REQUIRED_CONFIG_KEYS", "SOURCE_DAMAGED_HINT", "SOURCE_HINT", "WORDING", "config_key_problem",
           "json_error_text", "read_checkpoint_config", "read_source_config"]
