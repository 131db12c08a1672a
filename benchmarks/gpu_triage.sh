#!/bin/bash
# One device call (~9 minutes) that settles the deciding point of each open GPU issue, for a lease
# too short to run their own calls one after the other (15 minutes of device time, a few of them
# spent starting the machine). Each part has its own time limit, so one that hangs or fails
# leaves the others their time; each script writes its JSON after every row.
#   1. issue 8 (~2.5 min): benchmarks/sampling.py, the default kernel's compiled check (split grid,
#      cdf draw, one-launch finish) and top-p at B = 64, V = 152k with the columns the verdict
#      reads (--lean: the timing loop, one read, XLA's sort, the two split settings). Met if the
#      default call is within 4x of one read of the logits and >= 10x faster than XLA's sort.
#   2. issue 9 (~3.4 min): benchmarks/decode_block.py, the fused decoder layer's compiled check (at
#      the timed batch only, --quick-check) and all layers of a SmolLM2-135M decode step at batch
#      1: XLA's layer, the five fused launches
#      (170 launches per step against 395, compiled without a GPU) and, checked and timed last
#      (its first GPU run: a crash there keeps the rest), the same five phases as one persistent
#      launch per layer with barriers across the grid (pallas_persistent), beside the read floor
#      (decides kernels.decode_block.GPU_MEASURED and GPU_IMPL).
#   3. issue 7 (~3.3 min): benchmarks/quantized_matmul.py --mosaic, the Mosaic GPU kernel's first
#      run: its check at M = 17 over every format, then M = 1 and 16 at 4096 x 4096 and
#      8192 x 8192 beside bf16, the default Triton kernel and the Triton kernel on the repacked
#      codes (int8 per channel, int4 group 128).
# summary.txt prints the three verdicts. The full calls (benchmarks/README.md: gpu_lease.sh,
# gpu_decode_block.sh, gpu_qmm_mosaic.sh) take the table of whichever issue this leaves open.
# Files that come back: triage.log, summary.txt, sampling.json, decode_block.json,
# quantized_matmul_mosaic.json, mosaic_ptxas.txt.
export PYTHONPATH=. PYTHONUNBUFFERED=1
export MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=/tmp/mgpu_dump
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
LOG="$OUT/triage.log"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv \
  2>&1 | tee -a "$LOG"
timeout "${SAMPLING_TIMEOUT:-150}" python3 benchmarks/sampling.py --rows 0:1 --lean \
  --check-configs split_cdf --time-limit "${SAMPLING_LIMIT:-130}" --repeats 5 \
  --out "$OUT/sampling.json" 2>&1 | tee -a "$LOG"
timeout "${BLOCK_TIMEOUT:-205}" python3 benchmarks/decode_block.py --config smollm2-135m \
  --batch 1 --quick-check --impls xla pallas pallas_persistent --time-limit "${BLOCK_LIMIT:-170}" \
  --out "$OUT/decode_block.json" 2>&1 | tee -a "$LOG"
timeout "${QMM_TIMEOUT:-200}" python3 benchmarks/quantized_matmul.py --mosaic \
  --mosaic-check-m 17 --mosaic-m 1 16 --mosaic-sweep-shape none \
  --shapes 4096x4096,8192x8192 --mosaic-seconds "${MOSAIC_SECONDS:-170}" --no-check \
  --skip-table --time-limit "${QMM_LIMIT:-180}" \
  --out "$OUT/quantized_matmul_mosaic.json" 2>&1 | tee -a "$LOG"
grep -h -i -E "registers|spill|C7515|serializ" -r /tmp/mgpu_dump 2>/dev/null | sort | uniq -c \
  | sort -rn | head -100 > "$OUT/mosaic_ptxas.txt"
python3 benchmarks/triage_summary.py "$OUT" 2>&1 | tee "$OUT/summary.txt"
