"""What `internvlx train` takes: the argument dataclasses beside transformers' `TrainingArguments`
(`ModelArguments`, `DataArguments`, `PresetArguments`; `ARGUMENT_CLASSES` in the order the command line parses them),
a YAML/JSON config file read into them with each value checked as the command line would check it
(`parse_train_args`), and the `--model` folder's check."""

from __future__ import annotations

import os
from argparse import ArgumentTypeError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool

from ..hub.resolve import read_internvlx_config
from ..processing import TilingMode
from .collator import LOSS_REDUCTIONS
from .linear_cross_entropy import LM_HEAD_LOSSES
from .presets import LORA_PROJECTORS, PRESETS


@dataclass
class ModelArguments:
    model: str | None = field(
        default=None,
        metadata={"help": "folder of an internvlx-hf checkpoint (made by `internvlx convert` or `internvlx train`)"},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "attention backend: eager, sdpa or flash_attention_2 (default: the checkpoint's)"},
    )
    model_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the weights are loaded in (use --bf16 for mixed precision on float32 weights)",
                  "choices": ["float32", "bfloat16", "float16", "auto"]},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "train into a non-empty --output_dir: its old contents (checkpoints, model card, ...) are "
                          "deleted first. Without it a non-empty --output_dir is refused, unless "
                          "--resume_from_checkpoint continues the run in it"},
    )
    lm_head_loss: str = field(
        default="labelled",
        metadata={"help": "how the loss runs the LM head: labelled (only on the positions with a label: the loss and "
                          "gradients of full, without the logits of image and prompt tokens), cut_cross_entropy or "
                          "liger (the same with a fused linear cross-entropy: pip install cut-cross-entropy / "
                          "liger-kernel, the latter CUDA only), full (the logits of every position)",
                  "choices": list(LM_HEAD_LOSSES)},
    )
    threads: int | None = field(
        default=None,
        metadata={"help": "CPU runs: torch threads of this process. Default: torch's count (one per core) lowered to "
                          "the cores the machine has free at the start (its load average), so that a busy machine is "
                          "not oversubscribed (2 threads on a 2-core machine with another job ran 4-9x slower than "
                          "1); OMP_NUM_THREADS, where set, is kept"},
    )
    teacher: str | None = field(
        default=None,
        metadata={"help": "knowledge distillation: folder of a teacher checkpoint (e.g. the InternVL2 model --model "
                          "was converted from, `internvlx convert` as it is, or a fine-tuned one). The student "
                          "(--model) learns the teacher's next-token distributions on the answer tokens instead of "
                          "the labels; rows may come without answers (--teacher_answers). See docs/fine-tuning.md"},
    )
    teacher_answers: str = field(
        default="missing",
        metadata={"help": "with --teacher: missing (rows that end with a question get the teacher's greedy answer; "
                          "rows with an answer keep it, and the teacher's distribution over it is the target) or all "
                          "(every row's last answer is the teacher's: no label of the data is used). Written once to "
                          "OUT/teacher-answers/ (reused by a resumed run)",
                  "choices": ["missing", "all"]},
    )
    teacher_bits: int | None = field(
        default=None,
        metadata={"help": "with --teacher: load the teacher in 8-bit (LLM.int8()) or 4-bit (nf4) with bitsandbytes "
                          "(projectors and lm_head kept in full precision); default: --model_dtype",
                  "choices": [8, 4]},
    )
    teacher_max_new_tokens: int = field(
        default=256,
        metadata={"help": "with --teacher: the longest answer the teacher writes"},
    )
    teacher_batch_size: int = field(
        default=8,
        metadata={"help": "with --teacher: prompts per generate() call when the teacher writes answers"},
    )
    distill_beta: float = field(
        default=0.0,
        metadata={"help": "with --teacher: the divergence, as TRL's GKD: 0 forward KL(teacher || student), 1 reverse "
                          "KL, in between the generalized Jensen-Shannon divergence"},
    )
    distill_temperature: float = field(
        default=1.0,
        metadata={"help": "with --teacher: temperature of both next-token distributions"},
    )


@dataclass
class DataArguments:
    data: str | None = field(
        default=None,
        metadata={"help": "InternVL meta JSON and/or JSONL files (comma-separated); see docs/fine-tuning.md"},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "longest sample in tokens, image tokens included; a longer one keeps its head and the "
                          "replies in it (a cut inside an image moves before the image), or is skipped when no reply "
                          "token fits"},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "pack each batch into one row (position_ids restart per sample, no padding)"},
    )
    tiling: str | None = field(
        default=None,
        metadata={"help": "RVTC tiling: ratio, area, edge or none (default: the checkpoint's processor)",
                  "choices": [mode.value for mode in TilingMode]},
    )
    max_tiles: int | None = field(
        default=None,
        metadata={"help": "largest tile grid per image in training, for every dataset: it overrides the meta's "
                          "max_dynamic_patch (default: each dataset's max_dynamic_patch, else the processor's "
                          "max_tiles); the saved processor keeps the source's max_tiles (see --save_max_tiles)"},
    )
    save_max_tiles: bool = field(
        default=False,
        metadata={"help": "save the tile budget training used (--max_tiles, else the largest max_dynamic_patch) "
                          "into the output's processor, so that the model tiles at it at inference (default: the "
                          "source checkpoint's max_tiles stays)"},
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "same as --train_sampling_strategy group_by_length (batches of similar length; needs "
                          "per-sample lengths, see --lengths)"},
    )
    lengths: str = field(
        default="exact",
        metadata={"help": "per-sample lengths for group_by_length: a row's own 'length' field, else exact (computed "
                          "once in parallel and cached, reused by later runs and other ranks) or approximate "
                          "(text length / 4 + the tile budget: instant, more padding)",
                  "choices": ["exact", "approximate"]},
    )
    lengths_cache_dir: str | None = field(
        default=None,
        metadata={"help": "folder of the lengths cache; every DDP rank must see it (default: $INTERNVLX_CACHE/lengths "
                          "or the datasets cache)"},
    )
    check_data: bool = field(
        default=False,
        metadata={"help": "check every row before training, as `internvlx data check` does (full data table, "
                          "unusable rows left out up front); default: rows are checked as they load"},
    )
    data_num_proc: int | None = field(
        default=None,
        metadata={"help": "processes for --check_data and the exact lengths (default: all cores)"},
    )
    eval_data: str | None = field(
        default=None,
        metadata={"help": "held-out data (meta JSON / JSONL, as --data) scored by generation at every evaluation "
                          "(--eval_strategy; once after training when it is 'no'): eval_<dataset>_accuracy etc. go "
                          "to the log, trainer_state.json and the model card; its loss is logged as eval_loss"},
    )
    eval_metric: str | None = field(
        default=None,
        metadata={"help": "metric of every --eval-data dataset: exact_match, vqa, anls or relaxed (default: each "
                          "meta entry's \"metric\", else exact_match)"},
    )
    eval_max_new_tokens: int = field(
        default=32,
        metadata={"help": "longest generated answer when scoring --eval-data"},
    )
    loss_reduction: str = field(
        default="token",
        metadata={"help": "InternVL's loss averaging: token (every labelled token alike), sample (every sample "
                          "alike: 1/n per token), square (1/sqrt(n) per token; InternVL2.5's recipes)",
                  "choices": list(LOSS_REDUCTIONS)},
    )


@dataclass
class PresetArguments:
    preset: str = field(
        default="stage2",
        metadata={"help": "what trains: stage1 (projectors), stage2 (everything: the paper's instruction tuning), "
                          "stage2-frozen-vit (LLM + projectors, ViT frozen: InternVL2's fine-tuning scripts), full "
                          "(everything), lora, qlora (LoRA on a 4-bit nf4 base; needs the 'quantization' extra), "
                          "vico (InternVL3.5-Flash's router, ViCO's two stages, LoRA on the LLM in stage 1 merged "
                          "into OUT: a model with a router, e.g. from `internvlx convert --add-router`), "
                          "vico-projector (the same without LoRA), vico-router (ViCO's stage 2 alone: the router)",
                  "choices": list(PRESETS)},
    )
    vico_stage_split: float = field(
        default=0.5, metadata={"help": "presets vico, vico-projector: the share of the steps in stage 1 "
                                       "(consistency: the 64-token projector, and LoRA with vico), the rest in stage "
                                       "2 (the router)"})
    vico_ce_weight: float = field(
        default=0.0, metadata={"help": "presets vico, vico-projector, stage 1: the weight of the next-token loss "
                                       "beside the KL divergence from the model at full resolution"})
    vico_label_share: float = field(
        default=0.5, metadata={"help": "the vico presets: a tile is labelled compressible when its loss "
                                       "ratio is at or under this quantile of the recent ratios (or near 1)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (presets lora, qlora, vico)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (presets lora, qlora, vico)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (presets lora, qlora, vico)"})
    lora_target: str = field(
        default="llm",
        metadata={"help": "LoRA targets, comma-separated: llm (all LLM linears), vision (all ViT linears), "
                          "llm.NAME / vision.NAME / NAME (e.g. q_proj,v_proj)"},
    )
    lora_projectors: str = field(
        default="train",
        metadata={"help": "presets lora, qlora: train (the projectors train in full beside the adapters) or freeze "
                          "(adapters only, as InternVL2's *_lora.sh scripts: vLLM serves such an adapter unmerged "
                          "with --enable-lora, and refuses one with trained projectors)",
                  "choices": list(LORA_PROJECTORS)},
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, PresetArguments, TrainingArguments)


def checkpointing_renames() -> dict[str, str]:
    """The `TrainingArguments` names this transformers release lacks, to the ones it has: 5.23 renamed
    ``gradient_checkpointing[_kwargs]`` to ``activation_checkpointing[_kwargs]`` (the old names are its deprecated
    aliases), so on 5.16-5.22 the new names, which the docs use, are taken as the old ones ({} on 5.23)."""
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        return {}
    return {"activation_checkpointing": "gradient_checkpointing",
            "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs"}


def parse_train_args(config: str | os.PathLike | dict[str, Any] | None = None, **overrides: Any):
    """(ModelArguments, DataArguments, PresetArguments, TrainingArguments) from a YAML/JSON file or a dict, with
    ``overrides`` on top (the keys are the command-line flags without ``--``)."""
    values: dict[str, Any] = {}
    if isinstance(config, dict):
        values.update(config)
    elif config is not None:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"training config {str(path)!r} not found")
        import yaml

        text = path.read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(text)  # JSON is YAML too
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML/JSON ({error})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of option names to values, e.g. 'model: ./ckpt'")
        values.update(loaded)
    renames = checkpointing_renames()
    values = {renames.get(key, key): value for key, value in values.items()}
    overrides = {renames.get(key, key): value for key, value in overrides.items()}
    parser = HfArgumentParser(ARGUMENT_CLASSES, allow_abbrev=False)
    where = f"{config}: " if isinstance(config, (str, os.PathLike)) else ""
    values = {key: _coerce(parser, key, value, where) for key, value in values.items()}
    values.update({key: _coerce(parser, key, value, "") for key, value in overrides.items()})
    known = {f for cls in ARGUMENT_CLASSES for f in cls.__dataclass_fields__}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; see `internvlx train --help` for the names")
    if not values.get("output_dir"):  # TrainingArguments would fall back to ./trainer_output
        raise ValueError("--output_dir is required: the folder the fine-tuned checkpoint is written to")
    return parser.parse_dict(values)


def _coerce(parser: HfArgumentParser, key: str, value: Any, where: str) -> Any:
    """``value`` of option ``key`` as the command line would parse it, or a ValueError naming the key.

    YAML 1.1 (PyYAML) reads ``1e-3`` without a dot as a string and an unquoted ``no`` as false; `parse_dict` hands
    values to the dataclasses as they are, so a string learning rate would fail deep inside training.
    """
    action = next((a for a in parser._actions if a.dest == key and a.type is not None), None)
    if action is None or value is None or isinstance(value, dict):
        return value
    if isinstance(value, list) and action.nargs == "+":
        return [_coerce_one(action, key, item, where) for item in value]
    return _coerce_one(action, key, value, where)


def _coerce_one(action, key: str, value: Any, where: str) -> Any:
    kind = action.type
    names = {int: "an integer", float: "a number", string_to_bool: "true or false"}
    expected = names.get(kind, f"one of {list(action.choices)}" if action.choices else "a string")
    if isinstance(value, bool) and value is action.const:  # a bare flag (`--fsdp`: nargs="?", const=True)
        return value
    if isinstance(value, bool) and kind is not string_to_bool:
        quoted = " (YAML reads an unquoted yes/no/on/off as true/false; quote it)" if action.choices else ""
        raise ValueError(f"{where}{key} is {str(value).lower()}, but it must be {expected}{quoted}")
    try:
        if isinstance(value, str) and kind is not str:
            value = kind(value)
        elif kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            value = int(value)
    except (ValueError, TypeError, ArgumentTypeError):
        raise ValueError(f"{where}{key} is {value!r}, but it must be {expected}") from None
    if action.choices and value not in action.choices:
        raise ValueError(f"{where}{key} is {value!r}, but it must be {expected}")
    return value


def check_model_folder(path: str | None, flag: str = "--model") -> Path:
    """The checkpoint folder given by ``flag`` (--model, or --teacher), named by that flag in every error."""
    if not path:
        raise ValueError(f"{flag} is required: the folder of an internvlx-hf checkpoint (see `internvlx convert`)")
    folder = Path(path).expanduser().resolve()
    read_internvlx_config(folder, f"{flag} {path!r}")
    return folder
