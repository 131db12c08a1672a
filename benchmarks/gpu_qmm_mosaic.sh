#!/bin/bash
# One device call (~8 minutes) for issue 7's decode shapes: the Mosaic GPU kernel
# (kernels/quantized_matmul/mosaic.py, prepared on 2026-11-27 without a GPU: TMA-pipelined codes,
# dequantised in registers, wgmma with the weights as the register operand), run on a GPU for the
# first time.
#   1. Check against the reference, compiled for the GPU: every format (int8 / int4, per channel /
#      group 32 / 64 / 128, zero points), bf16 and f16, M = 1 and 17, at the default tiling and
#      at one that changes every option (64-column tiles, a K split, 2 stages, one wgmma per 128
#      columns, float32 dequantisation, the other load of the codes): 56 cases. The first run of
#      the kernels: a deviceless compile (benchmarks/xla_gpu_offline.py --mosaic-qmm) already took
#      them through Mosaic GPU's whole compiler and ptxas (no spills for the defaults).
#   2. M = 1, 4, 16, 64 on the four shapes: bf16 jnp.dot, the default Triton kernel and the Mosaic
#      kernel (at M <= 16 also the Triton dot kernel on the same repacked codes, w_layout="nk"),
#      int8 per channel and int4 group 128, in the same loop (speed-up over bf16, share of the
#      copy bandwidth).
#   3. A tiling sweep of the Mosaic kernel at 4096 x 14336, M = 1 and 16 (64 / 256 columns per
#      program, K split halved / doubled, 2 / 6 / 8 stages, one wgmma per 128 columns, the other
#      load of the codes, a 128-row int4 step).
# ptxas reports every Mosaic kernel's registers, spills and wgmma serialisation warnings (C7515)
# into a dump folder outside $OUT (one file per kernel); their lines are collected into
# $OUT/mosaic_ptxas.txt.
# If it beats the Triton kernel at M <= 16: route impl="auto" there (a load-time repack of the
# codes, mosaic.repack_nk, in postrl.quant) and rerun the issue's table.
export PYTHONPATH=. PYTHONUNBUFFERED=1
export MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=/tmp/mgpu_dump
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
timeout "${QMM_TIMEOUT:-480}" python3 benchmarks/quantized_matmul.py --mosaic \
  --mosaic-check-m 1 17 --mosaic-m 1 4 16 64 --mosaic-sweep-m 1 16 \
  --mosaic-sweep-shape 4096x14336 --mosaic-seconds "${MOSAIC_SECONDS:-380}" --no-check \
  --skip-table --time-limit "${QMM_LIMIT:-450}" \
  --out "$OUT/quantized_matmul_mosaic.json" 2>&1 | tee "$OUT/qmm_mosaic.log"
grep -h -i -E "registers|spill|C7515|serializ|smem" -r /tmp/mgpu_dump "$OUT/qmm_mosaic.log" \
  2>/dev/null | sort | uniq -c | sort -rn | head -200 > "$OUT/mosaic_ptxas.txt"
