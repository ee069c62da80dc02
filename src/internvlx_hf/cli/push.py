"""`internvlx push`: preflight a checkpoint folder, then upload it to a Hub model repository."""

from __future__ import annotations

import argparse
import sys

from .command import CLIError, Command

_PUSH_DESCRIPTION = """\
Check that MODEL would load from the Hub on a machine without internvlx-hf, then upload it: HfApi.create_repo
(exist_ok; --private for a new repository) and HfApi.create_commit with every file in one commit, with
huggingface_hub's progress bars. Log in first (`hf auth login`, with a token that can write) or set HF_TOKEN.

It uploads the model, not the training state. Left out (and listed):
  - the Trainer's checkpoint-* folders (--include-checkpoints uploads them: their safetensors weights, configs,
    processor and trainer_state.json)
  - the Trainer's pickled state, always: training_args.bin, optimizer.pt, scheduler.pt, scaler.pt, rng_state*.pth
  - OUT/adapter of a `--preset lora` run (OUT is the merged model; publish the adapter folder on its own)
  - what a run stopped while writing left unfinished: .checkpoint-staging/ and .NAME.tmp-* temporaries
A LoRA adapter folder whose adapter_config.json names its base model by a local path (as `internvlx train` writes
it) is uploaded with base_model_name_or_path set to the card's base_model (`internvlx card --base-model ID`); the
local file is not changed.

The preflight lists every problem at once, one line each, and uploads nothing when there is one:
  - a remote-code file named by an auto_map (config.json, processor/tokenizer configs) or imported by one is
    missing, or a remote-code file imports internvlx_hf
  - no tokenizer or no processor config (or one whose auto_map has no AutoProcessor)
  - a safetensors index names a missing shard; no weights; tensors whose names or shapes differ from the model
    config.json builds (checked on the meta device, from the safetensors headers)
  - no README.md model card (write it with `internvlx card`), or its usage snippet loads another id than REPO_ID
  - a pickle file (.bin, .pt, .pth, .pkl, .pickle) among the files to upload
LoRA adapter folders (adapter_config.json) need adapter_model.safetensors and a Hub id as base model (in
adapter_config.json or the card) instead."""

_PUSH_EPILOG = """\
examples:
  # card, check, upload
  internvlx card ./InternVL2-2B-X --license mit --repo-id me/InternVL2-2B-X
  internvlx push ./InternVL2-2B-X me/InternVL2-2B-X --private

  # only the preflight, and the files that would be uploaded (and the ones left out)
  internvlx push ./InternVL2-2B-X me/InternVL2-2B-X --dry-run

  # a LoRA adapter written by `internvlx train --preset lora --output_dir out/lora`, for a published base model
  internvlx card out/lora/adapter --license mit --repo-id me/X-lora --base-model me/InternVL2-2B-X
  internvlx push out/lora/adapter me/X-lora

  # to a branch (created from main when new), or as a pull request against main
  internvlx push ./InternVL2-2B-X me/InternVL2-2B-X --revision stage2
  internvlx push ./InternVL2-2B-X me/InternVL2-2B-X --create-pr"""


def _add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="the checkpoint folder")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the Hub model repository, owner/name")
    parser.add_argument("--private", action="store_true", help="create the repository private (if it is new)")
    parser.add_argument("--revision", default=None, metavar="BRANCH",
                        help="commit to this branch (created from main if it does not exist)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request against main instead")
    parser.add_argument("--message", default=None, help="commit message")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the preflight and list the files; upload nothing (needs no network)")
    parser.add_argument("--include-checkpoints", action="store_true",
                        help="also upload the Trainer's checkpoint-* folders (without their pickled training state)")


def _run_push(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..hub.preflight import preflight
    from ..hub.push import check_pr_target, plan_upload, push_folder
    from ..hub.resolve import looks_like_repo_id

    if "/" not in args.repo_id or not looks_like_repo_id(args.repo_id):
        raise CLIError(f"REPO_ID {args.repo_id!r} is not a Hub model id; use owner/name, e.g. me/InternVL2-2B-X.")
    try:
        check_pr_target(args.create_pr, args.revision)
    except ValueError as error:
        raise CLIError(str(error)) from None
    folder = Path(args.model)
    plan = plan_upload(folder, args.include_checkpoints) if folder.is_dir() else None  # preflight names a non-folder
    problems = preflight(folder, args.repo_id, include_checkpoints=args.include_checkpoints, plan=plan)
    if problems:
        for problem in problems:
            where = folder if problem.path == "." else folder / problem.path
            print(f"internvlx push: {where}: {problem.message}", file=sys.stderr)
        raise CLIError(f"{len(problems)} problem(s) in {folder} (listed above); nothing was uploaded.")
    target = args.repo_id + (f"@{args.revision}" if args.revision else "")
    target += " (pull request)" if args.create_pr else ""
    print(f"Preflight passed: {len(plan.files)} files, {plan.total_bytes / 1e6:.1f} MB for {target}")
    if args.dry_run:
        for name in plan.files:
            print(f"  {name}" + (f" ({plan.rewritten[name][1]})" if name in plan.rewritten else ""))
    else:
        for name, (_, why) in plan.rewritten.items():
            print(f"  {name}: uploaded {why}")
    if plan.left_out:
        print("Left out (not uploaded):")
        for name, why in plan.left_out.items():
            print(f"  {name}: {why}")
    if args.dry_run:
        return 0
    try:
        info = push_folder(folder, args.repo_id, private=True if args.private else None, revision=args.revision,
                           create_pr=args.create_pr, commit_message=args.message,
                           include_checkpoints=args.include_checkpoints, checked=True, plan=plan)
    except Exception as error:  # noqa: BLE001 - Hub errors become one line with a hint
        raise _hub_error(error, args.repo_id) from error
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or f"https://huggingface.co/{args.repo_id}"
    print(f"Uploaded to {url}")
    return 0


def _hub_error(error: Exception, repo_id: str) -> Exception:
    """Hub failures as a one-line CLIError with the fix; anything else is passed on unchanged."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return CLIError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it (or use --dry-run).")
    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            return CLIError(f"the Hub refused the upload to {repo_id} (HTTP {status}): log in with `hf auth login` "
                            "using a token that can write to it, or set HF_TOKEN.")
        return CLIError(f"the Hub answered HTTP {status} for {repo_id}: {' '.join(str(error).split())[:300]}")
    name = type(error).__name__
    if "Connect" in name or "Timeout" in name or isinstance(error, ConnectionError):
        return CLIError(f"cannot reach the Hugging Face Hub ({name}); check the network, or use --dry-run.")
    return error


PUSH = Command(
    name="push",
    help="check a checkpoint folder (preflight) and upload it to a Hub model repository",
    description=_PUSH_DESCRIPTION,
    epilog=_PUSH_EPILOG,
    add_arguments=_add_push_arguments,
    run=_run_push,
)
