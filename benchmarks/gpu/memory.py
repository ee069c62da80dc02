"""Peak GPU memory and throughput of `internvlx train` per preset, model and batch size: the table users plan with.

For each model (plain-256, plain-1024, LVTC with `hr_scale="rms"`, all from one converted checkpoint) and preset
(`stage1`, `stage2`, `lora`), trains a few steps with the pieces `internvlx train` uses (InternVLXDataset, the
collator, `apply_preset`, InternVLXTrainer; AdamW, bf16 autocast on float32 weights, activation checkpointing, SDPA)
on samples of one 1344x896 image each (3x2 tiles + the thumbnail = 7 tiles) and a short question and answer, at
batch 1, 2 and 4, then doubles the batch until it no longer fits: the largest batch that fits is the last power of
two that trained (bounded by --max-batch). Peak memory is `torch.cuda.max_memory_allocated` over the run;
samples/s is timed over the steps after the first.

    python benchmarks/gpu/memory.py CONVERTED --json memory.json              # a converted checkpoint folder
    python benchmarks/gpu/memory.py CONVERTED --presets lora --models-dtype bfloat16 --json memory-8b-lora.json
    python benchmarks/gpu/memory.py CONVERTED --device cpu --max-batch 2 --steps 2   # the code path on a CPU

`benchmarks/gpu/finetune.sh` makes CONVERTED (InternVL2-2B dimensions); on a machine without a GPU this only checks
the path (CPU memory is not measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import TrainerCallback, TrainingArguments

from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor
from internvlx_hf.data import InternVLXDataset
from internvlx_hf.training import InternVLXDataCollator, InternVLXTrainer
from internvlx_hf.training.presets import LoraSettings, apply_preset

MODELS = ("plain-256", "plain-1024", "lvtc")
PRESETS = ("stage1", "stage2", "lora")


class StepTimer(TrainerCallback):
    def __init__(self):
        self.starts, self.ends = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def rows(folder: Path, n: int) -> list[dict]:
    image = folder / "page.png"
    if not image.exists():
        Image.new("RGB", (1344, 896), (200, 180, 160)).save(image)
    return [{"image": str(image), "conversations": [
        {"from": "human", "value": f"<image>\nWhat is written in box {i}?"}, {"from": "gpt", "value": f"box {i}"}]}
        for i in range(n)]


def load(folder: str, name: str, dtype: torch.dtype, device: str):
    """The converted checkpoint as plain-256, plain-1024 (the same weights, a new MLP projector for 4x the tokens)
    or LVTC (layers from 3/4 of the depth on the 1024-token layout, hr_scale="rms")."""
    processor = InternVLXProcessor.from_pretrained(folder, trust_remote_code=True)
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if name == "plain-1024":
        kwargs.update(downsample_ratio=1.0, image_seq_length=1024, ignore_mismatched_sizes=True)
    if name == "lvtc":
        config = InternVLXForConditionalGeneration.config_class.from_pretrained(folder)
        depth = config.get_text_config().num_hidden_layers
        kwargs["lvtc"] = {"expand_layer": depth * 3 // 4, "hr_scale": "rms"}
    model = InternVLXForConditionalGeneration.from_pretrained(folder, **kwargs).to(device)
    processor.image_seq_length = model.config.image_seq_length
    model.config.use_cache = False
    return model, processor


def probe(folder: str, name: str, preset: str, batch: int, args) -> dict:
    model, processor = load(folder, name, getattr(torch, args.models_dtype), args.device)
    model = apply_preset(model, preset, LoraSettings())
    with tempfile.TemporaryDirectory() as tmp:
        data = rows(Path(tmp), batch * (args.steps + 1))
        dataset = InternVLXDataset(data, processor, progress=False)
        collator = InternVLXDataCollator(processor, max_length=None)
        training = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch, max_steps=args.steps, learning_rate=1e-5,
            bf16=args.device == "cuda", use_cpu=args.device == "cpu", gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="no", report_to="none",
            disable_tqdm=True, logging_strategy="no", remove_unused_columns=False, dataloader_num_workers=2)
        timer = StepTimer()
        trainer = InternVLXTrainer(model=model, args=training, train_dataset=dataset, data_collator=collator,
                                   processing_class=processor, callbacks=[timer])
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tiles = int(collator([dataset[0]])["pixel_values"].shape[0])  # 3x2 + thumbnail under the default budget
        record = {"model": name, "preset": preset, "batch": batch, "tiles_per_sample": tiles,
                  "model_dtype": args.models_dtype}
        try:
            trainer.train()
            seconds = [end - start for start, end in zip(timer.starts[1:], timer.ends[1:])]
            record.update(ok=True, samples_per_s=batch * len(seconds) / sum(seconds) if seconds else None,
                          peak_gib=torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None)
        except torch.OutOfMemoryError:
            record.update(ok=False, error="out of memory")
        finally:
            del trainer, model
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return record


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a converted internvlx-hf checkpoint folder (plain, MLP projector)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (default all three)")
    parser.add_argument("--models-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype the weights load in (float32 + bf16 autocast, as --model_dtype float32 --bf16)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per probe (default 4)")
    parser.add_argument("--max-batch", type=int, default=64, help="largest batch tried (default 64)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = []
    for name in args.models.split(","):
        for preset in args.presets.split(","):
            batch, fits = 1, []
            while batch <= args.max_batch:
                record = probe(args.checkpoint, name, preset, batch, args)
                results.append(record)
                print(json.dumps(record), flush=True)
                if not record["ok"]:
                    break
                fits.append(batch)
                batch *= 2
            results.append({"model": name, "preset": preset, "largest_batch_that_fits": max(fits) if fits else 0,
                            "bounded_by_max_batch": bool(fits) and max(fits) * 2 > args.max_batch})
            if args.json:
                tmp = args.json.with_name(args.json.name + ".tmp")
                tmp.write_text(json.dumps(results, indent=1) + "\n")
                os.replace(tmp, args.json)
    return results


if __name__ == "__main__":
    main()
