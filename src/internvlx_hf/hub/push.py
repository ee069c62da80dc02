"""Upload a checkpoint folder to the Hub after the preflight: `HfApi.create_repo` + `HfApi.upload_folder`."""

from __future__ import annotations

import os
from pathlib import Path

from .preflight import PreflightError, preflight

# Never uploaded: Python caches of the remote code (huggingface_hub itself skips .git and .cache/huggingface).
IGNORE_PATTERNS = ["*__pycache__*", "*.pyc"]


def files_to_upload(folder: str | os.PathLike) -> list[str]:
    """Relative paths `upload_folder` sends for ``folder`` (with `IGNORE_PATTERNS` and huggingface_hub's own)."""
    from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS + list(DEFAULT_IGNORE_PATTERNS)))


def check_pr_target(create_pr: bool, revision: str | None) -> None:
    """The Hub opens upload pull requests against the default branch: ``create_pr`` excludes another ``revision``."""
    if create_pr and revision not in (None, "main"):
        raise ValueError(f"--create-pr opens a pull request against main; it cannot go to --revision {revision!r}. "
                         "Drop one of the two.")


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                create_pr: bool = False, commit_message: str | None = None, api=None, checked: bool = False):
    """Check ``folder`` with `preflight`, then create ``repo_id`` (if needed) and upload the folder in one commit.

    Args:
        folder: the checkpoint folder.
        repo_id: ``owner/name`` of the model repository.
        private: make a new repository private (``None``: the account's default; an existing one is unchanged).
        revision: branch to commit to; created from ``main`` when it does not exist.
        create_pr: open a pull request against ``main`` instead of committing (cannot be combined with
            ``revision``: the Hub opens upload pull requests against the default branch).
        commit_message: defaults to "Upload <folder name> with internvlx push".
        api: an `huggingface_hub.HfApi` (default: a new one, with the token of `hf auth login` or ``HF_TOKEN``).
        checked: the caller has just run `preflight` on this folder and found nothing (`internvlx push` does, to
            list the problems itself); skips running it a second time.

    Returns:
        The `huggingface_hub.CommitInfo` of the upload (``commit_url``, ``pr_url``).

    Raises:
        PreflightError: the folder would not load from the Hub; nothing was created or uploaded.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    check_pr_target(create_pr, revision)
    problems = [] if checked else preflight(folder, repo_id)
    if problems:
        raise PreflightError(folder, problems)
    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message or f"Upload {folder.resolve().name} with internvlx push",
        ignore_patterns=list(IGNORE_PATTERNS),
    )


__all__ = ["IGNORE_PATTERNS", "check_pr_target", "files_to_upload", "push_folder"]
