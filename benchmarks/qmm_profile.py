r"""Run each quantized-matmul kernel variant a few times for a profiler, and summarise what Nsight
Compute measured about them (what holds the decode kernels at 0.9-2 TB/s).

    # on the GPU machine (benchmarks/gpu_qmm_profile.sh does both steps):
    ncu --clock-control none --kernel-name regex:quantized_matmul --section SpeedOfLight \
        --section WarpStateStats ... --csv --page raw \
        python3 benchmarks/qmm_profile.py --m 16 --k 8192 --n 8192 > ncu_raw.csv
    python3 benchmarks/qmm_profile.py --summarise ncu_raw.csv

The run half builds one weight per format (int8 per channel, int4 group 128), and for every
variant jit-compiles the kernel alone (no loop, no XLA baseline: the profiler times each launch
itself) and calls it ``--calls`` times. Variants are named ``bits:kernel:unpack:layout``, e.g.
``4:dot:prmt:nk``; the default tiling comes from ``default_config``. It prints nothing on stdout
(ncu writes the CSV there), only progress on stderr.

The summarise half reads ncu's raw CSV page (one row per profiled launch, a column per metric) and
prints, per kernel launch: duration, DRAM throughput (% of peak and GB/s), SM throughput,
achieved occupancy, issue activity, and the warp stall reasons that take the largest share of the
cycles between issued instructions (``smsp__average_warps_issue_stalled_*_per_issue_active``),
so it does not depend on which metric names a given ncu version reports: it takes what is there.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_VARIANTS = ("4:dot:shift:kn", "4:dot:prmt:kn", "4:dot:shift:nk", "4:dot:prmt:nk",
                    "4:fma:shift:kn", "8:dot:shift:kn", "8:dot:shift:nk")


def parse_variant(text: str):
  """"bits:kernel:unpack:layout" -> (bits, kernel, unpack, layout), with a clear error."""
  parts = text.split(":")
  if len(parts) != 4 or parts[0] not in ("4", "8"):
    raise argparse.ArgumentTypeError(f"variant {text!r}: want bits:kernel:unpack:layout, e.g. "
                                     f"4:dot:prmt:nk")
  return int(parts[0]), parts[1], parts[2], parts[3]


def run(args):
  import dataclasses  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from kernels.quantized_matmul import gpu as qgpu  # pylint: disable=import-outside-toplevel
  m, k, n = args.m, args.k, args.n
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(jnp.bfloat16)
  codes = {8: jax.random.randint(keys[1], (k, n), -127, 128, jnp.int32).astype(jnp.int8),
           4: jax.random.randint(keys[2], (k // 2, n), 0, 256, jnp.int32).astype(jnp.uint8)}
  scales = {8: jax.random.uniform(keys[3], (1, n), jnp.float32, 1e-4, 2e-4),
            4: jax.random.uniform(keys[4], (k // 128, n), jnp.float32, 1e-3, 3e-3)}
  transposed = {bits: jnp.asarray(c.T) for bits, c in codes.items()}
  done = []
  for bits, kernel, unpack, layout in args.variants:
    group = 128 if bits == 4 else None
    try:
      cfg = dataclasses.replace(
          qgpu.default_config(m, k, n, bits=bits, group_size=group, kernel=kernel),
          unpack=unpack, w_layout=layout)
      f = jax.jit(lambda x, q, s, cfg=cfg, bits=bits, group=group: qgpu.quantized_matmul_gpu(
          x, q, s, bits=bits, group_size=group, config=cfg, interpret=args.interpret))
      q = transposed[bits] if layout == "nk" else codes[bits]
      for _ in range(args.calls):
        jax.block_until_ready(f(x, q, scales[bits]))
      done.append(dict(bits=bits, kernel=kernel, unpack=unpack, layout=layout,
                       cfg=dataclasses.asdict(cfg)))
      print(f"ran {bits}:{kernel}:{unpack}:{layout} x {args.calls}: {cfg}", file=sys.stderr,
            flush=True)
    except Exception as e:  # noqa: BLE001 - report and go on with the next variant
      print(f"FAILED {bits}:{kernel}:{unpack}:{layout}: {type(e).__name__}: {str(e)[:300]}",
            file=sys.stderr, flush=True)
  if args.manifest:
    with open(args.manifest, "w") as f:
      json.dump(dict(m=m, k=k, n=n, calls=args.calls, variants=done), f, indent=1)


def read_raw_csv(path: str):
  """ncu's ``--csv --page raw`` output -> (units {metric: unit}, [row {metric: value}]); lines
  before the header (the program's or ncu's own output) are skipped."""
  with open(path, newline="") as f:
    lines = f.read().splitlines()
  start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
  if start is None:
    raise ValueError(f"{path}: no ncu CSV header (a line starting with \"ID\"); was the kernel "
                     f"name filter right, and did ncu profile anything?")
  reader = list(csv.reader(lines[start:]))
  header, units, rows = reader[0], reader[1], reader[2:]
  return dict(zip(header, units)), [dict(zip(header, r)) for r in rows if len(r) == len(header)]


def _number(text):
  try:
    return float(str(text).replace(",", ""))
  except ValueError:
    return None


def summarise_row(row: dict, units: dict, top: int = 5) -> dict:
  """The headline numbers of one profiled launch (None where ncu did not report a metric)."""
  def pick(*names):
    for name in names:
      if name in row and _number(row[name]) is not None:
        return _number(row[name])
    return None
  duration = pick("gpu__time_duration.sum")
  if duration is not None and units.get("gpu__time_duration.sum") == "nsecond":
    duration /= 1e3  # -> us
  elif duration is not None and units.get("gpu__time_duration.sum") == "msecond":
    duration *= 1e3
  stalls = {}
  for name, value in row.items():
    found = re.fullmatch(r"smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio", name)
    if found and _number(value) is not None:
      stalls[found.group(1)] = _number(value)
  biggest = sorted(stalls.items(), key=lambda kv: -kv[1])[:top]
  return dict(
      kernel=row.get("Kernel Name", ""), grid=row.get("Grid Size", ""),
      block=row.get("Block Size", ""), duration_us=duration,
      dram_pct=pick("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                    "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
      dram_bytes_per_s=pick("dram__bytes.sum.per_second"),
      sm_pct=pick("sm__throughput.avg.pct_of_peak_sustained_elapsed"),
      occupancy_pct=pick("sm__warps_active.avg.pct_of_peak_sustained_active"),
      issue_active_pct=pick("smsp__issue_active.avg.pct_of_peak_sustained_active"),
      cycles_per_issue=pick("smsp__average_warp_latency_per_inst_issued.ratio"),
      registers=pick("launch__registers_per_thread"),
      stalls=biggest)


def summarise(path: str, manifest: str | None = None) -> list:
  units, rows = read_raw_csv(path)
  out = [summarise_row(r, units) for r in rows]
  variants = []
  if manifest and os.path.exists(manifest):
    with open(manifest) as f:
      variants = json.load(f)["variants"]
  print("launch | kernel | grid | us | DRAM % | GB/s | SM % | occupancy % | issue active % | "
        "top stalls (cycles per issued instruction)")
  for i, s in enumerate(out):
    fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"
    stalls = ", ".join(f"{k} {v:.1f}" for k, v in s["stalls"])
    gbs = None if s["dram_bytes_per_s"] is None else s["dram_bytes_per_s"] / 1e9
    print(f"{i} | {s['kernel'][:40]} | {s['grid']} | {fmt(s['duration_us'])} | "
          f"{fmt(s['dram_pct'])} | {fmt(gbs, 0)} | {fmt(s['sm_pct'])} | "
          f"{fmt(s['occupancy_pct'])} | {fmt(s['issue_active_pct'])} | {stalls}")
  if variants:
    print("variants run, in order (each launched --calls times):",
          ", ".join(f"{v['bits']}:{v['kernel']}:{v['unpack']}:{v['layout']}" for v in variants))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--m", type=int, default=16)
  p.add_argument("--k", type=int, default=8192)
  p.add_argument("--n", type=int, default=8192)
  p.add_argument("--variants", type=parse_variant, nargs="+",
                 default=[parse_variant(v) for v in DEFAULT_VARIANTS])
  p.add_argument("--calls", type=int, default=2, help="launches of each variant")
  p.add_argument("--manifest", default=None, help="JSON: the variants run and their tilings")
  p.add_argument("--interpret", action="store_true", help="CPU smoke test (interpret mode)")
  p.add_argument("--summarise", metavar="CSV", default=None,
                 help="instead of running: summarise ncu's --csv --page raw output")
  p.add_argument("--summary-json", default=None, help="with --summarise: also write JSON here")
  args = p.parse_args(argv)
  if args.summarise:
    try:
      out = summarise(args.summarise, args.manifest)
    except (OSError, ValueError) as e:
      sys.exit(f"error: {e}")
    if args.summary_json:
      variants = None
      if args.manifest and os.path.exists(args.manifest):
        with open(args.manifest) as f:
          variants = json.load(f)
      with open(args.summary_json, "w") as f:
        json.dump(dict(launches=out, run=variants), f, indent=1)
    return
  run(args)


if __name__ == "__main__":
  main()
