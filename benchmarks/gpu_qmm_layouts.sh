#!/bin/bash
# One device call (~6 minutes) for issue 7's decode shapes: the two variants prepared on
# 2026-11-27 without a GPU, then measured here for the first time.
#   1. Check on odd shapes, compiled for the GPU: the "dot" kernel with the codes as stored (kn) and
#      transposed (w_layout="nk"), int4 with the shift and the "prmt" unpack (its inline PTX is
#      run only by an emulator on CPU; a wrong result here means XLA's Triton packs the asm's
#      operands differently from the standalone Triton the offline compile used).
#   2. --variant-set layouts at M = 1, 4, 16 on 4096 x 14336 and 8192 x 8192: dot kn / nk (int4:
#      shift / prmt), the default fma kernel at M <= 8, bf16 jnp.dot in the same loop.
#   3. A tiling sweep around dot + nk + prmt at M = 16 (4096 x 14336).
# Compiled for sm_90 offline (benchmarks/triton_offline.py), the M = 16 K loop goes from 802 to
# 493 instructions for int8 (nk) and from 411 to 282 for int4 (nk + prmt, no I2F).
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
timeout "${QMM_TIMEOUT:-360}" python3 benchmarks/quantized_matmul.py --check-kernels dot \
  --check-unpacks shift prmt --check-layouts kn nk --check-m 1 17 --variants \
  --variant-set layouts --variants-m 1 4 16 --shapes 4096x14336,8192x8192 \
  --variants-seconds "${VARIANTS_SECONDS:-210}" --skip-table --sweep --sweep-m 16 \
  --sweep-layout nk --sweep-int4-unpack prmt --time-limit "${QMM_LIMIT:-340}" \
  --out "$OUT/quantized_matmul_layouts.json" 2>&1 | tee "$OUT/qmm_layouts.log"
