#!/bin/bash
# One device call (~4 minutes) for issue 7: Nsight Compute on the quantized-matmul decode kernels
# (8192 x 8192, M = 16 and M = 1): the default int4 / int8 "dot" kernels, the int4 "fma" GEMV, and
# the variants prepared on 2026-11-27 (codes transposed: w_layout="nk"; int4 unpack="prmt").
# Per launch: duration, DRAM throughput, SM throughput, occupancy, issue activity and the largest
# warp stall reasons (benchmarks/qmm_profile.py --summarise). Needs ncu with hardware counters
# (the Firecracker machines; on gVisor ncu cannot read them: the log says so and nothing else runs).
# Files in $OUT: ncu_raw_m16.csv, ncu_raw_m1.csv (every metric), qmm_profile_m16.json,
# qmm_profile_m1.json (the summaries), qmm_profile.log.
export PYTHONPATH=. PYTHONUNBUFFERED=1
# no CUDA graphs: every kernel its own launch, as the profiler expects
export XLA_FLAGS="--xla_gpu_enable_command_buffer="
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
LOG="$OUT/qmm_profile.log"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv | tee "$LOG"
if [ -z "$NCU" ]; then echo "no ncu on this machine" | tee -a "$LOG"; exit 1; fi
"$NCU" --version | tee -a "$LOG"
for m in ${PROFILE_M:-16 1}; do
  variants="4:dot:shift:kn 4:dot:prmt:kn 4:dot:shift:nk 4:dot:prmt:nk 8:dot:shift:kn 8:dot:shift:nk"
  [ "$m" -le 8 ] && variants="$variants 4:fma:shift:kn 8:fma:shift:kn"
  timeout "${NCU_TIMEOUT:-150}" "$NCU" --clock-control none --target-processes all \
    --kernel-name regex:quantized_matmul --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats \
    --section MemoryWorkloadAnalysis --csv --page raw \
    python3 benchmarks/qmm_profile.py --m "$m" --k 8192 --n 8192 --calls 2 \
    --variants $variants --manifest "/tmp/qmm_profile_m$m.json" \
    > "$OUT/ncu_raw_m$m.csv" 2>> "$LOG"
  echo "== M = $m (ncu exit $?)" | tee -a "$LOG"
  python3 benchmarks/qmm_profile.py --summarise "$OUT/ncu_raw_m$m.csv" \
    --manifest "/tmp/qmm_profile_m$m.json" --summary-json "$OUT/qmm_profile_m$m.json" 2>&1 \
    | tee -a "$LOG"
done
