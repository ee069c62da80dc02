"""`train()`: the `internvlx train` entry point, from parsed arguments to a saved checkpoint.

It loads an internvlx-hf checkpoint and its processor, indexes the data (`InternVLXDataset`: rows are read lazily,
and lengths computed only for ``--group_by_length``; skips are counted at the end), applies a preset
(`apply_preset`), trains with `InternVLXTrainer` (transformers' `Trainer`) and writes OUT so that it loads anywhere:
weights, config, remote code, processor and tokenizer; for `lora` and `qlora`, the PEFT adapter in ``OUT/adapter``
and the merged model in OUT (for `qlora` merged into the full-precision base, so OUT loads without bitsandbytes).
The final files are written to a hidden folder inside OUT and moved into place at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from ..data import InternVLXDataset, apply_tile_precedence, as_sources
from ..processing import TilingMode
from .arguments import check_model_folder, DataArguments, ModelArguments, PresetArguments
from .collator import InternVLXDataCollator
from .distillation import DistillationCollator, InternVLXDistillationTrainer
from .output import check_output_dir, check_resume, finish_run, run_provenance
from .presets import LORA_PRESETS, apply_preset, format_trainable, LoraSettings
from .runtime import fsdp_request, join_deepspeed_comm, set_cpu_threads, warn_if_fsdp_is_off
from .teacher import describe_distillation, load_teacher
from .trainer import InternVLXTrainer
from .vico import VICO_PRESETS, ViCOSettings, ViCOTrainer


@dataclass
class TrainResult:
    trainer: InternVLXTrainer
    dataset: InternVLXDataset
    output_dir: Path
    metrics: dict[str, Any]


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
        set_cpu_threads(model_args.threads, say)

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
        teacher, teacher_processor, sources, answers = load_teacher(model_args, data_args, training_args, processor,
                                                                    sources, out, dtype, is_main, say)
        collator = DistillationCollator(collator, InternVLXDataCollator(
            teacher_processor, max_length=data_args.max_length, packing=data_args.packing))
    dataset = _index_data(sources, processor, data_args, training_args, is_main, say)
    eval_sets, eval_dataset = _read_eval_data(data_args, processor, say)

    join_deepspeed_comm(training_args)
    model, quantization = _load_model(folder, dtype, model_args, preset_args, training_args)
    say(format_trainable(model, preset_args.preset))
    _complete_training_args(training_args, data_args)
    provenance = run_provenance(model, dataset, processor, quantization, model_args, data_args, preset_args,
                                training_args)
    trainer_kwargs = dict(model=model, args=training_args, train_dataset=dataset, eval_dataset=eval_dataset,
                          data_collator=collator, processing_class=processor, started_from=folder,
                          provenance=provenance, callbacks=callbacks, lm_head_loss=model_args.lm_head_loss)
    if preset_args.preset in VICO_PRESETS:
        settings = _vico_settings(preset_args)
        provenance["vico"] = vars(settings).copy()
        trainer = ViCOTrainer(**trainer_kwargs, settings=settings, router_only=preset_args.preset == "vico-router")
    elif teacher is None:
        trainer = InternVLXTrainer(**trainer_kwargs)
    else:
        provenance["distillation"] = describe_distillation(model_args, answers)
        trainer = InternVLXDistillationTrainer(**trainer_kwargs, teacher_model=teacher, beta=model_args.distill_beta,
                                               temperature=model_args.distill_temperature)
    if eval_sets is not None:
        from ..evaluation import EvaluationCallback

        trainer.add_callback(EvaluationCallback(trainer, eval_sets, data_name=data_args.eval_data,
                                                max_new_tokens=data_args.eval_max_new_tokens))
    warn_if_fsdp_is_off(trainer, training_args, is_main)

    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if eval_sets is not None and training_args.eval_strategy == "no":
        trainer.evaluate()  # the final model's scores, before it is saved with them
    finish_run(trainer, processor, dataset, collator, out, preset_args.preset in LORA_PRESETS,
               full_base=(folder, dtype) if quantization is not None else None, say=say)
    return TrainResult(trainer=trainer, dataset=dataset, output_dir=out, metrics=result.metrics)


def _check_run(model_args: ModelArguments, preset_args: PresetArguments, training_args: TrainingArguments,
               data: Any) -> tuple[Path, Path]:
    """(the --model folder, OUT), once everything that can be checked before any work is: a bad argument found
    after an hour of computing lengths or teacher answers would waste that hour."""
    folder = check_model_folder(model_args.model)
    if model_args.teacher is not None:  # an unconverted teacher would otherwise be found after the data is read
        check_model_folder(model_args.teacher, "--teacher")
    if preset_args.preset == "qlora":
        _check_qlora(training_args)
    if preset_args.preset in VICO_PRESETS:
        if model_args.teacher is not None:
            raise ValueError(f"--preset {preset_args.preset} takes its teacher from the model itself (every tile at "
                             "full resolution); drop --teacher")
        _vico_settings(preset_args)
    if not data:
        raise ValueError("--data is required: an InternVL meta JSON or JSONL file (comma-separate several)")
    out = Path(training_args.output_dir)
    check_output_dir(out, folder, data, training_args, model_args.overwrite_output_dir)
    check_resume(training_args.resume_from_checkpoint, out)
    return folder, out


def _vico_settings(preset_args: PresetArguments) -> ViCOSettings:
    """The ``--vico_*`` flags, checked."""
    settings = ViCOSettings(stage_split=preset_args.vico_stage_split, ce_weight=preset_args.vico_ce_weight,
                            label_share=preset_args.vico_label_share)
    settings.check()
    return settings


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


def _check_qlora(training_args: TrainingArguments) -> None:
    """Stop a `qlora` run before any work when bitsandbytes is missing or a sharded backend is asked for."""
    from ..quantization import QuantizationUnavailable, require_bitsandbytes

    try:
        require_bitsandbytes("--preset qlora")
    except QuantizationUnavailable as error:
        raise ValueError(str(error)) from None
    if training_args.deepspeed or fsdp_request(training_args):
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


def _describe_lengths(dataset: InternVLXDataset) -> str:
    origins = getattr(dataset, "lengths_origin", None)
    if not origins:
        return "Lengths: from the full check (--check_data)"
    parts = [f"{source.name} {origin}" for source, origin in zip(dataset.sources, origins)]
    return f"Lengths ({dataset.length_mode}): " + ", ".join(parts)
