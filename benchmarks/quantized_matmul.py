r"""Weight-only quantized matmul on GPU: XLA bf16 ``jnp.dot`` vs XLA dequantise-then-dot vs the
Pallas (Triton) kernel, int8 per channel and int4 group 128, one run, with the copy bandwidth
beside them.

    python benchmarks/quantized_matmul.py --out benchmarks/results/quantized_matmul.json

Method (docs/benchmarks.md): every timed executable runs R matmuls over R distinct weight buffers
(together >= 3x the L2 cache, so weights stream from HBM) inside a loop of L iterations in one
jit (``looped``: about 3 ms per call, so launch and host overhead are amortised); time per matmul =
median over repeats of wall time / (R L). Achieved weight bandwidth =
(codes + scales + x + y bytes) / time, over a device-to-device copy (read + write) measured in the
same run. Every Pallas entry is checked against the reference first (relative error in float32).
From M = 128 the table also times ``materialised``: the codes dequantised to bf16 by one fusion,
then XLA's bf16 dot (the fallback the M >= 512 target allows, when no fused path reaches 0.9x).
Phases: --check (kernel vs reference on small odd shapes, real compilation, for every kernel in
--check-kernels / --check-unpacks / --check-layouts), --variants (the three kernels, "dot" /
"dot_t" / "fma", with each unpack and code layout, at every shape for the --variants-m rows,
beside bf16: which kernel wins where; --variant-set layouts: only the dot kernel with the codes as
stored and transposed, and the default fma kernel), the table (the
default kernel and the XLA baselines; --skip-table leaves it out), --sweep (alternative tilings
at one shape, for the "dot" kernel and, at M <= 8, the "fma" kernel) and --mosaic (the Mosaic GPU
swap-AB kernel, ``kernels.quantized_matmul.mosaic``: checked against the reference on small shapes
with every format, then timed at --mosaic-m over the shapes beside bf16 and the default Triton
kernel, then a tiling sweep at one shape; runs before the table). Prints each row as it goes;
writes JSON after each.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.quantized_matmul import (GpuConfig, quantized_matmul_gpu,  # noqa: E402
                                      quantized_matmul_reference)
from kernels.quantized_matmul.reference import dequantize as reference_dequantize  # noqa: E402
from kernels.quantized_matmul import gpu as qgpu  # noqa: E402
from kernels.quantized_matmul import mosaic as qmosaic  # noqa: E402

MS = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048)
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192))
L2_BYTES = 60 * 2**20
MATERIALISE_MIN_M = 128  # rows from which the table also times ``materialised``
INTERPRET = False  # --interpret: run the kernels in interpret mode (CPU smoke test)


def _median_call(f, args, repeats):
  jax.block_until_ready(f(*args))  # warm-up (and clocks up)
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def copy_bandwidth(n_bytes=2**30, reps=20, repeats=5):
  """Bytes per second (read + write) of a device-to-device copy: ``x = x + 1`` over a bf16 buffer,
  ``reps`` times inside one executable (so launch and host overhead are amortised)."""
  x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda a: jax.lax.fori_loop(0, reps, lambda i, c: c + 1, a), donate_argnums=0)
  x = f(x)  # compile
  ts = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    x = jax.block_until_ready(f(x))
    ts.append(time.perf_counter() - t0)
  return 2 * n_bytes * reps / statistics.median(ts[1:])


def matmul_tflops(n=8192, reps=10, repeats=5):
  """bf16 matrix product rate (TFLOP/s) on random data, ``reps`` chained products per call."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16) / n**0.5
  f = jax.jit(lambda a: jax.lax.fori_loop(0, reps, lambda i, c: (c @ a).astype(a.dtype), a))
  return 2 * n**3 * reps / _median_call(f, (a,), repeats) / 1e12


def looped(fn, reps):
  """``fn(x, *weights) -> [y_r]`` run ``reps`` times in a loop whose carried x changes in one
  element each time (set to 0 * sum of every output), so XLA can neither hoist nor merge the matmuls
  and every output is consumed. The full-output sums cost one read of y (small next to the
  weights at decode shapes; a few % at M=2048), the same for every variant."""
  def run(x, *ws):
    def body(_, xc):
      probe = sum(jnp.sum(y, dtype=jnp.float32) for y in fn(xc, *ws))
      # set, not add: an add reads the old entry inside the update's fusion, which XLA emits as
      # a pass over all of x (benchmarks/sampling.py ``timing_loop``)
      return xc.at[0, 0].set((probe * 0).astype(xc.dtype))
    return jax.lax.fori_loop(0, reps, body, x)
  return run


def time_many(fn, args, repeats, reps=1):
  """Seconds per execution of ``fn``'s body (median over ``repeats`` calls of ``reps`` loops)."""
  f = jax.jit(looped(fn, reps))
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  compile_s = time.perf_counter() - t0
  return _median_call(f, args, repeats) / reps, compile_s


def loop_reps(m, k, n, weight_bytes, buffers, target_s=3e-3):
  """Loop count that makes one timed call last about ``target_s`` (estimate: 4 TB/s weights or
  600 TFLOP/s, whichever is slower)."""
  est = max(weight_bytes / 4e12, 2 * m * k * n / 600e12) * buffers
  return int(min(50, max(1, math.ceil(target_s / est))))


def n_buffers(nbytes):
  return int(min(16, max(2, math.ceil(3 * L2_BYTES / nbytes))))


def make_weights(k, n, key):
  """bf16 weight, int8 per-channel codes + scales, int4 g128 packed codes + scales."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  w = (jax.random.normal(k1, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
  q8 = jax.random.randint(k2, (k, n), -127, 128, jnp.int32).astype(jnp.int8)
  s8 = jax.random.uniform(k3, (1, n), jnp.float32, 1e-4, 2e-4)
  q4 = jax.random.randint(k4, (k // 2, n), 0, 256, jnp.int32).astype(jnp.uint8)
  s4 = jax.random.uniform(k3, (k // 128, n), jnp.float32, 1e-3, 3e-3)
  return w, (q8, s8), (q4, s4)


def rel_err(y, ref):
  y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
  if not np.all(np.isfinite(y)):
    return float("nan")
  return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def xla_int8(x, q, s):
  """The dequantise-then-dot a user writes for per-channel int8: (x @ bf16(q)) * s."""
  return (jnp.dot(x, q.astype(x.dtype), preferred_element_type=jnp.float32) * s).astype(x.dtype)


def xla_int4(x, q, s):
  return quantized_matmul_reference(x, q, s, bits=4, group_size=128)


def materialised(bits, group):
  """The dequantise-once path for prefill shapes: the whole kernel dequantised to x's dtype by its
  own fusion (one read of the codes, one write of W), then XLA's bf16 ``jnp.dot`` on it. The
  optimisation barrier keeps XLA from fusing the dequantisation into the matmul's operand (what
  ``xla_int8`` / ``xla_int4`` get). The table times it from M = 128 up (``--materialise-from``): the issue's M >= 512
  target allows this fallback, and its extra write of W costs too much at decode shapes."""
  def f(x, q, s):
    w = reference_dequantize(q, s, bits=bits, group_size=group, k=x.shape[-1]).astype(x.dtype)
    y = jnp.dot(x, jax.lax.optimization_barrier(w), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
  return f


# (bits, group_size, zero points) of the odd-shape checks: int8 / int4, per channel and grouped
CHECK_FORMATS = ((8, None, False), (8, None, True), (8, 32, False), (4, 32, False), (4, 64, True),
                 (4, 128, False), (4, None, False))


def report_check(results, out, key, rows, tol=1e-2):
  """Print how many check ``rows`` fail (an error, or a relative error >= ``tol``) and the first
  20, store the rows under ``results[key]`` and write the JSON. True when none fails."""
  bad = [r for r in rows if not isinstance(r["rel_err"], float) or not r["rel_err"] < tol]
  print(f"{key.replace('_', ' ')}: {len(rows)} cases, {len(bad)} failing", flush=True)
  for r in bad[:20]:
    print("  FAIL", r, flush=True)
  results[key] = rows
  dump(results, out)
  return not bad


def check_case(m, k, n, bits, group, zeros, dtype):
  """Random operands of one check case (x in ``dtype``, codes as stored, scales in [0.5, 1.5],
  integer zero points in [-3, 3] or None) and the float32 reference product."""
  ka, kb, kc, kd = jax.random.split(jax.random.key(m * 100 + bits + (group or 0)), 4)
  x = jax.random.normal(ka, (m, k), jnp.float32).astype(dtype)
  g = 1 if group is None else k // group
  if bits == 8:
    q = jax.random.randint(kb, (k, n), -128, 128, jnp.int32).astype(jnp.int8)
  else:
    q = jax.random.randint(kb, (k // 2, n), 0, 256, jnp.int32).astype(jnp.uint8)
  s = jax.random.uniform(kc, (g, n), jnp.float32, 0.5, 1.5)
  z = jnp.round(jax.random.uniform(kd, (g, n), jnp.float32, -3, 3)) if zeros else None
  ref = quantized_matmul_reference(x.astype(jnp.float32), q, s, bits=bits, group_size=group,
                                   zeros_GxN=z)
  return x, q, s, z, ref


def run_check(results, out, kernels=("dot",), unpacks=("shift",), layouts=("kn",),
              ms=(1, 3, 16, 17, 128)):
  """Kernel vs reference at small odd shapes, compiled for the GPU (not interpret mode): the
  default tiling for "dot" and "dot_t", and for "fma" at M <= 8 (its M tile), with each unpack
  and code layout that applies (``prmt``: int4 dot kernels; ``nk``: dot kernels, codes
  transposed before the call)."""
  rows = []
  for m in ms:
    for bits, group, zeros in CHECK_FORMATS:
      for dt in (jnp.bfloat16, jnp.float16):
        k, n = 512, 256
        x, q, s, z, ref = check_case(m, k, n, bits, group, zeros, dt)
        for kernel, unpack, layout in itertools.product(kernels, unpacks, layouts):
          if kernel == "fma" and (m > qgpu.FMA_MAX_ROWS or layout == "nk"):
            continue
          if unpack == "prmt" and (bits == 8 or kernel == "fma"):
            continue
          cfg = dataclasses.replace(
              qgpu.default_config(m, k, n, bits=bits, group_size=group, kernel=kernel),
              unpack=unpack, w_layout=layout)
          try:
            y = quantized_matmul_gpu(x, q.T if layout == "nk" else q, s, z, bits=bits,
                                     group_size=group, config=cfg, interpret=INTERPRET)
            err = rel_err(y.astype(jnp.float32), ref)
          except Exception as e:  # noqa: BLE001 - report and continue
            err = f"{type(e).__name__}: {str(e)[:200]}"
          rows.append(dict(m=m, bits=bits, group=group, zeros=zeros, dtype=jnp.dtype(dt).name,
                           kernel=kernel, unpack=unpack, w_layout=layout, rel_err=err))
  return report_check(results, out, "check", rows)


def dump(results, out):
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
      json.dump(results, f, indent=1)
    os.replace(out + ".tmp", out)


def run_table(results, out, ms, shapes, repeats, deadline, copy_bw,
              materialise_from=MATERIALISE_MIN_M):
  rows = results.setdefault("table", [])
  print(f"{'K':>6} {'N':>6} {'M':>5} | {'bf16 us':>8} | {'xla8 us':>8} {'pal8 us':>8} {'x':>5} "
        f"{'bw%':>4} | {'xla4 us':>8} {'pal4 us':>8} {'x':>5} {'bw%':>4} | err8 err4", flush=True)
  weights = {}
  for k, n in shapes:  # every shape's buffers up front, so the M loop can run outermost
    bytes_bf16, bytes8, bytes4 = 2 * k * n, k * n + 4 * n, k * n // 2 + 4 * n * (k // 128)
    r16, r8, r4 = n_buffers(bytes_bf16), n_buffers(bytes8), n_buffers(bytes4)
    bufs = [make_weights(k, n, jax.random.key(i)) for i in range(max(r16, r8, r4))]
    weights[k, n] = (bytes_bf16, bytes8, bytes4, r16, r8, r4, [b[0] for b in bufs[:r16]],
                     [b[1] for b in bufs[:r8]], [b[2] for b in bufs[:r4]])
    del bufs
  # decode and prefill extremes first, so a run cut by the time limit still spans the table
  order = [m for m in (1, 16, 128, 2048, 512, 4, 64, 2, 8, 32) if m in ms]
  order += [m for m in ms if m not in order]
  for m in order:
    for k, n in shapes:
      bytes_bf16, bytes8, bytes4, r16, r8, r4, w16, w8, w4 = weights[k, n]
      if time.time() > deadline:
        print("time limit reached: table stops here", flush=True)
        return
      x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
      io = 2 * m * k + 2 * m * n
      row = dict(k=k, n=n, m=m, buffers=dict(bf16=r16, int8=r8, int4=r4))
      t, c = time_many(lambda x, *ws: [jnp.dot(x, w) for w in ws], (x, *w16), repeats,
                       loop_reps(m, k, n, bytes_bf16, r16))
      row["bf16_us"], row["bf16_bw"] = 1e6 * t / r16, (bytes_bf16 + io) / (t / r16) / copy_bw
      cfg8 = qgpu.default_config(m, k, n, bits=8, group_size=None)
      cfg4 = qgpu.default_config(m, k, n, bits=4, group_size=128)
      row["cfg8"], row["cfg4"] = dataclasses.asdict(cfg8), dataclasses.asdict(cfg4)
      for name, ws, r, nbytes, xla_fn, bits, group, cfg in (
          ("int8", w8, r8, bytes8, xla_int8, 8, None, cfg8),
          ("int4", w4, r4, bytes4, xla_int4, 4, 128, cfg4)):
        flat = [a for qs in ws for a in qs]
        reps = loop_reps(m, k, n, nbytes, r)
        t, _ = time_many(
            lambda x, *a, f=xla_fn: [f(x, a[i], a[i + 1]) for i in range(0, len(a), 2)],
            (x, *flat), repeats, reps)
        row[f"xla_{name}_us"] = 1e6 * t / r
        if m >= materialise_from:
          mat = materialised(bits, group)
          row[f"err_mat_{name}"] = rel_err(jax.jit(mat)(x, *ws[0]).astype(jnp.float32),
                                           xla_fn(x.astype(jnp.float32), *ws[0]))
          t, _ = time_many(
              lambda x, *a, f=mat: [f(x, a[i], a[i + 1]) for i in range(0, len(a), 2)],
              (x, *flat), repeats, reps)
          row[f"mat_{name}_us"] = 1e6 * t / r

        def pallas(x, *a, bits=bits, group=group, cfg=cfg):
          return [quantized_matmul_gpu(x, a[i], a[i + 1], bits=bits, group_size=group, config=cfg,
                                       interpret=INTERPRET)
                  for i in range(0, len(a), 2)]
        try:
          y = jax.jit(pallas)(x, *flat[:2])[0]
          row[f"err_{name}"] = rel_err(y.astype(jnp.float32),
                                       xla_fn(x.astype(jnp.float32), *ws[0]))
          t, c = time_many(pallas, (x, *flat), repeats, reps)
          row[f"pallas_{name}_us"] = 1e6 * t / r
          row[f"pallas_{name}_compile_s"] = c
          row[f"pallas_{name}_bw"] = (nbytes + io) / (t / r) / copy_bw
        except Exception as e:  # noqa: BLE001
          row[f"pallas_{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      rows.append(row)
      dump(results, out)

      def fmt(key):
        v = row.get(key)
        return f"{v:8.1f}" if isinstance(v, float) else f"{'ERR':>8}"

      def sp(key):
        v = row.get(key)
        return f"{row['bf16_us'] / v:5.2f}" if isinstance(v, float) else f"{'-':>5}"

      def bw(key):
        v = row.get(key)
        return f"{100 * v:4.0f}" if isinstance(v, float) else f"{'-':>4}"
      mat = (f" | materialised int8 {fmt('mat_int8_us')} ({sp('mat_int8_us')}x) int4 "
             f"{fmt('mat_int4_us')} ({sp('mat_int4_us')}x)" if m >= materialise_from else "")
      print(f"{k:6d} {n:6d} {m:5d} | {fmt('bf16_us')} | {fmt('xla_int8_us')} "
            f"{fmt('pallas_int8_us')} {sp('pallas_int8_us')} {bw('pallas_int8_bw')} | "
            f"{fmt('xla_int4_us')} {fmt('pallas_int4_us')} {sp('pallas_int4_us')} "
            f"{bw('pallas_int4_bw')} | {row.get('err_int8', float('nan')):.1e} "
            f"{row.get('err_int4', float('nan')):.1e}{mat}", flush=True)


def kernel_variants(m, k, n, *, bits, group, variant_set="all"):
  """The kernels compared by ``--variants``. "all": "dot" and "dot_t" at their default tiling with
  both unpacks (int4: also the contiguous x load, ``x_load="split"``); for M <= 8 the "fma" GEMV
  at its default and with the other unpack / reduction; and the "dot" kernel with the codes
  transposed (``w_layout="nk"``) and, for int4, with the "prmt" unpack in both layouts.
  "layouts": only the "dot" kernel in the two layouts (int4: with the shift and the prmt unpack)
  and, for M <= 8, the default "fma" kernel."""
  out = []
  dot = qgpu.default_config(m, k, n, bits=bits, group_size=group, kernel="dot")
  if variant_set == "all":
    for kernel in ("dot", "dot_t"):
      cfg = qgpu.default_config(m, k, n, bits=bits, group_size=group, kernel=kernel)
      out += [cfg, dataclasses.replace(cfg, unpack="magic")]
      if bits == 4:
        out.append(dataclasses.replace(cfg, x_load="split"))
  else:
    out.append(dot)
  out.append(dataclasses.replace(dot, w_layout="nk"))
  if bits == 4:
    out += [dataclasses.replace(dot, unpack="prmt"),
            dataclasses.replace(dot, unpack="prmt", w_layout="nk")]
  if m <= qgpu.FMA_MAX_ROWS:
    fma = qgpu.default_config(m, k, n, bits=bits, group_size=group, kernel="fma")
    out.append(fma)
    if variant_set == "all":
      other = "shift" if fma.unpack == "magic" else "magic"
      out += [dataclasses.replace(fma, unpack=other),
              dataclasses.replace(fma, fma_reduce="step" if fma.fma_reduce == "end" else "end")]
  return out


def time_entry(row, fn, x, args, ref, *, repeats, reps, buffers, nbytes, copy_bw):
  """Check ``fn(x, *args) -> [y per weight buffer]`` against ``ref`` on the first buffer, time it
  (``time_many``) and fill ``row``: err, us per matmul, compile_s, vs_bf16 (over
  ``row["bf16_us"]``), bw (``nbytes`` per matmul over the copy bandwidth). Returns the line to
  print."""
  y = jax.jit(fn)(x, *args[:2])[0]
  row["err"] = rel_err(y.astype(jnp.float32), ref)
  t, c = time_many(fn, (x, *args), repeats, reps)
  row["us"], row["compile_s"] = 1e6 * t / buffers, c
  row["vs_bf16"] = row["bf16_us"] / row["us"]
  row["bw"] = nbytes / (t / buffers) / copy_bw
  return (f"{row['us']:8.1f} us {row['vs_bf16']:5.2f}x bf16 {100 * row['bw']:4.0f}% of copy, "
          f"err {row['err']:.1e}")


def run_variants(results, out, ms, shapes, repeats, deadline, copy_bw, variant_set="all"):
  """Every kernel variant at every shape for the rows ``ms``, with bf16 ``jnp.dot`` timed in the
  same loop: one line per (shape, M, format, variant) with time, speed-up over bf16, share of the
  copy bandwidth and the error against the XLA path."""
  rows = results.setdefault("variants", [])
  for m in ms:
    for k, n in shapes:
      bytes_bf16, bytes8, bytes4 = 2 * k * n, k * n + 4 * n, k * n // 2 + 4 * n * (k // 128)
      r = max(n_buffers(bytes_bf16), n_buffers(bytes4))
      bufs = [make_weights(k, n, jax.random.key(200 + i)) for i in range(r)]
      x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
      io = 2 * m * k + 2 * m * n
      if time.time() > deadline:
        print("time limit reached: variants stop here", flush=True)
        return
      t, _ = time_many(lambda x, *ws: [jnp.dot(x, w) for w in ws], (x, *[b[0] for b in bufs]),
                       repeats, loop_reps(m, k, n, bytes_bf16, r))
      bf16_us = 1e6 * t / r
      print(f"variants K={k} N={n} M={m}: bf16 {bf16_us:.1f} us", flush=True)
      for bits, group, nbytes, xla_fn in ((8, None, bytes8, xla_int8), (4, 128, bytes4, xla_int4)):
        ws = [b[1] if bits == 8 else b[2] for b in bufs]
        flat = [a for qs in ws for a in qs]
        ref = xla_fn(x.astype(jnp.float32), *ws[0])
        flat_nk = None  # the codes transposed once, outside the timed loop (w_layout="nk")
        for cfg in kernel_variants(m, k, n, bits=bits, group=group, variant_set=variant_set):
          if time.time() > deadline:
            print("time limit reached: variants stop here", flush=True)
            return
          row = dict(k=k, n=n, m=m, bits=bits, group=group, cfg=dataclasses.asdict(cfg),
                     bf16_us=bf16_us)

          def pallas(x, *a, cfg=cfg, bits=bits, group=group):
            return [quantized_matmul_gpu(x, a[i], a[i + 1], bits=bits, group_size=group,
                                         config=cfg, interpret=INTERPRET)
                    for i in range(0, len(a), 2)]
          try:
            args = flat
            if cfg.w_layout == "nk":
              if flat_nk is None:
                flat_nk = [jax.block_until_ready(jnp.asarray(a.T)) if i % 2 == 0 else a
                           for i, a in enumerate(flat)]
              args = flat_nk
            shown = time_entry(row, pallas, x, args, ref, repeats=repeats,
                               reps=loop_reps(m, k, n, nbytes, r), buffers=r,
                               nbytes=nbytes + io, copy_bw=copy_bw)
          except Exception as e:  # noqa: BLE001 - report and continue
            row["error"] = shown = f"{type(e).__name__}: {str(e)[:200]}"
          rows.append(row)
          reduce = (f" reduce {cfg.fma_reduce}" if cfg.kernel == "fma" else
                    " x split" if cfg.x_load == "split" else "")
          reduce += " nk" if cfg.w_layout == "nk" else ""
          print(f"variants K={k} N={n} M={m} int{bits} {cfg.kernel:5s} {cfg.unpack:5s}{reduce}: "
                f"{shown}", flush=True)
        dump(results, out)
        del flat_nk
      del bufs


def run_sweep(results, out, repeats, deadline, sweep_ms=(1, 16, 64, 128, 512), layout="kn",
              int4_unpack="shift", shape=(4096, 14336)):
  """Alternative tilings around the heuristic at a few shapes (to tune ``default_config``).
  ``layout="nk"`` / ``int4_unpack="prmt"``: the "dot" kernel's tilings with the codes transposed
  (transposed once, before timing) and the int4 codes through the prmt unpack; the fma and
  exponent-trick variants are left out then."""
  rows = results.setdefault("sweep", [])
  k, n = shape
  bufs = [make_weights(k, n, jax.random.key(100 + i)) for i in range(4)]
  plain = layout == "kn" and int4_unpack == "shift"
  for m in sweep_ms:
    for bits in (8, 4):
      group = None if bits == 8 else 128
      base = dataclasses.replace(
          qgpu.default_config(m, k, n, bits=bits, group_size=group, kernel="dot"),
          w_layout=layout, unpack=int4_unpack if bits == 4 else "shift")
      variants = {base}
      if plain:
        variants.add(qgpu.default_config(m, k, n, bits=bits, group_size=group))
      for bn in (64, 256):
        variants.add(dataclasses.replace(base, block_n=bn))
      for sk in (base.split_k * 2, max(1, base.split_k // 2)):
        variants.add(dataclasses.replace(base, split_k=sk))
      variants.add(dataclasses.replace(base, num_warps=8 if base.num_warps == 4 else 4))
      variants.add(dataclasses.replace(base, num_stages=4))
      if bits == 8:
        variants.add(dataclasses.replace(base, block_k=64 if base.block_k == 128 else 128))
      if plain:  # the exponent-trick unpack, alone and with 8 warps
        variants.add(dataclasses.replace(base, unpack="magic"))
        variants.add(dataclasses.replace(base, unpack="magic", num_warps=8))
      if plain and m <= qgpu.FMA_MAX_ROWS:  # the GEMV kernel's tiling around its default
        fma = qgpu.default_config(m, k, n, bits=bits, group_size=group, kernel="fma")
        variants |= {fma, dataclasses.replace(fma, num_warps=4),
                     dataclasses.replace(fma, block_n=64), dataclasses.replace(fma, block_n=256),
                     dataclasses.replace(fma, split_k=fma.split_k * 2),
                     dataclasses.replace(fma, split_k=max(1, fma.split_k // 2)),
                     dataclasses.replace(fma, unpack="shift" if fma.unpack == "magic" else "magic"),
                     dataclasses.replace(fma, fma_reduce="step" if fma.fma_reduce == "end" else "end")}
        if bits == 8:
          variants.add(dataclasses.replace(fma, block_k=32))
      x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
      ws = [b[1] if bits == 8 else b[2] for b in bufs]
      flat = [a for qs in ws for a in qs]
      if layout == "nk":  # transposed once, outside the timed loop
        flat = [jnp.asarray(a.T) if i % 2 == 0 else a for i, a in enumerate(flat)]
      for cfg in sorted(variants, key=str):
        if time.time() > deadline:
          print("time limit reached: sweep stops here", flush=True)
          return
        try:
          qgpu.check_shape(m, k, n, bits=bits, group_size=group, cfg=cfg)

          def pallas(x, *a, cfg=cfg):
            return [quantized_matmul_gpu(x, a[i], a[i + 1], bits=bits, group_size=group,
                                         config=cfg, interpret=INTERPRET)
                    for i in range(0, len(a), 2)]
          t, _ = time_many(pallas, (x, *flat), repeats,
                           loop_reps(m, k, n, k * n // (8 // bits), len(ws)))
          us = 1e6 * t / len(ws)
        except Exception as e:  # noqa: BLE001
          us = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(dict(m=m, bits=bits, k=k, n=n, cfg=dataclasses.asdict(cfg),
                         default=cfg == base, us=us))
        print(f"sweep M={m:4d} int{bits} {'*' if cfg == base else ' '} {cfg}: "
              f"{us if isinstance(us, str) else f'{us:.1f} us'}", flush=True)
      dump(results, out)


def run_mosaic_check(results, out, ms=(1, 3, 16, 33), formats=CHECK_FORMATS,
                     dtypes=(jnp.bfloat16, jnp.float16), deadline=None):
  """The Mosaic kernel vs the reference at small shapes, compiled for the GPU (interpret mode with
  --interpret), every format of ``formats`` in each of ``dtypes`` (K = 1024, N = 256), at its
  default tiling and at a second one that changes every option: 64-column tiles, a K split,
  2 stages, one wgmma per 128 columns, float32 dequantisation, the other load of the codes."""
  rows = []
  k, n = 1024, 256
  for m in ms:
    for bits, group, zeros in formats:
      for dt in dtypes:
        if deadline is not None and time.time() > deadline:
          print("time limit reached: mosaic check stops here", flush=True)
          break
        x, q, s, z, ref = check_case(m, k, n, bits, group, zeros, dt)
        w_nk = qmosaic.repack_nk(q, bits=bits, k=k)
        base = qmosaic.default_config(m, k, n, bits=bits, group_size=group)
        other = dataclasses.replace(base, block_n=64, split_k=2, stages=2, chunk=128,
                                    math="f32",
                                    load="plain" if base.load == "upcast" else "upcast")
        for cfg in (base, other):
          try:
            y = qmosaic.quantized_matmul_mosaic(x, w_nk, s, z, bits=bits, group_size=group,
                                                config=cfg, interpret=INTERPRET)
            err = rel_err(y.astype(jnp.float32), ref)
          except Exception as e:  # noqa: BLE001 - report and continue
            err = f"{type(e).__name__}: {str(e)[:300]}"
          rows.append(dict(m=m, bits=bits, group=group, zeros=zeros, dtype=jnp.dtype(dt).name,
                           cfg=dataclasses.asdict(cfg), rel_err=err))
  return report_check(results, out, "mosaic_check", rows)


def mosaic_sweep_configs(m, k, n, *, bits, group):
  """The default Mosaic tiling and its neighbours: 64 / 256 columns per program, half / double
  the K split, 2 / 6 / 8 stages, one wgmma per 128 columns, the other load of the codes, a
  128-row int4 step (those over the shared-memory budget are left out; int4 with 256 columns
  sits at the 255-register limit, compiled without a GPU, and is timed to show what that
  costs)."""
  base = qmosaic.default_config(m, k, n, bits=bits, group_size=group)
  out = [base]
  for bn in (64, 256):
    out.append(dataclasses.replace(base, block_n=bn))
  for sk in (max(1, base.split_k // 2), base.split_k * 2):
    out.append(dataclasses.replace(base, split_k=sk))
  for st in (2, 6, 8):
    out.append(dataclasses.replace(base, stages=st))
  out.append(dataclasses.replace(base, chunk=128))
  out.append(dataclasses.replace(base, load="plain" if base.load == "upcast" else "upcast"))
  if bits == 4:
    out.append(dataclasses.replace(base, block_k=128))
  seen, unique = set(), []
  for cfg in out:
    try:
      qmosaic.check_shape(m, k, n, bits=bits, group_size=group, cfg=cfg)
    except qgpu.KernelShapeError:
      continue
    if cfg not in seen:
      seen.add(cfg)
      unique.append(cfg)
  return unique


def run_mosaic(results, out, ms, shapes, repeats, deadline, copy_bw, sweep_shape=None,
               sweep_m=(16,)):
  """The Mosaic kernel at its default tiling beside bf16 ``jnp.dot`` and the default Triton
  kernel (at M <= 16 also the Triton dot kernel on the same repacked codes, ``w_layout="nk"``),
  int8 per channel and int4 group 128, every shape and row count in ``ms`` (codes repacked
  once, outside the timed loop); then every ``mosaic_sweep_configs`` tiling at
  ``sweep_shape`` for the rows ``sweep_m``. One line per entry: time, speed-up over bf16, share
  of the copy bandwidth, error against the XLA path."""
  rows = results.setdefault("mosaic", [])
  plan = [(m, k, n, False) for m in ms for k, n in shapes]
  if sweep_shape is not None:
    plan += [(m, *sweep_shape, True) for m in sweep_m]
  for m, k, n, sweeping in plan:
    if time.time() > deadline:
      print("time limit reached: mosaic stops here", flush=True)
      return
    bytes_bf16, bytes8, bytes4 = 2 * k * n, k * n + 4 * n, k * n // 2 + 4 * n * (k // 128)
    # interpret mode (CPU smoke test): Mosaic GPU's interpreter takes ~10 ms per call, so two
    # buffers, one pass
    r = 2 if INTERPRET else max(n_buffers(bytes_bf16), n_buffers(bytes4))
    bufs = [make_weights(k, n, jax.random.key(300 + i)) for i in range(r)]
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
    io = 2 * m * k + 2 * m * n
    t, _ = time_many(lambda x, *ws: [jnp.dot(x, w) for w in ws], (x, *[b[0] for b in bufs]),
                     repeats, 1 if INTERPRET else loop_reps(m, k, n, bytes_bf16, r))
    bf16_us = 1e6 * t / r
    print(f"mosaic K={k} N={n} M={m}{' sweep' if sweeping else ''}: bf16 {bf16_us:.1f} us "
          f"({100 * (bytes_bf16 + io) / (t / r) / copy_bw:.0f}% of copy)", flush=True)
    for bits, group, nbytes, xla_fn in ((8, None, bytes8, xla_int8), (4, 128, bytes4, xla_int4)):
      ws = [b[1] if bits == 8 else b[2] for b in bufs]
      ref = xla_fn(x.astype(jnp.float32), *ws[0])
      flat = [a for qs in ws for a in qs]
      flat_nk = [jax.block_until_ready(qmosaic.repack_nk(a, bits=bits, k=k)) if i % 2 == 0
                 else a for i, a in enumerate(flat)]
      entries = []
      if not sweeping:
        triton = qgpu.default_config(m, k, n, bits=bits, group_size=group)
        entries.append(("triton", triton))
        entries.append(("mosaic", qmosaic.default_config(m, k, n, bits=bits, group_size=group)))
        if m <= 16 and triton.kernel == "dot":  # the Triton dot kernel on the same repacked codes
          entries.append(("triton_nk", dataclasses.replace(triton, w_layout="nk")))
      else:
        entries += [("mosaic", c) for c in mosaic_sweep_configs(m, k, n, bits=bits, group=group)]
      for name, cfg in entries:
        if time.time() > deadline:
          print("time limit reached: mosaic stops here", flush=True)
          return
        row = dict(k=k, n=n, m=m, bits=bits, group=group, kernel=name, sweep=sweeping,
                   cfg=dataclasses.asdict(cfg), bf16_us=bf16_us)

        def run(x, *a, cfg=cfg, bits=bits, group=group, name=name):
          f = qmosaic.quantized_matmul_mosaic if name == "mosaic" else quantized_matmul_gpu
          return [f(x, a[i], a[i + 1], bits=bits, group_size=group, config=cfg,
                    interpret=INTERPRET) for i in range(0, len(a), 2)]
        # the Triton kernel's w_layout="nk": the stored codes transposed (repack_nk's bytes)
        args = (flat_nk if name == "mosaic" else flat if name == "triton" else
                [a.T if i % 2 == 0 else a for i, a in enumerate(flat)])
        try:
          shown = time_entry(row, run, x, args, ref, repeats=repeats,
                             reps=1 if INTERPRET else loop_reps(m, k, n, nbytes, r), buffers=r,
                             nbytes=nbytes + io, copy_bw=copy_bw)
        except Exception as e:  # noqa: BLE001 - report and continue
          row["error"] = shown = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        tiling = (f"bn {cfg.block_n} bk {cfg.block_k} split {cfg.split_k} st {cfg.stages} "
                  f"chunk {cfg.chunk} {cfg.load}" if name == "mosaic" else
                  f"{cfg.kernel} {cfg.w_layout} split {cfg.split_k}")
        print(f"mosaic K={k} N={n} M={m} int{bits} {name:9s} {tiling}: {shown}", flush=True)
        dump(results, out)
      del flat_nk
    del bufs


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--m", type=int, nargs="+", default=list(MS))
  p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--time-limit", type=float, default=420, help="seconds for the whole run")
  p.add_argument("--no-check", action="store_true")
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--sweep-m", type=int, nargs="+", default=[1, 16, 64, 128, 512])
  p.add_argument("--sweep-seconds", type=float, default=90, help="time kept for the sweep")
  p.add_argument("--sweep-shape", default="4096x14336", help="K x N of the sweep")
  p.add_argument("--sweep-layout", choices=list(qgpu.W_LAYOUTS), default="kn",
                 help="code layout of the swept dot-kernel tilings (nk: transposed once)")
  p.add_argument("--sweep-int4-unpack", choices=["shift", "prmt"], default="shift",
                 help="int4 unpack of the swept dot-kernel tilings")
  p.add_argument("--check-kernels", nargs="+", default=list(qgpu.KERNELS),
                 choices=list(qgpu.KERNELS), help="kernels the --check phase compiles and checks")
  p.add_argument("--check-unpacks", nargs="+", default=["shift"], choices=list(qgpu.UNPACKS),
                 help="unpacks the --check phase runs with each kernel (prmt: int4 dot kernels)")
  p.add_argument("--check-layouts", nargs="+", default=["kn"], choices=list(qgpu.W_LAYOUTS),
                 help="code layouts the --check phase runs (nk: dot kernels)")
  p.add_argument("--check-m", type=int, nargs="+", default=[1, 3, 16, 17, 128])
  p.add_argument("--variants", action="store_true", help="time every kernel variant (before the "
                 "table)")
  p.add_argument("--variants-m", type=int, nargs="+", default=[1, 16])
  p.add_argument("--variant-set", choices=["all", "layouts"], default="all",
                 help="all: every kernel / unpack / layout variant; layouts: the dot kernel with "
                 "the codes as stored and transposed (int4: shift and prmt unpack), fma at M <= 8")
  p.add_argument("--variants-seconds", type=float, default=150, help="time given to --variants")
  p.add_argument("--mosaic", action="store_true", help="check and time the Mosaic GPU kernel "
                 "(before the table)")
  p.add_argument("--mosaic-m", type=int, nargs="+", default=[1, 4, 16, 64])
  p.add_argument("--mosaic-check-m", type=int, nargs="+", default=[1, 3, 16, 33],
                 help="rows of the Mosaic kernel's check (every format, bf16 and f16)")
  p.add_argument("--mosaic-sweep-shape", default="4096x14336",
                 help="K x N of the Mosaic tiling sweep ('none': no sweep)")
  p.add_argument("--mosaic-sweep-m", type=int, nargs="+", default=[1, 16])
  p.add_argument("--mosaic-seconds", type=float, default=240, help="time given to --mosaic")
  p.add_argument("--skip-table", action="store_true")
  p.add_argument("--materialise-from", type=int, default=MATERIALISE_MIN_M, metavar="M",
                 help="rows from which the table also times the dequantise-once path")
  p.add_argument("--interpret", action="store_true", help="CPU smoke test: kernels in interpret "
                 "mode, small copy")
  p.add_argument("--out", default="benchmarks/results/quantized_matmul.json")
  args = p.parse_args()
  global INTERPRET, L2_BYTES
  if args.interpret:
    INTERPRET, L2_BYTES = True, 2**20
  deadline = time.time() + args.time_limit
  shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
  dev = jax.devices()[0]
  results = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                 python=platform.python_version(), date=datetime.date.today().isoformat(),
                 command=" ".join(sys.argv))
  print(f"{dev.device_kind} jax {jax.__version__}", flush=True)
  if not args.no_check:
    run_check(results, args.out, args.check_kernels, args.check_unpacks, args.check_layouts,
              args.check_m)
  results["copy_bw_Bps"] = copy_bw = copy_bandwidth(2**24 if args.interpret else 2**30)
  results["matmul_tflops"] = matmul_tflops(512 if args.interpret else 8192)
  print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write); bf16 8192^3 matmul "
        f"{results['matmul_tflops']:.0f} TFLOP/s", flush=True)
  dump(results, args.out)
  if args.mosaic:
    mosaic_deadline = min(deadline, time.time() + args.mosaic_seconds)
    if args.interpret:  # Mosaic GPU's interpret mode takes seconds per case: two formats, bf16
      run_mosaic_check(results, args.out, (1,), ((8, None, True), (4, 64, True)), (jnp.bfloat16,))
    else:
      run_mosaic_check(results, args.out, tuple(args.mosaic_check_m), deadline=mosaic_deadline)
    sweep = (None if args.mosaic_sweep_shape == "none" else
             tuple(int(v) for v in args.mosaic_sweep_shape.split("x")))
    run_mosaic(results, args.out, args.mosaic_m, shapes, args.repeats, mosaic_deadline, copy_bw,
               sweep, args.mosaic_sweep_m)
  if args.variants:
    run_variants(results, args.out, args.variants_m, shapes, args.repeats,
                 min(deadline, time.time() + args.variants_seconds), copy_bw, args.variant_set)
  if not args.skip_table:
    run_table(results, args.out, args.m, shapes, args.repeats,
              deadline - (args.sweep_seconds if args.sweep else 0), copy_bw,
              args.materialise_from)
  if args.sweep:
    run_sweep(results, args.out, args.repeats, deadline, args.sweep_m, args.sweep_layout,
              args.sweep_int4_unpack, tuple(int(v) for v in args.sweep_shape.split("x")))
  dump(results, args.out)


if __name__ == "__main__":
  main()
