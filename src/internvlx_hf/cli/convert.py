"""`internvlx convert`: an OpenGVLab InternVL2 / InternVL-X folder -> an internvlx-hf checkpoint."""

from __future__ import annotations

import argparse

from .command import Command

_CONVERT_DESCRIPTION = """\
Convert an OpenGVLab checkpoint in its original remote-code layout (InternVLChatModel), the InternVL-X reference
release (that layout + PVTC `projector`) or a transformers-native InternVL checkpoint (model_type "internvl":
InternVLForConditionalGeneration + InternVLProcessor, e.g. the -hf repositories) into a self-contained internvlx-hf
checkpoint. Supported families:
  InternVL2    1B/2B/4B/8B/26B/40B/76B: Qwen2, InternLM2, Phi-3, Llama LLMs; InternViT-300M / -6B
  InternVL2.5  1B/2B/4B/8B/26B/38B/78B: Qwen2.5, InternLM2.5 LLMs; InternViT-300M / -6B
  InternVL3    1B/2B/8B/14B/38B/78B: Qwen2.5 LLMs; InternViT-300M / -6B (not InternVL3-9B:
               its InternLM3 LLM has no reference code in OpenGVLab/InternVL)
  InternVL3.5  1B/2B/4B/8B/14B/38B (Qwen3) and 30B-A3B/241B-A28B (Qwen3-MoE), and their -Flash models, whose
               visual resolution router is kept (256 or 64 tokens per tile: docs/flash.md)
  native       InternVLForConditionalGeneration folders (MLP projector); `internvlx export native` goes back
It writes config.json with auto_map, safetensors shards (+ index), the remote-code files, generation_config.json,
a fast tokenizer (tokenizer.json) with the chat template, and the processor configs. The result loads with
AutoModel.from_pretrained(DST, trust_remote_code=True) on a machine without internvlx-hf, and reproduces the source
model's logits.

SRC is a local folder in the OpenGVLab layout (config.json with llm_config/vision_config) or a native InternVL folder
(its processor settings become InternVLXImageProcessor's: tile size, min/max patches as min/max tiles, thumbnail,
normalisation, chat template). --projector/--lvtc upgrade either kind. Tensors are streamed one
at a time (memory stays near the largest tensor/shard), every source tensor is used or reported as dropped, every
new parameter is reported with its initialisation, and DST appears atomically (nothing is left behind on error)."""

_CONVERT_EPILOG = """\
examples:
  # InternVL2 -> internvlx-hf, same model (InternLM2 becomes a Llama-architecture LLM; logits match)
  internvlx convert ./InternVL2-2B ./InternVL2-2B-hf

  # InternVL2.5 / InternVL3 the same way (chat template internvl2_5 and its system message carried over)
  internvlx convert ./InternVL3-8B ./InternVL3-8B-hf

  # the InternVL-X reference release (PVTC projector) in bfloat16, 2GB shards
  internvlx convert ./InternVL-X-2B-HD ./InternVL-X-2B-HD-hf --dtype bfloat16 --max-shard-size 2GB

  # recommended compression upgrade (see "which compression" below): a PVTC projector, then fine-tune
  internvlx convert ./InternVL2-2B ./InternVL2-2B-PVTC --projector pvtc

  # upgrade InternVL2 to PVTC + LVTC (new modules initialised for stage-1 training, see the summary)
  internvlx convert ./InternVL2-2B ./InternVL2-2B-X --projector pvtc --lvtc k=18,T=2

  # a transformers-native InternVL checkpoint (InternVLForConditionalGeneration), as is or upgraded
  internvlx convert ./InternVL2-2B-native ./InternVL2-2B-hf
  internvlx convert ./InternVL2-2B-native ./InternVL2-2B-X --projector pvtc --lvtc k=18,T=2

  # LVTC with two LR projectors; the injected one starts as a copy of InternVL2's trained mlp1
  internvlx convert ./InternVL2-8B ./InternVL2-8B-LVTC --lvtc T=2,init_lr_from_mlp1

  # an InternVL3.5-Flash-like router (untrained, off) for any MLP checkpoint, then train it (docs/flash.md)
  internvlx convert ./InternVL3-8B ./InternVL3-8B-router --add-router
  internvlx train --model ./InternVL3-8B-router --data META --preset vico --output_dir ./InternVL3-8B-flash

--lvtc keys (comma-separated key=value; "--lvtc" alone or "--lvtc default" = all defaults):
  k  expand_layer        first layer on the high-resolution tokens (default 3/4 of the LLM depth)
  T  num_lr_projectors   LR projectors; T-1 of them are injected before layers s, s+i, ... (default 1)
  s  inject_start        (default 1)            i  inject_interval   (default 1)
  upsample_mode nearest|bilinear, hr_downsample_ratio (default 1.0), hr_projector_type mlp|pvtc,
  lr_downsample_ratio, lr_projector_type: the LVTCConfig fields; init_lr_from_mlp1: a flag (mlp LR projectors)
  hr_scale rms|none      how the HR projector's output joins layer k: rescaled to the LR state's RMS (rms, the
                         default here: an upgrade's HR projector is new) or as it is (none, the paper's formulation)

which compression (an InternVL2-like tiny model upgraded and fine-tuned, docs/lvtc.md "Which compression"):
  --projector pvtc            recommended: InternVL2's 256 tokens per 448 px tile at 0.6x the training-step cost
                              of 1024 tokens; fine-tuned at a higher learning rate than the plain model needs, it
                              read fine detail as well as 1024 tokens (0.988 against 0.992, 3 seeds each), and
                              small text better than the plain models (at the study's first rate, 1 seed)
  --lvtc k=K                  LVTC with hr_scale=rms: reads through its high-resolution tokens, within 0.05 of
                              1024 tokens at the same higher learning rate (0.952, 3 seeds), below PVTC
  --lvtc k=K,hr_scale=none    the paper's formulation: after an upgrade its high-resolution tokens went unused
  Every new module is untrained: fine-tune after converting (internvlx train --preset stage2); in the study the
  compressions needed twice the learning rate the plain model was fine-tuned with.

Errors name the input and the fix; the exit status is 2 for a conversion error."""


def _lvtc_spec(value: str) -> str:
    """The shape of an --lvtc SPEC ("default", or comma-separated key=value / init_lr_from_mlp1), checked while
    parsing so that `--lvtc SRC DST` is caught with a hint; `convert` checks the keys and values themselves."""
    items = [item.strip() for item in value.split(",")]
    if all(item in ("", "default", "init_lr_from_mlp1") or "=" in item for item in items):
        return value
    raise argparse.ArgumentTypeError(f"invalid SPEC {value!r} (comma-separated key=value, e.g. k=18,T=2)")


def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="local folder of an OpenGVLab InternVL2 / InternVL2.5 / InternVL3 / "
                        "InternVL-X or a transformers-native InternVL checkpoint")
    parser.add_argument("dst", metavar="DST", help="output folder (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--projector", choices=("keep", "mlp", "pvtc"), default="keep",
                        help="projector of the output: keep the source's (default), or a new mlp / pvtc one")
    parser.add_argument("--lvtc", nargs="?", const="default", default=None, metavar="SPEC", type=_lvtc_spec,
                        help="enable LVTC, e.g. k=18,T=2 (see the keys below); off by default. Give it after "
                             "SRC DST, or as --lvtc=SPEC, so that it does not take SRC as its value")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                        help="output dtype; auto keeps the source dtype of every tensor (default)")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest output shard, e.g. 5GB (default), 500MB, 2GiB")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read pytorch_model*.bin pickles (torch.load(weights_only=True)) if there are no "
                             "safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialising new modules (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--add-router", action="store_true",
                        help="give a checkpoint without InternVL3.5-Flash's router one (64-token projector, pooling, "
                             "gate), untrained and off, for `internvlx train --preset vico` (docs/flash.md); SRC may "
                             "also be an internvlx-hf checkpoint, which gains the router as it is")


def _check_convert(args: argparse.Namespace) -> None:
    """SRC must be a checkpoint folder: said before torch loads (the conversion checks it too, for its Python
    callers)."""
    from ..checkpoints import read_source_config

    read_source_config(args.src)


def _run_convert(args: argparse.Namespace) -> int:
    from ..conversion import convert

    report = convert(
        args.src,
        args.dst,
        projector=args.projector,
        lvtc=args.lvtc,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
        seed=args.seed,
        progress=not args.no_progress,
        add_router=args.add_router,
    )
    if report is None:  # an internvlx-hf SRC: the router alone was added
        print(f"Added an untrained router to {args.src} -> {args.dst} (off until `internvlx train --model {args.dst} "
              "--preset vico` trains it; docs/flash.md)")
        return 0
    print(report)
    return 0


CONVERT = Command(
    name="convert",
    help="convert an InternVL2 / 2.5 / 3, InternVL-X or native InternVL checkpoint to internvlx-hf",
    description=_CONVERT_DESCRIPTION,
    epilog=_CONVERT_EPILOG,
    add_arguments=_add_convert_arguments,
    run=_run_convert,
    check=_check_convert,
)
