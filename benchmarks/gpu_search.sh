#!/bin/bash
# One device call for issue 8's kernels (about 8 minutes on an H100 / H200; results in $OUT):
#   1. benchmarks/sampling.py  (gpu_sampling.sh: compiled check, top-p/top-k/min-p table, sweep)
#   2. benchmarks/beam_step.py (compiled check, beam-step table)
# Each script checks its kernel against the reference before timing anything and writes its JSON
# after every row, so a cut run keeps what it measured. SAMPLING_LIMIT / BEAM_LIMIT bound them.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
SAMPLING_LIMIT=${SAMPLING_LIMIT:-330} SAMPLING_TIMEOUT=${SAMPLING_TIMEOUT:-360} \
  OUT="$OUT" bash benchmarks/gpu_sampling.sh
timeout "${BEAM_TIMEOUT:-130}" python3 benchmarks/beam_step.py --time-limit "${BEAM_LIMIT:-100}" \
  --out "$OUT/beam_step.json" 2>&1 | tee "$OUT/beam_step.log"
