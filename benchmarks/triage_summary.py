"""The verdicts of ``benchmarks/gpu_triage.sh``: one line per open GPU issue, read from the JSON its
three benchmark scripts wrote into one folder.

- issue 8: the sampling kernel's compiled check passed, and top-p at B = 64, V = 152k with the
  default call took <= 4x one read of the logits (``copy_bound_us``, gross: the timing loop's own
  cost is not subtracted) and >= 10x less than XLA's sort (the issue's two targets).
- issue 9: the fused decoder layer's compiled check passed, and which of its implementations (the
  whole layer, or its attention or MLP half fused) ran the layers of a SmolLM2-135M decode step
  at batch 1 fastest, if faster than XLA's layer (``xla_over_<impl>`` > 1: set
  ``kernels.decode_block.GPU_MEASURED`` and ``GPU_IMPL``); with each one's share of the floor.
- issue 7: the Mosaic GPU kernel's compiled check (every format) passed, and at each timed
  (K, N, M, bits) its time beside bf16's and the default Triton kernel's, against the issue's
  decode targets (M <= 16: int8 >= 1.8x and int4 >= 3x bf16, >= 80% of the copy bandwidth), met
  only where its output there is also within 1e-2 of the reference.

A part whose JSON is missing or cut short says so instead of a verdict.

    python benchmarks/triage_summary.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os

# the decode targets (issue 7 item 4): speed-up over bf16 by bit width, share of copy
QMM_TARGET = {8: 1.8, 4: 3.0}
QMM_BW_TARGET = 0.8
# kernels.decode_block.KERNEL_IMPLS (not imported: this script reads JSON only)
DECODE_BLOCK_KERNEL_IMPLS = ("pallas", "pallas_attention", "pallas_mlp", "pallas_persistent")


def load_json(out_dir: str, name: str):
  """(document, None) of ``out_dir/name``, or (None, a line saying it is missing or unreadable)."""
  path = os.path.join(out_dir, name)
  if not os.path.exists(path):
    return None, f"{name} missing (the part did not start, or was cut before its first row)"
  try:
    with open(path) as f:
      return json.load(f), None
  except (OSError, ValueError) as e:
    return None, f"{name} unreadable ({type(e).__name__}: {e})"


def sampling_verdict(doc) -> str:
  """Issue 8 from ``sampling.py``'s JSON."""
  if not doc.get("check_passed"):
    return f"issue 8: check not passed (check_passed={doc.get('check_passed')!r}): no verdict"
  row = next((r for r in doc.get("table", []) if (r.get("mode"), r.get("batch")) == ("top_p", 64)),
             None)
  if row is None or "default_us" not in row:
    return "issue 8: no timed top-p row at B = 64 (cut by the time limit?)"
  t, floor, sort = row["default_us"], row["copy_bound_us"], row.get("sort_us")
  over = t / floor
  speedup = sort / t if sort else float("nan")
  met = over <= 4 and speedup >= 10
  return (f"issue 8: top-p B = 64, V = {row.get('vocab')}: default {t:.1f} us = {over:.2f}x the "
          f"read floor ({floor:.1f} us; target <= 4x), {speedup:.1f}x faster than the sort "
          f"(target >= 10x), loop {row.get('loop_us', float('nan')):.1f} us: "
          f"{'MET' if met else 'not met'}")


def decode_block_verdict(doc) -> str:
  """Issue 9 from ``decode_block.py``'s JSON: each kernel implementation (the whole layer fused,
  or one half) against XLA's layer, and the fastest."""
  checks = doc.get("checks", [])
  failed = doc.get("check_failed", [])
  bad = [c for c in checks if not c.get("ok")]
  if not checks or (bad and not failed):  # no check, or one that failed before naming an impl
    return (f"issue 9: fused layer check failed or missing ({len(bad)} of {len(checks)} failing"
            f"{': ' + str(bad[0].get('error', bad[0]))[:200] if bad else ''}): no verdict")
  lines = []
  if failed:  # those are not timed; the others are judged below
    first = str(bad[0].get("error") or bad[0].get("max_rel_err") or bad[0])[:200] if bad else ""
    lines.append(f"issue 9: check FAILED for {', '.join(failed)} (not timed; {len(bad)} of "
                 f"{len(checks)} check points failing{': ' + first if first else ''})")
  for r in doc.get("rows", []):
    timed = [(impl, r[f"xla_over_{impl}"]) for impl in DECODE_BLOCK_KERNEL_IMPLS
             if f"xla_over_{impl}" in r]
    if "xla_us" not in r or not timed:
      errors = {k: v for k, v in r.items() if k.endswith("_error")}
      lines.append(f"issue 9: {r.get('config')} batch {r.get('batch')}: not timed both ways "
                   f"{errors}")
      continue
    parts = [f"{impl} {r[impl + '_us']} us ({r.get(impl + '_over_floor')}x the floor, "
             f"{speedup}x)" for impl, speedup in timed]
    parts += [f"{k[:-len('_error')]} {str(v)[:120]}" for k, v in r.items() if k.endswith("_error")]
    best, speedup = max(timed, key=lambda t: t[1])
    lines.append(f"issue 9: {r['config']} batch {r['batch']}: XLA layers {r['xla_us']} us "
                 f"({r.get('xla_over_floor')}x the floor); " + "; ".join(parts)
                 + (f": {best} FASTER ({speedup}x)" if speedup > 1 else ": no kernel faster")
                 + f" (read floor {r['floor_us']} us)")
    if r.get("pallas_persistent_trace") or r.get("pallas_persistent_trace_error"):
      lines.append("  " + persistent_trace_line(r))
  if not doc.get("rows"):
    lines.append("issue 9: no timed row (cut by the time limit?)")
  return "\n".join(lines)


def persistent_trace_line(row) -> str:
  """One line of where the persistent layer's launch time goes (``decode_block.py``'s trace)."""
  t = row.get("pallas_persistent_trace")
  if not t:
    return f"persistent trace failed: {str(row.get('pallas_persistent_trace_error'))[:200]}"
  def us(prefix, n):
    return "/".join(f"{t.get(f'{prefix}_{k}_us', float('nan')):.2f}" for k in range(1, n + 1))
  return (f"persistent trace (median layer, us): phases {us('phase', 5)}, barriers "
          f"{us('barrier', 4)}, launch {t.get('launch_us', float('nan')):.2f}, gap between "
          f"layers {t.get('gap_us', float('nan')):.2f}; P = {t.get('programs')}, clock "
          f"resolution {t.get('resolution_ns')} ns, timeouts {t.get('barrier_timeouts')}")


def mosaic_verdict(doc) -> str:
  """Issue 7 from ``quantized_matmul.py --mosaic``'s JSON."""
  check = doc.get("mosaic_check")
  if not check:
    return "issue 7: Mosaic check missing: no verdict"
  bad = [r for r in check if not isinstance(r.get("rel_err"), float) or not r["rel_err"] < 1e-2]
  lines = [f"issue 7: Mosaic check: {len(check)} cases, {len(bad)} failing"
           + (f" (first: int{bad[0]['bits']} group {bad[0]['group']} {bad[0]['dtype']}: "
              f"{str(bad[0]['rel_err'])[:200]})" if bad else "")]
  rows = [r for r in doc.get("mosaic", []) if not r.get("sweep")]
  by_point = {}
  for r in rows:
    by_point.setdefault((r["k"], r["n"], r["m"], r["bits"]), {})[r["kernel"]] = r
  for (k, n, m, bits), kernels in sorted(by_point.items()):
    parts = []
    for name in ("mosaic", "triton", "triton_nk"):
      r = kernels.get(name)
      if r is None:
        continue
      if "us" not in r:
        parts.append(f"{name} {str(r.get('error', 'not timed'))[:120]}")
        continue
      parts.append(f"{name} {r['us']:.1f} us {r['vs_bf16']:.2f}x {100 * r['bw']:.0f}%"
                   + (f" ERR {r['err']:.1e}" if r.get("err", 0.0) >= 1e-2 else ""))
    mos = kernels.get("mosaic", {})
    # its output at this shape within the check's tolerance too (the check ran at K = 1024)
    met = ("us" in mos and mos.get("err", 1.0) < 1e-2 and mos["vs_bf16"] >= QMM_TARGET[bits]
           and mos["bw"] >= QMM_BW_TARGET)
    best = max((r for r in kernels.values() if "us" in r), key=lambda r: r["vs_bf16"],
               default=None)
    lines.append(f"issue 7: {k} x {n} M = {m} int{bits} (bf16 "
                 f"{next(iter(kernels.values()))['bf16_us']:.1f} us): " + "; ".join(parts)
                 + f" | target {QMM_TARGET[bits]}x and {QMM_BW_TARGET:.0%}: "
                 + ("MET by mosaic" if met else "not met")
                 + (f"; fastest {best['kernel']}" if best else ""))
  if not rows:
    lines.append("issue 7: no timed Mosaic row (cut by the time limit?)")
  return "\n".join(lines)


def summarise(out_dir: str) -> str:
  """The three verdicts as printed lines."""
  lines = []
  for name, verdict in (("sampling.json", sampling_verdict),
                        ("decode_block.json", decode_block_verdict),
                        ("quantized_matmul_mosaic.json", mosaic_verdict)):
    doc, problem = load_json(out_dir, name)
    lines.append(problem if doc is None else verdict(doc))
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out_dir", help="the folder gpu_triage.sh wrote its JSON into ($OUT)")
  print(summarise(parser.parse_args().out_dir))


if __name__ == "__main__":
  main()
