#!/usr/bin/env bash
# The cuda backend on a GPU: its correctness tests, then `kiln bench --compare` for each model named.
#   bash benchmarks/cuda_backend.sh llama-3.2-1b llama-3.1-8b
# Results go to $OUT (default bench_out/): the test log, and per model a JSON, a markdown table and a log.
set -o pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if [ -z "$SKIP_TESTS" ]; then
  python -m pytest tests/backends/test_cuda.py -q -s -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
fi
for model in "$@"; do
  python -m kiln.tools.cli bench "$model" --compare ${BENCH_ARGS} --json "$OUT/$model.json" \
    --markdown "$OUT/$model.md" 2>&1 | tee "$OUT/$model.log"
done
