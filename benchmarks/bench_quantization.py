"""4-bit / 8-bit loading (bitsandbytes) of the packaged demo model (PVTC + LVTC) against float32: memory, logit
deviation and answers per mode (docs/quantization.md).

Modes: float32; 8-bit LLM.int8() and 4-bit nf4 (double quantization) as `internvlx chat --load-in-8bit/4bit` load
them (`internvlx_hf.quantization.bitsandbytes_config`: projectors and lm_head kept in float32); the same with the
vision tower kept too (``keep_vision_tower=True``); and with transformers' default skip list only (everything but
lm_head quantized, projectors included), which is what a bare `BitsAndBytesConfig(load_in_8bit=True)` does.

Per mode: the model footprint (`get_memory_footprint`: parameters and buffers), the Linear weights quantized, the
last-token logits of every held-out prompt against float32's (cosine: mean and minimum; top-1 agreement), the
demo's five questions (`internvlx_hf.demo.demo_samples`) and exact match on a held-out synthetic set drawn like the
demo's training data (``--n`` samples, all five tasks, a seed of its own). Writes
benchmarks/results/quantization.json and .md.

    python benchmarks/bench_quantization.py            # about 12 s on 2 CPU cores (2026-11-23)
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from internvlx_hf.bench.harness import Progress, environment, time_call, write_results, write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HELD_OUT_SEED = 20261123  # not a training seed of the demo model (scripts/make_demo_model.py uses 0 and 1)

# name -> (bits, keep_vision_tower, transformers' default skip list only)
MODES = {
    "float32": (None, False, False),
    "8-bit": (8, False, False),
    "8-bit, vision tower kept": (8, True, False),
    "8-bit, projectors quantized": (8, False, True),
    "4-bit nf4": (4, False, False),
    "4-bit nf4, vision tower kept": (4, True, False),
    "4-bit nf4, projectors quantized": (4, False, True),
}


def load(mode: str):
    from transformers import BitsAndBytesConfig

    from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration
    from internvlx_hf.demo import demo_model_dir
    from internvlx_hf.quantization import bitsandbytes_config, check_kept_modules

    bits, keep_vision, default_skips = MODES[mode]
    if bits is None:
        return InternVLXForConditionalGeneration.from_pretrained(demo_model_dir()).eval()
    if default_skips:
        quantization = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
                        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True))
    else:
        quantization = bitsandbytes_config(bits, InternVLXConfig.from_pretrained(demo_model_dir()),
                                           keep_vision_tower=keep_vision)
    model = InternVLXForConditionalGeneration.from_pretrained(demo_model_dir(), quantization_config=quantization,
                                                              device_map="cpu").eval()
    if not default_skips:
        check_kept_modules(model, quantization.llm_int8_skip_modules)
    return model


def last_token_logits(model, processor, records, root, batch_size: int = 50):
    import torch
    from PIL import Image

    from internvlx_hf.demo.recipe import prompt_messages

    rows = []
    for start in range(0, len(records), batch_size):
        batch = records[start: start + batch_size]
        images = []
        for record in batch:
            with Image.open(root / record["image"]) as image:
                images.append([image.convert("RGB")])
        prompts = [processor.apply_chat_template(
            prompt_messages(r["conversations"][-2]["value"].replace("<image>\n", "", 1)), tokenize=False,
            add_generation_prompt=True) for r in batch]
        inputs = processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
        with torch.inference_mode():
            rows.append(model(**inputs).logits[:, -1].float())
    return torch.cat(rows)


def measure(mode: str, processor, records, root, meta, reference) -> dict:
    import torch

    from internvlx_hf.demo import answer, demo_samples
    from internvlx_hf.demo.recipe import evaluate
    from internvlx_hf.quantization import quantized_linear_names

    loaded = []
    load_s = time_call(lambda: loaded.append(load(mode)), warmup=0, repeats=1)["median_s"]
    model = loaded[0]
    result = {"mode": mode, "bits": MODES[mode][0], "load_s": round(load_s, 2),
              "footprint_bytes": model.get_memory_footprint()}
    names = quantized_linear_names(model) if MODES[mode][0] else []
    result["quantized_linears"] = len(names)
    result["kept_in_full_precision"] = (list(model.config.quantization_config.llm_int8_skip_modules or [])
                                        if MODES[mode][0] and not MODES[mode][2] else None)
    try:
        logits = last_token_logits(model, processor, records, root)
    except Exception as error:  # noqa: BLE001 - the failing mode is a result of the benchmark
        result["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
        return result
    cosine = torch.nn.functional.cosine_similarity(logits, reference if reference is not None else logits, dim=-1)
    base = reference if reference is not None else logits
    result.update({
        "logit_cosine_mean": float(cosine.mean()), "logit_cosine_min": float(cosine.min()),
        "top1_agreement": float((logits.argmax(-1) == base.argmax(-1)).float().mean()),
        "max_abs_logit_diff": float((logits - base).abs().max()),
    })
    samples = demo_samples()
    demo = [answer(model, processor, s.image, s.question).answer for s in samples]
    result["demo_answers"] = demo
    result["demo_right"] = sum(a == s.expected for a, s in zip(demo, samples))
    scored = evaluate(model, processor, meta, progress=False)
    result["held_out_accuracy"] = scored["accuracy"]
    result["held_out_right"] = sum(round(acc * n) for acc, n in zip(scored["accuracy"].values(),
                                                                    _task_counts(records).values()))
    result["held_out_n"] = scored["n"]
    result["held_out_s"] = round(scored["eval_s"], 2)
    result["_logits"] = logits
    return result


def _task_counts(records) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        counts[record["task"]] = counts.get(record["task"], 0) + 1
    return dict(sorted(counts.items()))


def markdown(record: dict) -> str:
    rows = record["modes"]
    full = next(r for r in rows if r["bits"] is None)["footprint_bytes"]
    lines = [f"Quantized loading of the demo model (PVTC + LVTC, {record['parameters']:,} parameters), "
             f"{record['held_out_n']} held-out prompts; bitsandbytes {record['bitsandbytes']}, "
             f"transformers {record['transformers']}, {record['device']}",
             "",
             "| mode | footprint (MiB) | vs float32 | Linears quantized | last-token logits cosine vs float32: mean "
             "(min) | top-1 agreement | demo questions right | held-out exact match |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        size = f"{row['footprint_bytes'] / 2**20:.2f} | {row['footprint_bytes'] / full:.2f}x"
        if "error" in row:
            lines.append(f"| {row['mode']} | {size} | {row['quantized_linears']} | fails: {row['error'][:110]} "
                         "| | | |")
            continue
        lines.append(f"| {row['mode']} | {size} | {row['quantized_linears']} | {row['logit_cosine_mean']:.4f} "
                     f"({row['logit_cosine_min']:.4f}) | {row['top1_agreement']:.3f} | {row['demo_right']}/5 | "
                     f"{row['held_out_right']}/{row['held_out_n']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="held-out samples (default 100: 20 per task)")
    parser.add_argument("--out", default=str(RESULTS / "quantization"), help="output path without the suffix")
    args = parser.parse_args(argv)

    from internvlx_hf.quantization import hide_optional_kernel_note, require_bitsandbytes

    hide_optional_kernel_note()
    require_bitsandbytes("bench_quantization.py")
    import bitsandbytes
    import torch
    import transformers
    from transformers import AutoProcessor

    from internvlx_hf.demo import demo_model_dir
    from internvlx_hf.demo.recipe import read_records
    from internvlx_hf.training.synthetic_vqa import generate_dataset

    processor = AutoProcessor.from_pretrained(demo_model_dir(), trust_remote_code=True)
    with tempfile.TemporaryDirectory() as tmp:
        meta = generate_dataset(Path(tmp) / "held_out", n=args.n, seed=HELD_OUT_SEED, image_size=112,
                                system_message="", name="held_out")
        records, root = read_records(meta)
        rows, reference = [], None
        progress = Progress(len(MODES), "quantization")
        for mode in MODES:
            row = measure(mode, processor, records, root, meta, reference)
            progress.step(mode)
            logits = row.pop("_logits", None)
            if mode == "float32":
                reference = logits
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "demo_answers"}), flush=True)
    from internvlx_hf import InternVLXForConditionalGeneration

    full = InternVLXForConditionalGeneration.from_pretrained(demo_model_dir())
    parameters = sum(p.numel() for p in full.parameters())
    record = {
        "benchmark": "bench_quantization.py", "date": datetime.date.today().isoformat(),
        "device": f"CPU ({torch.get_num_threads()} threads)", "environment": environment("cpu"),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__, "parameters": parameters,
        "held_out_n": len(records), "held_out_seed": HELD_OUT_SEED, "modes": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results(out.with_suffix(".json"), record)
    write_text(out.with_suffix(".md"), markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
