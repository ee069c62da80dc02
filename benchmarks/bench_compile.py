"""Decoding speed with torch.compile, plain and LVTC (docs/benchmarks.md, "Compile").

One small randomly initialised InternVL-X model per variant (Llama LLM of ``--hidden`` width and ``--layers`` depth,
a 2-layer ViT, 56 px tiles, 4 LR tokens per tile, 16 HR tokens from LVTC's expand layer), one prompt of ``--tiles``
tiles, greedy decoding. Per variant, in one process:

- plain: eager with transformers' default dynamic cache, eager with a static cache, and generate()'s own compiled
  decoding step (static cache, ``CompileConfig(fullgraph=True)``: the transformers recipe);
- LVTC: eager with its dynamic cache, ``model.forward = torch.compile(model.forward)`` with the dynamic cache (no
  ``fullgraph``: the prefill's layout step runs eagerly), eager with its static cache (`InternVLXLVTCStaticCache`:
  layers ``< k`` sized for the short layout, layers ``>= k`` for the long one), and generate()'s own compiled decoding
  step with that static cache (``CompileConfig(fullgraph=True)``, the prefill eager).

Decode ms/token is the slope between runs of ``--short`` and ``--long`` new tokens (the prefill and generate()'s
set-up cancel out), the median of ``--runs`` rounds; the candidates run round-robin so that load on the machine hits
them alike. Compilation happens in an untimed warm-up; it is reported separately (seconds of the first compiled run).
Every compiled run's tokens are checked against eager's.

    python benchmarks/bench_compile.py [--hidden 256 --layers 8 --runs 5 --threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "benchmarks" / "results"

from internvlx_hf.bench.harness import (environment, results, time_call, time_interleaved,  # noqa: E402
                                        write_results, write_text)

IMAGE_TOKEN_ID = 100


def build(args, lvtc: bool):
    from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration

    text = dict(model_type="llama", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=2,
                vocab_size=512, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                  patch_size=14)
    lvtc_config = {"expand_layer": args.layers * 3 // 4, "num_lr_projectors": 1} if lvtc else None
    config = InternVLXConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                             projector_type="mlp", lvtc=lvtc_config, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = InternVLXForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    return model


def prompt(args):
    g = torch.Generator().manual_seed(0)
    ids = [1] + torch.randint(3, 90, (16,), generator=g).tolist() + [IMAGE_TOKEN_ID] * (4 * args.tiles) + [5, 6, 7]
    ids = torch.tensor([ids])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(args.tiles, 3, 56, 56, generator=g))


def candidates(args):
    """name -> (variant, model, generate kwargs)."""
    from transformers import CompileConfig

    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # generate() compiles on accelerators only unless told
    plain, lvtc = build(args, lvtc=False), build(args, lvtc=True)
    lvtc_compiled = build(args, lvtc=True)
    lvtc_compiled.forward = torch.compile(lvtc_compiled.forward)
    return {
        "plain eager (dynamic cache)": ("plain", plain, {}),
        "plain eager (static cache)": ("plain", plain, {"cache_implementation": "static", "disable_compile": True}),
        "plain compiled (static cache, fullgraph)": ("plain", plain, {"cache_implementation": "static",
                                                                      "compile_config": compile_config}),
        "lvtc eager (dynamic cache)": ("lvtc", lvtc, {}),
        "lvtc compiled (dynamic cache)": ("lvtc", lvtc_compiled, {}),
        "lvtc eager (static cache)": ("lvtc", lvtc, {"cache_implementation": "static", "disable_compile": True}),
        "lvtc compiled (static cache, fullgraph)": ("lvtc", lvtc, {"cache_implementation": "static",
                                                                   "compile_config": compile_config}),
    }


@torch.no_grad()
def run(model, inputs, extra, new_tokens):
    out = model.generate(**inputs, **extra, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--long", type=int, default=40)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "compile.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inputs = prompt(args)
    cands = candidates(args)

    compile_s, tokens = {}, {}
    for name, (_, model, extra) in cands.items():  # warm-up: compiles, and every length the timed runs use
        first = time_call(lambda: tokens.__setitem__(name, run(model, inputs, extra, args.long)), warmup=0, repeats=1)
        compile_s[name] = round(first["median_s"], 2)
        run(model, inputs, extra, args.short)
    for name, (variant, _, _) in cands.items():
        reference = tokens[f"{variant} eager (dynamic cache)"]
        if tokens[name] != reference:
            raise SystemExit(f"{name}: tokens differ from eager: {tokens[name]} vs {reference}")

    # every candidate at both lengths, round-robin: each round's slope is (long - short) / (tokens between them)
    calls = [lambda m=model, e=extra, n=n: run(m, inputs, e, n)
             for _, model, extra in cands.values() for n in (args.short, args.long)]
    timings = iter(time_interleaved(calls, warmup=0, repeats=args.runs))
    slopes = {name: [1000 * (long - short) / (args.long - args.short)
                     for short, long in zip(next(timings)["times_s"], next(timings)["times_s"])] for name in cands}

    rows = []
    for name, (variant, _, _) in cands.items():
        ms = statistics.median(slopes[name])
        base = statistics.median(slopes[f"{variant} eager (dynamic cache)"])
        rows.append({"candidate": name, "decode_ms_per_token": round(ms, 3), "min_ms": round(min(slopes[name]), 3),
                     "speed_up_vs_eager": round(base / ms, 2), "first_run_s": compile_s[name],
                     "tokens_equal_eager": True})
    settings = vars(args) | {"out": str(args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out)}
    result = results("compile", rows, settings, environment("cpu", "float32"))
    write_results(args.out, result)
    lines = [f"Decode ms/token, CPU, {args.threads} thread(s), LLM {args.layers} x {args.hidden}, {args.tiles} tiles "
             f"(torch {torch.__version__}, transformers {result['environment']['transformers']})", "",
             "| candidate | decode ms/token (median) | min | speed-up vs eager | first run (s, compiles) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['candidate']} | {r['decode_ms_per_token']} | {r['min_ms']} | {r['speed_up_vs_eager']}x | "
              f"{r['first_run_s']} |" for r in rows]
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
