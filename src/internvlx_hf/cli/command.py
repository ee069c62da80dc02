"""What every subcommand module builds on: `Command` (its parser and runner) and `CLIError` (a user-facing error)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


class CLIError(Exception):
    """A user-facing error: the message says what is wrong with which input, and how to fix it."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    epilog: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
