"""The flags of `internvlx train`, with or without transformers.

Its flags are the fields of our argument dataclasses and of transformers' `TrainingArguments`, built by
`HfArgumentParser` (`add_live_flags`); importing `TrainingArguments` imports torch, seconds before `train --help`
or an argument error could answer. So `train_flags.json`, next to this module, describes the flags that build gives
(option strings, nargs, const, choices, the name of each value's converter, help with its default), and
`add_described_flags` rebuilds them with argparse alone: the same help, the same values, the same errors.

The file holds one description per environment (`environment()`: the transformers release, and whether torch is at
least 2.8, which picks TrainingArguments' `--optim` default shown in the help), identical descriptions shared: one for
every transformers release of the supported range (`scripts/make_train_flags.py` writes them, each release's
TrainingArguments read from its wheel). In an environment the file does not list (a release after the range, torch
before 2.8) `add_described_flags` declines and the caller builds the live flags, so a flag another transformers release
added or dropped is never refused or accepted wrongly. A flag whose value needs a class of transformers' stack (e.g.
`--parallelism_config`) is converted by the live parser's own type, built on first use.

`python -m internvlx_hf.cli.train_flags` rewrites the installed environment's description in the JSON (after a
change to the argument dataclasses, run `scripts/make_train_flags.py` to rewrite every release's; when a release
joins the range, look for new TrainingArguments defaults that depend on the environment); `--check` exits 1 while it
is stale or missing, as tests/test_cli_startup.py does; `--print` writes the description to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

FLAGS_JSON = Path(__file__).with_name("train_flags.json")
REGENERATE = "python -m internvlx_hf.cli.train_flags"

# `--debug` is the CLI's own flag (tracebacks); TrainingArguments' `debug` can still be set in CONFIG.yaml.
CLI_RESERVED = {"debug"}

_TITLES = ("model and output", "data", "preset and LoRA", "training (transformers TrainingArguments)")


def environment() -> dict[str, Any] | None:
    """What the flags depend on besides our own dataclasses, read from the installed packages' metadata (no import);
    None where transformers or torch is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        transformers_version, torch_version = version("transformers"), version("torch")
    except PackageNotFoundError:
        return None
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", torch_version).groups())
    return {"transformers": transformers_version, "torch>=2.8": (major, minor) >= (2, 8)}


# ------------------------------------------------------------------------------------------------- the live flags


def add_live_flags(parser: argparse.ArgumentParser) -> list[argparse._ArgumentGroup]:
    """Add the flags from the argument dataclasses (imports transformers and torch); returns their groups."""
    from typing import get_type_hints

    from transformers import HfArgumentParser

    from ..training.arguments import ARGUMENT_CLASSES, checkpointing_renames

    groups = []
    for cls, title in zip(ARGUMENT_CLASSES, _TITLES):
        group = parser.add_argument_group(title)
        hints = get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.init and field.name not in CLI_RESERVED:
                field.type = hints[field.name]  # what HfArgumentParser does before building each flag
                HfArgumentParser._parse_dataclass_field(group, field)
        for action in group._group_actions:
            if action.default not in (None, argparse.SUPPRESS) and action.help and "(default" not in action.help:
                action.help += f" (default: {action.default})"  # the defaults are applied later: show them
            # Only flags actually given end up in the namespace, so that they can override a CONFIG.yaml; the
            # dataclasses apply their own defaults afterwards (HfArgumentParser.parse_dict).
            action.required = False
            action.default = argparse.SUPPRESS
        groups.append(group)
    _add_renamed_flags(groups[-1], checkpointing_renames())
    return groups


def _add_renamed_flags(group: argparse._ArgumentGroup, renames: dict[str, str]) -> None:
    """Before transformers 5.23, ``--activation_checkpointing[_kwargs]`` (5.23's names, which the docs use) as the
    same flags as ``--gradient_checkpointing[_kwargs]`` (``renames``: new name -> the field this release has)."""
    for new, old in renames.items():
        action = next(a for a in group._group_actions if a.dest == old)
        dashed = f"--{old.replace('_', '-')}" in action.option_strings  # HfArgumentParser adds --a-b for --a_b
        flags = [f"--{new}", f"--{new.replace('_', '-')}"] if dashed else [f"--{new}"]
        group.add_argument(*flags, dest=old, type=action.type, nargs=action.nargs, const=action.const,
                           choices=action.choices, metavar=action.metavar, default=argparse.SUPPRESS,
                           help=f"--{old} under the name transformers 5.23 gives it")


_ACTIONS = {argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true",
            argparse._StoreFalseAction: "store_false", argparse._StoreConstAction: "store_const"}


def _type_name(action: argparse.Action) -> str | None:
    kind = action.type
    if kind is None or kind in (str, int, float, dict):
        return None if kind is None else kind.__name__
    if getattr(kind, "__origin__", None) is dict:  # dict[str, bool]: called as dict, named "dict" in errors
        return "dict"
    if getattr(kind, "__module__", "") == "transformers.hf_argparser":
        if kind.__name__ == "string_to_bool":
            return "bool"
        if kind.__qualname__ == "make_choice_type_function.<locals>.<lambda>":
            return "choice"
    return "live"


def describe(groups: list[argparse._ArgumentGroup]) -> list[dict[str, Any]]:
    """The description of the flags in ``groups`` (from `add_live_flags`) that `add_described_flags` reads."""
    described = []
    for group in groups:
        actions = []
        for action in group._group_actions:
            if type(action) not in _ACTIONS:
                raise TypeError(f"train flag {action.dest}: {type(action).__name__} cannot be described; "
                                "teach internvlx_hf.cli.train_flags to rebuild it")
            spec = {"flags": list(action.option_strings), "action": _ACTIONS[type(action)], "dest": action.dest}
            if spec["action"] == "store":
                spec.update(nargs=action.nargs, const=action.const, type=_type_name(action), metavar=action.metavar,
                            choices=None if action.choices is None else list(action.choices))
            if spec["action"] == "store_const":
                spec["const"] = action.const
            spec["help"] = action.help
            actions.append({key: value for key, value in spec.items() if value is not None})
        described.append({"title": group.title, "actions": actions})
    return described


def live_table() -> dict[str, Any]:
    """The description of the installed environment's flags (imports transformers): its environment and groups."""
    return {"environment": environment(), "groups": describe(add_live_flags(argparse.ArgumentParser()))}


def tables_text(tables: list[dict[str, Any]]) -> str:
    """The text of `train_flags.json` for descriptions ``[{"environment", "groups"}]`` (a later one for the same
    environment wins): environments whose groups are equal share one entry."""
    by_environment = {json.dumps(table["environment"], sort_keys=True): table for table in tables}
    entries: list[dict[str, Any]] = []
    for table in by_environment.values():
        same = next((entry for entry in entries if entry["groups"] == table["groups"]), None)
        if same is None:
            entries.append({"environments": [table["environment"]], "groups": table["groups"]})
        else:
            same["environments"].append(table["environment"])
    for entry in entries:
        entry["environments"].sort(key=_environment_order)
    entries.sort(key=lambda entry: _environment_order(entry["environments"][0]))
    description = {"generated_by": f"{REGENERATE} (this environment), scripts/make_train_flags.py (every release)",
                   "tables": entries}
    return json.dumps(description, indent=1, ensure_ascii=False) + "\n"


def _environment_order(env: dict[str, Any]):
    return tuple(int(part) if part.isdigit() else 0 for part in re.split(r"[.+-]", env["transformers"])), \
        env["torch>=2.8"]


def read_tables(path: Path = FLAGS_JSON) -> list[dict[str, Any]]:
    """The descriptions in ``path`` as ``[{"environment", "groups"}]``; [] where it is absent or unreadable."""
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
        return [{"environment": env, "groups": entry["groups"]} for entry in description["tables"]
                for env in entry["environments"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def live_text(path: Path = FLAGS_JSON) -> str:
    """What `train_flags.json` must hold: ``path``'s descriptions with the installed environment's one rewritten from
    the live flags (imports transformers)."""
    return tables_text([*read_tables(path), live_table()])


# ---------------------------------------------------------------------------------------------- the described flags


def _string_to_bool(value):
    # transformers.hf_argparser.string_to_bool, word for word: its error message is the user's.
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    elif value.lower() in ("no", "false", "f", "n", "0"):
        return False
    else:
        raise argparse.ArgumentTypeError(
            f"Truthy value expected: got {value} but expected one of yes/no, true/false, t/f, y/n, 1/0 (case "
            "insensitive)."
        )


def _choice_type(choices: list):
    # transformers.hf_argparser.make_choice_type_function: a choice's string to the choice, anything else as it is
    by_name = {str(choice): choice for choice in choices}
    return lambda value: by_name.get(value, value)


_LIVE_TYPES: dict[str, Any] = {}


class _LiveType:
    """A converter that needs transformers' stack (e.g. accelerate's ParallelismConfig): the live parser's own type
    for the flag, built on first use, so that only a command line giving that flag pays for the import."""

    def __init__(self, dest: str):
        self.dest = dest
        self.__name__ = dest  # argparse names the type in "invalid ... value"; set to the real name before a call

    def __call__(self, value):
        if not _LIVE_TYPES:
            for group in add_live_flags(argparse.ArgumentParser()):
                _LIVE_TYPES.update({a.dest: a.type for a in group._group_actions if a.type is not None})
        kind = _LIVE_TYPES[self.dest]
        self.__name__ = getattr(kind, "__name__", repr(kind))
        return kind(value)


def _converter(spec: dict[str, Any]):
    name = spec.get("type")
    known = {None: None, "str": str, "int": int, "float": float, "dict": dict, "bool": _string_to_bool}
    if name in known:
        return known[name]
    if name == "choice":
        return _choice_type(spec["choices"])
    return _LiveType(spec["dest"])


def add_described_flags(parser: argparse.ArgumentParser, path: Path = FLAGS_JSON) -> bool:
    """Add the flags described in ``path`` (`train_flags.json`) without importing transformers; False (and nothing
    added) where it was written for another environment, or cannot be read: then use `add_live_flags`."""
    here = environment()
    groups = next((table["groups"] for table in read_tables(path) if table["environment"] == here), None)
    if here is None or groups is None:
        return False
    for described in groups:
        group = parser.add_argument_group(described["title"])
        for spec in described["actions"]:
            options = {"action": spec["action"], "dest": spec["dest"], "help": spec.get("help"),
                       "default": argparse.SUPPRESS}
            if spec["action"] == "store":
                options.update(nargs=spec.get("nargs"), const=spec.get("const"), type=_converter(spec),
                               choices=spec.get("choices"), metavar=spec.get("metavar"))
            elif spec["action"] == "store_const":
                options["const"] = spec["const"]
            group.add_argument(*spec["flags"], **options)
    return True


def add_flags(parser: argparse.ArgumentParser, path: Path = FLAGS_JSON) -> None:
    """The train flags: the described ones where they hold, else the live ones."""
    if not add_described_flags(parser, path):
        add_live_flags(parser)


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(allow_abbrev=False,
                                  prog="python -m internvlx_hf.cli.train_flags", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--check", action="store_true", help=f"exit 1 if {FLAGS_JSON.name} is stale; write nothing")
    cli.add_argument("--print", action="store_true", help="print this environment's description as JSON")
    args = cli.parse_args(argv)
    if args.print:
        print(json.dumps(live_table(), ensure_ascii=False))
        return 0
    text = live_text()
    if args.check:
        current = FLAGS_JSON.read_text(encoding="utf-8") if FLAGS_JSON.is_file() else ""
        if current != text:
            print(f"{FLAGS_JSON} is stale: run `{REGENERATE}`", file=sys.stderr)
            return 1
        print(f"{FLAGS_JSON} is up to date")
        return 0
    FLAGS_JSON.write_text(text, encoding="utf-8")
    print(f"wrote {FLAGS_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
