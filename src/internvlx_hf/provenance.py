"""How a checkpoint folder was made: `internvlx_provenance.json`, written by conversion and training.

`internvlx card` reads it to fill the model card's `base_model`, `base_model_relation`, `datasets` and its "how
this model was made" section, so the card states only what was recorded. The file is plain JSON next to the
weights; nothing at load time reads it.

Layout (``format`` 1)::

    {
      "format": 1,
      "base_model": "OpenGVLab/InternVL2-2B",      # the InternVL2 / InternVL-X source, or null if unknown
      "conversion": {...} | null,                  # what `internvlx convert` did (record_conversion)
      "training": [{...}, ...]                     # every `internvlx train` run on this lineage, oldest first
    }

A training run copies the record of the folder it started from and appends its own entry, so a fine-tuned
checkpoint still names the InternVL2 model it came from.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_file

PROVENANCE_FILE = "internvlx_provenance.json"
FORMAT_VERSION = 1


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _version() -> str:
    from . import __version__

    return __version__


def empty_provenance() -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "base_model": None, "conversion": None, "training": []}


def read_provenance(folder: str | os.PathLike) -> dict[str, Any]:
    """The record of ``folder``; an empty record when the folder has none (e.g. a model built in Python)."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return empty_provenance()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete it or restore it from the original folder.") \
            from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not an internvlx-hf provenance record of format {FORMAT_VERSION}.")
    return {**empty_provenance(), **record}


def write_provenance(folder: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``record`` into ``folder`` atomically (a temporary file renamed into place)."""
    path = Path(folder) / PROVENANCE_FILE
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def record_conversion(folder: str | os.PathLike, *, source: str, base_model: str | None,
                      details: dict[str, Any]) -> Path:
    """Start the record of a freshly converted checkpoint.

    Args:
        source: the SRC folder as given.
        base_model: Hub id of the source model when it is known (e.g. from the source config's ``_name_or_path``).
        details: the conversion summary (LLM, projector, LVTC, tokens per tile, tiling, new modules, dropped
            tensors, dtype), JSON-serialisable.
    """
    record = empty_provenance()
    record["base_model"] = base_model
    record["conversion"] = {"source": str(source), "date": _now(), "internvlx_hf_version": _version(), **details}
    return write_provenance(folder, record)


def record_training(folder: str | os.PathLike, *, started_from: str | os.PathLike | None,
                    details: dict[str, Any]) -> Path:
    """Append a training run to the record copied from the checkpoint it started from.

    Args:
        started_from: the ``--model`` folder the run loaded (its record is carried over), or None.
        details: preset, data (names, files, sample counts), ``datasets`` (Hub ids, if any), steps, epochs,
            learning rate, LoRA settings, ``output`` kind (``"full"``, ``"adapter"``, ``"merged"``), JSON-serialisable.
    """
    record = read_provenance(started_from) if started_from is not None and Path(started_from).is_dir() \
        else empty_provenance()
    record["training"] = [*record.get("training", []),
                          {"date": _now(), "internvlx_hf_version": _version(), "started_from": str(started_from),
                           **details}]
    return write_provenance(folder, record)


__all__ = [
    "PROVENANCE_FILE",
    "empty_provenance",
    "read_provenance",
    "record_conversion",
    "record_training",
    "write_provenance",
]
