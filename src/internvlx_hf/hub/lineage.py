"""How a checkpoint folder relates to its base model, for its model card: the Hub's `base_model_relation` rules
(from the provenance record; ``relation=`` overrides):

==========================================  ====================  ==================================================
folder                                      base_model_relation   base_model
==========================================  ====================  ==================================================
converted only (``internvlx convert``)      ``finetune``          the InternVL2 / InternVL-X source of the conversion
fine-tuned (last run's output ``full``)     ``finetune``          the same source (a training run keeps the record)
LoRA merged into the weights (``merged``)   ``finetune``          the same source
LoRA adapter (``adapter``, or               ``adapter``           the model the adapter loads onto: ``--base-model``,
adapter_config.json in the folder)                                or adapter_config.json's base when it is a Hub id
no record (e.g. built in Python)            none                  ``--base-model`` if given
==========================================  ====================  ==================================================

The Hub's ``merge`` relation is meant for merges of several models (its model tree lists them as "Merges"); a LoRA
merged back into its one base model is a fine-tune of that model, so it is ``finetune`` here. A conversion keeps the
source weights, but the Hub has no relation for a format change and would infer ``finetune`` anyway; the card's
"How this model was made" section says what really happened. ``--relation`` sets any Hub value
(``finetune``, ``adapter``, ``merge``, ``quantized``) instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .resolve import looks_like_repo_id

RELATIONS = ("finetune", "adapter", "merge", "quantized")


@dataclass(frozen=True)
class Lineage:
    """How the folder relates to its base model (see the module docstring for the rules)."""

    kind: str  # "converted", "fine-tuned", "merged", "adapter", "unknown"
    base_model: str | None
    relation: str | None


def lineage(folder: str | os.PathLike, record: dict[str, Any], base_model: str | None = None,
            relation: str | None = None) -> Lineage:
    """Apply the `base_model_relation` rules to a folder and its provenance record."""
    folder = Path(folder)
    if base_model is not None and not looks_like_repo_id(base_model):
        raise ValueError(f"--base-model {base_model!r} is not a Hub model id (owner/name).")
    if relation is not None and relation not in RELATIONS:
        raise ValueError(f"--relation {relation!r} is not one of {', '.join(RELATIONS)}.")
    runs = record.get("training") or []
    output = runs[-1].get("output") if runs and isinstance(runs[-1], dict) else None
    adapter_config = folder / "adapter_config.json"
    if output == "adapter" or adapter_config.is_file():
        base = base_model or _adapter_base(adapter_config)
        if base is None:
            raise ValueError(
                f"{folder} is a LoRA adapter, and its base model is not a Hub id (adapter_config.json names "
                f"{_adapter_base_raw(adapter_config)!r}); publish the model it was trained on and pass "
                "--base-model OWNER/NAME (that repository)."
            )
        return Lineage("adapter", base, relation or "adapter")
    recorded = record.get("base_model")
    base = base_model or (recorded if isinstance(recorded, str) and looks_like_repo_id(recorded) else None)
    if runs:
        kind = "merged" if output == "merged" else "fine-tuned"
    elif record.get("conversion"):
        kind = "converted"
    else:
        kind = "unknown"
    default_relation = "finetune" if kind != "unknown" else None
    return Lineage(kind, base, (relation or default_relation) if base is not None else None)


def _adapter_base_raw(adapter_config: Path) -> Any:
    if not adapter_config.is_file():
        return None
    try:
        return json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{adapter_config} is not valid JSON ({error}).") from None


def _adapter_base(adapter_config: Path) -> str | None:
    base = _adapter_base_raw(adapter_config)
    if isinstance(base, str) and looks_like_repo_id(base) and not Path(base).exists():
        return base
    return None


__all__ = ["RELATIONS", "Lineage", "lineage"]
