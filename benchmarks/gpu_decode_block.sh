#!/bin/bash
# One device call for issue 9's batch-1 decode with the fused decoder layer (kernels.decode_block,
# ModelConfig.decode_block_impl; about 8 minutes on an H100 / H200; results in $OUT):
#   1. benchmarks/decode_block.py: the compiled kernels checked against the model's arithmetic
#      (both presets, 2 and 16 rows, with and without biases), then all layers of a decode step,
#      XLA's layer against the five fused launches and against the attention half fused alone
#      (pallas_attention; the fused layer's time minus it is the fused MLP's against XLA's) and,
#      checked and timed last (a crash in its first GPU run keeps the rest), the five phases as
#      one persistent launch per layer (pallas_persistent), beside the read floor, then (--sweep)
#      the launch settings of the five launches and of the persistent launch at SmolLM2-135M,
#      batch 1, in what is left of LIMIT;
#   2. benchmarks/generate.py at batch 1 and 16, --decode-block xla pallas pallas_persistent
#      (generate's defaults otherwise: the sampling and decode-attention kernels, two rows for one
#      prompt), tokens/s, fraction of the bandwidth bound and launches per step of each.
# Compiled without a GPU (benchmarks/xla_gpu_offline.py --decode-block, 2026-11-27 / 28) one
# SmolLM2-135M step at batch 1 launches 170 operations with the fused layer against 395 (259 with
# the attention half fused, 351 with the MLP half), the Llama-3.2-1B step 100 against 245 (148,
# 197). If a kernel implementation is faster at both shapes, set
# kernels.decode_block.GPU_MEASURED = True and GPU_IMPL to the fastest
# (ModelConfig.decode_block_impl="auto" then takes it on one GPU) and record the table in
# docs/benchmarks.md. LIMIT / GEN_LIMIT: seconds for step 1 / per
# generate process; EXTRA_ARGS / GEN_EXTRA: more arguments (CPU dry run: SMALL=tiny LARGE=
# EXTRA_ARGS="--interpret --steps 2 --repeats 1" GEN_EXTRA="--prompt-len 4 --new-tokens 4
# --repeats 1 --copy-mib 8"). Files that come back: decode_block.json, two generate JSON, log.txt,
# summary.txt.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/postrl-jax-cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
LIMIT=${LIMIT:-180}; GEN_LIMIT=${GEN_LIMIT:-90}  # at most ~9.5 min with the timeouts
MODELS="${SMALL:-smollm2-135m} ${LARGE-llama-1b}"
# shellcheck disable=SC2086
timeout $((LIMIT + 90)) python3 benchmarks/decode_block.py --config $MODELS --batch 1 16 \
  --impls xla pallas pallas_attention pallas_persistent --biases --sweep --time-limit "$LIMIT" ${EXTRA_ARGS:-} --out "$OUT/decode_block.json" 2>&1 \
  | tee -a "$OUT/log.txt"
for model in $MODELS; do
  # shellcheck disable=SC2086
  timeout $((GEN_LIMIT + 60)) python3 benchmarks/generate.py --config "$model" --batch 1 16 \
    --new-tokens 256 --top-p 0.9 --no-baseline --launches \
    --decode-block xla pallas pallas_persistent \
    --time-limit "$GEN_LIMIT" ${GEN_EXTRA:-} --out "$OUT/gen_block_${model}.json" 2>&1 \
    | tee -a "$OUT/log.txt"
done
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import glob, json, os, sys
out = sys.argv[1]
doc = json.load(open(os.path.join(out, "decode_block.json")))
print("status:", doc.get("status"), "| checks ok:", all(c.get("ok") for c in doc.get("checks", [])))
impls = ("pallas", "pallas_attention", "pallas_persistent")
print("check failed (not timed):", doc.get("check_failed") or "none")
print(f"{'layers of one step':<22} {'floor us':>9} {'xla us':>8} " + " ".join(
    f"{i + ' us (xla/' + i.replace('pallas', 'p') + ')':>30}" for i in impls))
for r in doc.get("rows", []):
  cells = [f"{str(r.get(i + '_us', '-')) + ' (' + str(r.get('xla_over_' + i, '-')) + 'x)':>30}"
           for i in impls]
  print(f"{r['config'] + ' b' + str(r['batch']):<22} {r.get('floor_us', '-')!s:>9} "
        f"{r.get('xla_us', '-')!s:>8} " + " ".join(cells))
  print("  launches: " + ", ".join(f"{i} {r.get(i + '_launches', '-')}" for i in ("xla",) + impls))
  if r.get("pallas_persistent_trace") or r.get("pallas_persistent_trace_error"):
    from benchmarks.triage_summary import persistent_trace_line
    print("  " + persistent_trace_line(r))
for r in doc.get("sweep", []):
  print(f"  sweep {r.get('impl', 'pallas'):<17} {r['setting']:<18} "
        f"{r.get('us', r.get('error', '-'))!s:>9} us, {r.get('over_floor', '-')}x the floor")
print(f"{'generate':<22} {'xla ms/step':>11} {'fused ms/step':>13} {'persist. ms':>13} "
      f"{'of bound (xla)':>14} {'launches':>16}")
for path in sorted(glob.glob(os.path.join(out, "gen_block_*.json"))):
  for r in json.load(open(path)).get("rows", []):
    launches = [str((r.get(k) or {}).get("launches", "-")) for k in (
        "postrl_launches_per_step", "postrl_block_pallas_launches_per_step",
        "postrl_block_pallas_persistent_launches_per_step")]
    print(f"{os.path.basename(path)[10:-5] + ' b' + str(r['batch']):<22} "
          f"{r.get('postrl_ms_per_step', '-')!s:>11} {r.get('postrl_block_pallas_ms_per_step', '-')!s:>13} "
          f"{r.get('postrl_block_pallas_persistent_ms_per_step', '-')!s:>13} "
          f"{r.get('fraction_of_bound', '-')!s:>14} {'/'.join(launches):>16}")
    for key in ("postrl_error", "postrl_block_pallas_error",
                "postrl_block_pallas_persistent_error"):
      if r.get(key):
        print(f"  {key}: {r[key]}")
PY
