"""Upload a checkpoint folder to the Hub after the preflight: `HfApi.create_repo` + one `HfApi.create_commit`.

What goes up is the model, not the training state (`plan_upload`): the Trainer's ``checkpoint-*`` folders stay home
unless asked for, and its pickled state (``training_args.bin``, ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``,
``rng_state*.pth``) always does: those files exist only as pickles, which can run code when loaded, and nobody needs
them to use the model. A LoRA output's ``adapter/`` folder is an adapter for another base model, published on its
own. A LoRA adapter folder's ``adapter_config.json`` goes up with ``base_model_name_or_path`` set to the card's
``base_model`` when the folder names its base by a local path (as `internvlx train` writes it), so that PEFT finds
the base model on the Hub; the local file is not changed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .preflight import PreflightError, preflight

# Never uploaded: Python caches of the remote code (huggingface_hub itself skips .git and .cache/huggingface).
IGNORE_PATTERNS = ["*__pycache__*", "*.pyc"]


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


@dataclass
class UploadPlan:
    """What `push_folder` sends for a folder: ``files`` (relative paths), ``left_out`` (a path, or a folder ending
    in ``/``, -> why), and ``rewritten`` (a path -> the content sent instead of the file's, and why)."""

    folder: Path
    files: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    rewritten: dict[str, tuple[bytes, str]] = field(default_factory=dict)

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
        if "/" in path and fnmatch(top, f"{PREFIX_CHECKPOINT_DIR}-*") and not include_checkpoints:
            plan.left_out.setdefault(f"{top}/", "a training checkpoint; --include-checkpoints uploads it (without "
                                                "its training state)")
        elif "/" in path and top == "adapter" and merged_lora:
            plan.left_out.setdefault("adapter/", "the LoRA adapter this merged model was made with; publish it on "
                                                 "its own (`internvlx card` and `internvlx push` on that folder)")
        elif any(fnmatch(path.rpartition("/")[2], name) for name in state_names):
            plan.left_out[path] = "the Trainer's training state (a pickle; not needed to use the model)"
        else:
            plan.files.append(path)
    base = adapter_upload_base(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")) if base else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        config = None  # the preflight reports it
    if isinstance(config, dict):
        config["base_model_name_or_path"] = base
        plan.rewritten["adapter_config.json"] = (
            (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"),
            f"with base_model_name_or_path {base!r}, the card's base_model, instead of the local path",
        )
    return plan


def adapter_upload_base(folder: Path) -> str | None:
    """The Hub id an adapter folder's ``adapter_config.json`` is uploaded with, when its own base is not a Hub id
    but the card (README.md) names one as ``base_model``; None otherwise (nothing to rewrite, or nothing to do it
    with: the preflight reports that)."""
    from .preflight import adapter_bases

    if not (folder / "adapter_config.json").is_file():
        return None
    own, card = adapter_bases(folder)
    return card if own is None and card is not None else None


def check_pr_target(create_pr: bool, revision: str | None) -> None:
    """The Hub opens upload pull requests against the default branch: ``create_pr`` excludes another ``revision``."""
    if create_pr and revision not in (None, "main"):
        raise ValueError(f"--create-pr opens a pull request against main; it cannot go to --revision {revision!r}. "
                         "Drop one of the two.")


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                create_pr: bool = False, commit_message: str | None = None, include_checkpoints: bool = False,
                api=None, checked: bool = False):
    """Check ``folder`` with `preflight`, then create ``repo_id`` (if needed) and upload `plan_upload`'s files in
    one commit.

    Args:
        folder: the checkpoint folder.
        repo_id: ``owner/name`` of the model repository.
        private: make a new repository private (``None``: the account's default; an existing one is unchanged).
        revision: branch to commit to; created from ``main`` when it does not exist.
        create_pr: open a pull request against ``main`` instead of committing (cannot be combined with
            ``revision``: the Hub opens upload pull requests against the default branch).
        commit_message: defaults to "Upload <folder name> with internvlx push".
        include_checkpoints: also upload the ``checkpoint-*`` folders (see `plan_upload`).
        api: an `huggingface_hub.HfApi` (default: a new one, with the token of `hf auth login` or ``HF_TOKEN``).
        checked: the caller has just run `preflight` on this folder and found nothing (`internvlx push` does, to
            list the problems itself); skips running it a second time.

    Returns:
        The `huggingface_hub.CommitInfo` of the upload (``commit_url``, ``pr_url``).

    Raises:
        PreflightError: the folder would not load from the Hub; nothing was created or uploaded.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    check_pr_target(create_pr, revision)
    problems = [] if checked else preflight(folder, repo_id, include_checkpoints=include_checkpoints)
    if problems:
        raise PreflightError(folder, problems)
    plan = plan_upload(folder, include_checkpoints)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=plan.rewritten[name][0]
                                     if name in plan.rewritten else str(folder / name)) for name in plan.files]
    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message or f"Upload {folder.resolve().name} with internvlx push",
    )


def files_to_upload(folder: str | os.PathLike, include_checkpoints: bool = False) -> list[str]:
    """Relative paths `push_folder` sends for ``folder`` (see `plan_upload`)."""
    return plan_upload(folder, include_checkpoints).files


__all__ = ["IGNORE_PATTERNS", "UploadPlan", "check_pr_target", "files_to_upload", "plan_upload", "push_folder",
           "training_state_names"]
