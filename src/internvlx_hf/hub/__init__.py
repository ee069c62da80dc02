"""Publishing checkpoints to the Hugging Face Hub: the card, the preflight, the upload.

- `build_model_card` / `write_model_card`: the model card (`internvlx card`), from the folder and its provenance.
- `preflight`: every reason a folder would not load from the Hub without internvlx-hf (`internvlx push` runs it).
- `plan_upload` (`upload`) / `push_folder` (`push`): what goes up (the model, not the training state); preflight,
  `HfApi.create_repo`, `HfApi.create_commit` (`internvlx push`).
"""

from .card import RELATIONS, Lineage, build_model_card, lineage, write_model_card
from .preflight import PreflightError, Problem, preflight
from .push import files_to_upload, plan_upload, push_folder
from .resolve import resolve_model
from .results import ResultRow, load_results

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
