"""`internvlx data check` / `internvlx data stats`: look at every row of a training mix before paying for GPUs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .command import CLIError, Command

_DATA_DESCRIPTION = """\
Check a training mix (InternVL meta JSON / JSONL, as `internvlx train --data` takes it) with a checkpoint's processor,
in parallel, before training on it. Every row is parsed, its images' sizes read from the file headers (no pixels
are decoded) and its conversation rendered with the chat template and tokenized to its exact length, with the tile
counts of the checkpoint's RVTC settings; --max_tiles and the meta's max_dynamic_patch apply as in training.

  check  the table `internvlx train --check_data` prints: samples, images, tiles, tokens, truncated and skipped rows
         per dataset, skipped rows by reason with file:line examples (every one is also logged as a warning)
  stats  the same, plus the distribution (min, p50, p90, p99, max) of tokens per sample, tiles per image and images
         per sample: what --max_length, --max_tiles and the batch size should fit

`internvlx train` itself reads rows lazily (each is checked when it loads, and skips are counted at the end); this
command finds every bad row up front. Exit status 0, or 1 with --strict when a row was skipped.

The exact lengths it measured go into the lengths cache (--lengths_cache_dir, as `internvlx train` takes it): a
later `internvlx train --group_by_length` with the same --model, --max_length, --max_tiles and --tiling reads them
instead of computing them again."""

_DATA_EPILOG = """\
examples:
  internvlx data check meta.json --model ./InternVL2-2B-X --max_length 4096
  internvlx data stats meta.json --model ./InternVL2-2B-X --max_tiles 6 --json > stats.json
  internvlx data check a.jsonl,b.jsonl --model ./ckpt --strict      # exit status 1 if any row is skipped"""


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("internvlx data {check,stats} DATA --model PATH [--max_length N] [--max_tiles N] [--json] "
                    "[--lengths_cache_dir DIR]")
    parser.add_argument("action", choices=("check", "stats"), help="check: the data table; stats: and distributions")
    parser.add_argument("data", metavar="DATA", help="InternVL meta JSON and/or JSONL files (comma-separated)")
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="checkpoint folder whose processor (tokenizer, chat template, tiling) training uses")
    parser.add_argument("--max_length", "--max-length", type=int, default=None, metavar="N",
                        help="as `internvlx train --max_length` (longer rows are truncated, or skipped)")
    parser.add_argument("--max_tiles", "--max-tiles", type=int, default=None, metavar="N",
                        help="as `internvlx train --max_tiles` (overrides the meta's max_dynamic_patch)")
    parser.add_argument("--tiling", choices=("ratio", "area", "edge", "none"), default=None,
                        help="as `internvlx train --tiling` (default: the checkpoint's)")
    parser.add_argument("--num_proc", "--num-proc", type=int, default=None, metavar="N",
                        help="processes (default: all cores)")
    parser.add_argument("--lengths_cache_dir", "--lengths-cache-dir", default=None, metavar="DIR",
                        help="as `internvlx train --lengths_cache_dir`: where the measured lengths are written for "
                             "--group_by_length (default: $INTERNVLX_CACHE/lengths or the datasets cache)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when any row is skipped")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_data(args: argparse.Namespace) -> int:
    from ..data.check import check_data, format_stats
    from ..hub.resolve import read_internvlx_config
    from ..processing import InternVLXProcessor, TilingMode

    for flag, value in (("--max_length", args.max_length), ("--max_tiles", args.max_tiles),
                        ("--num_proc", args.num_proc)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    read_internvlx_config(args.model, f"--model {args.model!r}")
    processor = InternVLXProcessor.from_pretrained(args.model, trust_remote_code=True)
    if args.tiling is not None:
        processor.image_processor.tiling = TilingMode(args.tiling)
    dataset, report = check_data(args.data, processor, max_length=args.max_length, max_tiles=args.max_tiles,
                                 num_proc=args.num_proc, progress=not args.no_progress,
                                 cache_dir=args.lengths_cache_dir)
    if args.action == "check":
        report.pop("stats")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(report["tiles"])
        print(dataset.summary)
        if args.action == "stats":
            print(format_stats(report["stats"]))
        if report["lengths_cache"]:
            folder = Path(report["lengths_cache"][0]).parent
            print(f"Lengths written to {folder} ({len(report['lengths_cache'])} file(s)): `internvlx train "
                  "--group_by_length` with the same settings reads them instead of computing them.")
    return 1 if args.strict and report["skipped"] else 0


DATA = Command(
    name="data",
    help="check a training mix (every row, in parallel) and show its statistics before training",
    description=_DATA_DESCRIPTION,
    epilog=_DATA_EPILOG,
    add_arguments=_add_data_arguments,
    run=_run_data,
)
