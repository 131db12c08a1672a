r"""One beam-search step on GPU: XLA (log_softmax + add + top_k over W x V) against the fused Pallas
(Triton) kernel of ``kernels.beam_step`` (+ its XLA merge), beside the time to read the logits
once, in one run.

    python benchmarks/beam_step.py --out benchmarks/results/beam_step.json       # ~90 s, H100
    python benchmarks/beam_step.py --interpret --b 1 --w 2 --v 300 --repeats 1   # CPU smoke test

Phases: --check (the compiled kernel against the reference: small and odd vocabularies, splits,
ties, -inf tokens / dead beams / rows, bf16, k up to 32, both insertion loops; exact indices,
values to float rounding), the copy bandwidth, then the table: B in {1, 16, 64}, W in {4, 8},
V in {32000, 49152, 128256, 151936} (Llama-2 / Mistral, SmolLM2, Llama-3, Qwen2), bf16 logits,
K = 2W. Method (docs/benchmarks.md, as benchmarks/quantized_matmul.py): every timed executable
runs R beam steps over R distinct logits buffers (together >= 3x the L2 cache where 16 buffers
reach it; ``l2_resident`` marks the rows where they do not) inside a loop of L iterations in one
jit. The beam scores are carried and every buffer is tied to them by an optimization barrier (no
copy), so XLA cannot hoist a step out of the loop; time per step = median over repeats / (R L).
The floor is one read of the logits at the copy bandwidth measured in the same run (read + write
bytes per second of a device-to-device copy): ``read_us = bytes / copy_bw``. Columns: XLA, the
kernel + merge, the kernel alone (``topk_partials_gpu``), their ratios; ``tokens_equal`` is the
fraction of (beam, token) picks equal to XLA's on the first buffer. --sweep times other tilings
at three shapes. Prints each row as it goes and rewrites the JSON after each (--out); stops
starting new shapes after --time-limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  pylint: disable=wrong-import-position
from benchmarks.quantized_matmul import copy_bandwidth, time_many  # noqa: E402
from kernels.beam_step import (GpuConfig, beam_step, beam_step_gpu,  # noqa: E402
                               beam_step_reference, default_config, log_softmax_topk,
                               topk_partials_gpu)
from kernels.beam_step import gpu as bgpu  # noqa: E402

BS, WS = (1, 16, 64), (4, 8)
VS = (151936, 32000, 128256, 49152)  # the order shapes run in: extremes first
L2_BYTES = 60 * 2**20


def random_logits(shape, n, dtype, seed=0):
  """``n`` distinct buffers of N(0, 3^2) logits."""
  keys = jax.random.split(jax.random.key(seed), n)
  return [(3.0 * jax.random.normal(k, shape, jnp.float32)).astype(dtype) for k in keys]


def _special_inputs(kind, b, w, v, dtype):
  x = np.array(random_logits((b, w, v), 1, jnp.float32, seed=v)[0])
  s = np.asarray(jax.random.normal(jax.random.key(v + 1), (b, w))) - 3.0
  if kind == "ties":  # integer logits, beam 1 a copy of beam 0, equal scores
    x = np.round(x / 3.0)
    x[:, 1] = x[:, 0]
    s[:] = 0.0
  elif kind == "inf":  # masked tokens, a dead beam, a row of -inf, a batch row with nothing finite
    x[0, 0, 3:] = -np.inf
    s[0, 1] = -np.inf
    x[0, 2] = -np.inf
    s[-1] = -np.inf
  return jnp.asarray(x).astype(dtype), jnp.asarray(s, jnp.float32)


# (B, W, V, K, dtype, inputs, config)
CHECKS = [
    (2, 3, 37, 6, "float32", "random", GpuConfig(block_v=16)),
    (1, 4, 1000, 8, "bfloat16", "random", GpuConfig(block_v=128, splits=3)),
    (3, 4, 37, 8, "float32", "inf", GpuConfig(block_v=16, splits=2)),
    (3, 4, 32000, 8, "bfloat16", "random", None),
    (2, 4, 4099, 8, "bfloat16", "ties", None),
    (2, 16, 2000, 32, "float32", "random", GpuConfig(block_v=256, insert="rounds")),
    (1, 8, 151936, 16, "bfloat16", "random", GpuConfig(insert="rounds")),
    (64, 8, 49152, 16, "bfloat16", "random", None),
]


@np.errstate(invalid="ignore")  # -inf - -inf in the value differences (only finite ones count)
def run_check(results, interpret):
  """The compiled kernel against the reference; returns True when every case agrees."""
  rows, ok = [], True
  cases = CHECKS[1:3] if interpret else CHECKS
  for b, w, v, k, dtype, kind, cfg in cases:
    t0 = time.perf_counter()
    x, s = _special_inputs(kind, b, w, v, jnp.dtype(dtype))
    row = dict(b=b, w=w, v=v, k=k, dtype=dtype, inputs=kind,
               config=None if cfg is None else dataclasses.asdict(cfg))
    try:
      got = beam_step(x, s, k, impl="pallas", interpret=interpret, config=cfg)
      ref = beam_step_reference(x, s, k)
      row["tokens_equal"] = bool(np.array_equal(got.token_BxK, ref.token_BxK)
                                 and np.array_equal(got.beam_BxK, ref.beam_BxK))
      gv, rv = np.asarray(got.values_BxK), np.asarray(ref.values_BxK)
      fin = np.isfinite(rv)
      row["values_inf_equal"] = bool(np.array_equal(fin, np.isfinite(gv))
                                     and np.array_equal(gv[~fin], rv[~fin]))
      both = fin & np.isfinite(gv)
      row["max_value_diff"] = float(np.max(np.abs(gv - rv)[both], initial=0.0))
      gl, rl = np.asarray(got.lse_BxW), np.asarray(ref.lse_BxW)
      row["lse_inf_equal"] = bool(np.array_equal(gl[~np.isfinite(rl)], rl[~np.isfinite(rl)]))
      row["max_lse_diff"] = float(np.max(np.abs(gl - rl)[np.isfinite(rl) & np.isfinite(gl)],
                                         initial=0.0))
      row["ok"] = (row["tokens_equal"] and row["values_inf_equal"] and row["lse_inf_equal"]
                   and row["max_value_diff"] < 1e-4 and row["max_lse_diff"] < 1e-4)
    except Exception as e:  # noqa: BLE001 - report and go on
      row["error"], row["ok"] = f"{type(e).__name__}: {str(e)[:400]}", False
    ok &= row["ok"]
    rows.append(row)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    common.log(f"check B={b} W={w} V={v} K={k} {dtype} {kind}: "
               f"{'ok' if row['ok'] else 'FAIL ' + str(row)} ({row['seconds']} s)")
  v = 300 if interpret else 49152
  x = random_logits((4, v), 1, jnp.bfloat16, seed=3)[0]
  try:
    got = log_softmax_topk(x, 20, impl="pallas", interpret=interpret)
    ref = log_softmax_topk(x, 20, impl="xla")
    row = dict(op="log_softmax_topk", r=4, v=v, k=20,
               ok=bool(np.array_equal(got.index_RxK, ref.index_RxK)
                       and np.allclose(got.values_RxK, ref.values_RxK, atol=1e-4)))
  except Exception as e:  # noqa: BLE001
    row = dict(op="log_softmax_topk", ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
  ok &= row["ok"]
  rows.append(row)
  common.log(f"check log_softmax_topk: {'ok' if row['ok'] else 'FAIL ' + str(row)}")
  results.update(check=rows, check_ok=bool(ok))
  return ok


def n_buffers(nbytes, l2_bytes):
  return int(min(16, max(2, math.ceil(3 * l2_bytes / nbytes))))


def loop_reps(nbytes, buffers, target_s=3e-3):
  """Loop count that makes one timed call last about ``target_s`` (estimate: 3 TB/s reads plus
  20 us per step)."""
  est = (nbytes / 3e12 + 20e-6) * buffers
  return int(min(50, max(1, math.ceil(target_s / est))))


def _tied(x, s):
  """x, made to depend on the loop-carried scores without a copy (an optimization barrier), so
  that XLA cannot hoist a computation on the loop-invariant logits out of the timing loop."""
  return jax.lax.optimization_barrier((x, s))[0]


def time_shape(b, w, v, dtype, repeats, copy_bw, interpret, l2_bytes, config=None):
  """One table row: XLA, kernel + merge, kernel alone at (B, W, V), K = 2W."""
  k = 2 * w
  itemsize = jnp.dtype(dtype).itemsize
  nbytes = b * w * v * itemsize
  r = n_buffers(nbytes, l2_bytes)
  reps = loop_reps(nbytes, r)
  xs = random_logits((b, w, v), r, dtype, seed=b * 1000 + w * 10 + v)
  scores = jax.random.normal(jax.random.key(1), (b, w)) - 3.0
  cfg = config or default_config(b * w, v)
  row = dict(b=b, w=w, v=v, k=k, dtype=jnp.dtype(dtype).name, buffers=r, loop=reps,
             logits_bytes=nbytes, l2_resident=r * nbytes < l2_bytes,
             read_us=1e6 * nbytes / copy_bw, config=dataclasses.asdict(cfg))

  def xla(s, *xs):
    return [o for x in xs for o in beam_step_reference(_tied(x, s), s, k)[:3]]

  def pallas(s, *xs):
    return [o for x in xs
            for o in beam_step_gpu(_tied(x, s), s, k, config=cfg, interpret=interpret)[:3]]

  def kernel_only(s, *xs):
    return [o for x in xs for o in topk_partials_gpu(_tied(x, s).reshape(b * w, v), min(k, v),
                                                     config=cfg, interpret=interpret)]

  got = jax.jit(lambda s, x: beam_step_gpu(x, s, k, config=cfg, interpret=interpret))(scores,
                                                                                      xs[0])
  ref = beam_step_reference(xs[0], scores, k)
  row["tokens_equal"] = float(np.mean((np.asarray(got[1]) == np.asarray(ref.beam_BxK))
                                      & (np.asarray(got[2]) == np.asarray(ref.token_BxK))))
  row["max_value_diff"] = float(np.max(np.abs(np.asarray(got[0]) - np.asarray(ref.values_BxK))))
  for name, fn in (("xla", xla), ("pallas", pallas), ("kernel", kernel_only)):
    try:
      # one loop iteration first: XLA's top-k over W x V can take milliseconds (494 us at
      # B = 1, W = 4, V = 152k on an H100), far above the bandwidth estimate behind ``reps``
      t1, c = time_many(fn, (scores, *xs), 1, 1)
      n = int(min(reps, max(1, math.ceil(3e-3 / max(t1, 1e-7)))))
      t, _ = time_many(fn, (scores, *xs), repeats, n) if n > 1 or repeats > 1 else (t1, c)
      row[f"{name}_loop"] = n
      row[f"{name}_us"] = 1e6 * t / r
      row[f"{name}_compile_s"] = c
    except Exception as e:  # noqa: BLE001 - report and go on
      row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
  for name in ("xla", "pallas", "kernel"):
    if f"{name}_us" in row:
      row[f"{name}_x_read"] = row[f"{name}_us"] / row["read_us"]
  if "xla_us" in row and "pallas_us" in row:
    row["speedup"] = row["xla_us"] / row["pallas_us"]
  return row


def _fmt(row, key, spec="8.1f"):
  v = row.get(key)
  if isinstance(v, float):
    return format(v, spec)
  return f"{'ERR' if key + '_error' in row or 'error' in row else '-':>8}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--b", type=int, nargs="+", default=list(BS))
  p.add_argument("--w", type=int, nargs="+", default=list(WS))
  p.add_argument("--v", type=int, nargs="+", default=list(VS))
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--time-limit", type=float, default=80,
                 help="seconds from the start (check included); no new shape after it")
  p.add_argument("--no-check", action="store_true")
  p.add_argument("--sweep", action="store_true",
                 help="other tilings at three shapes, after the table")
  p.add_argument("--interpret", action="store_true",
                 help="CPU smoke test: the kernel in interpret mode, a small copy")
  p.add_argument("--out", default="benchmarks/results/beam_step.json")
  args = p.parse_args(argv)
  budget = common.Budget(args.time_limit)
  l2_bytes = 2**20 if args.interpret else L2_BYTES
  results = common.Results(args.out, **common.environment(), settings=vars(args),
                           status="running", rows=[])
  common.log(f"{jax.devices()[0].device_kind} jax {jax.__version__}")
  if not args.no_check:
    run_check(results, args.interpret)
  copy_bw = copy_bandwidth(2**22 if args.interpret else 2**30, reps=2 if args.interpret else 20)
  results.update(copy_bw_Bps=copy_bw)
  common.log(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s (read + write)")
  common.log(f"{'B':>3} {'W':>2} {'V':>6} {'MB':>6} | {'read us':>8} {'xla us':>8} "
             f"{'pallas us':>9} {'kern us':>8} | {'xla/pal':>7} {'pal/read':>8} | tok=")
  shapes = [(b, w, v) for v in args.v for b in args.b for w in args.w]
  status = "complete"
  for b, w, v in shapes:
    if budget.over():
      status = "time_limit"
      common.log("time limit reached: the table stops here")
      break
    row = time_shape(b, w, v, jnp.dtype(args.dtype), args.repeats, copy_bw, args.interpret,
                     l2_bytes)
    results.append("rows", row)
    common.log(f"{b:3d} {w:2d} {v:6d} {row['logits_bytes'] / 1e6:6.1f} | {_fmt(row, 'read_us')} "
               f"{_fmt(row, 'xla_us')} {_fmt(row, 'pallas_us', '9.1f')} {_fmt(row, 'kernel_us')}"
               f" | {_fmt(row, 'speedup', '7.2f')} {_fmt(row, 'pallas_x_read', '8.2f')} | "
               f"{row['tokens_equal']:.2f}")
  if args.sweep and status == "complete":
    sweep_shapes = [(1, 4, 151936), (64, 8, 151936), (16, 4, 32000)]
    if args.interpret:
      sweep_shapes = [(args.b[0], args.w[0], args.v[0])]
    for b, w, v in sweep_shapes:
      base = default_config(b * w, v)
      candidates = [base, dataclasses.replace(base, insert="rounds"),
                  dataclasses.replace(base, num_warps=8),
                  dataclasses.replace(base, num_stages=3),
                  dataclasses.replace(base, block_v=2048, num_warps=8,
                                      splits=max(1, base.splits // 2)),
                  dataclasses.replace(base, block_v=512, splits=base.splits * 2),
                  dataclasses.replace(base, splits=max(1, base.splits // 2)),
                  dataclasses.replace(base, splits=base.splits * 2)]
      variants = []
      for cfg in candidates:
        try:
          bgpu.check_config(v, 2 * w, cfg)
          if cfg not in variants:
            variants.append(cfg)
        except ValueError:
          pass
      for cfg in variants:
        if budget.over():
          status = "time_limit"
          break
        try:
          row = time_shape(b, w, v, jnp.dtype(args.dtype), args.repeats, copy_bw,
                           args.interpret, l2_bytes, config=cfg)
        except Exception as e:  # noqa: BLE001 - a tiling the kernel cannot run
          row = dict(b=b, w=w, v=v, config=dataclasses.asdict(cfg),
                     error=f"{type(e).__name__}: {str(e)[:300]}")
        row["default"] = cfg == base
        results.append("sweep", row)
        common.log(f"sweep B={b} W={w} V={v} {cfg}: pallas {_fmt(row, 'pallas_us')} us, "
                   f"kernel {_fmt(row, 'kernel_us')} us")
  results.update(status=status, elapsed_s=budget.elapsed())
  common.log(f"done in {budget.elapsed():.0f} s ({status})")


if __name__ == "__main__":
  main()
