"""`internvlx eval`: score checkpoints on held-out visual QA (the data `internvlx train` reads)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..hub.resolve import check_model_argument
from .command import CLIError, Command
from .quantization import add_quantization_arguments, check_quantization_available

# = internvlx_hf.evaluation.METRICS and processing.TilingMode (not imported, so that --help stays instant)
METRIC_NAMES = ("exact_match", "vqa", "anls", "relaxed")
TILINGS = ("ratio", "area", "edge", "none")
_PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")

_EVAL_DESCRIPTION = """\
Answer every question of DATA with CHECKPOINT and score the answers, dataset by dataset. DATA is what
`internvlx train --data` reads: an InternVL meta JSON or JSONL files (InternVL `conversations` or TRL `messages`
rows). A row's prompt is its conversation up to the last gpt / assistant turn, rendered with the checkpoint's chat
template; that turn is the reference answer. A row may add "answers": [...], the reference answers to score against
instead (e.g. the 10 human answers of VQAv2). Answers are generated in left-padded batches, greedily (--num-beams
for beam search), and stop at the template's end-of-turn token.

metrics (a meta entry's "metric" key chooses one per dataset; --metric overrides; default exact_match):
  exact_match  the answer equals a reference (surrounding whitespace ignored)
  vqa          VQA accuracy: min(#humans who gave the answer / 3, 1), averaged over the 10 leave-one-out subsets
               of the human answers, after the VQA answer normalisation (punctuation, number words -> digits,
               articles, contractions); exact match after normalisation for a single reference
  anls         ANLS (DocVQA, InfographicVQA): 1 - normalised Levenshtein distance when it is below 0.5, else 0;
               case-insensitive; the best reference counts
  relaxed      relaxed accuracy (ChartQA): numbers within 5% relative error of the reference, else exact match
               (case-insensitive)

Per dataset it prints the score (the mean over samples), the samples, tiles and visual tokens per sample (per LLM
layer group for an LVTC model: the tokens before and from the expand layer k) and generate() seconds per sample.
Several checkpoints (--compare) or tiling modes (--tiling ratio,edge) are printed side by side. Every row, image
and option is checked before the first answer is generated, and a bad one stops the run with its file:line."""

_EVAL_EPILOG = """\
examples:
  # the demo model on a synthetic held-out set (internvlx_hf.training.synthetic_vqa)
  internvlx eval src/internvlx_hf/demo/model heldout/meta.json

  # a DocVQA-style set scored with ANLS, the first 200 samples, bfloat16 on the GPU, every answer kept
  internvlx eval ./InternVL-X-2B docvqa_val.jsonl --metric anls --limit 200 --dtype bfloat16 --device cuda \\
      --json docvqa.json

  # InternVL2's tiling against RVTC's, and the accuracy against visual tokens as a plot
  internvlx eval ./InternVL-X-2B-HD meta.json --tiling ratio,area,edge --plot tiling.png

  # two checkpoints side by side
  internvlx eval out/stage1 meta.json --compare out/stage2

meta JSON with a metric per dataset ("root", "repeat_time" as for training; repeat_time is ignored here):
  {"textvqa": {"annotation": "textvqa_val.jsonl", "root": "images/", "metric": "vqa"},
   "chartqa": {"annotation": "chartqa_test.jsonl", "root": "charts/", "metric": "relaxed"}}

--json FILE writes every prediction with its score (atomically; '-' prints it instead of the table); the file
also works as `internvlx card --results FILE` for a single checkpoint."""

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder (from `internvlx convert` or "
                                                                 "`internvlx train`) or Hub id")
    parser.add_argument("data", metavar="DATA", help="InternVL meta JSON or JSONL file(s), comma-separated")
    parser.add_argument("--compare", metavar="CHECKPOINT", action="append", default=[],
                        help="another checkpoint to score on the same data, printed side by side (repeatable)")
    parser.add_argument("--tiling", default=None, metavar="MODE[,MODE...]",
                        help=f"RVTC tiling ({', '.join(TILINGS)}); several, comma-separated, are compared "
                             "(default: the checkpoint's processor setting)")
    parser.add_argument("--max-tiles", type=_positive, default=None, metavar="N",
                        help="tile budget per sample (default: the processor's; a dataset's max_dynamic_patch wins, "
                             "as in training)")
    parser.add_argument("--metric", choices=METRIC_NAMES, default=None,
                        help="metric of every dataset (default: each meta entry's \"metric\", else exact_match)")
    parser.add_argument("--max-new-tokens", type=_positive, default=32, metavar="N",
                        help="longest answer in tokens (default 32)")
    parser.add_argument("--num-beams", type=_positive, default=1, metavar="N",
                        help="beam search with N beams (default 1: greedy)")
    parser.add_argument("--batch-size", type=_positive, default=8, metavar="N",
                        help="prompts per generate() call (default 8)")
    parser.add_argument("--limit", type=_positive, default=None, metavar="N",
                        help="score only the first N samples of each dataset")
    parser.add_argument("--dtype", choices=_DTYPES, default="auto", help="weights dtype (default auto: as saved)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, mps or auto (default: every GPU when there is one, else cpu)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="write the scores and every prediction as JSON ('-': print it instead of the table)")
    parser.add_argument("--plot", default=None, metavar="FILE",
                        help=f"draw score against visual tokens per sample ({', '.join(_PLOT_FORMATS)}; needs "
                             "matplotlib: pip install 'internvlx-hf[plot]')")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (nor transformers' own)")
    add_quantization_arguments(parser)


def _tilings(text: str | None) -> list[str | None]:
    if text is None:
        return [None]
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    bad = [mode for mode in modes if mode not in TILINGS]
    if not modes or bad:
        raise CLIError(f"--tiling {text!r}: use one or more of {', '.join(TILINGS)}, comma-separated")
    if len(set(modes)) != len(modes):
        raise CLIError(f"--tiling {text!r} names a mode twice")
    return modes


def _labels(checkpoints: list[str]) -> list[str]:
    names = [Path(c).name or c for c in checkpoints]
    return names if len(set(names)) == len(names) else list(checkpoints)


def _check_outputs(args: argparse.Namespace) -> None:
    for option, value in (("--json", args.json), ("--plot", args.plot)):
        if value and value != "-" and Path(value).is_dir():
            raise CLIError(f"{option} {value!r} is a folder; give a file name")
    if args.plot:
        suffix = Path(args.plot).suffix.lstrip(".").lower()
        if suffix not in _PLOT_FORMATS:
            raise CLIError(f"--plot {args.plot!r}: give a file ending in one of "
                           f"{', '.join('.' + f for f in _PLOT_FORMATS)}")
        from ..evaluation.report import require_matplotlib

        try:
            require_matplotlib()
        except ImportError as error:
            raise CLIError(str(error)) from None


def _check_eval(args: argparse.Namespace) -> None:
    """The arguments' checks that need no heavy import: answered before torch loads."""
    checkpoints = [args.checkpoint, *args.compare]
    if len(set(checkpoints)) != len(checkpoints):
        raise CLIError("a checkpoint is given twice (CHECKPOINT and --compare); compare different checkpoints")
    for checkpoint in checkpoints:
        check_model_argument(checkpoint, "CHECKPOINT")
    for part in (part.strip() for part in args.data.split(",")):
        if part and not Path(part).is_file():
            what = "is a folder" if Path(part).is_dir() else "no such file"
            raise CLIError(f"DATA {part!r}: {what}; give an InternVL meta JSON or a JSONL file (several: "
                           "comma-separated).")
    _tilings(args.tiling)


def _run_eval(args: argparse.Namespace) -> int:  # after _check_eval (EVAL.check)
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if args.no_progress:  # transformers' own bars too (loading weights)
        hf_logging.disable_progress_bar()
    try:
        return _evaluate(args)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from transformers import AutoProcessor

    from ..evaluation import evaluate, format_comparison, format_run, plot_runs, read_eval_data, to_json, write_json
    from ..hub.resolve import read_internvlx_config, resolve_model
    from ..loading import load_checkpoint

    tilings = _tilings(args.tiling)
    _check_outputs(args)
    check_quantization_available(args.load_in_bits)
    checkpoints = [args.checkpoint, *args.compare]
    # Every checkpoint's prompts are rendered and checked before the first model loads.
    prepared = []
    for checkpoint in checkpoints:
        path = resolve_model(checkpoint)
        read_internvlx_config(path, f"CHECKPOINT {checkpoint!r}")
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        prepared.append((processor, read_eval_data(args.data, processor, metric=args.metric, limit=args.limit)))
    runs = []
    for checkpoint, name, (processor, sets) in zip(checkpoints, _labels(checkpoints), prepared):
        model, processor = load_checkpoint(checkpoint, args.dtype, args.device, processor=processor,
                                           load_in_bits=args.load_in_bits)
        for tiling in tilings:
            label = name if len(tilings) == 1 else f"{name} ({tiling})"
            runs.append(evaluate(model, processor, sets, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, tiling=tiling,
                                 max_tiles=args.max_tiles, progress=not args.no_progress, label=label,
                                 checkpoint=checkpoint))
        del model
    record = to_json(runs, args.data)
    if args.json == "-":  # stdout holds the JSON alone, so that it can be piped
        print(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        print(format_run(runs[0]) if len(runs) == 1 else format_comparison(runs))
    notes = sys.stderr if args.json == "-" else sys.stdout
    if args.json and args.json != "-":
        print(f"Wrote {write_json(record, args.json)}", file=notes)
    if args.plot:
        print(f"Wrote {plot_runs(runs, args.plot)}", file=notes)
    return 0


EVAL = Command(
    name="eval",
    help="score checkpoints on held-out visual QA (exact match, VQA accuracy, ANLS, relaxed accuracy)",
    description=_EVAL_DESCRIPTION,
    epilog=_EVAL_EPILOG,
    add_arguments=_add_eval_arguments,
    run=_run_eval,
    check=_check_eval,
)
