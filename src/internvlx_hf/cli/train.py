"""`internvlx train`: fine-tune an internvlx-hf checkpoint with the HF Trainer (presets stage1, stage2,
stage2-frozen-vit, full, lora, qlora)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from .command import CLIError, Command
from .train_flags import CLI_RESERVED, FLAGS_JSON, add_flags

_TRAIN_DESCRIPTION = """\
Fine-tune an internvlx-hf checkpoint (made by `internvlx convert`) on InternVL's meta JSON / JSONL data with the
Hugging Face Trainer. Every TrainingArguments flag works (--per_device_train_batch_size, --learning_rate,
--max_steps, --bf16, --activation_checkpointing, --save_strategy, --resume_from_checkpoint, --seed, --report_to,
...), and so does `internvlx train CONFIG.yaml` with the same names as keys (flags given next to it win).

It prints the tile budget that applies, the data (rows and samples per dataset: rows are read lazily, each checked
when it loads; a bad one is skipped with a file:line warning and counted at the end; --check_data or `internvlx data
check` checks them all first), the trainable parameters per module group and the Trainer's progress bar. OUT and
every OUT/checkpoint-* hold weights, config, remote code, processor and tokenizer, and load with AutoModel /
AutoProcessor (trust_remote_code=True) where internvlx-hf is not installed; with --preset lora or qlora,
OUT/adapter holds the PEFT adapter and OUT the merged model (qlora: merged into the full-precision base, so it loads
without bitsandbytes).
OUT must be new or empty: --resume_from_checkpoint continues the run in it, --overwrite_output_dir empties it first.

presets:
  stage1             projectors (mlp / pvtc, LVTC's LR and HR projectors); ViT and LLM frozen (the paper's stage 1)
  stage2             everything (the paper's stage 2, instruction tuning: all parameters; default)
  stage2-frozen-vit  LLM + projectors; ViT frozen (InternVL2's fine-tuning scripts, --freeze_backbone True)
  full               everything (the same parameters as stage2)
  lora               LoRA on the LLM's attention and MLP linears (--lora_target), projectors trained in full
                     (--lora_projectors freeze: adapters only, which vLLM serves unmerged with --enable-lora)
  qlora              lora on a 4-bit nf4 base (QLoRA; bitsandbytes: pip install "internvlx-hf[quantization]");
                     projectors and lm_head stay in full precision"""

_TRAIN_EPILOG = """\
examples:
  # stage 1: train the new PVTC / LVTC projectors of an upgraded checkpoint
  internvlx train --model ./InternVL2-2B-X --data meta.json --preset stage1 --output_dir out/stage1 \\
      --per_device_train_batch_size 4 --learning_rate 1e-4 --num_train_epochs 1 --bf16

  # stage 2: fine-tune every parameter, packed batches of up to 8192 tokens, activation (gradient) checkpointing
  internvlx train --model out/stage1 --data meta.json --preset stage2 --output_dir out/stage2 \\
      --max_length 8192 --packing --activation_checkpointing --learning_rate 4e-5 --bf16

  # stage 2 with the ViT frozen (InternVL2's fine-tuning scripts), InternVL2.5's 1/sqrt(n) loss weighting
  internvlx train --model out/stage1 --data meta.json --preset stage2-frozen-vit --output_dir out/stage2-frozen-vit \\
      --packing --loss_reduction square

  # LoRA on the LLM and the ViT; OUT/adapter = adapter, OUT = merged model
  internvlx train --model ./InternVL2-2B-hf --data train.jsonl --preset lora --lora_r 16 \\
      --lora_target llm,vision --output_dir out/lora --max_steps 1000

  # LoRA adapters only (projectors frozen), to serve OUT/adapter unmerged on vLLM (vllm serve --enable-lora)
  internvlx train --model ./InternVL2-2B-hf --data train.jsonl --preset lora --lora_projectors freeze \
      --output_dir out/lora-llm --max_steps 1000

  # QLoRA: the same adapters on a 4-bit nf4 base (bitsandbytes), bfloat16 compute on a GPU
  internvlx train --model ./InternVL2-2B-hf --data train.jsonl --preset qlora --model_dtype bfloat16 \\
      --output_dir out/qlora --max_steps 1000

  # distillation: the converted model learns from its source, on questions without answers (the teacher writes
  # them, in 8-bit); no label is needed
  internvlx train --model ./InternVL2-8B-pvtc --teacher ./InternVL2-8B-hf --data questions.jsonl \
      --output_dir out/distilled --teacher_bits 8 --learning_rate 1e-5 --bf16

  # the same options from a YAML file (keys = flag names), one overridden on the command line
  internvlx train train.yaml --learning_rate 1e-5

  # multi-GPU (DDP); add --deepspeed ds_zero2.json for ZeRO, see docs/fine-tuning-scale.md
  torchrun --nproc_per_node 8 -m internvlx_hf train --model ... --data ... --output_dir ...

--data: an InternVL meta JSON ({"name": {"root", "annotation", "repeat_time", "max_dynamic_patch"?}}) or JSONL files
(InternVL `conversations` or TRL `messages` + `images` rows), comma-separated."""


def _argument_classes():
    from ..training.arguments import ARGUMENT_CLASSES

    return ARGUMENT_CLASSES


def _option_names() -> set[str]:
    return {f.name for cls in _argument_classes() for f in dataclasses.fields(cls)
            if f.init and f.name not in CLI_RESERVED}


def _add_train_arguments(parser: argparse.ArgumentParser, flags: Path = FLAGS_JSON) -> None:
    parser.usage = ("internvlx train [CONFIG.yaml] --model PATH --data META_JSON_OR_JSONL --output_dir OUT "
                    "[--preset {stage1,stage2,stage2-frozen-vit,full,lora,qlora}] [any TrainingArguments flag] ...")
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                        help="YAML (or JSON) file of options; flags given next to it override its values")
    add_flags(parser, flags)  # from train_flags.json where it holds: --help and argument errors without torch


def parse_cli(args: argparse.Namespace | Sequence[str] | None):
    """The four argument dataclasses of `train()` from a parsed namespace (or argv after ``train``)."""
    from ..training.arguments import parse_train_args

    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(allow_abbrev=False, prog="internvlx train")
        _add_train_arguments(parser)
        args = parser.parse_args(args)
    options = _option_names()
    given = {name: value for name, value in vars(args).items() if name in options}
    try:
        return parse_train_args(args.config, **given)
    except TypeError as error:  # a dataclass refusing a value
        raise CLIError(f"invalid training options: {error}") from None


# Without them nothing runs: checked before torch is imported, so that a forgotten one is answered at once (train()
# checks them again, after CONFIG.yaml is read, for callers from Python).
_REQUIRED = ("model", "data", "output_dir")


def _check_train(args: argparse.Namespace) -> None:
    missing = [f"--{name}" for name in _REQUIRED if getattr(args, name, None) is None]
    if args.config is None and missing:
        raise CLIError(f"the following options are required: {', '.join(missing)} (or give them in a CONFIG.yaml: "
                       "internvlx train CONFIG.yaml)")


def _run_train(args: argparse.Namespace) -> int:
    from ..training.run import train
    from ..training.runtime import end_distributed, exit_if_gloo_threads_remain

    train(*parse_cli(args))  # the result is not kept, so that end_distributed() can free the wrapped model
    end_distributed()
    exit_if_gloo_threads_remain()  # DeepSpeed's groups can outlive it; their threads would abort the teardown
    return 0


TRAIN = Command(
    name="train",
    help="fine-tune a checkpoint with the HF Trainer (presets stage1, stage2, stage2-frozen-vit, full, lora, qlora)",
    description=_TRAIN_DESCRIPTION,
    epilog=_TRAIN_EPILOG,
    add_arguments=_add_train_arguments,
    run=_run_train,
    check=_check_train,
)
