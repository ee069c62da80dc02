"""The `internvlx` command line (also `python -m internvlx_hf`).

Each subcommand lives in a module of this package and exposes one `Command`: a name, one line of help, a
description and an epilog with examples, a function that adds its arguments and one that runs it. `COMMANDS`
lists them in the order `internvlx --help` shows them. Subcommands import torch/transformers only when they run,
and a subcommand's arguments are added only when that subcommand is parsed (`CommandParser`), so `internvlx
--help`, `internvlx COMMAND --help` and argument errors answer at once (`train`'s flags, transformers'
TrainingArguments among them, come from a shipped description: `train_flags`).

Errors: a command raises `CLIError` (or a `ValueError` / `FileNotFoundError` / `TypeError` / `OSError` /
`ConversionError` whose message names the input and the fix); `main` prints it as one line
`internvlx <cmd>: error: ...` and returns 2. `--debug` (before or after the subcommand) shows the traceback instead.
An unexpected exception (a bug) is also reported in one line, with exit status 1 and a pointer to `--debug`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .command import CLIError, Command, CommandParser, OneLineErrorParser


def _commands() -> list[Command]:
    from .bench import BENCH
    from .card import CARD
    from .chat import CHAT
    from .convert import CONVERT
    from .data import DATA
    from .demo import DEMO
    from .eval import EVAL
    from .export import EXPORT
    from .push import PUSH
    from .serve import SERVE
    from .tokens import TOKENS
    from .train import TRAIN

    return [DEMO, CONVERT, EXPORT, CHAT, SERVE, TOKENS, CARD, PUSH, DATA, TRAIN, EVAL, BENCH]


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) if str(error) else type(error).__name__
    if isinstance(error, KeyError):  # str(KeyError) is the repr of the key
        text = f"missing key {text}"
    return text


# Errors whose message is written for the user; anything else is a bug and says so.
_USER_ERRORS: tuple[type[BaseException], ...] = (CLIError, ValueError, FileNotFoundError, TypeError, OSError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..conversion.errors import ConversionError
    from ..quantization import QuantizationUnavailable

    return (*_USER_ERRORS, ConversionError, QuantizationUnavailable)


def build_parser(commands: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    commands = _commands() if commands is None else commands
    parser = OneLineErrorParser(
        allow_abbrev=False,
        prog="internvlx",
        description="InternVL-X (PVTC, LVTC, RVTC) for Hugging Face Transformers.",
        epilog="Run `internvlx COMMAND --help` for the options and examples of a command.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=CommandParser)
    for command in commands:
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            add_arguments=command.add_arguments,
            intermixed=command.intermixed,
        )
        sub.set_defaults(_run=command.run, _check=command.check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    from ..quantization import hide_optional_kernel_note

    hide_optional_kernel_note()  # before anything imports peft, which imports bitsandbytes where it is installed
    args = build_parser().parse_args(argv)
    if args._check is not None:  # the mistakes users make most (a wrong path, a bad value): said before torch loads
        try:
            args._check(args)
        except _USER_ERRORS as error:
            if args.debug:
                raise
            print(f"internvlx {args.command}: error: {_one_line(error)}", file=sys.stderr)
            return 2
    from tqdm.contrib.logging import logging_redirect_tqdm
    from transformers.utils import logging as transformers_logging

    # Warnings while a progress bar runs (skipped samples, transformers' notes) get lines of their own. transformers'
    # logger is set up first: it adds its own handler when first used, which would then print everything twice.
    library_logger = transformers_logging.get_logger("transformers")
    loggers = [logging.root, library_logger]
    # With CI=true transformers lets its records propagate to the root logger as well, which the redirect also
    # writes to: every transformers line would print twice. One handler each, whatever the environment.
    propagate, library_logger.propagate = library_logger.propagate, False
    restore_bars = _hide_transformers_bars()
    try:
        with logging_redirect_tqdm(loggers):
            return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"internvlx {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI's single exit point for errors
        if args.debug:
            raise
        if isinstance(error, _user_errors()):
            print(f"internvlx {args.command}: error: {_one_line(error)}", file=sys.stderr)
            return 2
        print(
            f"internvlx {args.command}: error: unexpected {type(error).__name__}: {_one_line(error)} "
            "(this is a bug; rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        library_logger.propagate = propagate
        restore_bars()


def _hide_transformers_bars():
    """Turn off transformers' own progress bars ("Loading weights", "Writing model shards") while a command runs, and
    return the function that turns them back on.

    Every command shows its own progress (convert, export, data and eval bars, the Trainer's bar in `train`) or its
    output (`chat` streams the answer), and transformers' bars around it are noise: a "Loading weights" bar before
    every answer, a "Writing model shards 0%" line left inside the training bar. transformers' switch also turns off
    huggingface_hub's bars, which stay on: a download is long work that deserves one.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    shown, hub_hidden = transformers_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    if not hub_hidden:
        enable_progress_bars()

    def restore() -> None:
        if shown:
            transformers_logging.enable_progress_bar()
        if hub_hidden:
            disable_progress_bars()

    return restore


__all__ = ["CLIError", "Command", "build_parser", "main"]
