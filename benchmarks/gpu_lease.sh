#!/bin/bash
# One device call (~9 minutes; TOTAL = the seconds the call may take) for a short lease, in the
# order that settles most if the call is cut:
#   1. issue 8's deciding points: benchmarks/sampling.py checks (split + fast_math, cdf draw, row
#      kernel; since 2026-11-27 each path ends in the one-launch finish, so the checks cover it)
#      and the table's first five points with every column (top-p at B = 64 / 1 / 256, top-k and
#      min-p at B = 64, V = 152k), including the A/B of the finish (split_*_xla_finish: XLA's
#      decision and the leftover-row launch, as before) and the in-launch combine
#      (split_cdf_grid: GpuConfig.grid_combine, 5 launches instead of 8; its compiled check is
#      the first run of its atomic arrival counters on a GPU). Met if the default kernel call at top-p,
#      B = 64 is within 4x of one read of the logits (gross: the timing loop's own cost, the
#      "loop" column, is not subtracted) and >= 10x faster than XLA's sort.
#   2. with what time is left: if 1 met, the rest of the sampling table (--lean: loop, read,
#      sort and the two split settings default_config picks between), so that one run holds the
#      whole table; otherwise a sweep of the kernel's launch settings at B = 64, V = 152k.
# Every script writes its JSON after each row, so a cut run keeps what it measured.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
TOTAL=${TOTAL:-540}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
timeout "${SAMPLING_TIMEOUT:-305}" python3 benchmarks/sampling.py --rows 0:5 \
  --check-configs split_fast split_cdf split_cdf_grid row --time-limit "${SAMPLING_LIMIT:-290}" --repeats 5 \
  --out "$OUT/sampling.json" 2>&1 | tee "$OUT/sampling.log"
met=$(python3 - "$OUT" <<'PY'
import sys
from benchmarks.triage_summary import load_json, sampling_verdict  # the targets of gpu_triage.sh
doc, problem = load_json(sys.argv[1], "sampling.json")
verdict = problem if doc is None else sampling_verdict(doc)
print(f"{'yes' if verdict.endswith(': MET') else 'no'} ({verdict})")
PY
)
echo "issue 8 targets met at B = 64, V = 152k: $met" | tee "$OUT/met.txt"
left=$((TOTAL - SECONDS - 15))
echo "seconds left for part 2: $left"
limit=$((left - 15)); sweep_s=$((left - 30))
if [ "$left" -gt 40 ]; then
  if [ "${met%% *}" = yes ]; then
    timeout "$left" python3 benchmarks/sampling.py --no-check --lean --rows 5: \
      --time-limit $limit --repeats 5 --out "$OUT/sampling_rest.json" 2>&1 \
      | tee "$OUT/sampling_rest.log"
  else
    timeout "$left" python3 benchmarks/sampling.py --no-check --no-table --sweep \
      --sweep-programs 8192 2048 --sweep-blocks 1024 2048 --sweep-warps 4 2 \
      --sweep-seconds $sweep_s --time-limit $limit --repeats 5 \
      --out "$OUT/sampling_sweep.json" 2>&1 | tee "$OUT/sampling_sweep.log"
  fi
fi
