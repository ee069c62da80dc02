"""What ViCO's two stages cost per training sample at InternVL3.5-2B and -8B sizes, computed (not measured): the LLM's
FLOPs (`token_budget.prefill_flops`, forward; a backward through frozen layers, which computes the activations'
gradients only, counted as one more forward) and the weights and optimizer state the step holds, for a sample of 6
tiles + the thumbnail (7 x 256 visual tokens) and 200 text tokens, against a `stage2` fine-tuning step of the same
sample. docs/flash.md's table is this script's output:

    python benchmarks/vico_costs.py --out benchmarks/results/vico-costs.json

Stage 1: the teacher's forward (every tile at 256 tokens), the student's forward and backward (tiles compressed at
the mean rate 0.5: 160 tokens a tile on average); the 64-token projector and, with `--preset vico`, LoRA adapters of
rank 16 on every attention and MLP linear of the LLM have gradients and optimizer state (the adapters' FLOPs, three
passes of 2 x tokens x their parameters, are counted; `vico-projector` has the projector alone).
Stage 2: one forward with no tile compressed and one per tile with that tile alone compressed (no gradient), the
router's pooling and gate forward and backward (negligible). The vision tower runs in each forward (300M
parameters: InternViT-300M, 1,025 tokens a tile), as the model's forward runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from internvlx_hf.token_budget import LLMShape, prefill_flops  # noqa: E402

#: Qwen3's published dimensions (the LLMs of InternVL3.5-2B and -8B): layers, hidden, intermediate, heads, KV heads,
#: head dim, vocabulary, and the LLM's parameters
SIZES = {
    "InternVL3.5-2B (Qwen3-1.7B)": (LLMShape(28, 2048, 6144, 16, 8, 128, 151936), 1.72e9),
    "InternVL3.5-8B (Qwen3-8B)": (LLMShape(36, 4096, 12288, 32, 8, 128, 151936), 8.19e9),
}
VIT_PARAMETERS, VIT_TOKENS, VIT_WIDTH = 0.30e9, 1025, 1024
TILES, TEXT, FULL, SMALL = 7, 200, 256, 64


def projector_parameters(llm_width: int) -> int:
    """The 64-token projector's (LayerNorm over 16 ViT tokens' channels, then Linear to 2D, 2D, D)."""
    inputs, hidden = 16 * VIT_WIDTH, 2 * llm_width
    return 2 * inputs + inputs * hidden + hidden + hidden * hidden + hidden + hidden * llm_width + llm_width


def router_parameters() -> int:
    """The pooling's (a query, two attention layers, two LayerNorms) and the gate's (four residual blocks, LayerNorm,
    Linear to 2)."""
    c = VIT_WIDTH
    attention = 4 * c * c + 4 * c
    block = c * 4 * c + 4 * c + 4 * c * c + c + 2 * c
    return c + 2 * attention + 4 * c + 4 * block + 2 * c + 2 * c + 2


def lora_parameters(shape, rank: int = 16) -> int:
    """`--preset vico`'s adapters: rank x (inputs + outputs) for q, k, v, o, gate, up and down of every layer."""
    d, inter, q, kv = shape.hidden_size, shape.intermediate_size, shape.num_heads * shape.head_dim, \
        shape.num_kv_heads * shape.head_dim
    return shape.num_layers * rank * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + inter) + (inter + d))


def costs() -> dict:
    rows = {}
    full_tokens = TILES * FULL + TEXT
    student_tokens = TILES * (FULL + SMALL) // 2 + TEXT
    one_compressed = full_tokens - (FULL - SMALL)
    vit = 2 * VIT_PARAMETERS * VIT_TOKENS * TILES  # one vision-tower forward over the sample's tiles
    for name, (shape, parameters) in SIZES.items():
        forward_full = prefill_flops(shape, full_tokens)
        lora = lora_parameters(shape)
        stage1 = forward_full + 2 * prefill_flops(shape, student_tokens) + 2 * vit + 3 * 2 * student_tokens * lora
        stage2 = forward_full + TILES * prefill_flops(shape, one_compressed) + (1 + TILES) * vit
        finetune = 3 * forward_full + 3 * vit  # a stage2 step: forward and backward with weight gradients
        weights_gib = 2 * (parameters + VIT_PARAMETERS) / 2 ** 30  # bfloat16
        rows[name] = {"tokens_full": full_tokens, "tokens_student_mean": student_tokens,
                      "stage1_tflops": stage1 / 1e12, "stage2_tflops": stage2 / 1e12,
                      "stage2_finetune_tflops": finetune / 1e12,
                      "stage1_vs_finetune": stage1 / finetune, "stage2_vs_finetune": stage2 / finetune,
                      "weights_gib_bf16": weights_gib,
                      # AdamW in float32 with float32 master weights for every trained parameter: 16 bytes each
                      "finetune_optimizer_gib": 16 * (parameters + VIT_PARAMETERS) / 2 ** 30,
                      "lora_parameters": lora,
                      "stage1_optimizer_gib": 16 * (projector_parameters(shape.hidden_size) + lora) / 2 ** 30,
                      "stage1_projector_optimizer_gib": 16 * projector_parameters(shape.hidden_size) / 2 ** 30,
                      "stage2_optimizer_gib": 16 * router_parameters() / 2 ** 30}
    return {"what": __doc__.split("\n\n")[0], "sample": {"tiles": TILES, "text_tokens": TEXT}, "sizes": rows}


def table(result) -> str:
    lines = ["| per sample (7 tiles, 200 text tokens) | stage 1 (consistency) | stage 2 (router labels) | a stage2 "
             "fine-tuning step | bfloat16 weights | optimizer state: stage 1 (`vico` / `vico-projector`) / stage 2 / "
             "a full fine-tune |",
             "|---|---|---|---|---|---|"]
    for name, row in result["sizes"].items():
        lines.append(f"| {name} | {row['stage1_tflops']:.1f} TFLOPs ({row['stage1_vs_finetune']:.2f}x) | "
                     f"{row['stage2_tflops']:.1f} TFLOPs ({row['stage2_vs_finetune']:.2f}x) | "
                     f"{row['stage2_finetune_tflops']:.1f} TFLOPs | {row['weights_gib_bf16']:.1f} GiB | "
                     f"{row['stage1_optimizer_gib']:.1f} / {row['stage1_projector_optimizer_gib']:.1f} / "
                     f"{row['stage2_optimizer_gib']:.1f} / "
                     f"{row['finetune_optimizer_gib']:.0f} GiB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", help="write the figures as JSON")
    args = parser.parse_args(argv)
    result = costs()
    result["table"] = table(result)
    print(result["table"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
