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

import os
from pathlib import Path

from .preflight import PreflightError, preflight
from .upload import IGNORE_PATTERNS, UploadPlan, plan_upload, training_state_names


def check_pr_target(create_pr: bool, revision: str | None) -> None:
    """The Hub opens upload pull requests against the default branch: ``create_pr`` excludes another ``revision``."""
    if create_pr and revision not in (None, "main"):
        raise ValueError(f"--create-pr opens a pull request against main; it cannot go to --revision {revision!r}. "
                         "Drop one of the two.")


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                create_pr: bool = False, commit_message: str | None = None, include_checkpoints: bool = False,
                api=None, checked: bool = False, plan: UploadPlan | None = None):
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
        plan: the folder's `plan_upload` when the caller has it already (it is what goes up).

    Returns:
        The `huggingface_hub.CommitInfo` of the upload (``commit_url``, ``pr_url``).

    Raises:
        PreflightError: the folder would not load from the Hub; nothing was created or uploaded.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    check_pr_target(create_pr, revision)
    plan = plan or plan_upload(folder, include_checkpoints)
    problems = [] if checked else preflight(folder, repo_id, include_checkpoints=include_checkpoints, plan=plan)
    if problems:
        raise PreflightError(folder, problems)
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
