#!/bin/bash
# One device call for issue 9's batch-1 decode overhead (about 5 minutes on an H100 / H200;
# results in $OUT). A batch-1 decode step of both preset shapes cost ~1.6-1.8 ms on an H200
# whatever the model size, far above the time to stream the weights: per-launch overhead. This
# call measures where it goes, one generate.py process per XLA setting (XLA_FLAGS is read once,
# when the backend starts):
#   default   XLA's defaults (command buffers for fusions and library calls, not loops)
#   graphs    + WHILE and CONDITIONAL command buffers, graphs of any size: the whole decode loop
#             becomes CUDA graphs with conditional nodes instead of one launch per operation
#   nographs  command buffers off: every operation is its own launch
# with top-p 0.9 (the 32-pass XLA bisection) and top-p 1.0 (no truncation), and the sampling
# kernel (--sampling-impl pallas) under the default flags. --launches records the
# operations one decode step launches, from the compiled program's HLO (benchmarks/common.py
# loop_launches). Seven processes: five settings of the SmolLM2-135M shape (SMALL), default and
# graphs for the Llama-3.2-1B shape (LARGE; empty skips it); LIMIT = seconds per process;
# NEW_TOKENS = tokens per call; EXTRA_ARGS = more generate.py arguments for every process (later
# ones win; e.g. "--prompt-len 4 --repeats 1 --copy-mib 8" for a CPU dry run with SMALL=tiny).
#
# The device tool returns at most 8 files, so everything fits in six:
#   summary.txt               the table printed at the end
#   overhead_runs.tar.gz      every process's JSON and log (runs/overhead_<model>_<variant>_p<p>.*)
#   <model>_b1.fusions.txt    the default runs (SMALL and LARGE): one decode step's launched
#   <model>_b1.hlo.txt.gz       operations one per line, and the whole optimised HLO (--dump-hlo)
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/runs"
cd "$(dirname "$0")/.."
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/postrl-jax-cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
declare -A FLAGS=(
  [default]=""
  [graphs]="--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1"
  [nographs]="--xla_gpu_enable_command_buffer="
)
LIMIT=${LIMIT:-60}
run() {  # run MODEL VARIANT TOP_P [extra generate.py arguments]
  local model=$1 variant=$2 top_p=$3; shift 3
  local name="overhead_${model}_${variant}_p${top_p}"
  XLA_FLAGS="${FLAGS[$variant]}" timeout $((LIMIT + 60)) python3 benchmarks/generate.py \
    --config "$model" --batch 1 --new-tokens "${NEW_TOKENS:-256}" --top-p "$top_p" \
    --no-baseline --launches --time-limit "$LIMIT" "$@" ${EXTRA_ARGS:-} \
    --out "$OUT/runs/$name.json" 2>&1 | tee "$OUT/runs/$name.log"
}
small=${SMALL:-smollm2-135m}
run "$small" default 0.9 --sampling-impl xla pallas --dump-hlo "$OUT" --dump-hlo-gzip-mib 0
run "$small" default 1.0
run "$small" graphs 0.9
run "$small" graphs 1.0
run "$small" nographs 0.9
if [ -n "${LARGE-llama-1b}" ]; then
  run "${LARGE-llama-1b}" default 0.9 --dump-hlo "$OUT" --dump-hlo-gzip-mib 0
  run "${LARGE-llama-1b}" graphs 0.9
fi
python3 - "$OUT/runs" <<'PY' | tee "$OUT/summary.txt"
import glob, json, os, sys
print(f"{'run':<42} {'ms/step':>8} {'launches':>9} {'pallas ms':>10}")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "overhead_*.json"))):
  doc = json.load(open(path))
  for r in doc.get("rows", []):
    print(f"{os.path.basename(path)[9:-5]:<42} {r.get('postrl_ms_per_step', '-')!s:>8} "
          f"{(r.get('postrl_launches_per_step') or {}).get('launches', '-')!s:>9} "
          f"{r.get('postrl_pallas_ms_per_step', '-')!s:>10}")
    for key in ("postrl_error", "postrl_launches_error", "postrl_hlo_error",
                "postrl_pallas_error"):
      if r.get(key):
        print(f"  {key}: {r[key]}")
PY
tar -czf "$OUT/overhead_runs.tar.gz" -C "$OUT" runs && rm -rf "$OUT/runs"
ls -l "$OUT" | tee -a "$OUT/summary.txt"
n=$(find "$OUT" -type f | wc -l)
echo "$n files in $OUT (the device tool returns at most 8)" | tee -a "$OUT/summary.txt"
