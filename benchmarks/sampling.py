r"""Top-k / top-p / min-p sampling on GPU: XLA's sort-based sampler vs postrl's XLA bisection
sampler (``generate.sample_token``) vs the Pallas (Triton) rejection sampler
(``kernels.sampling``), beside the time to read the logits once.

    python benchmarks/sampling.py --out benchmarks/results/sampling.json
    python benchmarks/sampling.py --interpret --batch 2 --vocab 3000 --out /tmp/s.json   # CPU

Phases:

1. check (compiled kernel, before any timing; for each ``--check-configs`` setting of
   ``CHECK_CONFIGS``: the row kernel, the split path, each with and without fast_math, and the
   split path's inverse-CDF draw): frequencies of N draws from N identical rows (V = 1000)
   against the exact truncated distribution (float64), by a chi-squared statistic with a 1e-5
   threshold, for every mode; then at full size (B = 64, V = 151936, float32 and bf16) every
   token in ``process_logits``'s kept set, model log-prob = log_softmax(logits)[token], the mean
   number of rounds and the rows handed to the XLA fallback.
2. the copy bandwidth of the device (read + write, ``benchmarks/quantized_matmul.copy_bandwidth``)
   in the same run.
3. the table: for each (mode, batch, vocab), microseconds per call of
   read (``jnp.max`` over the logits: reading them once), sort (``reference.sort_sample``),
   bisect (``generate.sample_token``: 32 passes over V), radix (the same with
   ``bits_per_pass=4``: 8 passes, each testing 15 thresholds; same tokens), then
   ``kernels.sampling.sample(impl="pallas")`` with the settings of ``KERNEL_COLUMNS``: pallas
   (one program per row, exact math; before 2026-11-26's change to no rounds cap this included
   the XLA fallback's ``lax.cond``), split (each row over several programs, the same tokens),
   fast and split_fast (the two with ``fast_math=True``: PTX approximate exp / log; split_fast
   is the default below B = 64 and for min-p alone), split_cdf (split_fast with ``draw="cdf"``:
   inverse transform sampling, no per-entry noise; one candidate per round, one block per chunk,
   4 warps: ``CDF_COLUMN``, the default for top-k / top-p from B x V = 16 x 49,152),
   split_fast_xla_finish and split_cdf_xla_finish (the two with ``fused_finish=False``: XLA
   decides the last candidates, then the leftover-row launch, as before 2026-11-27), and kernel
   (``sample_gpu`` alone, default settings: ``kernels.sampling.default_config``); default_us is
   the column of the setting ``default_config`` picks at that point; split_cdf_grid (split_cdf
   with ``grid_combine=True``: no locate / finish launches); ratios over read, the sort
   and the copy floor. Logits are ``--logit-scale`` x N(0, 1) per row (scale 4 over
   152k tokens: top-1 probability ~0.12, top-p 0.9 keeps ~750 tokens, top-50 holds ~65% of the
   mass).
4. ``--sweep``: kernel settings at (64, 151936), top-p: the row kernel at block 1024 / 16 warps
   and the default, then the split path over ``--sweep-programs`` x ``--sweep-blocks`` x
   ``--sweep-warps``, each exact and with fast_math, the split ones also with the cdf draw
   (one candidate per round with three rounds, then ``CDF``'s two rounds with four, one and two
   candidates).

Timing (as ``benchmarks/quantized_matmul.py``): each executable samples R distinct logits buffers
(together >= 3x the 50 MB L2 cache, at most 8) in a loop of L iterations inside one jit (L chosen
so that a call lasts about 3 ms); each iteration, after sampling from a buffer, changes one entry
of it in place (sets it to 0 x the running sum of the outputs, so the next iteration reads a new
value and XLA can hoist nothing out of the loop; the buffers are donated, so nothing is copied;
before 2026-11-27 the entry was added to, which made the update a pass over the whole buffer, in
every gross time of the earlier tables: see ``timing_loop``) and folds
the iteration into the key. Time per sample = median over ``--repeats`` calls / (R L). That loop
costs a few launches per call of its own: the ``loop`` column times it with a body that reads one
column of the logits, and the ``*_net_us`` columns subtract it (``*_net_over_copy``: net time over
the copy floor ``copy_bound_us``, the issue's "time to read the logits once"). Prints each row as
it goes; writes JSON (``benchmarks.common.Results``, with ``environment()``) after each.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.quantized_matmul import copy_bandwidth  # noqa: E402
from kernels.sampling import GpuConfig, kept_mask, sample, sample_gpu, sort_sample  # noqa: E402
from kernels.sampling.gpu import CDF_MEASURED_FASTEST, chunks_per_row, default_config  # noqa: E402
from postrl.sampling.generate import sample_token  # noqa: E402

BATCHES = (1, 16, 64, 256)
VOCABS = (32000, 49152, 128256, 151936)
MODES = {"top_p": dict(top_p=0.9), "top_k": dict(top_k=50), "min_p": dict(min_p=0.05)}
CHECK_MODES = dict(MODES, top_p_min_p_t08=dict(temperature=0.8, top_p=0.9, min_p=0.05),
                   plain_t12=dict(temperature=1.2))
# kernel settings the check runs (the split path with small chunks, so that the V = 1000 rows are
# split too) and fast_math (PTX approximate exp / log)
_ROW, _SPLIT = GpuConfig(split=False, fast_math=False), GpuConfig(split=True, fast_math=False)
# the inverse-CDF draw as timed: 4 candidates per round, 2 split rounds (a top-p 0.9 round
# rejects all 4 with probability ~1e-4, so the second round rarely has rows and the row kernel
# almost never runs; the fewest launches: statistics, then locate + mass per round)
CDF = dict(fast_math=True, draw="cdf", candidates=4, split_rounds=2)
# the sweep also times CDF's two rounds with one and two candidates (the H200 sweep of 2026-11-26
# found K = 4 slower than K = 1 with three rounds: is it the fourfold check or the rounds?)
CDF_FEWER = (1, 2)
# the table's column: the cdf draw as ``default_config`` takes it (top-k / top-p from B x V =
# 16 x 49,152)
# (one candidate per round, one block of 2048 per chunk, 4 warps: the fastest of the H200 sweep of
# 2026-11-26, where four candidates were slower at every launch setting), at every point
CDF_COLUMN = dict(fast_math=True, **CDF_MEASURED_FASTEST)
CHECK_CONFIGS = {"row": _ROW, "split": dataclasses.replace(_SPLIT, block=256, chunk=256),
                 "row_fast": dataclasses.replace(_ROW, fast_math=True),
                 "split_fast": dataclasses.replace(_SPLIT, block=256, chunk=256, fast_math=True),
                 "split_cdf": dataclasses.replace(_SPLIT, **dict(CDF_COLUMN, block=256,
                                                                  chunk=256)),
                 "split_cdf4": dataclasses.replace(_SPLIT, block=256, chunk=256, **CDF),
                 # the in-launch combine (atomic arrival counters): its compiled check is the
                 # first test of its memory ordering on a GPU
                 "split_cdf_grid": dataclasses.replace(_SPLIT, **dict(CDF_COLUMN, block=256,
                                                                       chunk=256),
                                                       grid_combine=True)}
# the table's kernel columns (``sample(impl="pallas", config=...)``): one program per row, the
# split path, each exact and with fast_math, and the split path's inverse-CDF draw
KERNEL_COLUMNS = {"pallas": _ROW, "split": _SPLIT,
                  "fast": dataclasses.replace(_ROW, fast_math=True),
                  "split_fast": dataclasses.replace(_SPLIT, fast_math=True),
                  "split_cdf": dataclasses.replace(_SPLIT, **CDF_COLUMN),
                  # the same two with the finish as it was until 2026-11-27 (XLA decides the last
                  # candidates, then the leftover-row launch): the A/B of GpuConfig.fused_finish
                  "split_fast_xla_finish": dataclasses.replace(_SPLIT, fast_math=True,
                                                               fused_finish=False),
                  "split_cdf_xla_finish": dataclasses.replace(_SPLIT, **CDF_COLUMN,
                                                              fused_finish=False),
                  # the cdf column with each mass launch's last program per row combining
                  # (GpuConfig.grid_combine: 5 launches instead of 8 at B = 64)
                  "split_cdf_grid": dataclasses.replace(_SPLIT, **CDF_COLUMN, grid_combine=True)}
L2_BYTES = 50 * 2**20
TARGET_S = 3e-3
INTERPRET = False  # --interpret: kernels in interpret mode (CPU smoke test)


def exact_probs(x, *, temperature=1.0, top_k=None, top_p=None, min_p=None):
  """The truncated distribution of one row in float64 (definitions of ``process_logits``)."""
  z = np.asarray(x, np.float64) / temperature
  keep = np.isfinite(z)
  if top_k is not None:
    keep &= np.array([(z > zi).sum() for zi in z]) < top_k
  if top_p is not None:
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    p /= p.sum()
    keep &= np.array([p[z > zi].sum() for zi in z]) < top_p
  if min_p is not None:
    keep &= z - z[keep].max() >= np.log(min_p)
  q = np.where(keep, np.exp(z - z[keep].max()), 0.0)
  return q / q.sum()


def chi2_stat(counts, probs):
  """Pearson's statistic over the tokens of positive probability (those expecting fewer than 5
  draws pooled into one bin; inf if a token of probability 0 is drawn) and the upper 1e-5
  quantile of chi-squared(df) (Wilson-Hilferty)."""
  if np.any(counts[probs == 0] > 0):
    return math.inf, 0.0
  e, o = probs[probs > 0] * counts.sum(), counts[probs > 0].astype(np.float64)
  small = e < 5
  if small.any():
    e, o = np.append(e[~small], e[small].sum()), np.append(o[~small], o[small].sum())
  df = max(len(e) - 1, 1)
  threshold = df * (1 - 2 / (9 * df) + 4.265 * math.sqrt(2 / (9 * df))) ** 3
  return float(np.sum((o - e) ** 2 / e)), threshold


def make_logits(b, v, dtype, seed, scale):
  return (scale * jax.random.normal(jax.random.key(seed), (b, v), jnp.float32)).astype(dtype)


def _error(e: Exception) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def run_check(results, *, modes, draws, check_vocab, full_b, full_v, scale, configs=("row",)):
  """Compiled kernel vs the exact distribution and the reference (see the module docstring), for
  each of ``configs`` (names in CHECK_CONFIGS); the support check runs every mode on float32
  logits and the first on bf16 too."""
  ok = True
  for config in configs:
    ok &= _check_config(results, config, modes=modes, draws=draws, check_vocab=check_vocab,
                        full_b=full_b, full_v=full_v, scale=scale)
  results.update(check_passed=bool(ok))
  return ok


def _differs_from_separate_launches(cfg, x, seeds, token, rounds, settings):
  """For a ``grid_combine`` setting: rows whose token or rounds differ from the same setting with
  separate locate / finish launches on the same seeds (the same arithmetic on the same partials:
  on a GPU a difference means the in-launch combine read a partial before it was written);
  None for other settings."""
  if not cfg.grid_combine:
    return None
  want_tok, _, want_rounds = sample_gpu(x, seeds, interpret=INTERPRET,
                                        config=dataclasses.replace(cfg, grid_combine=False),
                                        **settings)
  return int(np.sum((np.asarray(want_tok) != np.asarray(token))
                    | (np.asarray(want_rounds) != np.asarray(rounds))))


def _check_config(results, config, *, modes, draws, check_vocab, full_b, full_v, scale):
  cfg = CHECK_CONFIGS[config]
  ok = True
  row_x = make_logits(1, check_vocab, jnp.float32, 123, 3.0)
  xs = jnp.tile(row_x, (draws, 1))
  modes = {m: CHECK_MODES[m] for m in modes}
  for name, settings in modes.items():
    seeds = jax.random.bits(jax.random.key(7), (draws,), jnp.uint32)
    token, _, rounds = sample_gpu(xs, seeds, interpret=INTERPRET, config=cfg, **settings)
    token = np.asarray(token)
    counts = np.bincount(token[token >= 0], minlength=check_vocab)
    stat, threshold = chi2_stat(counts, exact_probs(np.asarray(row_x[0]), **settings))
    differs = _differs_from_separate_launches(cfg, xs, seeds, token, rounds, settings)
    passed = bool(stat < threshold) and not differs
    ok &= passed
    row = dict(kind="frequency", config=config, mode=name, vocab=check_vocab, draws=draws, chi2=stat,
               threshold=threshold, passed=passed, fallback_rows=int(np.sum(token < 0)),
               mean_rounds=float(np.mean(np.asarray(rounds))),
               differs_from_separate_launches=differs)
    results.append("check", row)
    common.log(f"check {config:10s} frequency {name:16s} chi2 {stat:8.1f} < {threshold:6.1f}: "
               f"{passed}  "
               f"rounds {row['mean_rounds']:.2f}, fallback rows {row['fallback_rows']}")
  first = next(iter(modes))
  for dtype, name in [(jnp.float32, m) for m in modes] + [(jnp.bfloat16, first)]:
    settings = modes[name]
    x = make_logits(full_b, full_v, dtype, 321, scale)
    seeds = jax.random.bits(jax.random.key(8), (full_b,), jnp.uint32)
    token, logp, rounds = sample_gpu(x, seeds, interpret=INTERPRET, config=cfg, **settings)
    token = np.asarray(token)
    differs = _differs_from_separate_launches(cfg, x, seeds, token, rounds, settings)
    fallback = int(np.sum(token < 0))
    if fallback:  # those rows would be drawn again by the XLA reference: check the others
      x, token, logp = x[token >= 0], token[token >= 0], logp[token >= 0]
    keep = np.asarray(kept_mask(x, **settings))
    rows = np.arange(len(token))
    in_set = bool(keep[rows, token].all())
    ref = np.asarray(jax.nn.log_softmax(x.astype(jnp.float32), axis=-1))[rows, token]
    err = float(np.max(np.abs(np.asarray(logp) - ref), initial=0.0))
    passed = in_set and err < 1e-4 and not differs
    ok &= passed
    row = dict(kind="support", config=config, mode=name, dtype=jnp.dtype(dtype).name, batch=full_b,
               vocab=full_v, in_kept_set=in_set, logp_max_err=err, passed=passed,
               kernel_fallback_rows=fallback, differs_from_separate_launches=differs,
               mean_rounds=float(np.mean(np.asarray(rounds))),
               max_rounds=int(np.max(np.asarray(rounds))))
    results.append("check", row)
    common.log(f"check {config:10s} support {jnp.dtype(dtype).name:8s} {name:16s} in kept set "
               f"{in_set}, "
               f"logp err {err:.1e}, rounds {row['mean_rounds']:.2f} (max {row['max_rounds']})"
               f", fallback rows {row['kernel_fallback_rows']}")
  return ok


def _median_call(f, args, repeats):
  """Median seconds of ``f(*args)`` whose first output is fed back as its donated argument."""
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    args = (args[0], *f(*args)[1])
    jax.block_until_ready(args)
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), args


def timing_loop(fn):
  """``run(key, reps, *bufs) -> (acc, bufs)``: ``reps`` iterations, each sampling every buffer
  with ``fn(key_i, logits)`` and then changing one of its entries in place (module docstring)."""
  def run(key, reps, *bufs):
    def body(i, carry):
      acc, bufs = carry
      out = []
      for r, b in enumerate(bufs):
        for y in fn(jax.random.fold_in(key, i * len(bufs) + r), b):
          acc = acc + jnp.sum(y.astype(jnp.float32))
        # changed after the sampler has read it (0 x the outputs): the next iteration reads a new
        # value, so nothing is hoisted. The entry is *set*, not added to: ``.at[0, 0].add`` reads
        # the old entry inside the update's fusion, which XLA then emits as a loop over the whole
        # buffer (read + write of every entry: 5 ms per 39 MB buffer on this CPU against 4 us for
        # ``.set``; on the H200 the 'loop' column's 36 us at B = 64, V = 152k, 2026-11-26,
        # included in every gross time until then). Updating before the read was worse still.
        out.append(b.at[0, 0].set((acc * 0).astype(b.dtype)))
      return acc, tuple(out)
    acc, bufs = jax.lax.fori_loop(0, reps, body, (jnp.float32(0), tuple(bufs)))
    return acc, bufs
  return run


def time_sampler(fn, bufs, repeats):
  """Seconds per ``fn(key, logits) -> arrays`` call (see the module docstring). Returns
  (seconds, compile seconds, buffers): the buffers are donated and come back updated."""
  run = timing_loop(fn)
  f = jax.jit(run, donate_argnums=tuple(range(2, 2 + len(bufs))))
  key = jax.random.key(0)
  t0 = time.perf_counter()
  acc, bufs = f(key, 1, *bufs)
  jax.block_until_ready(acc)
  compile_s = time.perf_counter() - t0
  t1, (_, *bufs) = _median_call(lambda k, *b: f(k, 1, *b), (key, *bufs), 2)
  reps = int(min(50, max(1, math.ceil(TARGET_S / max(t1, 1e-7)))))
  t, (_, *bufs) = _median_call(lambda k, *b: f(k, reps, *b), (key, *bufs), repeats)
  return t / (reps * len(bufs)), compile_s, list(bufs)


def n_buffers(nbytes):
  return int(min(8, max(2, math.ceil(3 * L2_BYTES / nbytes))))


def table_points(modes, batches, vocabs):
  """(mode, batch, vocab) in the order measured: the issue's point and the extremes first, so a
  run cut by the time limit still spans the table; top-k / min-p at the largest vocabulary."""
  v_max = max(vocabs)
  b_mid = 64 if 64 in batches else batches[len(batches) // 2]
  first = [("top_p", b_mid, v_max), ("top_p", min(batches), v_max), ("top_p", max(batches), v_max),
           ("top_k", b_mid, v_max), ("min_p", b_mid, v_max)]
  rest = [("top_p", b, v) for v in sorted(vocabs, reverse=True) for b in batches]
  rest += [(m, b, v_max) for m in ("top_k", "min_p") for b in batches]
  out = []
  for p in first + rest:
    if p not in out and p[0] in modes and p[1] in batches and p[2] in vocabs:
      out.append(p)
  return out


# the columns a --lean table times: the loop's own cost, the read, the issue's baseline (XLA's
# sort) and the two split settings ``default_config`` chooses between (the Gumbel draw with
# fast_math, and the inverse-CDF draw); each row's "default_us" is the one it picks there
LEAN_VARIANTS = ("loop", "read", "sort", "split_fast", "split_cdf")


def run_table(results, *, modes, batches, vocabs, dtype, scale, repeats, budget, copy_bw,
              reserve_s, rows=slice(None), lean=False):
  common.log(f"{'mode':6s} {'B':>4s} {'V':>7s} | {'read us':>8s} {'sort us':>9s} {'bisect us':>9s} "
             f"{'radix us':>9s} {'pallas us':>9s} {'split us':>9s} {'kernel us':>9s} | "
             f"{'pal/read':>8s} {'sort/pal':>8s} {'spl/read':>8s} {'sort/spl':>8s} {'rounds':>6s} | "
             f"{'loop us':>7s} {'pal/copy':>8s} {'spl/copy':>8s} | {'fast us':>9s} "
             f"{'splfst us':>9s} {'sf/copy':>8s} | {'cdf us':>9s} {'sort/cdf':>8s} {'cdf/copy':>8s}")
  for mode, b, v in table_points(modes, batches, vocabs)[rows]:
    if budget.over(reserve_s):
      common.log("time limit reached: table stops here")
      results.update(status="time limit")
      return
    settings = MODES[mode]
    nbytes = b * v * jnp.dtype(dtype).itemsize
    r = n_buffers(nbytes)
    bufs = [make_logits(b, v, dtype, 1000 + i, scale) for i in range(r)]
    row = dict(mode=mode, batch=b, vocab=v, dtype=jnp.dtype(dtype).name, buffers=r,
               logits_bytes=nbytes, copy_bound_us=1e6 * nbytes / copy_bw, **settings)
    seeds = jax.random.bits(jax.random.key(5), (b,), jnp.uint32)
    try:
      _, _, rounds = sample_gpu(bufs[0], seeds, interpret=INTERPRET, **settings)
      row["mean_rounds"] = float(jnp.mean(rounds))
    except Exception as e:  # noqa: BLE001 - the kernel fails: the XLA samplers are still timed
      row["mean_rounds"], row["kernel_error"] = None, _error(e)
    variants = {
        # the timing loop's own cost per call (the in-place update of the buffer, the sum of the
        # output, the loop step) with a body that reads one column: subtracted for the net columns
        "loop": lambda k, x: (x[:, 0],),
        "read": lambda k, x: (jnp.max(x, axis=-1),),
        "sort": lambda k, x: sort_sample(k, x, **settings),
        "bisect": lambda k, x: sample_token(k, x, temperature=1.0, top_k=settings.get("top_k"),
                                            top_p=settings.get("top_p"),
                                            min_p=settings.get("min_p"))[::2],
        "radix": lambda k, x: sample_token(k, x, temperature=1.0, top_k=settings.get("top_k"),
                                           top_p=settings.get("top_p"),
                                           min_p=settings.get("min_p"), bits_per_pass=4)[::2],
        **{name: functools.partial(
            lambda k, x, cfg: sample(k, x, impl="pallas", interpret=INTERPRET, config=cfg,
                                     **settings), cfg=cfg) for name, cfg in KERNEL_COLUMNS.items()},
        "kernel": lambda k, x: sample_gpu(
            x, jax.random.bits(k, (b,), jnp.uint32), interpret=INTERPRET, **settings)[:2],
    }
    if lean:
      variants = {k: f for k, f in variants.items() if k in LEAN_VARIANTS}
    for name, fn in variants.items():
      if (name in KERNEL_COLUMNS or name == "kernel") and "kernel_error" in row:
        row[f"{name}_error"] = "skipped: the kernel failed on this shape"
        continue
      try:
        t, c, bufs = time_sampler(fn, bufs, repeats)
        row[f"{name}_us"], row[f"{name}_compile_s"] = 1e6 * t, round(c, 2)
      except Exception as e:  # noqa: BLE001 - report and continue
        row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        bufs = [make_logits(b, v, dtype, 1000 + i, scale) for i in range(r)]
    if "loop_us" in row:  # net of the loop's own cost, and over the copy floor
      for name in ("read", "sort", *KERNEL_COLUMNS, "kernel"):
        if f"{name}_us" in row:
          row[f"{name}_net_us"] = row[f"{name}_us"] - row["loop_us"]
          row[f"{name}_net_over_copy"] = row[f"{name}_net_us"] / row["copy_bound_us"]
    default = default_config(b, v, top_k=settings.get("top_k"), top_p=settings.get("top_p"),
                             min_p=settings.get("min_p"))
    picked = [n for n in ("split_fast", "split_cdf")
              if same_launch(KERNEL_COLUMNS[n], default, b, v) and f"{n}_us" in row]
    if picked:  # the column of what ``sample(impl="pallas")`` runs at this point by default
      row["default_column"], row["default_us"] = picked[0], row[f"{picked[0]}_us"]
      row["default_over_copy"] = row["default_us"] / row["copy_bound_us"]
      if "sort_us" in row:
        row["sort_over_default"] = row["sort_us"] / row["default_us"]
    if "pallas_us" in row and "read_us" in row:
      row["pallas_over_read"] = row["pallas_us"] / row["read_us"]
    if "pallas_us" in row and "sort_us" in row:
      row["sort_over_pallas"] = row["sort_us"] / row["pallas_us"]
    for name in ("split_fast", "split_cdf"):  # gross time over the copy floor, and the sort's
      if f"{name}_us" in row:
        row[f"{name}_over_copy"] = row[f"{name}_us"] / row["copy_bound_us"]
        if "sort_us" in row:
          row[f"sort_over_{name}"] = row["sort_us"] / row[f"{name}_us"]
    if "split_us" in row and "read_us" in row:
      row["split_over_read"] = row["split_us"] / row["read_us"]
      row["sort_over_split"] = row.get("sort_us", float("nan")) / row["split_us"]
    results.append("table", row)
    del bufs

    def fmt(key, width=9, spec=".1f"):
      val = row.get(key)
      return f"{val:{width}{spec}}" if isinstance(val, float) else f"{'ERR':>{width}}"
    common.log(f"{mode:6s} {b:4d} {v:7d} | {fmt('read_us', 8)} {fmt('sort_us')} "
               f"{fmt('bisect_us')} {fmt('radix_us')} {fmt('pallas_us')} {fmt('split_us')} "
               f"{fmt('kernel_us')} | {fmt('pallas_over_read', 8, '.2f')} "
               f"{fmt('sort_over_pallas', 8, '.1f')} {fmt('split_over_read', 8, '.2f')} "
               f"{fmt('sort_over_split', 8, '.1f')} {fmt('mean_rounds', 6, '.2f')} | "
               f"{fmt('loop_us', 7)} {fmt('pallas_net_over_copy', 8, '.1f')} "
               f"{fmt('split_net_over_copy', 8, '.1f')} | {fmt('fast_us')} {fmt('split_fast_us')} "
               f"{fmt('split_fast_net_over_copy', 8, '.1f')} | {fmt('split_cdf_us')} "
               f"{fmt('sort_over_split_cdf', 8, '.1f')} {fmt('split_cdf_over_copy', 8, '.1f')}")


def same_launch(a: GpuConfig, b: GpuConfig, batch: int, vocab: int) -> bool:
  """Whether two settings launch the same kernels at (batch, vocab): equal once ``chunk=None``
  is resolved through ``programs`` (8192 programs at B = 64 is the default's one block per chunk)."""
  def resolved(c):
    return dataclasses.replace(c, chunk=chunks_per_row(batch, vocab, c)[0], programs=0)
  return resolved(a) == resolved(b)


def sweep_configs(blocks, warps_list, programs_list):
  """The row kernel at the best setting of 2026-11-26's first sweep, ``GpuConfig()`` (the default
  below B = 64 and for min-p alone), then the split
  path over programs x blocks x warps; each exact and with fast_math, and the split settings also
  with the inverse-CDF draw (fast_math; one candidate per round, and ``CDF``), interleaved so that a
  cut sweep keeps whole groups."""
  out = [GpuConfig(split=False, block=1024, num_warps=16), GpuConfig()]
  out += [GpuConfig(split=True, programs=n, block=block, num_warps=warps)
          for n in programs_list for block in blocks for warps in warps_list]
  return [c for cfg in out for c in (
      dataclasses.replace(cfg, fast_math=False), dataclasses.replace(cfg, fast_math=True))
          + ((dataclasses.replace(cfg, fast_math=True, draw="cdf"), dataclasses.replace(cfg, **CDF))
             + tuple(dataclasses.replace(cfg, **dict(CDF, candidates=k)) for k in CDF_FEWER)
             if cfg.split else ())]


def run_sweep(results, *, b, v, dtype, scale, repeats, budget, configs):
  """Kernel launch settings at one shape (top-p 0.9), through ``sample`` (what users call)."""
  r = n_buffers(b * v * jnp.dtype(dtype).itemsize)
  bufs = [make_logits(b, v, dtype, 2000 + i, scale) for i in range(r)]
  for cfg in configs:
    if budget.over(0):
      common.log("time limit reached: sweep stops here")
      return
    fn = functools.partial(lambda k, x, cfg: sample(k, x, top_p=0.9, impl="pallas", config=cfg,
                                                    interpret=INTERPRET), cfg=cfg)
    try:
      t, _, bufs = time_sampler(fn, bufs, repeats)
      us = 1e6 * t
    except Exception as e:  # noqa: BLE001
      us = f"{type(e).__name__}: {str(e)[:200]}"
      bufs = [make_logits(b, v, dtype, 2000 + i, scale) for i in range(r)]
    chunk, n_chunks = chunks_per_row(b, v, cfg)
    results.append("sweep", dict(batch=b, vocab=v, config=dataclasses.asdict(cfg),
                                 chunks=n_chunks if cfg.split else 1, us=us,
                                 default=same_launch(cfg, default_config(b, v, top_p=0.9), b, v)))
    common.log(f"sweep B={b} V={v} split={cfg.split!s:5} programs {cfg.programs:4d} chunks "
               f"{n_chunks if cfg.split else 1:3d} block {cfg.block:5d} warps {cfg.num_warps:2d} "
               f"fast_math {cfg.fast_math!s:5} draw {cfg.draw:6s}: "
               f"{us if isinstance(us, str) else f'{us:.1f} us'}")


def parse_rows(text):
  """'START:STOP' (either side may be empty) -> slice of the table's points."""
  try:
    start, stop = (int(t) if t.strip() else None for t in text.split(":"))
  except ValueError:
    raise SystemExit(f"--rows: expected START:STOP (e.g. 0:5 or 5:), got {text!r}") from None
  return slice(start, stop)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
  p.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
  p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="logits dtype (postrl's LM head returns float32)")
  p.add_argument("--logit-scale", type=float, default=4.0)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run")
  p.add_argument("--no-check", action="store_true")
  p.add_argument("--check-draws", type=int, default=16384)
  p.add_argument("--check-modes", nargs="+", default=list(CHECK_MODES),
                 choices=list(CHECK_MODES))
  p.add_argument("--check-configs", nargs="+", default=["row"], choices=list(CHECK_CONFIGS),
                 help="kernel settings the check runs (CHECK_CONFIGS)")
  p.add_argument("--rows", default=":",
                 help="START:STOP slice of the table's points (table_points order), e.g. 0:5")
  p.add_argument("--lean", action="store_true",
                 help=f"time only the columns {', '.join(LEAN_VARIANTS)}")
  p.add_argument("--no-table", action="store_true")
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--sweep-seconds", type=float, default=40, help="time kept for the sweep")
  p.add_argument("--sweep-blocks", type=int, nargs="+", default=[1024, 2048])
  p.add_argument("--sweep-warps", type=int, nargs="+", default=[4, 8])
  p.add_argument("--sweep-programs", type=int, nargs="+", default=[512, 1024, 2048],
                 help="split path: programs in all (GpuConfig.programs)")
  p.add_argument("--copy-mib", type=int, default=None,
                 help="size of the copy-bandwidth probe (default 1024; 4 with --interpret)")
  p.add_argument("--interpret", action="store_true",
                 help="CPU smoke test: kernels in interpret mode, small check and copy")
  p.add_argument("--out", default="benchmarks/results/sampling.json")
  args = p.parse_args(argv)
  global INTERPRET, L2_BYTES
  if args.interpret:  # the CPU smoke test: two buffers per timed program (the fewest the loop
    # takes), as each buffer's kernel is compiled again in interpret mode
    INTERPRET, L2_BYTES = True, 1
  budget = common.Budget(args.time_limit)
  results = common.Results(args.out, **common.environment(), settings=vars(args),
                           status="running")
  dtype = jnp.dtype(args.dtype)
  common.log(f"{jax.devices()[0].device_kind} jax {jax.__version__}; logits {dtype.name}")
  if not args.no_check:
    small = args.interpret
    try:
      ok = run_check(results, modes=args.check_modes, draws=args.check_draws,
                     check_vocab=37 if small else 1000, full_b=2 if small else 64,
                     full_v=max(args.vocab) if small else 151936, scale=args.logit_scale,
                     configs=args.check_configs)
    except Exception as e:  # noqa: BLE001 - e.g. the kernel does not compile: time XLA anyway
      ok = False
      results.update(check_passed=False, check_error=_error(e))
      common.log(f"check could not run: {_error(e)}")
    common.log(f"check {'passed' if ok else 'FAILED'}")
  copy_mib = args.copy_mib or (4 if args.interpret else 1024)
  small_copy = copy_mib <= 64
  copy_bw = copy_bandwidth(copy_mib * 2**20, reps=2 if small_copy else 20,
                           repeats=2 if small_copy else 5)
  results.update(copy_bw_Bps=copy_bw)
  common.log(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s (read + write)")
  if not args.no_table:
    run_table(results, modes=args.modes, batches=args.batch, vocabs=args.vocab, dtype=dtype,
              scale=args.logit_scale, repeats=args.repeats, budget=budget, copy_bw=copy_bw,
              reserve_s=args.sweep_seconds if args.sweep else 0, rows=parse_rows(args.rows),
              lean=args.lean)
  if args.sweep:
    run_sweep(results, b=64 if 64 in args.batch else max(args.batch), v=max(args.vocab),
              dtype=dtype, scale=args.logit_scale, repeats=args.repeats, budget=budget,
              configs=sweep_configs(args.sweep_blocks, args.sweep_warps, args.sweep_programs))
  if results.doc.get("status") == "running":
    results.update(status="complete")


if __name__ == "__main__":
  main()
