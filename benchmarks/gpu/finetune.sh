#!/usr/bin/env bash
# A user's fine-tune on a GPU, end to end, as the README tells it (docs/fine-tuning-scale.md, "On a GPU"):
#   1. an InternVL2-2B-sized checkpoint in OpenGVLab's layout (random weights at the real dimensions: InternViT-300M +
#      a 24-layer, 2048-wide InternLM2 LLM, vocabulary 92,553), made by internvlx_hf.conversion.synthetic_checkpoint;
#   2. `internvlx convert` with --projector pvtc --lvtc k=18,hr_scale=rms;
#   3. `internvlx train` with bf16, activation checkpointing, packing, SDPA: preset stage1, then stage2 from its output;
#      preset lora from the converted model; on the demo's synthetic tasks (448 px images, one tile each);
#   4. the stage2 output reloaded with AutoModel (trust_remote_code, internvlx_hf not importable) and generating;
#      `internvlx eval` of the stage2 and lora outputs with batched generation;
#   5. resume: a lora run stopped at step N and resumed from its checkpoint against an uninterrupted run;
#   6. with MEMORY=1, benchmarks/gpu/memory.py: peak memory and samples/s per preset, model and batch size.
# BUDGET=SECONDS skips the steps that would start after that many seconds (the summary is always written).
# Every step's output goes to $OUT/finetune.log and the numbers to $OUT/finetune.json. From the repository root:
#   bash benchmarks/gpu/finetune.sh                  # on a CUDA GPU (InternVL2-2B dimensions)
#   SIZE=tiny DEVICE=cpu bash benchmarks/gpu/finetune.sh   # the same path with a tiny model, on a CPU
set -uo pipefail
REPO=$PWD
OUT=$(mkdir -p "${OUT:-gpu-out}" && cd "${OUT:-gpu-out}" && pwd)
WORK=${WORK:-/tmp/internvlx-finetune}
SIZE=${SIZE:-2b}
DEVICE=${DEVICE:-cuda}
STEPS1=${STEPS1:-60}; STEPS2=${STEPS2:-150}; STEPSL=${STEPSL:-150}; RESUME_AT=${RESUME_AT:-10}
BATCH=${BATCH:-8}; TRAIN_N=${TRAIN_N:-2000}; TEST_N=${TEST_N:-200}
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/finetune.log
rm -rf "$WORK"; mkdir -p "$WORK"
if [ "$DEVICE" = cpu ]; then PRECISION=(--use_cpu); else PRECISION=(--bf16); fi
COMMON=("${PRECISION[@]}" --activation_checkpointing --packing --attn_implementation sdpa --save_strategy no
        --logging_steps 10 --report_to none --per_device_train_batch_size "$BATCH" --dataloader_num_workers 4
        --disable_tqdm true)
stamp() { echo "[$(date -u +%T)] $*" | tee -a "$LOG"; }
BUDGET=${BUDGET:-100000}  # seconds: a step that would start later is skipped (and logged as such)
run() {
    if [ "$SECONDS" -ge "$BUDGET" ]; then stamp "SKIPPED (past BUDGET=$BUDGET s): $*"; return 125; fi
    stamp "\$ $*"; local t0=$SECONDS; "$@" >> "$LOG" 2>&1; local rc=$?; stamp "  -> exit $rc in $((SECONDS - t0)) s"
    return $rc
}

stamp "size $SIZE on $DEVICE"
run python3 - "$WORK/src" "$REPO/tests/fixtures/internvl2_internlm2" "$SIZE" <<'PY' || exit 1
import sys, torch
from internvlx_hf.conversion.synthetic_checkpoint import make_synthetic_internvl2
dims = {  # InternVL2-2B: InternViT-300M + InternLM2-chat-1.8B
    "2b": dict(vit_hidden=1024, vit_layers=24, vit_heads=16, vit_intermediate=4096, llm_hidden=2048, llm_layers=24,
               heads=16, kv_heads=8, llm_intermediate=8192, vocab_size=92553, num_shards=2),
    "tiny": dict(vit_hidden=64, vit_layers=2, vit_heads=4, vit_intermediate=128, llm_hidden=128, llm_layers=4,
                 heads=4, kv_heads=2, llm_intermediate=256),
}[sys.argv[3]]
make_synthetic_internvl2(sys.argv[1], sys.argv[2], dtype=torch.bfloat16, **dims)
PY
K=$([ "$SIZE" = tiny ] && echo 3 || echo 18)
run python3 -m internvlx_hf convert "$WORK/src" "$WORK/converted" --projector pvtc --lvtc "k=$K,hr_scale=rms" \
    --no-progress || exit 1
run python3 - "$WORK" "$TRAIN_N" "$TEST_N" <<'PY' || exit 1
import sys
from internvlx_hf.training.synthetic_vqa import BASIC_TASKS, generate_dataset
work, n_train, n_test = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
generate_dataset(f"{work}/train", n_train, tasks=BASIC_TASKS, seed=0, system_message="", name="shapes")
generate_dataset(f"{work}/test", n_test, tasks=BASIC_TASKS, seed=1, system_message="", name="shapes")
PY
TRAIN=(python3 -m internvlx_hf train --data "$WORK/train/meta.json" "${COMMON[@]}")
run "${TRAIN[@]}" --model "$WORK/converted" --output_dir "$WORK/stage1" --preset stage1 --max_steps "$STEPS1" \
    --learning_rate 1e-3 --warmup_steps 10
run "${TRAIN[@]}" --model "$WORK/stage1" --output_dir "$WORK/stage2" --preset stage2 --max_steps "$STEPS2" \
    --learning_rate 2e-5 --warmup_steps 10

# The stage2 output in a process where internvlx_hf cannot be imported: the folder's own remote code.
NO_PACKAGE=$(printf %s "$PYTHONPATH" | tr ':' '\n' | grep -vx "$REPO/src" | paste -sd:)
run env PYTHONPATH="$NO_PACKAGE" python3 - "$WORK/stage2" "$WORK/test" "$DEVICE" "$OUT/reload.json" \
    <<'PY'
import json, sys, time, importlib.util, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
assert importlib.util.find_spec("internvlx_hf") is None, "internvlx_hf must not be importable here"
folder, test, device, out = sys.argv[1:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).to(device).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
row = json.loads(open(f"{test}/shapes.jsonl").readline())
question = row["conversations"][-2]["value"].replace("<image>\n", "")
messages = [{"role": "system", "content": ""}, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=[Image.open(f"{test}/{row['image']}").convert("RGB")], text=prompt, return_tensors="pt").to(device)
start = time.perf_counter()
ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
answer = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
record = {"class": f"{type(model).__module__}.{type(model).__name__}", "question": question, "answer": answer,
          "expected": row["conversations"][-1]["value"], "seconds": time.perf_counter() - start}
print(record); json.dump(record, open(out, "w"), indent=1)
PY
evaluate() {
    run python3 -m internvlx_hf eval "$WORK/$1" "$WORK/test/meta.json" --batch-size 50 --max-new-tokens 8 \
        --device "$DEVICE" --dtype "$([ "$DEVICE" = cpu ] && echo float32 || echo bfloat16)" --no-progress \
        --json "$WORK/eval-$1.json"
}
evaluate stage2
run "${TRAIN[@]}" --model "$WORK/converted" --output_dir "$WORK/lora" --preset lora --max_steps "$STEPSL" \
    --learning_rate 2e-4 --warmup_steps 10

# Resume: the same lora run uninterrupted (a checkpoint at RESUME_AT on the way) and resumed from that checkpoint.
RESUME=("${TRAIN[@]}" --model "$WORK/converted" --preset lora --max_steps $((2 * RESUME_AT)) --learning_rate 2e-4
        --save_strategy steps --save_steps "$RESUME_AT" --save_only_model false --seed 7)
run "${RESUME[@]}" --output_dir "$WORK/resume-straight"
mkdir -p "$WORK/resume-resumed" && cp -r "$WORK/resume-straight/checkpoint-$RESUME_AT" "$WORK/resume-resumed/"
run "${RESUME[@]}" --output_dir "$WORK/resume-resumed" \
    --resume_from_checkpoint "$WORK/resume-resumed/checkpoint-$RESUME_AT"

evaluate lora

# The memory table (MEMORY=1): plain-256 / plain-1024 / LVTC x stage1 / stage2 / lora, batch 1, 2, 4, ... until OOM.
if [ "${MEMORY:-0}" = 1 ]; then
    run python3 -m internvlx_hf convert "$WORK/src" "$WORK/plain" --no-progress
    run python3 "$REPO/benchmarks/gpu/memory.py" "$WORK/plain" --device "$DEVICE" --json "$OUT/memory.json"
fi

BUDGET=100000 run python3 - "$WORK" "$OUT/finetune.json" "$SIZE" "$DEVICE" <<'PY'
import json, sys, pathlib, torch, transformers, platform
from safetensors.torch import load_file
work, out, size, device = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
summary = {"size": size, "device": torch.cuda.get_device_name() if device == "cuda" else device,
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "runs": {}}
for name in ("stage1", "stage2", "lora"):
    state = work / name / "trainer_state.json"
    if state.is_file():
        history = json.loads(state.read_text())["log_history"]
        losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
        final = next((h for h in history if "train_runtime" in h), {})
        summary["runs"][name] = {"losses": losses, "train_runtime_s": final.get("train_runtime"),
                                 "train_samples_per_second": final.get("train_samples_per_second"),
                                 "steps": final.get("step") or (losses[-1][0] if losses else None)}
for name in ("stage2", "lora"):
    path = work / f"eval-{name}.json"
    if path.is_file():
        record = json.loads(path.read_text())
        run = record["runs"][0] if "runs" in record else record
        for dataset in run.get("datasets", []):
            predictions = dataset.pop("predictions", [])
            dataset["examples"] = [{k: p[k] for k in ("prediction", "reference")} for p in predictions[:5]]
        summary["runs"].setdefault(name, {})["eval"] = run
straight, resumed = work / "resume-straight" / "adapter", work / "resume-resumed" / "adapter"
if straight.is_dir() and resumed.is_dir():
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    diffs = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a}
    scale = max(float(t.float().abs().max()) for t in a.values())
    summary["resume"] = {"tensors": len(a), "same_keys": a.keys() == b.keys(), "max_abs_diff": max(diffs.values()),
                         "max_abs_weight": scale, "identical_tensors": sum(v == 0.0 for v in diffs.values())}
json.dump(summary, open(out, "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
for name, run in summary["runs"].items():
    print(name, "loss", run.get("losses", [])[:1], "->", run.get("losses", [])[-1:], "samples/s",
          run.get("train_samples_per_second"), "eval", json.dumps(run.get("eval"))[:300])
PY
cp "$WORK"/eval-*.json "$OUT/" 2>/dev/null
stamp "done"
