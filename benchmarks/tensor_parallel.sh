#!/usr/bin/env bash
# Tensor parallelism on one machine with several GPUs: the all-reduce routes, `kiln bench` at TP=1
# and TP=N on one model shape with a table of the two, then the multi-GPU tests.
#   bash benchmarks/tensor_parallel.sh llama-3.1-8b 2
# Results go to $OUT (default bench_out/). BENCH_ARGS passes options to both `kiln bench` runs.
set -o pipefail
MODEL=${1:-llama-3.1-8b}
TP=${2:-2}
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
BENCH_ARGS=${BENCH_ARGS:---batches 1,8,64 --workloads 128/128 --requests 512}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
nvidia-smi topo -m | tee -a "$OUT/gpu.txt"
timeout 120 python benchmarks/all_reduce.py --gpus "$TP" 2>&1 | tee "$OUT/all_reduce.md"
for tp in 1 "$TP"; do
  timeout "${BENCH_TIMEOUT:-300}" python -m kiln.tools.cli bench "$MODEL" --tp "$tp" $BENCH_ARGS \
    --json "$OUT/${MODEL}_tp$tp.json" --markdown "$OUT/${MODEL}_tp$tp.md" 2>&1 | grep -v "it/s\]$" | tee "$OUT/${MODEL}_tp$tp.log"
done
python - "$OUT/${MODEL}_tp1.json" "$OUT/${MODEL}_tp$TP.json" <<'PY' | tee "$OUT/${MODEL}_tp_summary.md"
import json, sys
one, many = (json.load(open(p)) for p in sys.argv[1:3])
rows = {(r["case"]): r for r in one["rows"] if r["system"] == "kiln"}
tp = many["tensor_parallel"]
print(f"| case | TP=1 tok/s | TP={tp['ranks']} tok/s | speedup | TP=1 TPOT ms | TP={tp['ranks']} TPOT ms |")
print("|---|---|---|---|---|---|")
for r in many["rows"]:
    if r["system"] == "kiln" and r["case"] in rows:
        a = rows[r["case"]]
        print(f"| {r['case']} | {a['tok_s']:.0f} | {r['tok_s']:.0f} | {r['tok_s'] / a['tok_s']:.2f}x | "
              f"{a['tpot_ms']:.2f} | {r['tpot_ms']:.2f} |")
print()
print("tensor parallel: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in tp.items()))
PY
if [ -z "$SKIP_TESTS" ]; then
  timeout "${TEST_TIMEOUT:-300}" python -m pytest tests/backends/test_cuda.py -k two_gpus -q -s -p no:cacheprovider 2>&1 \
    | tee "$OUT/tp_tests.log"
fi
