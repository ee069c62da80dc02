"""`internvlx export native`: an internvlx-hf checkpoint -> a transformers-native InternVL folder."""

from __future__ import annotations

import argparse

from .command import CLIError, Command

_EXPORT_DESCRIPTION = """\
Export an internvlx-hf checkpoint to another format. The one TARGET is `native`: transformers' own InternVL
(InternVLForConditionalGeneration + InternVLProcessor), whose model loads with
AutoModelForImageTextToText.from_pretrained(DST) without trust_remote_code and without internvlx-hf installed, and
gives the same logits and greedy generations. (transformers builds InternVLProcessor only where torchvision is
installed: its video-processor slot needs it.)

Only a plain checkpoint can be exported: the MLP projector (InternVL2's) and no LVTC, since native InternVL has
neither PVTC nor LVTC. The tensors are copied unchanged (same names, dtypes and values); the configs, tokenizer
settings, chat template and image processor are rewritten. RVTC's area/edge tile caps have no native setting: the
native processor tiles by aspect ratio over the same min..max tiles ('ratio' tiling), and the summary lists what
was not carried. A converted Llama tokenizer (Yi, Phi-3: InternVLXLlamaTokenizerFast, remote code) is written as
its tokenizer.json for transformers' TokenizersBackend when that gives the same ids on the chat template's prompts
(legacy=True always; legacy=False when the prompts start with a special token), else refused with the reason
(Phi-3's phi3-chat). DST appears atomically (nothing is left behind on error).

The way back: `internvlx convert DST NEW` reads native InternVL folders (bit-identical weights)."""

_EXPORT_EPILOG = """\
examples:
  # an InternVL2 conversion (or a fine-tuned MLP checkpoint) as a native transformers checkpoint
  internvlx export native ./InternVL2-2B-hf ./InternVL2-2B-native

  # then, anywhere with transformers >= 5 (no internvlx-hf, no trust_remote_code):
  #   model = AutoModelForImageTextToText.from_pretrained("./InternVL2-2B-native")

  # refused: PVTC / LVTC checkpoints (native InternVL has neither), and Phi-3 (InternVL2-4B) conversions
  internvlx export native ./InternVL-X-2B-HD-hf ./out     # error: ... uses the PVTC projector ...
  internvlx export native ./InternVL2-4B-hf ./out         # error: ... starts its prompts with '<|system|>' ...

Errors name the input and the fix; the exit status is 2 for an export error."""


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET", help="the format to write; only 'native' (transformers' InternVL)")
    parser.add_argument("src", metavar="SRC", help="folder of an internvlx-hf checkpoint (MLP projector, no LVTC)")
    parser.add_argument("dst", metavar="DST", help="output folder (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest output shard, e.g. 5GB (default), 500MB, 2GiB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_export(args: argparse.Namespace) -> int:
    from ..conversion.export import EXPORT_TARGETS, export_native

    if args.target not in EXPORT_TARGETS:
        raise CLIError(f"unknown TARGET {args.target!r}; the only target is 'native' (transformers' InternVL), e.g. "
                       "`internvlx export native SRC DST`.")
    report = export_native(args.src, args.dst, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                           progress=not args.no_progress)
    print(report)
    return 0


EXPORT = Command(
    name="export",
    help="export an internvlx-hf checkpoint as a transformers-native InternVL checkpoint",
    description=_EXPORT_DESCRIPTION,
    epilog=_EXPORT_EPILOG,
    add_arguments=_add_export_arguments,
    run=_run_export,
)
