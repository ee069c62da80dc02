"""How far bfloat16 moves the demo model's logits, with and without LVTC's KV cache, on CPU or a GPU.

For every question of `internvlx_hf.demo.demo_samples` (seeds 0-7, five tasks) at 224x112 (2 tiles + thumbnail; the
demo model was trained on one tile) it runs 8 greedy bfloat16 steps with the cache, past the end of the answer, and
compares each step's logits, by relative error ``||a - b|| / ||b||``, with:

- ``ec``: a float32 forward without a cache over the same tokens (what tests/test_cuda.py bounds by 3e-2);
- ``eu``: a bfloat16 forward without a cache (bfloat16's rounding alone, no cache involved);
- ``ecu``: cached against uncached bfloat16 (the cache's own share).

It splits the steps into those of a right answer (up to its end-of-turn token) and the rest (wrong answers, steps
past the end), and writes every row and the maxima to benchmarks/results/bf16-noise.json. The helpers are
tests/test_cuda.py's own (`demo_inputs`, `generate`, `rel_err`), so the numbers are measured as the test measures.

    python benchmarks/bench_bf16_noise.py [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bf16-noise.json"))
    args = parser.parse_args(argv)
    os.environ["INTERNVLX_CUDA_TESTS_DEVICE"] = args.device
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "src"))
    import torch
    import test_cuda as helpers

    from internvlx_hf.bench.harness import Progress, environment, write_text
    from internvlx_hf.demo import demo_samples, load_demo_model

    torch.set_num_threads(args.threads)
    model, processor = load_demo_model()
    model.to(args.device)
    tokenizer = processor.tokenizer
    rows, progress = [], Progress(args.seeds, "bf16 noise")
    with torch.no_grad():
        for seed in range(args.seeds):
            for task, sample in enumerate(demo_samples(seed=seed)):
                inputs = helpers.demo_inputs(processor, [sample], sizes=[(224, 112)])
                tokens, logits = helpers.generate(model.to(torch.bfloat16), processor, inputs, steps=8, stop=False)
                seq = torch.cat([inputs["input_ids"], tokens], 1)
                kwargs = dict(input_ids=seq, num_patches=inputs["num_patches"], use_cache=False)
                full16 = model(pixel_values=inputs["pixel_values"].bfloat16(), **kwargs).logits.float()
                full32 = model.float()(pixel_values=inputs["pixel_values"].float(), **kwargs).logits.float()
                first = inputs["input_ids"].shape[1] - 1
                answer = tokenizer.decode(tokens[0])
                right = answer.startswith(sample.expected + "<|im_end|>")
                answer_steps = len(tokenizer(sample.expected, add_special_tokens=False)["input_ids"])
                for step, cached in enumerate(logits):
                    at = first + step
                    rows.append({"seed": seed, "task": sample.task, "step": step, "answer": answer,
                                 "expected": sample.expected, "in_right_answer": right and step <= answer_steps,
                                 "ec": helpers.rel_err(cached[0], full32[0, at]),
                                 "eu": helpers.rel_err(full16[0, at], full32[0, at]),
                                 "ecu": helpers.rel_err(cached[0], full16[0, at])})
            progress.step(f"seed {seed}")
    summary = {}
    for part, keep in (("steps of right answers", True), ("other steps", False)):
        chosen = [r for r in rows if r["in_right_answer"] is keep]
        summary[part] = {"steps": len(chosen), **{f"max_{k}": max(r[k] for r in chosen) for k in ("ec", "eu", "ecu")}}
    print("| steps | n | max ec (cached bf16 vs fp32) | max eu (uncached bf16 vs fp32) | max ecu (cached vs "
          "uncached bf16) |")
    print("|---|--:|--:|--:|--:|")
    for part, v in summary.items():
        print(f"| {part} | {v['steps']} | {v['max_ec']:.4f} | {v['max_eu']:.4f} | {v['max_ecu']:.4f} |")
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    write_text(args.out, json.dumps({"device": device, "torch": torch.__version__, "threads": args.threads,
                                     "size": [224, 112], "environment": environment(args.device, "bfloat16"),
                                     "summary": summary, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
