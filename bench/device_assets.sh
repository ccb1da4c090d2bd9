#!/usr/bin/env bash
# Prepare, on this machine, what a device call carries (`carry` of the device tool):
# - .whl/: wheels the GPU image lacks (cp312): grpcio-health-checking and
#   grpcio-reflection at its grpcio 1.84, sqlalchemy, greenlet, google-re2, py-spy;
# - .gpu_assets/tokenizer: the SmolLM2 tokenizer files (the image has no gguf to convert
#   the default model), for LORAPLEX_TEST_TOKENIZER_DIR;
# - with BASELINE, .devtree_old: a checkout of that commit, for the old-against-new runs
#   of bench/gpu_checks.sh, profile_decode_step.py --root and bench_serving.py --engine-root.
# Usage (repo root): bash bench/device_assets.sh [VENV] [BASELINE]
set -euo pipefail
venv=${1:-.venv}
baseline=${2:-}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0 sqlalchemy greenlet google-re2 py-spy
model=$("$venv/bin/python" -c "from tests.model_factory import default_model_dir; print(default_model_dir())")
mkdir -p .gpu_assets/tokenizer
for name in tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json; do
  cp "$model/$name" .gpu_assets/tokenizer/
done
if [ -n "$baseline" ] && [ ! -d .devtree_old ]; then
  git worktree add -q --detach .devtree_old "$baseline"
fi
du -sh .whl .gpu_assets ${baseline:+.devtree_old}
