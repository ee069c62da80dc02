#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command on a lent one (torch and transformers only: vLLM's CUDA wheel is not
# needed), under 10 minutes (docs/testing.md, "On a GPU"):
#   1. tests/test_short_layout.py on CUDA: LVTC's saving-path layout on vLLM with the inputs each vLLM runner gives
#      (the same tests as on CPU, device-parametrized), every tensor on the GPU;
#   2. tests/test_cuda.py (bfloat16 against float32, LVTC's cache, padded batches) and the other tests that skip
#      without a GPU, with the relative errors measured written to JSON.
# Writes under $OUT (default ./gpu-out); exits non-zero when a test fails or the CUDA cases did not run.
#   bash benchmarks/gpu/check.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1  # offline: the transformers test mixins' sdist download fails at once (those tests skip)

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__); print('device', torch.cuda.get_device_name())"
} > "$OUT/check-env.txt" 2>&1
cat "$OUT/check-env.txt"

INTERNVLX_CUDA_TESTS_REPORT="$OUT/cuda-tests.json" python3 -m pytest -v -rs -p no:cacheprovider \
    tests/test_short_layout.py tests/test_cuda.py \
    tests/test_lvtc.py::test_flash_attention_2_matches_sdpa_on_gpu \
    tests/test_transformers_conformance.py::test_offloaded_generation_on_gpu > "$OUT/check.log" 2>&1
status=$?
grep -E "PASSED|FAILED|ERROR|SKIPPED" "$OUT/check.log" | sed 's/ *\[ *[0-9]*%\]//' | tail -40
tail -3 "$OUT/check.log"
cuda=$(grep -c "test_short_layout.py::.*cuda.* PASSED" "$OUT/check.log")
echo "short-layout cases passed on CUDA: $cuda"
[ "$cuda" -gt 0 ] || { echo "no short-layout case ran on CUDA"; exit 1; }
exit $status
