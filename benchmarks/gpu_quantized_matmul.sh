#!/bin/bash
# One device call for issue 7: environment, then benchmarks/quantized_matmul.py (check on odd shapes,
# the full table, a tiling sweep). Results land in $OUT (the device tool fetches them).
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
python3 -c "import jax, triton; print('jax', jax.__version__, 'triton', triton.__version__, jax.devices())"
timeout "${QMM_TIMEOUT:-330}" python3 benchmarks/quantized_matmul.py --sweep \
  --time-limit "${QMM_LIMIT:-300}" --out "$OUT/quantized_matmul.json" "$@" 2>&1 | tee "$OUT/qmm.log"
