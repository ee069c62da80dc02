"""`train()`: the `internvlx train` entry point, from parsed arguments to a saved checkpoint.

It loads an internvlx-hf checkpoint and its processor, indexes the data (`InternVLXDataset`: rows are read lazily,
and lengths computed only for ``--group_by_length``; skips are counted at the end), applies a preset
(`apply_preset`), trains with `InternVLXTrainer` (transformers' `Trainer`) and writes OUT so that it loads anywhere:
weights, config, remote code, processor and tokenizer; for `lora` and `qlora`, the PEFT adapter in ``OUT/adapter``
and the merged model in OUT (for `qlora` merged into the full-precision base, so OUT loads without bitsandbytes).
The final files are written to a hidden folder inside OUT and moved into place at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from argparse import ArgumentTypeError
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool

from ..atomic import remove_stale_temporaries, temp_prefix
from ..data import InternVLXDataset, apply_tile_precedence, as_sources
from ..hub.resolve import read_internvlx_config
from ..processing import TilingMode
from .collator import LOSS_REDUCTIONS, InternVLXDataCollator
from .linear_cross_entropy import LM_HEAD_LOSSES
from .presets import (
    LORA_PRESETS,
    LORA_PROJECTORS,
    PRESETS,
    LoraSettings,
    apply_preset,
    describe_lora,
    format_trainable,
    ignore_peft_checkpointing_warning,
)
from .distillation import DistillationCollator, InternVLXDistillationTrainer
from .trainer import InternVLXTrainer, checkpoint_problem, last_complete_checkpoint

logger = logging.getLogger(__name__)

FINAL_STAGING = "internvlx-final"  # OUT/.internvlx-final.tmp-HOST-PID.*: the final files, before they move into OUT


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
                          "(everything), lora, qlora (LoRA on a 4-bit nf4 base; needs the 'quantization' extra)",
                  "choices": list(PRESETS)},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (presets lora, qlora)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (presets lora, qlora)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (presets lora, qlora)"})
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


@dataclass
class TrainResult:
    trainer: InternVLXTrainer
    dataset: InternVLXDataset
    output_dir: Path
    metrics: dict[str, Any]


def _check_model_folder(path: str | None) -> Path:
    if not path:
        raise ValueError("--model is required: the folder of an internvlx-hf checkpoint (see `internvlx convert`)")
    folder = Path(path).expanduser().resolve()
    read_internvlx_config(folder, f"--model {path!r}")
    return folder


def _check_output_dir(out: Path, folder: Path, data: Any, training_args: TrainingArguments,
                      overwrite: bool) -> None:
    """A new run writes into a new or empty OUT: in a used one the last run's checkpoints and model card would stay
    beside the new model. Resuming continues the run that is there; ``overwrite`` empties OUT first."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} is a file; pass a folder for the fine-tuned checkpoint")
    entries = sorted(entry.name for entry in out.iterdir()) if out.is_dir() else []
    if not entries or training_args.resume_from_checkpoint:
        return
    if not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(f"--output_dir {out} is not empty ({shown}); a new run there would mix its files with "
                         "the old ones. Continue that run with --resume_from_checkpoint, delete its contents with "
                         "--overwrite_output_dir, or choose another --output_dir")
    target = out.resolve()
    inputs = [("--model", folder)] + [("--data", Path(part.strip()).resolve()) for part in
                                      (data.split(",") if isinstance(data, str) else []) if part.strip()]
    for flag, path in inputs:
        if path.is_relative_to(target):
            raise ValueError(f"--overwrite_output_dir would delete {flag} {path}, which lies in --output_dir {out}; "
                             "write to another --output_dir")
    with training_args.main_process_first(local=False, desc="emptying --output_dir"):
        if training_args.process_index == 0:
            for entry in out.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


def _check_resume(checkpoint: str | None, out: Path) -> None:
    """Refuse a --resume_from_checkpoint folder that was not written whole, naming the one to resume from."""
    if not checkpoint:
        return
    problem = checkpoint_problem(checkpoint)
    if problem is None:
        return
    last = last_complete_checkpoint(out)
    hint = (f"resume from {last}, the last complete checkpoint in --output_dir" if last is not None
            else f"--output_dir {out} has no complete checkpoint: start the run anew")
    raise ValueError(f"--resume_from_checkpoint {checkpoint} cannot be resumed from: {problem}; {hint}")


def _move_into(tmp: Path, out: Path) -> None:
    for entry in tmp.iterdir():
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()


def _merged_model(trainer: InternVLXTrainer, adapter: Path, base: tuple[Path, Any] | None):
    """The trained model with its LoRA adapter merged in: the trained model itself (`lora`), or for `qlora` the
    ``base`` checkpoint (folder, dtype: what --model and --model_dtype name) in full precision with the saved
    ``adapter`` applied (merging into the 4-bit layers would round the update to nf4 and save a model that needs
    bitsandbytes to load)."""
    if base is None:
        return trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    from peft import PeftModel

    from .. import InternVLXForConditionalGeneration

    folder, dtype = base
    full = InternVLXForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    with ignore_peft_checkpointing_warning():
        return PeftModel.from_pretrained(full, adapter).merge_and_unload()


def _save_final(trainer: InternVLXTrainer, processor, out: Path, lora: bool,
                full_base: tuple[Path, Any] | None = None) -> None:
    """Write OUT's final files into a hidden folder, then move them in (nothing half-written on failure).

    ``full_base``: for `qlora`, the checkpoint (folder, dtype) the merged model is built from."""
    is_main = trainer.args.should_save
    if is_main:  # what a run killed while saving its final files left (a new run's files go to a new folder)
        remove_stale_temporaries(out / FINAL_STAGING)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out / FINAL_STAGING), dir=out)) if is_main else None
    # Every process takes part in save_model (FSDP / DeepSpeed gather the weights there); only the main one writes.
    target = str(tmp / "adapter") if lora and is_main else (str(tmp) if is_main else str(out))
    try:
        trainer.save_model(target)
        if lora and is_main:
            merged = _merged_model(trainer, tmp / "adapter", full_base)
            merged.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            trainer.record_provenance(tmp, output="merged")
        if is_main:
            trainer.state.save_to_json(str(tmp / "trainer_state.json"))  # the log history, as in checkpoints
            _move_into(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    trainer.accelerator.wait_for_everyone()


def _fsdp_request(training_args: TrainingArguments) -> str | None:
    """Where FSDP was asked for: the ``--fsdp`` flag, or an accelerate config with ``distributed_type: FSDP``
    (`accelerate launch` passes it on as ACCELERATE_USE_FSDP); None when it was not."""
    from accelerate.utils import parse_flag_from_env

    if training_args.fsdp:
        return "--fsdp"
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return "The accelerate config (distributed_type: FSDP, ACCELERATE_USE_FSDP=true)"
    return None


def _join_deepspeed_comm(training_args: TrainingArguments) -> None:
    """Let DeepSpeed's communication layer use the process group that is already there.

    On accelerators accelerate starts torch.distributed through `deepspeed.init_distributed`; a CPU run (``use_cpu``)
    starts it with torch alone, and DeepSpeed's own layer then reports one process: ZeRO-3's `zero.Init` (in
    `from_pretrained`) checks the Trainer's ``train_batch_size`` (micro batch x accumulation x processes) against a
    world of 1 and stops.
    """
    import torch.distributed as dist

    if not training_args.deepspeed or not (dist.is_available() and dist.is_initialized()):
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)


def train(model_args: ModelArguments, data_args: DataArguments, preset_args: PresetArguments,
          training_args: TrainingArguments, *, train_data: Any = None, callbacks: list | None = None,
          print_fn: Callable[[str], None] | None = print) -> TrainResult:
    """Fine-tune an internvlx-hf checkpoint; see docs/fine-tuning.md.

    Args:
        train_data: rows to train on instead of ``data_args.data`` (a `datasets.Dataset`, a list of rows, or paths).
        callbacks: extra `transformers.TrainerCallback` objects for the Trainer (e.g. training diagnostics).
        print_fn: where the parameter table, data summary and final notes go (main process only); None: silent.
    """
    data = train_data if train_data is not None else data_args.data
    folder, out = _check_run(model_args, preset_args, training_args, data)
    is_main = training_args.process_index == 0
    say = print_fn if (print_fn is not None and is_main) else (lambda text: None)
    if training_args.device.type == "cpu":  # before any work: the teacher's answers, the lengths, the steps
        _set_cpu_threads(model_args.threads, say)

    processor = _load_processor(folder, data_args)
    sources = as_sources(data)
    say(apply_tile_precedence(sources, processor.image_processor, data_args.max_tiles,
                              save_budget=data_args.save_max_tiles))
    if training_args.device.type == "cpu":
        _say_cpu_tile_cost(sources, processor, data_args, say)
    dtype = _torch_dtype(model_args.model_dtype)
    collator = InternVLXDataCollator(processor, max_length=data_args.max_length, packing=data_args.packing,
                                     loss_reduction=data_args.loss_reduction)
    teacher = answers = None
    if model_args.teacher is not None:  # before the data is indexed: the teacher may write its answers
        teacher, teacher_processor, sources, answers = _load_teacher(model_args, data_args, training_args, processor,
                                                                     sources, out, dtype, is_main, say)
        collator = DistillationCollator(collator, InternVLXDataCollator(
            teacher_processor, max_length=data_args.max_length, packing=data_args.packing))
    dataset = _index_data(sources, processor, data_args, training_args, is_main, say)
    eval_sets, eval_dataset = _read_eval_data(data_args, processor, say)

    _join_deepspeed_comm(training_args)
    model, quantization = _load_model(folder, dtype, model_args, preset_args, training_args)
    say(format_trainable(model, preset_args.preset))
    _complete_training_args(training_args, data_args)
    provenance = _provenance(model, dataset, processor, quantization, model_args, data_args, preset_args,
                             training_args)
    trainer_kwargs = dict(model=model, args=training_args, train_dataset=dataset, eval_dataset=eval_dataset,
                          data_collator=collator, processing_class=processor, started_from=folder,
                          provenance=provenance, callbacks=callbacks, lm_head_loss=model_args.lm_head_loss)
    if teacher is None:
        trainer = InternVLXTrainer(**trainer_kwargs)
    else:
        provenance["distillation"] = _describe_distillation(model_args, answers)
        trainer = InternVLXDistillationTrainer(**trainer_kwargs, teacher_model=teacher, beta=model_args.distill_beta,
                                               temperature=model_args.distill_temperature)
    if eval_sets is not None:
        from ..evaluation import EvaluationCallback

        trainer.add_callback(EvaluationCallback(trainer, eval_sets, data_name=data_args.eval_data,
                                                max_new_tokens=data_args.eval_max_new_tokens))
    _warn_if_fsdp_is_off(trainer, training_args, is_main)

    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if eval_sets is not None and training_args.eval_strategy == "no":
        trainer.evaluate()  # the final model's scores, before it is saved with them
    _finish(trainer, processor, dataset, collator, out, preset_args.preset in LORA_PRESETS,
            full_base=(folder, dtype) if quantization is not None else None, say=say)
    return TrainResult(trainer=trainer, dataset=dataset, output_dir=out, metrics=result.metrics)


def _check_run(model_args: ModelArguments, preset_args: PresetArguments, training_args: TrainingArguments,
               data: Any) -> tuple[Path, Path]:
    """(the --model folder, OUT), once everything that can be checked before any work is: a bad argument found
    after an hour of computing lengths or teacher answers would waste that hour."""
    folder = _check_model_folder(model_args.model)
    if preset_args.preset == "qlora":
        _check_qlora(training_args)
    if not data:
        raise ValueError("--data is required: an InternVL meta JSON or JSONL file (comma-separate several)")
    out = Path(training_args.output_dir)
    _check_output_dir(out, folder, data, training_args, model_args.overwrite_output_dir)
    _check_resume(training_args.resume_from_checkpoint, out)
    return folder, out


def _set_cpu_threads(requested: int | None, say: Callable[[str], None]) -> None:
    import torch

    threads, why = cpu_threads(requested)
    torch.set_num_threads(threads)
    say(f"CPU threads: {threads} ({why})")


def _say_cpu_tile_cost(sources: list, processor, data_args: DataArguments, say: Callable[[str], None]) -> None:
    """On a CPU, what a sample of the largest tile budget holds, said before any work: the tiles are what a CPU run's
    steps cost (4 steps of 13-tile samples of the tiny test fixture: 25.7 s and 3.0 GiB, at --max_tiles 2: 8.5 s and
    1.0 GiB), and the budget is the knob that keeps a trial run small."""
    budget = max((source.max_dynamic_patch for source in sources), default=processor.image_processor.max_tiles)
    thumbnail = 1 if getattr(processor.image_processor, "use_thumbnail", False) and budget > 1 else 0
    tokens = (budget + thumbnail) * processor.image_seq_length
    if tokens < 1024:  # (four InternVL tiles: the demo model's 112 is not worth a line)
        return
    say(f"On a CPU: up to {budget} tiles an image{' (+ the thumbnail)' if thumbnail else ''}, {tokens:,} image tokens "
        "a sample, each adding to every step's time and memory; --max_tiles 2 keeps a trial run small (training "
        "only: the saved processor keeps its max_tiles unless --save_max_tiles).")


def _load_processor(folder: Path, data_args: DataArguments):
    """The checkpoint's processor with --tiling applied (the saved processor tiles as training did), and --max_tiles
    checked (the budget is applied per dataset: `apply_tile_precedence`)."""
    from .. import InternVLXProcessor

    # The checkpoint's own tokenizer code (e.g. tokenization_internvlx.py written by `internvlx convert`) may be needed.
    processor = InternVLXProcessor.from_pretrained(folder, trust_remote_code=True)
    if data_args.tiling is not None:
        if data_args.tiling not in {mode.value for mode in TilingMode}:
            raise ValueError(f"--tiling must be one of {[mode.value for mode in TilingMode]}, got {data_args.tiling!r}")
        processor.image_processor.tiling = TilingMode(data_args.tiling)
    if data_args.max_tiles is not None and data_args.max_tiles < processor.image_processor.min_tiles:
        raise ValueError(f"--max_tiles {data_args.max_tiles} is below the processor's min_tiles "
                         f"{processor.image_processor.min_tiles}")
    return processor


def _torch_dtype(name: str) -> Any:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _index_data(sources: list, processor, data_args: DataArguments, training_args: TrainingArguments,
                is_main: bool, say: Callable[[str], None]) -> InternVLXDataset:
    dataset = InternVLXDataset(sources, processor, max_length=data_args.max_length, progress=is_main,
                               check=data_args.check_data, lengths=data_args.lengths,
                               num_proc=data_args.data_num_proc, cache_dir=data_args.lengths_cache_dir)
    say(str(dataset.summary))
    if data_args.group_by_length or training_args.train_sampling_strategy == "group_by_length":
        # The main process computes the lengths (or reads them from the cache) first; the others then read its cache.
        with training_args.main_process_first(local=False, desc="per-sample lengths"):
            dataset.lengths  # noqa: B018 - computed and cached on first use
        say(_describe_lengths(dataset))
    return dataset


def _read_eval_data(data_args: DataArguments, processor, say: Callable[[str], None]):
    """(the --eval_data sets to score, their rows for eval_loss), or (None, None) without --eval_data. Read and
    checked before the model loads: a bad held-out row stops the run now, not after the first epoch."""
    if not data_args.eval_data:
        return None, None
    from ..evaluation import read_eval_data
    from ..metrics import get_metric

    if data_args.eval_metric is not None:
        get_metric(data_args.eval_metric, "--eval_metric")
    if data_args.eval_max_new_tokens < 1:
        raise ValueError(f"--eval_max_new_tokens must be >= 1, got {data_args.eval_max_new_tokens}")
    # The meta file is read once; its sources give the prompts and answers to score and the rows of eval_loss.
    eval_sources = as_sources(data_args.eval_data)
    eval_sets = read_eval_data(eval_sources, processor, metric=data_args.eval_metric)
    eval_dataset = InternVLXDataset(eval_sources, processor, max_length=data_args.max_length, progress=False)
    say("Held-out data (--eval-data): " + ", ".join(f"{s.name} {len(s.samples):,} samples ({s.metric})"
                                                    for s in eval_sets))
    return eval_sets, eval_dataset


def _load_model(folder: Path, dtype: Any, model_args: ModelArguments, preset_args: PresetArguments,
                training_args: TrainingArguments):
    """(the model with the preset applied, the `qlora` base's quantization arguments or None)."""
    from .. import InternVLXForConditionalGeneration

    load_kwargs = {"dtype": dtype}
    if model_args.attn_implementation:
        load_kwargs["attn_implementation"] = model_args.attn_implementation
    quantization = None
    if preset_args.preset == "qlora":
        quantization = _qlora_load_kwargs(folder, dtype, training_args)
        load_kwargs.update(quantization)
    model = InternVLXForConditionalGeneration.from_pretrained(folder, **load_kwargs)
    if quantization is not None:
        from ..quantization import check_kept_modules

        check_kept_modules(model, quantization["quantization_config"].llm_int8_skip_modules)
    model.config.use_cache = False
    model = apply_preset(model, preset_args.preset, LoraSettings(
        r=preset_args.lora_r, alpha=preset_args.lora_alpha, dropout=preset_args.lora_dropout,
        target=preset_args.lora_target, projectors=preset_args.lora_projectors))
    return model, quantization


def _complete_training_args(training_args: TrainingArguments, data_args: DataArguments) -> None:
    if training_args.label_names is None:
        training_args.label_names = ["labels"]
    if data_args.group_by_length:
        training_args.train_sampling_strategy = "group_by_length"
    # A text-only batch leaves the vision tower without gradients; DDP must then look for unused parameters
    # (transformers only does so without gradient checkpointing). Reentrant checkpointing cannot, so it stays off.
    checkpointing_kwargs = getattr(training_args, "activation_checkpointing_kwargs", None) \
        or training_args.gradient_checkpointing_kwargs or {}
    reentrant = checkpointing_kwargs.get("use_reentrant")
    if training_args.ddp_find_unused_parameters is None and not reentrant:
        training_args.ddp_find_unused_parameters = True


def _provenance(model, dataset: InternVLXDataset, processor, quantization: dict[str, Any] | None,
                model_args: ModelArguments, data_args: DataArguments, preset_args: PresetArguments,
                training_args: TrainingArguments) -> dict[str, Any]:
    """The training run as internvlx_provenance.json and the model card record it."""
    lora = preset_args.preset in LORA_PRESETS
    return {
        "preset": preset_args.preset,
        "data": dataset.summary.to_dict(),
        "datasets": [s.hub_id for s in dataset.sources if s.hub_id],
        "learning_rate": training_args.learning_rate,
        "lora": describe_lora(model.peft_config["default"]) if lora else None,
        "quantization": _describe_quantization(quantization),
        "packing": data_args.packing,
        "max_length": data_args.max_length,
        "loss_reduction": data_args.loss_reduction,
        "lm_head_loss": model_args.lm_head_loss,
        "tiling": TilingMode(processor.image_processor.tiling).value,
        # the largest budget training tiled at (the saved processor's max_tiles is the source's unless
        # --save_max_tiles: `apply_tile_precedence`)
        "max_tiles": max((s.max_dynamic_patch or processor.image_processor.max_tiles for s in dataset.sources),
                         default=processor.image_processor.max_tiles),
    }


def _describe_distillation(model_args: ModelArguments, answers: dict[str, Any]) -> dict[str, Any]:
    return {"teacher": str(Path(model_args.teacher).expanduser().resolve()), "teacher_bits": model_args.teacher_bits,
            "beta": model_args.distill_beta, "temperature": model_args.distill_temperature,
            "teacher_answers": answers}


def _warn_if_fsdp_is_off(trainer: InternVLXTrainer, training_args: TrainingArguments, is_main: bool) -> None:
    requested = _fsdp_request(training_args)
    if requested and not trainer.is_fsdp_enabled and is_main:
        logger.warning("%s asks for FSDP, but it is not in effect: accelerate applies FSDP only to GPU (and other "
                       "accelerator) runs, so this run trains without sharding (%s).", requested,
                       "DDP" if training_args.world_size > 1 else "one process")


def _finish(trainer: InternVLXTrainer, processor, dataset: InternVLXDataset, collator, out: Path, lora: bool,
            full_base: tuple[Path, Any] | None, say: Callable[[str], None]) -> None:
    """Record what the run read, save OUT and print the closing notes."""
    peak = peak_memory(trainer.args.device)  # training's peak, before the merge and the save add theirs
    loaded = dataset.load_report(_status_of_all_ranks(dataset, trainer))
    if collator.skipped:
        loaded["dropped_by_collator"] = dict(collator.skipped)  # this process's only (rows given to it directly)
    trainer.provenance["data_loaded"] = loaded
    out.mkdir(parents=True, exist_ok=True)
    _save_final(trainer, processor, out, lora, full_base=full_base)
    say(_describe_loaded(loaded))
    say(peak)
    say(f"Saved {'the merged model to ' + str(out) + ' and the adapter to ' + str(out / 'adapter') if lora else out}")


def cpu_threads(requested: int | None = None) -> tuple[int, str]:
    """The torch threads of a CPU run and why: ``requested`` (``--threads``); else, with ``OMP_NUM_THREADS`` set,
    torch's count (which follows it); else torch's count (one per core) lowered to the cores that are free now, the
    cores this process may use minus the machine's 1-minute load average, at least 1.

    Measured (benchmarks/bench_cpu_threads.py): on a 2-core machine with another job on one core, torch's default of 2
    threads made every parallel region wait for a core the other job held, and the same steps took several times as
    long as with 1."""
    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, int(cores - load + 0.5))
    threads = max(1, min(torch.get_num_threads(), free))
    return threads, (f"{cores} cores, load average {load:.1f}; --threads N or OMP_NUM_THREADS sets another "
                     "count")


def _load_teacher(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
                  processor, sources: list, out: Path, dtype: Any, is_main: bool, say: Callable[[str], None]):
    """(teacher model, its processor, the data with the teacher's answers where --teacher_answers asks, the answers'
    report) for ``--teacher``. The main process writes the answers (OUT/teacher-answers/); the others read them."""
    import torch

    from .. import InternVLXForConditionalGeneration, InternVLXProcessor
    from ..quantization import quantized_loading_kwargs

    if model_args.lm_head_loss != "labelled":
        raise ValueError(f"--lm_head_loss {model_args.lm_head_loss} does not combine with --teacher: distillation "
                         "computes its own loss from the logits of the answer tokens (leave --lm_head_loss labelled)")
    for name, least in (("teacher_max_new_tokens", 1), ("teacher_batch_size", 1)):
        if getattr(model_args, name) < least:
            raise ValueError(f"--{name} must be >= {least}, got {getattr(model_args, name)}")
    teacher_folder = _check_model_folder(model_args.teacher)
    teacher_processor = InternVLXProcessor.from_pretrained(teacher_folder, trust_remote_code=True)
    # the teacher sees the images as the student does (the --tiling / --max_tiles overrides apply to both)
    teacher_processor.image_processor.tiling = processor.image_processor.tiling
    teacher_processor.image_processor.max_tiles = processor.image_processor.max_tiles
    load_kwargs: dict[str, Any] = {"dtype": dtype}
    if model_args.teacher_bits is not None:
        load_kwargs.update(quantized_loading_kwargs(teacher_folder, model_args.teacher_bits, dtype,
                                                    what="--teacher_bits"))
        load_kwargs["device_map"] = {"": training_args.device}
    teacher = InternVLXForConditionalGeneration.from_pretrained(teacher_folder, **load_kwargs)
    if model_args.teacher_bits is None:
        teacher.to(training_args.device)
    teacher.eval().requires_grad_(False)
    bits = f", {model_args.teacher_bits}-bit" if model_args.teacher_bits else ""
    say(f"Teacher: {teacher_folder} ({teacher.config.image_seq_length} visual tokens per tile{bits}); the student "
        f"learns its next-token distributions on the answer tokens (beta {model_args.distill_beta}, temperature "
        f"{model_args.distill_temperature})")
    from .distillation import TEACHER_ANSWERS_DIR, teacher_answers

    with training_args.main_process_first(local=False, desc="the teacher's answers"), torch.no_grad():
        answered, report = teacher_answers(
            teacher, teacher_processor, sources, out / TEACHER_ANSWERS_DIR, mode=model_args.teacher_answers,
            batch_size=model_args.teacher_batch_size, max_new_tokens=model_args.teacher_max_new_tokens,
            progress=is_main)
    what = "reused" if report["reused"] else f"written in {report['seconds']:.0f} s"
    say(f"Teacher's answers (--teacher_answers {model_args.teacher_answers}): {report['answered']:,} of "
        f"{report['rows']:,} rows ({report['generated']:,} distinct prompts), {what}"
        + (f", in {out / TEACHER_ANSWERS_DIR}" if any(s.annotation is not None for s in answered) else ""))
    return teacher, teacher_processor, answered, report


def peak_memory(device) -> str:
    """The run's peak memory so far, as the summary prints it: on a CUDA device what torch allocated at most
    (``torch.cuda.max_memory_allocated``: tensors, not the caching allocator's reserve), elsewhere the peak resident
    set size of this process (``ru_maxrss``: weights, data, activations, Python and libraries)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        used = torch.cuda.max_memory_allocated(device)
        return f"Peak memory: {used / 2**30:.2f} GiB allocated on {device} (torch.cuda.max_memory_allocated)"
    import sys

    try:
        import resource
    except ImportError:  # Windows
        return f"Peak memory: not measured on {sys.platform} ({device.type})"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss *= 1 if sys.platform == "darwin" else 1024
    return f"Peak memory: {rss / 2**30:.2f} GiB resident (peak RSS of this process, {device.type})"


def _check_qlora(training_args: TrainingArguments) -> None:
    """Stop a `qlora` run before any work when bitsandbytes is missing or a sharded backend is asked for."""
    from ..quantization import QuantizationUnavailable, require_bitsandbytes

    try:
        require_bitsandbytes("--preset qlora")
    except QuantizationUnavailable as error:
        raise ValueError(str(error)) from None
    if training_args.deepspeed or _fsdp_request(training_args):
        raise ValueError("--preset qlora trains on one device per process (DDP); it does not combine with "
                         "DeepSpeed or FSDP here: use --preset lora with those")


def _qlora_load_kwargs(folder: Path, dtype: Any, training_args: TrainingArguments) -> dict[str, Any]:
    """``from_pretrained`` arguments of the `qlora` base: 4-bit nf4 (projectors and lm_head kept, computing in the
    weights' dtype), placed whole on this process's device (bitsandbytes quantizes while loading, so it cannot be
    moved by the Trainer afterwards)."""
    from .. import InternVLXConfig
    from ..quantization import bitsandbytes_config

    config = InternVLXConfig.from_pretrained(folder)
    quantization_config = bitsandbytes_config(4, config, compute_dtype=None if dtype == "auto" else dtype)
    return {"quantization_config": quantization_config, "device_map": {"": training_args.device}}


def _describe_quantization(load_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    if load_kwargs is None:
        return None
    config = load_kwargs["quantization_config"]
    return {"bits": 4, "quant_type": config.bnb_4bit_quant_type, "double_quant": config.bnb_4bit_use_double_quant,
            "compute_dtype": str(config.bnb_4bit_compute_dtype).removeprefix("torch."),
            "kept_in_full_precision": list(config.llm_int8_skip_modules)}


def _describe_lengths(dataset: InternVLXDataset) -> str:
    origins = getattr(dataset, "lengths_origin", None)
    if not origins:
        return "Lengths: from the full check (--check_data)"
    parts = [f"{source.name} {origin}" for source, origin in zip(dataset.sources, origins)]
    return f"Lengths ({dataset.length_mode}): " + ", ".join(parts)


def _status_of_all_ranks(dataset: InternVLXDataset, trainer: InternVLXTrainer):
    """The per-row status of every process combined (elementwise max: a row any rank loaded counts once)."""
    import torch
    import torch.distributed as dist

    status = dataset._status
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    combined = status.to(trainer.accelerator.device, torch.int32)
    dist.all_reduce(combined, op=dist.ReduceOp.MAX)
    return combined.cpu().numpy()


def _describe_loaded(loaded: dict[str, Any]) -> str:
    line = (f"Rows read during training: {loaded['rows_read']:,} of {loaded['rows']:,}, "
            f"{loaded['truncated']:,} truncated")
    if loaded["skipped"]:
        reasons = ", ".join(f"{reason}: {count:,}" for reason, count in loaded["skipped"].items())
        line += f", skipped {sum(loaded['skipped'].values()):,} ({reasons}; see the warnings)"
    if loaded.get("dropped_by_collator"):
        line += f"; dropped by the collator: {loaded['dropped_by_collator']}"
    return line


def end_distributed() -> None:
    """Destroy torch.distributed's default process group after training (a no-op in a single process).

    Call it at the end of a torchrun script once nothing refers to the `TrainResult` any more, as `internvlx train`
    does. The DDP-wrapped model holds the group, so while it lives `destroy_process_group()` leaves the group's
    gloo worker threads running, and in interpreter teardown they can abort the process (SIGABRT, "terminate called
    without an active exception") after training has succeeded; accelerate's `end_training()` has the same gap.
    Default arguments hold groups too (`_release_default_arguments`). A DeepSpeed run's engine keeps its groups alive
    beyond this call (see `exit_if_gloo_threads_remain`).
    """
    import gc

    import torch.distributed as dist

    gc.collect()  # in case only reference cycles still hold the wrapped model
    if dist.is_available() and dist.is_initialized():
        _release_default_arguments(list(dist.distributed_c10d._world.pg_map))
        dist.destroy_process_group()


def _release_default_arguments(groups: list) -> None:
    """Point default arguments that hold one of ``groups`` at None.

    A default argument is evaluated when its module is imported: ``def barrier(self, group=GroupMember.WORLD)``
    (deepspeed.comm.torch's ``TorchBackend.barrier`` / ``monitored_barrier``; torch.distributed.nn.functional's
    collectives, imported with torch._dynamo) holds the default process group when the module is first imported
    while one exists, and keeps it, with its gloo threads, after `destroy_process_group()`. Where deepspeed is
    installed, a plain DDP run imports it during training, after the group is made. None is what those defaults
    hold when imported before any group exists (the default group, whichever it is then)."""
    import sys
    import types

    ids = {id(group) for group in groups}
    if not ids:
        return

    def release(function) -> None:  # only plain attribute reads: a module's __getattr__ can have side effects
        if isinstance(function, (classmethod, staticmethod)):
            function = function.__func__
        if not isinstance(function, types.FunctionType):
            return
        defaults = function.__defaults__
        if defaults and any(id(value) in ids for value in defaults):
            function.__defaults__ = tuple(None if id(value) in ids else value for value in defaults)
        keywords = function.__kwdefaults__
        if keywords and any(id(value) in ids for value in keywords.values()):
            function.__kwdefaults__ = {key: None if id(value) in ids else value for key, value in keywords.items()}

    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType):
            continue
        for value in list(module.__dict__.values()):
            if isinstance(value, type):
                for member in list(value.__dict__.values()):
                    release(member)
            else:
                release(value)


def gloo_threads() -> list[str] | None:
    """Names of this process's gloo worker threads (Linux: /proc/self/task); None where they cannot be listed."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return None
    names = []
    for task in os.listdir(tasks):
        try:
            with open(f"{tasks}/{task}/comm", encoding="utf-8") as handle:
                names.append(handle.read().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return [name for name in names if "gloo" in name]


def exit_if_gloo_threads_remain() -> None:
    """Leave the process now, status 0, when it is one of several launched ones (WORLD_SIZE > 1) and gloo worker
    threads outlived `end_distributed()`.

    After a DeepSpeed run, gloo threads outlive `end_distributed()` (DeepSpeed keeps its own process groups, e.g.
    ``deepspeed.utils.groups._WORLD_GROUP``, and clearing that one did not stop them), and they can abort the
    interpreter's teardown (SIGABRT after "Saved ...", seen in 1 of 8 ZeRO-3 runs here). Call it only when the
    work is done and written: logging is shut down and the standard streams flushed, then the process exits
    without that teardown.
    """
    import sys

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not gloo_threads():  # launched by torchrun / accelerate only
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


__all__ = ["ARGUMENT_CLASSES", "DataArguments", "ModelArguments", "PresetArguments", "TrainResult",
           "checkpointing_renames", "end_distributed", "exit_if_gloo_threads_remain", "gloo_threads",
           "cpu_threads", "parse_train_args", "peak_memory", "train"]
