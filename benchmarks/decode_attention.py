r"""One decode step's attention over a KV cache on GPU: XLA's masked einsum (reads all S slots)
against the flash-decoding Pallas (Triton) kernel of ``kernels.decode_attention`` (reads the
first L_b slots of each row), beside the time to read the kernel's bytes once, in one run.

    timeout 200 python benchmarks/decode_attention.py --sweep --out $OUT/decode_attention.json
        # GPU: --time-limit 140 (the last 30 s for --sweep), about 2.5-3 min in all
    python benchmarks/decode_attention.py --interpret --heads 4,2 --batch 1 --slots 64 \
        --repeats 1 --out /tmp/decode_attention.json                             # CPU smoke test

Phases:

1. check (the compiled kernel, before any timing): ``decode_attention(impl="pallas")`` against
   ``decode_attention_reference`` at G = H / K = 1, 3, 4 and 16 query heads per kv head, lengths
   1, ragged (not a multiple of the block) and S in the same batch, random lengths at B = 64,
   S = 8192, float32 and bf16, a few ``GpuConfig`` values; some cases fill the slots past each
   row's length with NaN (the kernel must never read them; the reference gets the clean cache).
   Pass: max |kernel - reference| <= 5e-3 (float32) / 2e-2 (bf16). The float32 reference runs at
   ``jax.default_matmul_precision("highest")``; Triton's float32 ``tl.dot`` uses TF32 (as XLA's
   default-precision einsum in the model does on this GPU), ~1e-3 relative, hence the float32
   bound; a wrong mask, rescaling or chunk combination errs by O(1). Each check records its seconds. ``--interpret``: the first two (tiny) cases only.
2. the copy bandwidth of the device (``benchmarks/quantized_matmul.copy_bandwidth``: bytes read +
   written per second of a device-to-device copy) in the same run.
3. the table: bf16 cache, D = 64, (H, K) in {(9, 3) SmolLM2-135M, (32, 8) Llama-3.2-1B},
   B in {1, 16, 64, 256}, S in {320, 2048, 8192} cache slots, every row's length L = S // 2
   (``--valid``: half the cache valid, so the kernel should read half of what XLA reads). Columns:
   ``kernel_bytes`` (what the kernel must read: valid k + v slots and q), ``xla_bytes`` (all S
   slots of k + v and q), ``floor_us`` = kernel_bytes / copy bandwidth (the copy rate counts read
   + write bytes, as in the other scripts), ``xla_us`` (``decode_attention(impl="xla")``, the
   reference), ``pallas_us`` (``decode_attention(impl="pallas")``: the kernel + its XLA combine),
   ``xla_over_pallas``, ``pallas_over_floor``, and ``max_abs_diff`` of the kernel against the
   reference on the first buffer. ``chunks`` / ``busy_chunks``: chunks per (row, kv head) launched
   / holding valid slots. Shapes run in the order of ``table_points`` (1B at B = 64, S = 2048 and
   the extremes first), so a run cut by --time-limit still spans small and large; shapes whose
   buffers need more than 40% of the device memory are recorded as skipped.
4. ``--sweep``: the kernel alone (``impl="pallas"``) at --sweep-shapes over block_s x chunks
   (``--sweep-block-s``, ``--sweep-chunks``; 0 = ``default_chunks``) and num_warps x num_stages
   at the default block and chunks. --sweep-seconds of the limit are kept for it.

Timing (as ``benchmarks/beam_step.py``): every timed executable runs R attention steps over R
distinct caches (together >= 3x the 60 MB L2 cache in kernel bytes where 16 buffers reach it;
``l2_resident`` marks the rows where they do not) inside a loop of L iterations in one jit
(``time_many``: the carried q changes by 0 x the sum of every output each iteration; k, v and
the lengths are tied to it by an optimization barrier, no copy, so XLA cannot hoist work on the
loop-invariant cache out of the loop). L comes from a first one-iteration timing (about 3 ms per
call); time per step = median over --repeats calls / (R L). Prints each row as it goes and
rewrites the JSON after each (--out); no new shape starts after --time-limit; every failure is
recorded in its row (``<variant>_error``), never a crash.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
from kernels.decode_attention import (GpuConfig, decode_attention,  # noqa: E402
                                      decode_attention_reference)
from kernels.decode_attention import gpu as dgpu  # noqa: E402

HEADS = ((9, 3), (32, 8))  # (query heads, kv heads): SmolLM2-135M, Llama-3.2-1B
BATCHES = (1, 16, 64, 256)
SLOTS = (320, 2048, 8192)
L2_BYTES = 60 * 2**20
MEMORY_FRACTION = 0.4  # buffers of one shape may take at most this much of the device memory
TOL = {"float32": 5e-3, "bfloat16": 2e-2}  # float32: TF32 products on the GPU (module doc)

# (B, H, K, D, S, lengths, dtype, config, poisoned): lengths "edge" = 1, ragged, S, then random
CHECKS = [
    (3, 4, 4, 64, 100, "edge", "float32", GpuConfig(block_s=32), False),               # G = 1
    (3, 9, 3, 64, 64, "edge", "bfloat16", GpuConfig(block_s=16, chunks=2), True),      # G = 3
    (3, 9, 3, 64, 320, "edge", "bfloat16", None, True),                                # 135M
    (4, 32, 8, 64, 2048, "edge", "bfloat16", None, False),                             # G = 4
    (4, 32, 8, 64, 2048, "edge", "float32", GpuConfig(chunks=1), False),
    (3, 16, 1, 128, 1000, "edge", "float32", GpuConfig(block_s=16, chunks=4), True),   # G = 16
    (3, 32, 8, 64, 8192, "edge", "bfloat16", GpuConfig(block_s=128, num_warps=8), True),
    (64, 32, 8, 64, 8192, "random", "bfloat16", None, False),
    (1, 9, 3, 64, 8192, "half", "bfloat16", None, False),
]


def check_lengths(kind, b, s, seed=0):
  """Valid slots per row: "edge" cycles 1, a ragged length (not a multiple of 16) and S, the rest
  random; "random" draws them all from [1, S]; "half" is S // 2."""
  if kind == "half":
    return np.full((b,), max(1, s // 2), np.int32)
  out = np.random.RandomState(seed).randint(1, s + 1, size=b).astype(np.int32)
  if kind == "edge":
    edge = [1, min(s, 3 * s // 5 + 1), s]
    out[:min(b, 3)] = edge[:min(b, 3)]
  return out


def random_inputs(b, h, k, d, s, dtype, n, seed=0):
  """q [B, H, D] and ``n`` distinct (k, v) caches [B, S, K, D] of N(0, 1) values in ``dtype``."""
  keys = jax.random.split(jax.random.key(seed), 2 * n + 1)
  q = jax.random.normal(keys[0], (b, h, d), dtype)
  caches = [(jax.random.normal(keys[2 * i + 1], (b, s, k, d), dtype),
             jax.random.normal(keys[2 * i + 2], (b, s, k, d), dtype)) for i in range(n)]
  return q, caches


def _poison(x, lengths):
  """x with every slot at or past its row's length set to NaN."""
  valid = jnp.arange(x.shape[1])[None, :, None, None] < lengths[:, None, None, None]
  return jnp.where(valid, x, jnp.nan).astype(x.dtype)


def _error(e: Exception) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def run_check(results, interpret):
  """The compiled kernel against the reference (module docstring); True when every case passes."""
  ok = True
  for b, h, k, d, s, kind, dtype, cfg, poisoned in (CHECKS[:2] if interpret else CHECKS):
    t0 = time.perf_counter()
    row = dict(b=b, h=h, k=k, g=h // k, d=d, s=s, lengths=kind, dtype=dtype, poisoned=poisoned,
               config=None if cfg is None else dataclasses.asdict(cfg), tol=TOL[dtype])
    try:
      lengths = jnp.asarray(check_lengths(kind, b, s, seed=s))
      q, ((kc, vc),) = random_inputs(b, h, k, d, s, jnp.dtype(dtype), 1, seed=b + s)
      kk, vk = (_poison(kc, lengths), _poison(vc, lengths)) if poisoned else (kc, vc)
      got = decode_attention(q, kk, vk, lengths, impl="pallas", interpret=interpret, config=cfg)
      with jax.default_matmul_precision("highest"):
        ref = jax.jit(decode_attention_reference)(q, kc, vc, lengths)
      got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
      row["finite"] = bool(np.isfinite(got).all())
      row["max_abs_diff"] = float(np.max(np.abs(got - ref)))
      row["max_abs_ref"] = float(np.max(np.abs(ref)))
      row["ok"] = row["finite"] and row["max_abs_diff"] <= TOL[dtype]
    except Exception as e:  # noqa: BLE001 - report and go on
      row["error"], row["ok"] = _error(e), False
    row["seconds"] = round(time.perf_counter() - t0, 2)
    ok &= row["ok"]
    results.append("check", row)
    common.log(f"check B={b} H={h} K={k} G={h // k} D={d} S={s} {kind} {dtype}"
               f"{' poisoned' if poisoned else ''} {cfg or 'default'}: "
               f"{'ok' if row['ok'] else 'FAIL'} max diff {row.get('max_abs_diff', 'ERR')}"
               f"{' ' + row['error'] if 'error' in row else ''} ({row['seconds']} s)")
  results.update(check_ok=bool(ok))
  return ok


def n_buffers(nbytes, l2_bytes):
  return int(min(16, max(2, math.ceil(3 * l2_bytes / nbytes))))


def loop_reps(nbytes, buffers, target_s=3e-3):
  """Upper bound on the loop count: about ``target_s`` per call at 3 TB/s reads plus 10 us a
  step (the count itself comes from a first timing)."""
  est = (nbytes / 3e12 + 10e-6) * buffers
  return int(min(50, max(1, math.ceil(target_s / est))))


def launched_chunks(b, k, s, length, cfg):
  """(chunks per (row, kv head) the kernel launches, those holding valid slots), as ``gpu.py``
  cuts the S slots into whole blocks."""
  chunks = cfg.chunks or dgpu.default_chunks(b, k, s, cfg.block_s)
  chunk = -(-s // chunks)
  chunk = -(-chunk // cfg.block_s) * cfg.block_s
  return -(-s // chunk), -(-length // chunk)


def _tied(k_BxSxKxD, v_BxSxKxD, lengths_B, q_BxHxD):
  """The cache and lengths, made to depend on the loop-carried q without a copy (an optimization
  barrier), so that XLA cannot hoist work on the loop-invariant cache (a transpose of k, the mask)
  out of the timing loop."""
  return jax.lax.optimization_barrier((k_BxSxKxD, v_BxSxKxD, lengths_B, q_BxHxD))[:3]


def time_shape(h, k, b, s, *, d, dtype, valid, repeats, copy_bw, interpret, l2_bytes,
               memory_bytes, variants=("xla", "pallas"), config=None):
  """One row: XLA and the kernel at (H, K, B, S), every row's length ``int(S * valid)``."""
  cfg = config or GpuConfig()
  itemsize = jnp.dtype(dtype).itemsize
  length = max(1, int(s * valid))
  q_bytes = b * h * d * itemsize
  cache_bytes = 2 * b * s * k * d * itemsize
  kernel_bytes = 2 * b * length * k * d * itemsize + q_bytes
  r = n_buffers(kernel_bytes, l2_bytes)
  chunks, busy = launched_chunks(b, k, s, length, cfg)
  row = dict(h=h, k=k, g=h // k, b=b, s=s, length=length, d=d, dtype=jnp.dtype(dtype).name,
             buffers=r, kernel_bytes=kernel_bytes, xla_bytes=cache_bytes + q_bytes,
             l2_resident=r * kernel_bytes < l2_bytes, floor_us=1e6 * kernel_bytes / copy_bw,
             config=dataclasses.asdict(cfg), chunks=chunks, busy_chunks=busy)
  if memory_bytes and r * (cache_bytes + q_bytes) > MEMORY_FRACTION * memory_bytes:
    row["skipped"] = (f"{r} buffers of {(cache_bytes + q_bytes) / 2**30:.2f} GiB exceed "
                      f"{MEMORY_FRACTION:.0%} of the device memory")
    return row
  try:
    q, caches = random_inputs(b, h, k, d, s, dtype, r, seed=b * 100003 + s * 31 + h)
  except Exception as e:  # noqa: BLE001 - e.g. out of memory
    row["error"] = _error(e)
    return row
  lengths = jnp.full((b,), length, jnp.int32)
  flat = [x for kv in caches for x in kv]
  del caches

  def step(impl):
    def fn(q_BxHxD, lengths_B, *kv):
      outs = []
      for i in range(0, len(kv), 2):
        kc, vc, lens = _tied(kv[i], kv[i + 1], lengths_B, q_BxHxD)
        outs.append(decode_attention(q_BxHxD, kc, vc, lens, impl=impl, interpret=interpret,
                                     config=cfg if impl == "pallas" else None))
      return outs
    return fn

  if "pallas" in variants:
    try:
      got = jax.jit(functools.partial(decode_attention, impl="pallas", interpret=interpret,
                                      config=cfg))(q, flat[0], flat[1], lengths)
      ref = jax.jit(decode_attention_reference)(q, flat[0], flat[1], lengths)
      row["max_abs_diff"] = float(np.max(np.abs(np.asarray(got, np.float32)
                                                - np.asarray(ref, np.float32))))
    except Exception as e:  # noqa: BLE001 - the kernel fails here: XLA is still timed
      row["pallas_error"] = _error(e)
  reps = loop_reps(cache_bytes, r)
  for name in variants:
    if name == "pallas" and "pallas_error" in row:
      continue
    fn = step(name)
    try:
      t1, c = time_many(fn, (q, lengths, *flat), 1, 1)
      n = int(min(reps, max(1, math.ceil(3e-3 / max(t1, 1e-7)))))
      t, _ = time_many(fn, (q, lengths, *flat), repeats, n) if n > 1 or repeats > 1 else (t1, c)
      row[f"{name}_loop"] = n
      row[f"{name}_us"] = 1e6 * t / r
      row[f"{name}_compile_s"] = round(c, 2)
    except Exception as e:  # noqa: BLE001 - report and go on
      row[f"{name}_error"] = _error(e)
  if "pallas_us" in row:
    row["pallas_over_floor"] = row["pallas_us"] / row["floor_us"]
    if "xla_us" in row:
      row["xla_over_pallas"] = row["xla_us"] / row["pallas_us"]
  del flat
  return row


def table_points(heads, batches, slots):
  """(H, K, B, S) in the order measured: the largest heads at the middle batch and cache
  (Llama-3.2-1B, B = 64, S = 2048) and the extremes first, so that a run cut by the time limit
  still spans small and large shapes; then every other point, largest heads and caches first."""
  big = max(heads, key=lambda hk: hk[0] * hk[1])
  small = min(heads, key=lambda hk: hk[0] * hk[1])
  b_mid = 64 if 64 in batches else sorted(batches)[len(batches) // 2]
  s_mid = 2048 if 2048 in slots else sorted(slots)[len(slots) // 2]
  b_lo, b_hi, s_lo, s_hi = min(batches), max(batches), min(slots), max(slots)
  first = [(*big, b_mid, s_mid), (*big, b_lo, s_hi), (*big, b_hi, s_hi), (*small, b_lo, s_lo),
           (*small, b_hi, s_hi), (*big, b_hi, s_lo), (*small, b_lo, s_hi), (*small, b_mid, s_mid)]
  rest = [(*hk, b, s) for hk in sorted(heads, key=lambda hk: -hk[0] * hk[1])
          for s in sorted(slots, reverse=True) for b in sorted(batches)]
  out = []
  for p in first + rest:
    if p not in out:
      out.append(p)
  return out


def sweep_configs(h, k, b, s, d, blocks, chunks_list, warps_list, stages_list):
  """block_s x chunks (0: ``default_chunks``), then num_warps x num_stages at the default block and
  chunks; configs the kernel refuses or that launch the same grid and settings are left out."""
  candidates = [GpuConfig(block_s=bs, chunks=c or None) for bs in blocks for c in chunks_list]
  candidates += [GpuConfig(num_warps=w, num_stages=st) for w in warps_list for st in stages_list]
  out, seen = [], set()
  for cfg in candidates:
    try:
      dgpu.check_shapes(h, k, d, cfg)
    except ValueError:
      continue
    key = (cfg.block_s, launched_chunks(b, k, s, s, cfg)[0], cfg.num_warps, cfg.num_stages)
    if key not in seen:
      seen.add(key)
      out.append(cfg)
  return out


def _fmt(row, key, spec="8.1f"):
  v = row.get(key)
  if isinstance(v, float):
    return format(v, spec)
  width = int(spec.split(".")[0])
  mark = "skip" if "skipped" in row else ("ERR" if any(k.endswith("error") for k in row) else "-")
  return f"{mark:>{width}}"


def _heads(text):
  try:
    h, k = (int(x) for x in text.split(","))
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected H,K (query heads,kv heads), got {text!r}") from e
  return h, k


def _shape(text):
  try:
    h, k, b, s = (int(x) for x in text.split(","))
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected H,K,B,S, got {text!r}") from e
  return h, k, b, s


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--heads", type=_heads, nargs="+", default=list(HEADS),
                 help="H,K pairs: query heads, key/value heads (default 9,3 32,8)")
  p.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
  p.add_argument("--slots", type=int, nargs="+", default=list(SLOTS), help="cache slots S")
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--valid", type=float, default=0.5,
                 help="every row's length = int(S * valid) (default: S // 2)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                 help="cache (and q) dtype of the table")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--time-limit", type=float, default=140,
                 help="seconds from the start (check included); no new shape after it")
  p.add_argument("--no-check", action="store_true")
  p.add_argument("--sweep", action="store_true", help="kernel settings at --sweep-shapes")
  p.add_argument("--sweep-shapes", type=_shape, nargs="+", default=[(32, 8, 1, 8192)],
                 help="H,K,B,S of each sweep shape (default 32,8,1,8192)")
  p.add_argument("--sweep-block-s", type=int, nargs="+", default=[32, 64, 128])
  p.add_argument("--sweep-chunks", type=int, nargs="+", default=[0, 16, 64],
                 help="chunks per (row, kv head); 0 = default_chunks")
  p.add_argument("--sweep-warps", type=int, nargs="+", default=[4, 8])
  p.add_argument("--sweep-stages", type=int, nargs="+", default=[2, 3])
  p.add_argument("--sweep-seconds", type=float, default=30,
                 help="seconds of the time limit kept for the sweep")
  p.add_argument("--copy-mib", type=int, default=None,
                 help="size of the copy-bandwidth probe (default 1024; 4 with --interpret)")
  p.add_argument("--interpret", action="store_true",
                 help="CPU smoke test: the kernel in interpret mode, two checks, a small copy")
  p.add_argument("--out", default="benchmarks/results/decode_attention.json")
  args = p.parse_args(argv)
  budget = common.Budget(args.time_limit)
  l2_bytes = 2**14 if args.interpret else L2_BYTES
  env = common.environment()
  results = common.Results(args.out, **env, settings=vars(args), status="running", rows=[])
  common.log(f"{jax.devices()[0].device_kind} jax {jax.__version__}")
  if not args.no_check and not budget.over():
    try:
      ok = run_check(results, args.interpret)
    except Exception as e:  # noqa: BLE001 - report and time XLA anyway
      ok = False
      results.update(check_ok=False, check_error=_error(e))
    common.log(f"check {'passed' if ok else 'FAILED'}")
  copy_mib = args.copy_mib or (4 if args.interpret else 1024)
  small_copy = copy_mib <= 64
  copy_bw = copy_bandwidth(copy_mib * 2**20, reps=2 if small_copy else 20,
                           repeats=2 if small_copy else 5)
  results.update(copy_bw_Bps=copy_bw)
  common.log(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s (read + write)")
  dtype = jnp.dtype(args.dtype)
  common_kw = dict(d=args.head_dim, dtype=dtype, valid=args.valid, repeats=args.repeats,
                   copy_bw=copy_bw, interpret=args.interpret, l2_bytes=l2_bytes,
                   memory_bytes=env.get("device_memory_bytes"))
  common.log(f"{'H':>3} {'K':>2} {'B':>4} {'S':>5} {'L':>5} | {'kern MB':>8} {'xla MB':>8} | "
             f"{'floor us':>8} {'xla us':>8} {'pallas us':>9} | {'xla/pal':>7} {'pal/flr':>7} | "
             f"{'max diff':>8} chunks")
  status = "complete"
  reserve = args.sweep_seconds if args.sweep else 0.0
  for h, k, b, s in table_points(args.heads, args.batch, args.slots):
    if budget.over(reserve):
      status = "time_limit"
      common.log("time limit reached: the table stops here")
      break
    try:
      row = time_shape(h, k, b, s, **common_kw)
    except Exception as e:  # noqa: BLE001 - anything time_shape did not catch
      row = dict(h=h, k=k, b=b, s=s, error=_error(e))
    results.append("rows", row)
    common.log(f"{h:3d} {k:2d} {b:4d} {s:5d} {row.get('length', 0):5d} | "
               f"{row.get('kernel_bytes', 0) / 1e6:8.2f} {row.get('xla_bytes', 0) / 1e6:8.2f} | "
               f"{_fmt(row, 'floor_us')} {_fmt(row, 'xla_us')} {_fmt(row, 'pallas_us', '9.1f')} | "
               f"{_fmt(row, 'xla_over_pallas', '7.2f')} {_fmt(row, 'pallas_over_floor', '7.2f')} | "
               f"{_fmt(row, 'max_abs_diff', '8.1e')} {row.get('chunks', '-')}/"
               f"{row.get('busy_chunks', '-')}"
               + "".join(f" {key}: {val}" for key, val in row.items()
                         if key.endswith("error") or key == "skipped"))
  if args.sweep:
    for h, k, b, s in args.sweep_shapes:
      configs = sweep_configs(h, k, b, s, args.head_dim, args.sweep_block_s, args.sweep_chunks,
                              args.sweep_warps, args.sweep_stages)
      for cfg in configs:
        if budget.over():
          status = "time_limit"
          common.log("time limit reached: the sweep stops here")
          break
        try:
          row = time_shape(h, k, b, s, **common_kw, variants=("pallas",), config=cfg)
        except Exception as e:  # noqa: BLE001
          row = dict(h=h, k=k, b=b, s=s, config=dataclasses.asdict(cfg), error=_error(e))
        row["default"] = cfg == GpuConfig()
        results.append("sweep", row)
        common.log(f"sweep H={h} K={k} B={b} S={s} block_s {cfg.block_s:3d} chunks "
                   f"{row.get('chunks', '-')}/{row.get('busy_chunks', '-')} warps "
                   f"{cfg.num_warps} stages {cfg.num_stages}: pallas {_fmt(row, 'pallas_us')} us"
                   f" ({_fmt(row, 'pallas_over_floor', '5.2f')} x floor)"
                   + "".join(f" {key}: {val}" for key, val in row.items()
                             if key.endswith("error") or key == "skipped"))
  results.update(status=status, elapsed_s=budget.elapsed())
  common.log(f"done in {budget.elapsed():.0f} s ({status})")


if __name__ == "__main__":
  main()
