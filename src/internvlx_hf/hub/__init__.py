"""Publishing checkpoints to the Hugging Face Hub: the card, the preflight, the upload; and where a MODEL argument
lives (`resolve_model`: a local folder or a Hub snapshot).

- `build_model_card` / `write_model_card`: the model card (`internvlx card`), from the folder and its provenance.
- `preflight`: every reason a folder would not load from the Hub without internvlx-hf (`internvlx push` runs it).
- `plan_upload` (`upload`) / `push_folder` (`push`): what goes up (the model, not the training state); preflight,
  `HfApi.create_repo`, `HfApi.create_commit` (`internvlx push`).

The card's names load on first use (the card reads the token budget, which imports transformers), so that
`hub.resolve`, which the command line reads before anything heavy (a missing MODEL folder is reported at once),
imports only the standard library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .preflight import PreflightError, Problem, preflight
from .push import files_to_upload, plan_upload, push_folder
from .resolve import resolve_model
from .results import ResultRow, load_results

_CARD = ("RELATIONS", "Lineage", "build_model_card", "lineage", "write_model_card")

if TYPE_CHECKING:
    from .card import RELATIONS, Lineage, build_model_card, lineage, write_model_card


def __getattr__(name: str):
    if name not in _CARD:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(".card", __name__), name)


__all__ = [
    "RELATIONS",
    "Lineage",
    "PreflightError",
    "Problem",
    "ResultRow",
    "build_model_card",
    "files_to_upload",
    "lineage",
    "load_results",
    "plan_upload",
    "preflight",
    "push_folder",
    "resolve_model",
    "write_model_card",
]
