"""What every subcommand module builds on: `Command` (its parser and runner), `CommandParser` (the subcommand's
argparse parser) and `CLIError` (a user-facing error)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass


class CLIError(Exception):
    """A user-facing error: the message says what is wrong with which input, and how to fix it."""


def check_image_file(path: str, flag: str = "--image") -> None:
    """An image path given on the command line: a folder, a missing file or a file Pillow cannot read is a
    `CLIError` here, before torch loads (Pillow imports in a fraction of a second; `verify` checks the file's
    structure, and PNG checksums, without decoding the pixels)."""
    from pathlib import Path

    if Path(path).is_dir():
        raise CLIError(f"{flag} {path!r} is a folder, not an image file; pass the path of an image file.")
    if not Path(path).is_file():
        raise CLIError(f"{flag} {path!r}: no such file; pass an existing image file (URLs are not downloaded).")
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises UnidentifiedImageError, SyntaxError, OSError, struct.error...
        raise CLIError(f"{flag} {path!r} is not an image Pillow can read ({type(error).__name__}: {error}); give a "
                       "PNG/JPEG/WebP file.") from None


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    epilog: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    # Positionals may come after options (`chat MODEL --image X "question"`): plain argparse binds every
    # positional at the first run of them (MODEL) and then rejects the question after the options.
    intermixed: bool = False
    # Checks of the parsed arguments that need no heavy import (raise CLIError): run before `main` imports
    # transformers, so that they answer as fast as argparse's own errors.
    check: Callable[[argparse.Namespace], None] | None = None


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: an absent sub-level flag must not reset `internvlx --debug COMMAND`.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")


class _ProbeFailed(Exception):
    """Raised instead of printing an error while `CommandParser` tries a corrected command line."""


class OneLineErrorParser(argparse.ArgumentParser):
    """A parser whose argument errors are one line, `PROG: error: MESSAGE`, exit status 2, as every other error of the
    CLI: argparse's usage block before it buried the line that matters (`--projector pvtx`: the choices), and
    `PROG --help` has the usage and more."""

    def error(self, message):
        if message.startswith("the following arguments are required: "):  # the one error the usage answered
            message = f"{message}; see `{self.prog} --help`"
        self.exit(2, f"{self.prog}: error: {message}\n")


# Names other training command lines give flags that this one spells the Trainer's way: `--lr` abbreviates no flag
# here, and the flags it starts (--lr_scheduler_type) are not the one meant.
_OTHER_NAMES = {"lr": "learning_rate", "bs": "per_device_train_batch_size", "batch_size": "per_device_train_batch_size",
                "epochs": "num_train_epochs", "wd": "weight_decay"}


class CommandParser(OneLineErrorParser):
    """A subcommand's parser: adds the command's arguments the first time it parses or prints help, parses
    intermixed positionals where the command asks for it, and turns the optional-value trap into a one-line hint.

    Lazy arguments: `internvlx --help` needs no subparser and `internvlx chat --help` one; building every
    subparser up front would read the description of `train`'s flags (and, under another transformers release than
    the one `train_flags.json` describes, import torch to build them) on every run.

    The trap: an option whose value is optional (``nargs="?"``: ``--lvtc [SPEC]``, the Trainer's boolean flags)
    placed before the positionals takes the first positional as its value (`convert --lvtc SRC DST` reads
    SPEC=SRC, then misses DST); argparse answers with its usage and "required: DST". The hint names the option
    that took the value and shows the command line that works (it is only given when that line parses).
    """

    def __init__(self, *args, add_arguments=None, intermixed: bool = False, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--max_step` for --max_steps is a mistake, said at once
        super().__init__(*args, **kwargs)
        self._pending_arguments = add_arguments
        self._intermixed = intermixed
        self._parsing: list[str] | None = None
        self._probing = False

    def _add_pending_arguments(self) -> None:
        add_arguments, self._pending_arguments = self._pending_arguments, None
        if add_arguments is not None:
            add_arguments(self)
            add_debug_argument(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_pending_arguments()
        if self._parsing is not None:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._parsing = self._respell(list(sys.argv[1:] if args is None else args))
        try:
            if self._intermixed:
                parsed, extras = self.parse_known_intermixed_args(self._parsing, namespace)
            else:
                parsed, extras = super().parse_known_args(self._parsing, namespace)
        finally:
            self._parsing = None
        if extras and not self._probing:  # said here, with the command's name (the top parser would leave it out)
            self.error(self.unrecognized(extras))
        return parsed, extras

    def _respell(self, args: list[str]) -> list[str]:
        """A flag spelt with the other separator (`--max_tiles` where this command spells `--max-tiles`, as `train`
        and `data` spell theirs with the Trainer's underscores) is taken as this command's, with one line saying
        so: every command accepts both, and documents one."""
        known = self._option_string_actions
        respelt = []
        for arg in args:
            flag, equals, value = arg.partition("=")
            if flag.startswith("--") and flag not in known:
                other = "--" + (flag[2:].replace("_", "-") if "_" in flag else flag[2:].replace("-", "_"))
                if other in known:
                    print(f"{self.prog}: {flag} is spelt {other} here; taken as {other}", file=sys.stderr)
                    arg = other + equals + value
            respelt.append(arg)
        return respelt

    def unrecognized(self, extras: list[str]) -> str:
        """argparse's "unrecognized arguments" message, with the option of the command meant by the first unknown
        one that is another trainer's name for it (``--lr``: did you mean ``--learning_rate``?), close to it
        (``--learing_rate``) or abbreviates options (abbreviations are off: ``--max-new``: did you mean
        ``--max-new-tokens``?). Each option is named once, as the command lists it (not also in the other
        spelling)."""
        import difflib

        message = f"unrecognized arguments: {' '.join(extras)}"
        listed = {option: self._listed_name(action) for option, action in self._option_string_actions.items()
                  if option.startswith("--")}
        for extra in extras:
            if not extra.startswith("--"):
                continue
            flag = extra.partition("=")[0]
            other_name = _OTHER_NAMES.get(flag[2:].replace("-", "_"))
            meant = [listed[option] for option in (f"--{other_name}", f"--{other_name}".replace("_", "-"))
                     if other_name and option in listed]
            if meant:
                return f"{message}; did you mean {meant[0]}?"
            close = difflib.get_close_matches(flag, list(listed), n=1, cutoff=0.75)
            if close:
                return f"{message}; did you mean {listed[close[0]]}?"
            longer = sorted({name for option, name in listed.items() if option.startswith(flag)})
            if longer:
                return f"{message}; did you mean {' or '.join(longer[:3])}?"
        return message

    @staticmethod
    def _listed_name(action: argparse.Action) -> str:
        return next(option for option in action.option_strings if option.startswith("--"))

    def format_help(self):
        self._add_pending_arguments()
        return super().format_help()

    def format_usage(self):
        self._add_pending_arguments()
        return super().format_usage()

    def error(self, message):
        if self._probing:
            raise _ProbeFailed(message)
        hint = self._optional_value_hint(message, self._parsing or [])
        if hint is None:
            super().error(message)
        self.exit(2, f"{self.prog}: error: {message.rstrip('.')}; {hint}\n")

    def _optional_value_hint(self, message: str, tokens: list[str]) -> str | None:
        """The hint for an option with an optional value that took a positional as its value, else None.

        Given when the option refused the value (its ``type`` check failed) or, for an option without a type,
        when a positional is missing; and only when the command line with the option moved last parses."""
        if not any(not action.option_strings for action in self._actions):
            return None  # no positionals to take
        for index, token in enumerate(tokens[:-1]):
            if token == "--":
                return None
            action = self._option_string_actions.get(token)
            value = tokens[index + 1]
            if action is None or action.nargs != "?" or value.startswith("-"):
                continue
            refused = message.startswith(f"argument {'/'.join(action.option_strings)}: ")
            missing = action.type is None and message.startswith("the following arguments are required: ")
            others = tokens[:index] + tokens[index + 1:]
            if not (refused or missing) or not self._parses([*others, token]):
                return None
            metavar = action.metavar or action.dest.upper()
            suggestion = shlex.join([*self.prog.split(), *others, token])
            return (f"{token} took {value!r} as its {metavar} because its value is optional: "
                    f"did you mean `{suggestion}`?")
        return None

    def _parses(self, tokens: list[str]) -> bool:
        parsing, self._parsing, self._probing = self._parsing, None, True
        try:
            return not self.parse_known_args(tokens)[1]  # and nothing left over
        except _ProbeFailed:
            return False
        finally:
            self._parsing, self._probing = parsing, False


__all__ = ["CLIError", "Command", "CommandParser", "OneLineErrorParser", "add_debug_argument", "check_image_file"]
