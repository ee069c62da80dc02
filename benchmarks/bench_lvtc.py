"""LVTC efficiency at InternVL2-2B dimensions (random weights): FLOPs and CPU prefill time.

Models (InternViT-300M + a 24-layer, 2048-wide, 16-head / 8-kv-head LLM, vocab 92553):
  plain-256   projector at downsample 0.5 (256 tokens per 448px tile)
  plain-1024  projector at downsample 1.0 (1024 tokens per tile)
  lvtc-256->1024  LVTC, 256 tokens for layers < k=18, 1024 from layer 18 (HR projector + 2D upsampling)
Input: one 448px tile and 64 text tokens; prefill with logits for the last token only (`logits_to_keep=1`).

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (matmul/attention FLOPs; elementwise ops are not
counted). Wall time is the median of `--runs` rounds after one warm-up; each round times the three models
one after the other (they share the ViT, LLM and head), so changes in machine load hit all three alike.

    python benchmarks/bench_lvtc.py            # the table in the README
    python benchmarks/bench_lvtc.py --tiny     # a seconds-long smoke run with a tiny model
    python benchmarks/bench_lvtc.py --device cuda --dtype bfloat16 --train   # GPU: prefill + train step
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration
from internvlx_hf.modeling.modeling_internvlx import build_projector

IMAGE_TOKEN_ID = 92546


def build_all(tiny: bool, dtype: torch.dtype, device: str, attn: str) -> dict:
    """The three models, sharing one ViT, one LLM and one LM head (so they fit in memory together and can be
    timed round-robin): plain-1024's projector doubles as LVTC's HR projector (same type and ratio)."""
    text = {} if not tiny else dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    vision = {} if not tiny else dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2)
    common = dict(text_config=text or None, vision_config=vision or None, attn_implementation=attn,
                  image_token_id=999 if tiny else IMAGE_TOKEN_ID)
    depth = 8 if tiny else 24
    configs = {
        "plain-256": InternVLXConfig(**common),
        "plain-1024": InternVLXConfig(**common, downsample_ratio=1.0),
        "lvtc-256->1024": InternVLXConfig(**common, lvtc={"expand_layer": depth * 3 // 4}),
    }
    torch.manual_seed(0)
    with torch.device(device):
        base = InternVLXForConditionalGeneration(configs["plain-256"])
        hr_projector = build_projector(configs["plain-1024"], "mlp", 1.0)
    models = {"plain-256": base}
    for kind in ("plain-1024", "lvtc-256->1024"):
        with torch.device("meta"):
            model = InternVLXForConditionalGeneration(configs[kind])
        model.model.vision_tower = base.model.vision_tower
        model.model.language_model = base.model.language_model
        model.lm_head = base.lm_head
        if kind == "plain-1024":
            model.model.multi_modal_projector = hr_projector
        else:
            model.model.multi_modal_projector = base.model.multi_modal_projector
            model.model.lvtc_hr_projector = hr_projector
        assert not any(p.is_meta for p in model.parameters()), kind
        models[kind] = model
    return {kind: model.to(dtype).eval() for kind, model in models.items()}


def inputs(model, n_text: int, device: str, dtype: torch.dtype):
    config = model.config
    text = torch.randint(3, 1000, (n_text,), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([text[:8], torch.full((config.image_seq_length,), config.image_token_id), text[8:]])[None]
    pixel_values = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    return ids.to(device), pixel_values.to(device, dtype)


def prefill(model, ids, pixel_values):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixel_values, logits_to_keep=1, use_cache=True).logits


def train_step(model, ids, pixel_values):
    model.train()
    out = model(input_ids=ids, pixel_values=pixel_values, labels=ids, use_cache=False)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="tiny model, for a quick smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    parser.add_argument("--train", action="store_true", help="also time one training step (forward+backward)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    models = build_all(args.tiny, dtype, args.device, args.attn)
    batches = {kind: inputs(model, args.text_tokens, args.device, dtype) for kind, model in models.items()}
    flops = {}
    for kind, model in models.items():
        with FlopCounterMode(display=False) as counter:
            prefill(model, *batches[kind])
        flops[kind] = counter.get_total_flops()
        prefill(model, *batches[kind])  # warm-up
    # Round-robin: every round times each model once, so drift in machine load hits all three alike.
    times = {kind: [] for kind in models}
    train_times = {kind: [] for kind in models}
    for _ in range(args.runs):
        for kind, model in models.items():
            times[kind].append(timed(lambda: prefill(model, *batches[kind]), args.device))
            if args.train:
                train_times[kind].append(timed(lambda: train_step(model, *batches[kind]), args.device))
    rows = [
        (kind, batches[kind][0].shape[1], flops[kind], statistics.median(times[kind]),
         statistics.median(train_times[kind]) if args.train else None)
        for kind in models
    ]

    ref_flops, ref_time = rows[1][2], rows[1][3]
    print(f"device={args.device} dtype={args.dtype} attn={args.attn} threads={torch.get_num_threads()} "
          f"runs={args.runs} text_tokens={args.text_tokens}{' (tiny)' if args.tiny else ''}")
    header = "| model | input ids | TFLOPs | FLOPs vs 1024 | prefill s (median) | time vs 1024 |"
    if args.train:
        header += " train step s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for kind, length, flops, seconds, train in rows:
        line = (f"| {kind} | {length} | {flops / 1e12:.3f} | {flops / ref_flops:.3f} | {seconds:.3f} | "
                f"{seconds / ref_time:.3f} |")
        if args.train:
            line += f" {train:.3f} |"
        print(line)
    lvtc = rows[2]
    flop_ratio, time_ratio = lvtc[2] / ref_flops, lvtc[3] / ref_time
    print(f"\nLVTC FLOPs / plain-1024 FLOPs = {flop_ratio:.3f} (required <= 0.60)")
    print(f"LVTC time / plain-1024 time = {time_ratio:.3f}; predicted by FLOPs {flop_ratio:.3f}; "
          f"deviation {abs(time_ratio / flop_ratio - 1) * 100:.1f}% (required <= 15%)")


if __name__ == "__main__":
    main()
