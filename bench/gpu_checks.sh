#!/usr/bin/env bash
# One device call: GPU tests, then the kernel-level benchmarks; $OUT gets logs.txt and
# one JSON per benchmark (the device tool brings back at most 8 files).
# Usage (on the GPU machine, repo root): bash bench/gpu_checks.sh [BASELINE_CHECKOUT]
# Needs the wheels the GPU image lacks in .whl/ and the SmolLM2 tokenizer files in
# .gpu_assets/tokenizer: `bash bench/device_assets.sh .venv [BASELINE_COMMIT]` prepares
# them (and the baseline checkout); carry .whl, .gpu_assets and the baseline.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
export LORAPLEX_TEST_TOKENIZER_DIR=$PWD/.gpu_assets/tokenizer
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
status=0
run() {  # name, command...: log to $OUT/NAME.log, remember a failure, keep going
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "/tmp/$name.log" 2>&1 || { status=1; echo "!! $name failed"; }
  tail -n 25 "/tmp/$name.log"
  { echo "== $name: $*"; cat "/tmp/$name.log"; } >> "$OUT/logs.txt"
}
run gpu_tests timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/engine/test_fused_kernels.py tests/engine/test_attention_prefill.py \
  tests/engine/test_attention_triton.py tests/engine/test_model_gpu.py \
  tests/engine/test_cuda_graphs_gpu.py tests/engine/test_lora_kernels.py \
  tests/engine/test_lora_slot_pool.py
run profile_new timeout 200 python3 bench/profile_decode_step.py --label new \
  --out "$OUT/profile_new.json"
if [ -n "${1:-}" ]; then
  run profile_old timeout 200 python3 bench/profile_decode_step.py --label old --root "$1" \
    --out "$OUT/profile_old.json"
fi
run lora_kernels timeout 150 python3 bench/bench_lora_kernels.py --scenarios single decode \
  --out "$OUT/lora_kernels.json"
run attention timeout 120 python3 bench/bench_attention.py --out "$OUT/attention.json"
run adapter_load timeout 150 python3 bench/bench_adapter_load.py --threads 4 --adapters 50 \
  --out "$OUT/adapter_load.json"
exit $status
