"""Where a training run writes: OUT checked before training (a previous run's files, a resumed checkpoint), and the
final files (weights, config, remote code, processor; for LoRA and QLoRA the adapter in ``OUT/adapter`` and the
merged model) written to a hidden folder inside OUT and moved into place at the end, with the run's provenance."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from ..atomic import remove_stale_temporaries, temp_prefix
from ..data import InternVLXDataset
from ..processing import TilingMode
from .arguments import DataArguments, ModelArguments, PresetArguments
from .presets import LORA_PRESETS, describe_lora, ignore_peft_checkpointing_warning
from .runtime import peak_memory, status_of_all_ranks
from .trainer import checkpoint_problem, InternVLXTrainer, last_complete_checkpoint


FINAL_STAGING = "internvlx-final"  # OUT/.internvlx-final.tmp-HOST-PID.*: the final files, before they move into OUT


def check_output_dir(out: Path, folder: Path, data: Any, training_args: TrainingArguments,
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


def check_resume(checkpoint: str | None, out: Path) -> None:
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


def run_provenance(model, dataset: InternVLXDataset, processor, quantization: dict[str, Any] | None,
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


def finish_run(trainer: InternVLXTrainer, processor, dataset: InternVLXDataset, collator, out: Path, lora: bool,
               full_base: tuple[Path, Any] | None, say: Callable[[str], None]) -> None:
    """Record what the run read, save OUT and print the closing notes."""
    peak = peak_memory(trainer.args.device)  # training's peak, before the merge and the save add theirs
    loaded = dataset.load_report(status_of_all_ranks(dataset, trainer))
    if collator.skipped:
        loaded["dropped_by_collator"] = dict(collator.skipped)  # this process's only (rows given to it directly)
    trainer.provenance["data_loaded"] = loaded
    out.mkdir(parents=True, exist_ok=True)
    _save_final(trainer, processor, out, lora, full_base=full_base)
    say(_describe_loaded(loaded))
    say(peak)
    say(f"Saved {'the merged model to ' + str(out) + ' and the adapter to ' + str(out / 'adapter') if lora else out}")


def _describe_loaded(loaded: dict[str, Any]) -> str:
    line = (f"Rows read during training: {loaded['rows_read']:,} of {loaded['rows']:,}, "
            f"{loaded['truncated']:,} truncated")
    if loaded["skipped"]:
        reasons = ", ".join(f"{reason}: {count:,}" for reason, count in loaded["skipped"].items())
        line += f", skipped {sum(loaded['skipped'].values()):,} ({reasons}; see the warnings)"
    if loaded.get("dropped_by_collator"):
        line += f"; dropped by the collator: {loaded['dropped_by_collator']}"
    return line


def _describe_quantization(load_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    if load_kwargs is None:
        return None
    config = load_kwargs["quantization_config"]
    return {"bits": 4, "quant_type": config.bnb_4bit_quant_type, "double_quant": config.bnb_4bit_use_double_quant,
            "compute_dtype": str(config.bnb_4bit_compute_dtype).removeprefix("torch."),
            "kept_in_full_precision": list(config.llm_int8_skip_modules)}
