#!/usr/bin/env bash
# GPU speed at real sizes, in one command on a CUDA machine (see docs/benchmarks.md, "On a GPU"):
#   1. the CUDA-only checks (benchmarks/gpu/check.sh: the short-layout tests on CUDA, tests/test_cuda.py and the
#      other tests that skip without a GPU), with the relative errors they measured written to JSON;
#   2. benchmarks/bench_models.py in bfloat16 at InternVL2-2B and InternVL2-8B dimensions (their real layer counts,
#      random weights): prefill at 1, 6 and 12 tiles, decoding, a training step with the ViT frozen and trained
#      (6 tiles, gradient checkpointing), SDPA's flash kernels forced (falls back to torch's choice, and says so,
#      where a call cannot run on them), with profiler tables of lvtc and plain-1024.
# Writes everything under $OUT (default ./gpu-out). Run from the repository root:
#   bash benchmarks/gpu/speed.sh            # both presets
#   PRESETS=2b RUNS=3 TESTS=0 bash benchmarks/gpu/speed.sh   # one preset, fewer rounds, no tests
set -uo pipefail
OUT=${OUT:-gpu-out}
PRESETS=${PRESETS:-"2b 8b"}
RUNS=${RUNS:-5}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1  # offline: the transformers test mixins' sdist download fails at once (those tests skip)

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import sys, torch, transformers, accelerate, peft; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__); print('device', torch.cuda.get_device_name(), '| bf16', torch.cuda.is_bf16_supported(), '| flash sdp', torch.backends.cuda.flash_sdp_enabled())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

[ "${TESTS:-1}" = 0 ] || OUT="$OUT" bash benchmarks/gpu/check.sh

for preset in $PRESETS; do
    args=(--device cuda --dtype bfloat16 --preset "$preset" --tiles 1,6,12 --train-tiles 6 --train-vit frozen,full
          --gradient-checkpointing --runs "$RUNS" --decode-tokens 16 --profile --json "$OUT/gpu-$preset.json")
    if ! python3 benchmarks/bench_models.py "${args[@]}" --sdpa-backend flash > "$OUT/gpu-$preset.log" 2>&1; then
        echo "preset $preset: a call could not run on the flash kernels only; again with torch's choice" | tee -a "$OUT/gpu-$preset.log"
        tail -5 "$OUT/gpu-$preset.log"
        python3 benchmarks/bench_models.py "${args[@]}" --sdpa-backend auto >> "$OUT/gpu-$preset.log" 2>&1
    fi
    grep -E "required|^\| (plain|lvtc|native|pvtc)" "$OUT/gpu-$preset.log" | tail -60
done
