#!/bin/bash
# One device call for issue 9's batch-1 decode (about 4 minutes on an H100 / H200; results in
# $OUT): generate at batch 1 with and without its second row (postrl.sampling.generate
# min_decode_rows). XLA's GPU compiler turns a one-row matmul below 10M elements into a multiply
# that writes the weight-sized product and a reduction that reads it back; with two rows each
# projection is one GEMM reading the weights once, and XLA merges q / k / v and gate / up.
# Compiled without a GPU (benchmarks/xla_gpu_offline.py, 2026-11-27) one SmolLM2-135M step
# launches 399 operations with the second row (662 without) and writes 4.4 MB (214 MB); the
# Llama-3.2-1B shape 250 (377) and 13.8 MB (341 MB). This call times both under generate's
# defaults (the sampling and decode-attention kernels on one GPU), top-p 0.9, and records the
# launches of each compiled program (--launches). SMALL / LARGE: the two presets (LARGE empty
# skips it); LIMIT = seconds per process; EXTRA_ARGS = more generate.py arguments (e.g.
# "--prompt-len 4 --new-tokens 4 --repeats 1 --copy-mib 8" for a CPU dry run with SMALL=tiny).
# Six files come back: four JSON, log.txt and summary.txt.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/postrl-jax-cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
LIMIT=${LIMIT:-45}
run() {  # run MODEL NAME [extra generate.py arguments]
  local model=$1 name=$2; shift 2
  timeout $((LIMIT + 60)) python3 benchmarks/generate.py --config "$model" --batch 1 \
    --new-tokens 256 --top-p 0.9 --no-baseline --launches --time-limit "$LIMIT" "$@" \
    ${EXTRA_ARGS:-} --out "$OUT/rows_${model}_${name}.json" 2>&1 | tee -a "$OUT/log.txt"
}
for model in ${SMALL:-smollm2-135m} ${LARGE-llama-1b}; do
  run "$model" two_rows
  run "$model" one_row --no-row-padding
done
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import glob, json, os, sys
print(f"{'run':<30} {'ms/step':>8} {'tok/s':>8} {'of bound':>9} {'launches':>9}")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "rows_*.json"))):
  for r in json.load(open(path)).get("rows", []):
    print(f"{os.path.basename(path)[5:-5]:<30} {r.get('postrl_ms_per_step', '-')!s:>8} "
          f"{r.get('postrl_tokens_per_s', '-')!s:>8} {r.get('fraction_of_bound', '-')!s:>9} "
          f"{(r.get('postrl_launches_per_step') or {}).get('launches', '-')!s:>9}")
    for key in ("postrl_error", "postrl_launches_error"):
      if r.get(key):
        print(f"  {key}: {r[key]}")
PY
