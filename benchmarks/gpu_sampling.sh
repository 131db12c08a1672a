#!/bin/bash
# One device call for issue 8 (sampling half): environment, then benchmarks/sampling.py (check of
# the compiled kernel against the exact distribution and the reference, the copy bandwidth, the
# table of sort / bisection / Pallas sampling vs reading the logits once, a short settings sweep).
# Finishes in under 6 minutes on one H100 (SAMPLING_LIMIT bounds the script, SAMPLING_TIMEOUT kills
# it); results land in $OUT (the device tool fetches them).
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
# the check compiles and checks the default (split + fast_math), its inverse-CDF draw and the row
# kernel (the split path's leftover rows)
timeout "${SAMPLING_TIMEOUT:-360}" python3 benchmarks/sampling.py --sweep --sweep-seconds 70 \
  --check-configs ${CHECK_CONFIGS:-split_fast split_cdf row} \
  --time-limit "${SAMPLING_LIMIT:-330}" --repeats 5 --out "$OUT/sampling.json" "$@" 2>&1 \
  | tee "$OUT/sampling.log"
