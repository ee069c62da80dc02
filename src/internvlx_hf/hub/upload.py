"""What `internvlx push` uploads for a folder (`plan_upload`): the model, not the training state; and the base model
an adapter folder names (`adapter_bases`), which the preflight checks and the upload rewrites to a Hub id."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Never uploaded: Python caches of the remote code (huggingface_hub itself skips .git and .cache/huggingface).
IGNORE_PATTERNS = ["*__pycache__*", "*.pyc"]
# Top-level entries a writer that was stopped left unfinished: `InternVLXTrainer`'s checkpoint staging folder
# (training.trainer.CHECKPOINT_STAGING) and the temporary files / folders of `internvlx_hf.atomic` (`temp_prefix`).
UNFINISHED = (".checkpoint-staging", ".*.tmp-*")
# The answers a teacher wrote for `internvlx train --teacher` (training.distillation.TEACHER_ANSWERS_DIR): training
# data, not the model.
TEACHER_ANSWERS = "teacher-answers"


def training_state_names() -> list[str]:
    """File names (glob patterns) of the Trainer's state besides the model, as transformers' Trainer writes them."""
    from transformers.trainer import (
        OPTIMIZER_NAME,
        OPTIMIZER_NAME_BIN,
        SCALER_NAME,
        SCHEDULER_NAME,
        TRAINING_ARGS_NAME,
    )

    return [TRAINING_ARGS_NAME, OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME, SCALER_NAME, "rng_state*.pth"]


@dataclass(frozen=True)
class AdapterBase:
    """The base model an adapter folder names, read once from ``adapter_config.json`` and the card (README.md).

    ``declared`` is ``base_model_name_or_path`` as written (None where the file is not a readable JSON object);
    ``own`` and ``card`` are that value and the card's ``base_model`` as Hub ids, each None when it is not one (e.g.
    the local path `internvlx train` records); ``config`` is the parsed file (None where it cannot be read)."""

    config: dict[str, Any] | None
    declared: Any
    own: str | None
    card: str | None

    @property
    def upload_base(self) -> str | None:
        """The Hub id ``adapter_config.json`` is uploaded with: the card's, when its own base is not a Hub id."""
        return self.card if self.own is None and self.card is not None else None


@dataclass
class UploadPlan:
    """What `push_folder` sends for a folder: ``files`` (relative paths), ``left_out`` (a path, or a folder ending
    in ``/``, -> why), ``rewritten`` (a path -> the content sent instead of the file's, and why), and for an
    adapter folder its `AdapterBase` (``adapter``; None for a model folder)."""

    folder: Path
    files: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    rewritten: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    adapter: AdapterBase | None = None

    @property
    def total_bytes(self) -> int:
        return sum(len(self.rewritten[f][0]) if f in self.rewritten else (self.folder / f).stat().st_size
                   for f in self.files)


def plan_upload(folder: str | os.PathLike, include_checkpoints: bool = False) -> UploadPlan:
    """The files `push_folder` uploads for ``folder`` and the ones it leaves out, with the reason.

    Args:
        include_checkpoints: also upload the Trainer's ``checkpoint-*`` folders (their safetensors weights, configs,
            processor and ``trainer_state.json``; their pickled training state still stays home).
    """
    from fnmatch import fnmatch

    from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
    from huggingface_hub.utils import filter_repo_objects
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(folder)
    plan = UploadPlan(folder)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    paths = list(filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS + list(DEFAULT_IGNORE_PATTERNS)))
    state_names = training_state_names()
    merged_lora = (folder / "adapter" / "adapter_config.json").is_file() \
        and not (folder / "adapter_config.json").is_file()
    for path in paths:
        top, _, _ = path.partition("/")
        if any(fnmatch(top, pattern) for pattern in UNFINISHED):
            plan.left_out.setdefault(top + ("/" if "/" in path else ""), "unfinished: left by a run that was stopped "
                                                                      "while writing it")
        elif "/" in path and fnmatch(top, f"{PREFIX_CHECKPOINT_DIR}-*") and not include_checkpoints:
            plan.left_out.setdefault(f"{top}/", "a training checkpoint; --include-checkpoints uploads it (without "
                                                "its training state)")
        elif "/" in path and top == TEACHER_ANSWERS:
            plan.left_out.setdefault(f"{top}/", "the answers the teacher wrote for distillation (training data, not "
                                                "the model)")
        elif "/" in path and top == "adapter" and merged_lora:
            plan.left_out.setdefault("adapter/", "the LoRA adapter this merged model was made with; publish it on "
                                                 "its own (`internvlx card` and `internvlx push` on that folder)")
        elif any(fnmatch(path.rpartition("/")[2], name) for name in state_names):
            plan.left_out[path] = "the Trainer's training state (a pickle; not needed to use the model)"
        else:
            plan.files.append(path)
    plan.adapter = read_adapter_base(folder)
    base = plan.adapter.upload_base if plan.adapter else None
    if base is not None and plan.adapter.config is not None:  # an unreadable config: the preflight reports it
        config = {**plan.adapter.config, "base_model_name_or_path": base}
        plan.rewritten["adapter_config.json"] = (
            (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"),
            f"with base_model_name_or_path {base!r}, the card's base_model, instead of the local path",
        )
    return plan


def adapter_upload_base(folder: Path) -> str | None:
    """The Hub id an adapter folder's ``adapter_config.json`` is uploaded with, when its own base is not a Hub id
    but the card (README.md) names one as ``base_model``; None otherwise (nothing to rewrite, or nothing to do it
    with: the preflight reports that)."""
    adapter = read_adapter_base(folder)
    return adapter.upload_base if adapter else None


def _hub_id(value: Any) -> str | None:
    from .resolve import looks_like_repo_id

    if isinstance(value, str) and looks_like_repo_id(value) and not Path(value).is_absolute() \
            and not Path(value).exists():
        return value
    return None


def read_adapter_base(folder: Path) -> AdapterBase | None:
    """The `AdapterBase` of an adapter folder (one read of ``adapter_config.json`` and of the card), or None when
    ``folder`` has no ``adapter_config.json``."""
    if not (folder / "adapter_config.json").is_file():
        return None
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        config = None
    config = config if isinstance(config, dict) else None
    declared = config.get("base_model_name_or_path") if config else None
    card = None
    if (folder / "README.md").is_file():
        from huggingface_hub import ModelCard

        try:
            card = ModelCard.load(folder / "README.md").data.base_model
        except Exception:  # noqa: BLE001 - a card without (valid) metadata names no base model
            card = None
        card = card[0] if isinstance(card, list) and len(card) == 1 else card
    return AdapterBase(config=config, declared=declared, own=_hub_id(declared), card=_hub_id(card))


def adapter_bases(folder: Path) -> tuple[str | None, str | None]:
    """The base model of an adapter folder as Hub ids: ``(adapter_config.json's base_model_name_or_path, the
    card's base_model)``, each None when it is not a Hub id (e.g. the local path `internvlx train` records)."""
    adapter = read_adapter_base(folder)
    return (adapter.own, adapter.card) if adapter else (None, None)


__all__ = ["IGNORE_PATTERNS", "AdapterBase", "UploadPlan", "adapter_bases", "adapter_upload_base", "plan_upload",
           "read_adapter_base", "training_state_names"]
