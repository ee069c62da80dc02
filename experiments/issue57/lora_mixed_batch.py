"""Does vLLM-CPU keep a batch's requests without an adapter on the base model when others use a LoRA adapter?

Hypothesis (from tests/test_vllm_lora.py, where the plugin's model gave a base request the adapter's answer when
batched with an adapter request): the cause is vLLM-CPU's LoRA with one adapter slot, not the plugin. Checked here
on vLLM's own Qwen2 (no plugin): a tiny random Qwen2 and a peft adapter on all its linears, greedy tokens of a prompt
with the adapter alone, without it alone, and the two in one batch, with `max_loras` 1 and 2 (each in its own
process). Decides it: the batched base answer equals the base answer alone (right) or the adapter's (wrong).

    .venv-vllm/bin/python experiments/issue57/lora_mixed_batch.py [--work DIR]

Writes benchmarks/results/issue57-lora-cpu-mixed-batch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Hello there, how are", "Another prompt entirely x"]


def build(work: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from internvlx_hf.demo.packaged import DEMO_MODEL_DIR

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=812, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.08)
    model.save_pretrained(work / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEMO_MODEL_DIR / name, work / "model" / name)
    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
                   ).save_pretrained(work / "adapter")


def run(work: Path, max_loras: int) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(str(work / "model"), dtype="float32", enforce_eager=True, max_model_len=512, enable_lora=True,
              max_lora_rank=8, max_loras=max_loras, gpu_memory_utilization=0.15)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    lora = LoRARequest("adapter", 1, str(work / "adapter"))

    def tokens(prompts, loras):
        return [list(out.outputs[0].token_ids)
                for out in llm.generate(prompts, params, lora_request=loras, use_tqdm=False)]

    adapter_alone = tokens([PROMPTS[0]], [lora])[0]
    base_alone = tokens([PROMPTS[1]], [None])[0]
    batched = tokens(PROMPTS, [lora, None])
    return {"max_loras": max_loras, "adapter_alone": adapter_alone, "base_alone": base_alone,
            "adapter_batched": batched[0], "base_batched": batched[1],
            "base_batched_is_right": batched[1] == base_alone, "adapter_batched_is_right": batched[0] == adapter_alone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/issue57-lora"), help="scratch folder")
    parser.add_argument("--max-loras", type=int, help=argparse.SUPPRESS)  # (one child run)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.max_loras is not None:
        print("RESULT" + json.dumps(run(args.work, args.max_loras)))
        return
    if not (args.work / "adapter").exists():
        build(args.work)
    rows = []
    for max_loras in (1, 2):
        done = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--max-loras", str(max_loras)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        rows.append(json.loads(done.stdout.split("RESULT", 1)[1]))
        print(f"max_loras={max_loras}: base request batched with an adapter request right: "
              f"{rows[-1]['base_batched_is_right']}, adapter request right: {rows[-1]['adapter_batched_is_right']}",
              flush=True)
    import vllm

    out = ROOT / "benchmarks" / "results" / "issue57-lora-cpu-mixed-batch.json"
    out.write_text(json.dumps({"vllm": vllm.__version__, "model": "vLLM's Qwen2ForCausalLM (no plugin), tiny random",
                               "prompts": PROMPTS, "runs": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
