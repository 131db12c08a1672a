"""GPU Pallas (Triton backend) top-k / top-p / min-p sampling without a sort: rejection sampling
with a rising pivot (the scheme of FlashInfer's sorting-free samplers, Ye et al. 2025).

One program per row streams the row in power-of-two blocks of the vocabulary (masked loads for the
ragged tail) and runs rounds r = 0, 1, ... with a pivot π (π_0 = -inf), z = logits / temperature:

    pass A (sample):  j = argmax_{v : z_v > π, z_v - m >= log min_p} (z_v + g_v^r)     (Gumbel-max)
    pass B (check):   c_j = #{v : z_v > z_j},   M_j = sum_{z_v > z_j} exp(z_v - m)
    accept j  iff  c_j < k  (top-k)  and  M_j / S < p  (top-p),   S = sum_v exp(z_v - m)
    otherwise π = z_j and run the next round

(m = max z). The kept set of ``postrl.sampling.generate.process_logits`` is
S_keep = {v : c_v < k} ∩ {v : M_v / S < p} ∩ {v : z_v - m >= log min_p}, and each of the three is
an upper set in z (more probable tokens have fewer tokens and less mass above them). Why the output
is exact: round r samples j from p restricted to R_r = {z_v > π_r} ∩ {min-p}, and R_r ⊇ S_keep
(R_0 does; a rejected j is outside S_keep, so are its ties and every token below it, because
S_keep is an upper set). Conditional on j ∈ S_keep, j ~ p | R_r restricted to S_keep = p | S_keep,
whatever happened in earlier rounds. Rows still rejected after ``max_rounds`` rounds return
token -1; ``kernels.sampling.sample`` samples those rows again with the XLA reference, which keeps
the output exactly p | S_keep (a row's reaching the cap depends only on rejected draws, not on
which token of S_keep would be accepted). Each round removes at least the rejected token's mass
from R, and the mass above a draw from p | R is (for distinct probabilities) uniform on [0, p(R)],
so the expected number of rounds is about 1 + ln(1 / p(S_keep)): at most 1 / p for top-p alone.

Pass A of round 0 also accumulates, online (running max, rescaled sum), m, S and the temperature-1
statistics max(logits), sum exp(logits - max), from which the plain model log-prob
log_softmax(logits)[token] (what trainers use) is computed in the kernel. Every pass keeps
per-lane accumulators of the block's shape (best score and its index, running max and sum, count,
mass) and reduces them once at its end, not once per block. With min-p, a first pass
computes those statistics alone and every draw is restricted to z - m >= log min_p, so min-p
without top-k / top-p is always accepted in round 0 (two passes over the row).

Two launch layouts draw the same tokens (the noise depends only on row seed, index and round;
both take the smallest index among equal scores):

* one program per row (``GpuConfig.split=False``) runs every round in one launch. Timed on an H100
  on 2026-11-26: at B = 64, V = 152k, top-p 0.9, 341 us (exact) / 276 us (fast_math); only 64
  programs, one per row, so most of the GPU idles (a row's stream is bound by one multiprocessor's
  latency, not by memory).
* the split path (``split=True``, the default): each row over C programs of ``chunk`` entries (about
  ``programs`` in all). Launch 0 draws round 0 and the statistics per chunk; launch r checks round
  r - 1's candidate and draws round r's in the same pass (the draw is dropped where the check
  accepts). Every program of a row combines the previous launch's [C] per-chunk partials itself
  (max / rescaled sums / smallest index of the best score / the accept test: ``combine_stats`` /
  ``combine_draws`` / ``advance``; all take the same decision and the row's first program writes
  the state out), so the launches follow each other with no XLA step; XLA combines once, after
  the last (and, with min-p, takes the row max between the statistics and the first draw). After
  ``split_rounds`` rounds the rows still rejected (few: the acceptance probability per round is at
  least p(kept)) continue in the row kernel from the last rejected pivot. Timed on the same H100 (same run): 188 us exact, 155 us
  with fast_math at B = 64, V = 152k, top-p (14.5x XLA's sort, 11x the 13.6 us read floor); 31 us
  at B = 1, where it beats every XLA sampler too (docs/benchmarks.md).

Randomness: g_v^r = -log(-log1p(-w)), w uniform in (0, 1) from h = a counter-based hash (two
murmur3 fmix32 rounds) of (row seed, vocabulary index v, round r); the row seeds come from a
``jax.random`` key outside the kernel. In float32 the Gumbel variables lie in [-2.81, 22.2], so a
token more than ~25 nats below the round's most probable candidate (relative probability
< 1.4e-11) is never drawn; ``jax.random.categorical``'s float32 Gumbel variables, in
[-4.47, 16.6], cut at ~21 nats.

Arithmetic per vocabulary entry: the hash (two fmix32, ~18 integer operations), the two logs of
the noise and one exp for the running sum-exp (and one exp per entry of a check pass). libdevice's
accurate ``logf`` / ``log1pf`` / ``expf`` cost tens of instructions each, so at B = 64 the passes
are bound by this arithmetic rather than by memory (an estimate from instruction counts, not a
profile). ``GpuConfig(fast_math=True)`` replaces them by PTX's approximate special-function
instructions (one ``lg2.approx`` per log, ``ex2.approx`` per exp) and log1p by a short series
below w = 1/16 (``gumbel``, ``_exponential``): the noise moves by < 1e-5. It is the default
(the split path with it 155 vs 188 us exact at B = 64, V = 152k, top-p, on an H100);
``fast_math=False`` gives libdevice's accurate functions.

Not computed: the normaliser of the truncated distribution (it needs the exact top-k / top-p
threshold), hence not the sampling log-prob; callers that need it use the XLA path. top-k together
with top-p is not run here (the top-p mass is renormalised over the top-k set, whose total needs
the k-th largest value): ``kernels.sampling`` sends it to XLA.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class GpuConfig:
  """Launch settings of the Triton kernels.

  Attributes:
    block: vocabulary entries per step of the stream (a power of two >= 16).
    split: True (default): the split path, each row over C programs of ``chunk`` entries,
      per-chunk partials combined by the next launch's programs (rows of a single chunk run the
      row kernel). False: one program per row runs every round (at B = 64 only 64 programs, so
      the GPU is mostly idle: 1.8-2.2x slower on an H100 at B = 64 / 1, V = 152k).
    chunk: vocabulary entries per program of the split path (a multiple of ``block``). None: about
      ``programs`` programs in all (B rows x C chunks, at least one block each).
    programs: the number of programs ``chunk=None`` aims at (a few per multiprocessor).
    split_rounds: rejection rounds run by the split kernels before the rows still rejected go to
      the one-program-per-row kernel (>= 1).
    max_rounds: rounds in all before a row is handed back as token -1 and drawn again by the XLA
      reference (``kernels.sampling.sample``). None: no cap. The pivot rises past at least one
      distinct logit per rejected round and the most probable token is always kept, so a row is
      accepted within as many rounds as it has distinct logits (about 1 + ln(1 / p(kept)) on
      average), and no data-dependent branch (a host synchronisation on GPU) is needed.
    num_warps, num_stages: Triton's warps per program and software-pipelining depth.
    fast_math: the per-element exp and logs through PTX's approximate special-function
      instructions (``ex2.approx``, ``lg2.approx``: one instruction each, errors of about
      2^-22, relative for ex2 and absolute for lg2 near 1)
      and ``-log1p(-w)`` by a series below w = 1/16, instead of libdevice's accurate ``expf`` /
      ``logf`` / ``log1pf`` (tens of instructions each). The Gumbel noise moves by < 1e-5 (see
      ``gumbel``), so the sampled distribution is the same up to float rounding, but the
      tokens drawn for a seed may differ from the exact path's. Interpret mode computes the same
      formulas with ``jnp.exp2`` / ``jnp.log2``. Default True (measured faster on an H100:
      155 vs 188 us with the split path at B = 64, V = 152k); False for libdevice's functions.
    draw: how the split path draws a round's candidate from p restricted to R_r.
      "gumbel" (default): Gumbel-max, g_v = hash noise per entry, in the same pass as the
      statistics or the previous check (per entry: the hash and two logs). "cdf": inverse
      transform sampling (``_locate_kernel``): the chunk where the cumulative mass crosses u_1
      sum_c w_c (w_c: the chunk's mass in R_r, from the statistics or the previous check), then
      that chunk alone scanned for the block and, in it, the entry where the running sums cross
      u_2 w_c* and u_3 (block sum). Per entry only an exp and a compare, at the cost of one
      small launch per round (a program per row reading one chunk); the other passes check a
      candidate and give the next round's w_c in the same pass. The distribution is the same up
      to float rounding: the draw runs in three levels (chunk, block, entry), each with its own
      23-bit uniform, so each level rounds probabilities to 2^-23 of its own total, about
      n 2^-25 in total variation for a level of n entries (< 1e-4 in all at block 2048; a single
      level over V = 152k would be ~2e-3). The tokens for a seed differ from "gumbel"'s. Timed on
      an H200 (2026-11-26, B = 64, V = 152k, top-p): 88 us with one block per chunk and 4 warps
      against 140-216 us for "gumbel" over the same sweep; the default for top-k / top-p at
      B x V >= 16 x 49,152 (``default_config``).
    candidates: K, candidates per round of the "cdf" draw (a power of two <= 8; "gumbel" takes
      1). Each round draws K i.i.d. candidates from p restricted to R_r, checks all K in one mass
      pass and accepts the first (in drawing order) that passes: rejection sampling from the
      proposal p|R_r, exact because R_r contains the kept set. When all K are rejected, the next
      round's set is above the highest of them (all K are outside the kept set, an upper set of
      z). A top-p 0.9 round rejects all K with probability ~0.1^K, so K = 4 lets one or two
      rounds decide nearly every row: fewer launches (3 + 2 per round), the fixed cost of the
      split path. K = 1 is the one-candidate draw. rounds_B then counts candidates: r K + k + 1
      for candidate k of round r. Measured on an H200 (B = 64, V = 152k, top-p): K = 4 was
      slower than K = 1 at four of the five launch settings swept (105-125 vs 88-107 us; within
      the run-to-run spread at the fifth): checking four
      pivots per entry costs the mass pass more than the launches it saves.
    fused_finish: True (default): after the split path's last check launch, one launch (a
      program per row, ``_finish_kernel``) decides the last candidates and continues the rows
      still rejected. False: XLA decides them on the [B, C] partials (a reduction and a few
      elementwise kernels), then the leftover-row launch (``_continue_rows``), about four more
      launches per call (compiled for an H100: 12 -> 8 launches at B = 64, top-p; 10 -> 5
      at B = 1; ``benchmarks/xla_gpu_offline.py --sampler``). The tokens are the same either
      way (tested). Not yet timed.
    grid_combine: "cdf" draw only, False (default). True: each mass launch also decides its
      round in the same launch: the program of a row that finishes last (an atomic arrival
      counter per row and round, zeroed by the first locate launch) reads the row's per-chunk
      partials and runs the next locate (or the finish) itself, so a call at B = 64 launches 5
      kernels instead of 8 (statistics, first locate, 3 x mass). Relies on the GPU's memory
      ordering (a CTA barrier, an acquire-release atomic at GPU scope, loads past L1), which
      interpret mode cannot test: it draws the same tokens there (tested), not yet run on a
      GPU. Experimental until ``benchmarks/sampling.py``'s compiled check (the distribution,
      and the same tokens as the separate launches on the same seeds) has passed on one. Its
      cost: the combine's code sits in every program of the mass launch, 79 registers per
      thread (162 in the last round, which holds the row continuation) against 39 for
      ``_mass_kernel`` at B = 64, V = 152k, 4 warps (sm_90, standalone Triton), so fewer
      programs are resident per multiprocessor; only a GPU timing tells which way it goes.
  """
  block: int = 2048
  split: bool = True
  chunk: int | None = None
  programs: int = 1024
  split_rounds: int = 3
  max_rounds: int | None = None
  num_warps: int = 8
  num_stages: int = 2
  fast_math: bool = True
  draw: str = "gumbel"
  candidates: int = 1
  fused_finish: bool = True
  grid_combine: bool = False


DRAWS = ("gumbel", "cdf")
# The cdf draw's settings where an H200 timed it fastest (2026-11-26, B = 64, V = 152k, top-p 0.9,
# one run: 88 us against 140-216 us for the Gumbel draw at every programs x warps point of the
# sweep; docs/benchmarks.md): one block per chunk, one candidate per round, 4 warps.
CDF_MEASURED_FASTEST = dict(draw="cdf", candidates=1, chunk=2048, num_warps=4)
# The fewest logits (B x V) at which the cdf draw was timed faster than the Gumbel draw, for
# top-k / top-p (H200, 2026-11-27, one run, both with the XLA finish): B = 16 x V = 49,152, 30 vs
# 40 us; every larger point of the table too (B = 16 at V = 128k / 152k, 41 vs 55 / 70 us; B = 64
# and 256 at every vocabulary); slower at B = 16 x V = 32,000 (37 vs 33 us) and at B = 1 (28-41 vs
# 27-38 us at every vocabulary).
CDF_MIN_LOGITS = 16 * 49152
# min-p alone: the cdf draw (the first draw is always accepted: statistics, the floor's masses,
# one locate) timed faster at B = 64, V = 152k (52 vs 78 us, the same run); not timed elsewhere
CDF_MIN_LOGITS_MIN_P = 64 * 151936


def default_config(batch: int, vocab: int, *, top_k: int | None = None,
                   top_p: float | None = None, min_p: float | None = None) -> GpuConfig:
  """The launch settings ``sample_gpu`` uses when ``config`` is None.

  The split path with the inverse-CDF draw, one block per chunk, one candidate per round, 4 warps
  (``CDF_MEASURED_FASTEST``) where the logits hold at least ``CDF_MIN_LOGITS`` entries with top-k
  or top-p (B >= 16 at V = 49k - 152k, B >= 25 at V = 32k: timed at B = 64 there, B = 25 - 63
  untimed) or ``CDF_MIN_LOGITS_MIN_P`` with min-p alone; ``GpuConfig()`` (the Gumbel draw) elsewhere, where the cdf draw's extra locate launch
  costs more than its cheaper passes save. Measured on an H200 (2026-11-27, the table of
  docs/benchmarks.md): B = 64, V = 152k, top-p: 74 vs 126 us; B = 16, V = 152k: 41 vs 70 us;
  B = 1: 41 vs 38 us. Both draws are exact (the same distribution); the tokens for a seed differ.
  """
  if top_k is None and top_p is None:
    cdf = min_p is not None and batch * vocab >= CDF_MIN_LOGITS_MIN_P
  else:
    cdf = batch * vocab >= CDF_MIN_LOGITS
  return GpuConfig(**CDF_MEASURED_FASTEST) if cdf else GpuConfig()


class KernelShapeError(ValueError):
  """The kernel cannot run these settings (``impl="auto"`` falls back to XLA)."""


def check_config(cfg: GpuConfig):
  """Raise ``KernelShapeError`` naming the setting the kernel cannot use."""
  if cfg.block < 16 or cfg.block & (cfg.block - 1):
    raise KernelShapeError(f"block={cfg.block}: the Triton kernel needs a power of two >= 16")
  if cfg.chunk is not None and (cfg.chunk < cfg.block or cfg.chunk % cfg.block):
    raise KernelShapeError(f"chunk={cfg.chunk}: needs a multiple of block={cfg.block}")
  if cfg.programs < 1:
    raise KernelShapeError(f"programs={cfg.programs}: needs at least one program")
  if cfg.split_rounds < 1:
    raise KernelShapeError(f"split_rounds={cfg.split_rounds}: needs at least one round")
  if cfg.max_rounds is not None and cfg.max_rounds < 1:
    raise KernelShapeError(f"max_rounds={cfg.max_rounds}: needs at least one round (or None)")
  if cfg.draw not in DRAWS:
    raise KernelShapeError(f"draw={cfg.draw!r}: expected one of {DRAWS}")
  if cfg.grid_combine and cfg.draw != "cdf":
    raise KernelShapeError("grid_combine=True: the cdf draw's mass launches only (draw='cdf')")
  if cfg.grid_combine and not cfg.fused_finish:
    raise KernelShapeError("grid_combine=True finishes inside the last mass launch: "
                           "fused_finish=False does not apply")
  if cfg.candidates not in (1, 2, 4, 8) or (cfg.candidates > 1 and cfg.draw != "cdf"):
    raise KernelShapeError(f"candidates={cfg.candidates}: 1, 2, 4 or 8 candidates per round, "
                           "more than one with draw='cdf' only")


def chunks_per_row(b: int, v: int, cfg: GpuConfig) -> tuple[int, int]:
  """(chunk, C): vocabulary entries per program and programs per row of the split path.

  chunk = cfg.chunk, or with None the whole blocks that give about ``cfg.programs`` programs:
  C0 = ceil(programs / B) chunks of ceil(ceil(V / block) / C0) blocks each. C = ceil(V / chunk).
  """
  nblocks = -(-v // cfg.block)
  if cfg.chunk is None:
    per_row = max(1, min(nblocks, -(-cfg.programs // b)))
    chunk = -(-nblocks // per_row) * cfg.block
  else:
    chunk = min(cfg.chunk, nblocks * cfg.block)
  return chunk, -(-v // chunk)


def _u32(v: int):
  return np.uint32(v)


def fmix32(h):
  """murmur3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  h = h ^ (h >> _u32(16))
  h = h * _u32(0x85EBCA6B)
  h = h ^ (h >> _u32(13))
  h = h * _u32(0xC2B2AE35)
  return h ^ (h >> _u32(16))


def round_key(seed_u32, r_i32):
  """Per (row seed, round) key of the counter-based hash."""
  return fmix32(seed_u32 ^ fmix32(r_i32.astype(jnp.uint32) * _u32(0x9E3779B9) + _u32(0x7F4A7C15)))


# How the per-element transcendentals are computed (``GpuConfig.fast_math``): "exact" = jnp's
# exp / log / log1p (libdevice's accurate expf / logf / log1pf on a GPU); "fast" = the formulas
# below with jnp.exp2 / jnp.log2 (interpret mode); "ptx" = the same formulas with PTX's
# ex2.approx / lg2.approx (one special-function instruction each; compiled kernels only).
_LOG2E, _LN2 = np.float32(1.4426950408889634), np.float32(0.6931471805599453)


def _ptx_approx(op: str, x):
  """One PTX special-function instruction per element: ``ex2`` (2^x) or ``lg2`` (log2 x), float32,
  flush-to-zero; errors of about 2^-22 (relative for ex2; for lg2 absolute near 1, relative
  elsewhere: the PTX ISA's figures)."""
  [y] = plgpu.elementwise_inline_asm(f"{op}.approx.ftz.f32 $0, $1;", args=[x],
                                     constraints="=f,f", pack=1,
                                     result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
  return y


def _exp(x, math: str = "exact"):
  """e^x: jnp.exp, or 2^(x log2 e) for the fast modes."""
  if math == "exact":
    return jnp.exp(x)
  x2 = x * _LOG2E
  return _ptx_approx("ex2", x2) if math == "ptx" else jnp.exp2(x2)


def _log(x, math: str = "exact"):
  """ln x: jnp.log, or ln 2 log2(x) for the fast modes."""
  if math == "exact":
    return jnp.log(x)
  return _LN2 * (_ptx_approx("lg2", x) if math == "ptx" else jnp.log2(x))


def _exponential(w, math: str = "exact"):
  """E = -log(1 - w) ~ Exp(1) for w uniform on (0, 1), accurate where w is small (where the largest
  Gumbel variables -log E come from): jnp.log1p, or for the fast modes the series
  w + w^2/2 + ... + w^6/6 below w = 1/16 (truncation < 1e-8 relative) and -log(1 - w) above (1 - w
  rounds by <= 2^-25: < 5e-7 relative in E there, ~7e-7 with the float32 log)."""
  if math == "exact":
    return -jnp.log1p(-w)
  series = w * (1 + w * (np.float32(1 / 2) + w * (np.float32(1 / 3) + w * (
      np.float32(1 / 4) + w * (np.float32(1 / 5) + w * np.float32(1 / 6))))))
  return jnp.where(w < np.float32(1 / 16), series, -_log(1 - w, math))


def gumbel(key_u32, index_i32, math: str = "exact"):
  """Gumbel(0, 1) variables -log(-log(1 - w)) for vocabulary indices ``index`` under ``key``.

  h = fmix32(fmix32(index + key) ^ key); w = (h >> 1) 2^-31 + 2^-32, uniform on (0, 1) and fine
  near 0 (float32 keeps 24 significant bits), clamped to 1 - 2^-24; -log(1 - w) is computed as
  -log1p(-w), accurate for small w, where the largest Gumbel values come from. The variables lie
  in [-2.81, 22.2]. ``math`` "fast" / "ptx" (``GpuConfig.fast_math``) computes both logs as in
  ``_exponential`` and ``_log``: the variables move by < 1e-5 (tested against "exact").
  """
  h = fmix32(fmix32(index_i32.astype(jnp.uint32) + key_u32) ^ key_u32)
  w = (h >> _u32(1)).astype(jnp.int32).astype(jnp.float32) * np.float32(2.0**-31)
  w = jnp.minimum(w + np.float32(2.0**-32), np.float32(1.0 - 2.0**-24))
  return -_log(_exponential(w, math), math)


def _lane_softmax_update(m, s, v, math: str = "exact"):
  """Per-lane running (max, sum exp(v - max)) after one more element v per lane: one exp per
  element, no reduction. -inf elements add nothing (and make no NaN)."""
  e = _exp(-jnp.abs(v - m), math)
  s = jnp.where(v > m, s * e + 1.0, jnp.where(v == -jnp.inf, s, s + e))
  return jnp.maximum(m, v), s


def _lane_softmax_reduce(m, s):
  """Per-lane (max, sum) -> the row's max and sum exp(v - max)."""
  mx = jnp.max(m)
  return mx, jnp.sum(jnp.where(m == -jnp.inf, 0.0, s * jnp.exp(m - mx)))


def _load_block(x_ref, start, lane, *, vocab: int, temperature: float):
  """Entries [start, start + block) of a row as float32 (-inf past V) -> (index, x, z = x / T)."""
  offs = start + lane
  x = plgpu.load(x_ref.at[pl.ds(start, lane.shape[0])], mask=offs < vocab,
                 other=jnp.array(-jnp.inf, x_ref.dtype)).astype(jnp.float32)
  return offs, x, (x / jnp.float32(temperature) if temperature != 1.0 else x)


def _in_set(z, pivot, m, log_min_p):
  """R = {z > pivot} (∩ {z - m >= log min_p}): the tokens a round may draw (m: the
  row max, unused without min-p)."""
  cand = z > pivot
  if log_min_p is not None:
    cand = cand & (z - m >= jnp.float32(log_min_p))
  return cand


def _gumbel_max_update(c, score, offs, z, x):
  """Per-lane running Gumbel-max winner (best score, index, z, x) after one more block."""
  best, idx, bz, bx = c
  take = score > best
  return (jnp.where(take, score, best), jnp.where(take, offs, idx), jnp.where(take, z, bz),
          jnp.where(take, x, bx))


def _gumbel_max_reduce(best, idx, bz, bx, vocab: int):
  """Per-lane winners -> (token or -1, its z, its x): the largest score, the smallest index among
  equal scores (``combine_draws`` applies the same rule across chunks)."""
  ninf = jnp.float32(-jnp.inf)
  won = (best == jnp.max(best)) & (idx >= 0)
  tok = jnp.min(jnp.where(won, idx, vocab))
  hit = won & (idx == tok)
  return (jnp.where(tok < vocab, tok, -1), jnp.max(jnp.where(hit, bz, ninf)),
          jnp.max(jnp.where(hit, bx, ninf)))


def _row_rounds(x_ref, seed, r0, pivot0, *, vocab: int, block: int, temperature: float,
                top_k: int | None, top_p: float | None, log_min_p: float | None,
                max_rounds: int | None, math: str):
  """One row inside a kernel: statistics and rejection rounds from round ``r0`` and pivot
  ``pivot0`` on -> (token or -1, model log-prob, rounds). Every pass keeps per-lane accumulators
  of shape [block] and reduces them once at its end (no reduction per block)."""
  f32, i32 = jnp.float32, jnp.int32
  ninf = f32(-jnp.inf)
  nblocks = pl.cdiv(vocab, block)
  lane = lax.broadcasted_iota(i32, (block,), 0)
  scaled = temperature != 1.0
  full = lambda v, dtype=f32: jnp.full((block,), v, dtype)

  load = lambda i: _load_block(x_ref, i * block, lane, vocab=vocab, temperature=temperature)

  def stats_init():
    return (full(-jnp.inf), full(0.0)) * (2 if scaled else 1)

  def stats_update(c, x, z):
    m, s = _lane_softmax_update(c[0], c[1], z, math)
    if not scaled:
      return m, s
    return (m, s) + _lane_softmax_update(c[2], c[3], x, math)

  def stats_reduce(c):
    """(m, S) of z and (m1, S1) of the logits at temperature 1."""
    m, s = _lane_softmax_reduce(c[0], c[1])
    m1, s1 = _lane_softmax_reduce(c[2], c[3]) if scaled else (m, s)
    return m, s, m1, s1

  def stats_pass():
    return stats_reduce(lax.fori_loop(
        0, nblocks, lambda i, c: stats_update(c, *load(i)[1:]), stats_init()))

  def sample_pass(r, pivot, floor, with_stats):
    """Gumbel-max over {z > pivot, z - m >= log min_p} -> (token or -1, z_token, x_token) and,
    when ``with_stats``, the statistics of the row (accumulated in the same pass)."""
    key = round_key(seed, r)

    def body(i, c):
      offs, x, z = load(i)
      cand = _in_set(z, pivot, floor, log_min_p)
      score = jnp.where(cand, z + gumbel(key, offs, math), ninf)
      out = _gumbel_max_update(c[:4], score, offs, z, x)
      if with_stats:
        out += stats_update(c[4:], x, z)
      return out

    init = (full(-jnp.inf), full(-1, i32), full(-jnp.inf), full(-jnp.inf))
    if with_stats:
      init += stats_init()
    c = lax.fori_loop(0, nblocks, body, init)
    return _gumbel_max_reduce(*c[:4], vocab) + (stats_reduce(c[4:]) if with_stats else ())

  def accepts(ztok, m, s):
    """True where the token of scaled logit ``ztok`` is in the top-k / top-p kept set: the count
    and the mass (relative to m) of the tokens strictly above it."""
    def body(i, c):
      count, mass = c
      _, _, z = load(i)
      above = z > ztok
      count = count + above.astype(i32) if top_k is not None else count
      if top_p is not None:
        mass = mass + jnp.where(above, _exp(z - m, math), f32(0.0))
      return count, mass
    count, mass = lax.fori_loop(0, nblocks, body, (full(0, i32), full(0.0)))
    ok = jnp.bool_(True)
    if top_k is not None:
      ok = ok & (jnp.sum(count) < top_k)
    if top_p is not None:
      ok = ok & (jnp.sum(mass) / s < f32(top_p))
    return ok

  cap = _NO_CAP if max_rounds is None else max_rounds
  floor = None
  if log_min_p is not None:
    m, s, m1, s1 = stats_pass()
    floor = m  # the row max: the min-p floor is m + log min_p (``_in_set``)
    tok, ztok, xtok = sample_pass(r0, pivot0, floor, False)
  else:
    tok, ztok, xtok, m, s, m1, s1 = sample_pass(r0, pivot0, None, True)
  found = tok >= 0
  rounds = r0 + 1
  if top_k is not None or top_p is not None:
    ok = found & accepts(ztok, m, s)

    def cond(c):
      r, done = c[0], c[1]
      return (r < cap) & ~done

    def body(c):
      r, _, _, ztok_prev, _ = c
      tok, ztok, xtok = sample_pass(r, ztok_prev, floor, False)
      found = tok >= 0
      ok = found & accepts(ztok, m, s)
      return r + 1, ok | ~found, jnp.where(ok, tok, i32(-1)), ztok, xtok

    rounds, _, tok, ztok, xtok = lax.while_loop(
        cond, body, (rounds, ok | ~found, jnp.where(ok, tok, i32(-1)), ztok, xtok))
  return tok, xtok - m1 - jnp.log(s1), rounds


def _row_kernel(x_ref, seed_ref, pivot_ref, round_ref, active_ref, tok_ref, logp_ref, rounds_ref,
                **settings):
  """One program per row: ``_row_rounds`` from round ``round_ref`` and pivot ``pivot_ref``. A row
  with ``active_ref`` 0 reads nothing (token -1, log-prob NaN)."""
  active = active_ref[...] != 0

  @pl.when(active)
  def _run():
    tok, logp, rounds = _row_rounds(x_ref, seed_ref[...], round_ref[...], pivot_ref[...],
                                    **settings)
    tok_ref[...], logp_ref[...], rounds_ref[...] = tok, logp, rounds

  @pl.when(~active)
  def _skip():
    tok_ref[...] = jnp.int32(-1)
    logp_ref[...] = jnp.float32(jnp.nan)
    rounds_ref[...] = round_ref[...]


_NO_CAP = 2**30  # max_rounds=None: rounds until accepted (at most the row's distinct logits)


class SplitState(NamedTuple):
  """A row's progress between launches of the split path (each field [B] in XLA, a scalar inside a
  kernel): whether it is decided, the accepted token (-1 before), its logit, the rounds it took,
  and the candidate of the latest round (token or -1, z, x), not yet checked."""
  done: jax.Array
  result: jax.Array
  result_x: jax.Array
  rounds: jax.Array
  tok: jax.Array
  ztok: jax.Array
  xtok: jax.Array


_STATE_DTYPES = (jnp.int32, jnp.int32, jnp.float32, jnp.int32, jnp.int32, jnp.float32,
                 jnp.float32)  # SplitState's fields as stored (done as int32)
_DRAW_IDENTITY = (-jnp.inf, -1, -jnp.inf, -jnp.inf)  # best score, index, z, x of "no draw"


def advance(state: SplitState, rounds_if_ok, count_xC, mass_xC, draw_xC, s, *, top_k, top_p):
  """The state after checking its candidate and, with ``draw_xC`` (per-chunk best score, index, z,
  x), taking the next round's draw as the new candidate where the row is still undecided.

  The check (per-chunk partials, summed over the last axis): accept iff #{z > z_tok} < k and
  sum_{z > z_tok} exp(z - m) / S < p. The same function runs in XLA on [B, C] partials and inside
  the split kernels on one row's [C] partials, so both take the same decisions."""
  ok = ~state.done
  if top_k is not None:
    ok = ok & (jnp.sum(count_xC, axis=-1) < top_k)
  if top_p is not None:
    ok = ok & (jnp.sum(mass_xC, axis=-1) / s < jnp.float32(top_p))
  done = state.done | ok
  new = SplitState(done, jnp.where(ok, state.tok, state.result),
                   jnp.where(ok, state.xtok, state.result_x),
                   jnp.where(ok, rounds_if_ok, state.rounds), state.tok, state.ztok, state.xtok)
  if draw_xC is None:
    return new
  tok, ztok, xtok = combine_draws(*draw_xC)
  tok = jnp.where(done, new.tok, tok)
  return new._replace(done=done | (tok < 0), tok=tok, ztok=jnp.where(done, new.ztok, ztok),
                      xtok=jnp.where(done, new.xtok, xtok))


def _load_partials(ref, n_chunks: int, identity):
  """One row's [C] per-chunk partials (a ref of shape (C,)) as a power-of-two vector padded with
  the reduction's identity."""
  width = pl.next_power_of_2(n_chunks)
  lane = lax.broadcasted_iota(jnp.int32, (width,), 0)
  return plgpu.load(ref.at[pl.ds(0, width)], mask=lane < n_chunks,
                    other=jnp.array(identity, ref.dtype))


def _chunk_kernel(x_ref, seed_ref, *refs, vocab: int, block: int, chunk: int, n_chunks: int,
                  temperature: float, top_k: int | None, top_p: float | None,
                  log_min_p: float | None, math: str, rnd: int, stats: bool, sample: bool,
                  check: bool, first: bool, with_m: bool):
  """One (row, chunk) program of the split path: over v in [c chunk, (c + 1) chunk) it computes
  any of (per-lane accumulators, one reduction at the end; an inactive row reads nothing and
  writes the identities):

    stats:  max z, sum exp(z - max) (and the same of the logits at temperature 1)
    sample: Gumbel-max of round ``rnd`` over {z > pivot, z - m >= log min_p}: score, index, z, x
    check:  #{z > pivot} and sum_{z > pivot} exp(z - m)   (the candidate of the previous round)

  Launch 0 (stats / sample) runs every row from pivot -inf; with min-p it takes the row max m
  (``with_m``), else m is unused. Later launches (check) combine the
  previous launch's per-chunk partials themselves (every program of the row takes the same
  decision, so no XLA step sits between the launches) and the row's first program writes what
  they combined: launch 1 (``first``) takes launch 0's statistics and draw partials and writes
  m, S, m1, S1 and the first ``SplitState``; launch r >= 2 takes the row's m, S, the state the
  previous launch wrote and its check and draw partials, ``advance``s the state and writes it.
  The candidate's z is the pivot of both the check and the next draw.
  """
  f32, i32 = jnp.float32, jnp.int32
  ninf = f32(-jnp.inf)
  lane = lax.broadcasted_iota(i32, (block,), 0)
  start = pl.program_id(1) * chunk
  scaled = temperature != 1.0
  full = lambda v, dtype=f32: jnp.full((block,), v, dtype)
  written = ()
  if check and first:
    parts = [_load_partials(r, n_chunks, ident)
             for r, ident in zip(refs[:8], (-jnp.inf, 0.0) * 2 + _DRAW_IDENTITY)]
    refs = refs[8:]
    m, s = combine_stats(parts[0], parts[1])
    written = (m, s) + combine_stats(parts[2], parts[3])
    state = first_state(*combine_draws(*parts[4:]))
    active, pivot = ~state.done, state.ztok
  elif check:
    m_ref, s_ref, *refs = refs
    state = SplitState(*(r[...] for r in refs[:7]))
    state = state._replace(done=state.done != 0)
    parts = [_load_partials(r, n_chunks, ident)
             for r, ident in zip(refs[7:13], (0, 0.0) + _DRAW_IDENTITY)]
    refs = refs[13:]
    m = m_ref[...]
    state = advance(state, i32(rnd - 1), parts[0], parts[1], parts[2:], s_ref[...],
                    top_k=top_k, top_p=top_p)
    active, pivot = ~state.done, state.ztok
  elif with_m:  # launch 0 after XLA took the row max (min-p): every row active, no pivot
    m_ref, *refs = refs
    active, pivot, m = jnp.bool_(True), ninf, m_ref[...]
  else:  # launch 0: constants, not inputs (an input would be one more XLA kernel to fill it)
    active, pivot, m = jnp.bool_(True), ninf, f32(0.0)
  out_refs = refs
  key = round_key(seed_ref[...], i32(rnd))

  def body(i, c):
    offs, x, z = _load_block(x_ref, start + i * block, lane, vocab=vocab,
                             temperature=temperature)
    c = dict(c)
    if stats:
      c["m"], c["s"] = _lane_softmax_update(c["m"], c["s"], z, math)
      if scaled:
        c["m1"], c["s1"] = _lane_softmax_update(c["m1"], c["s1"], x, math)
    if sample:
      cand = _in_set(z, pivot, m, log_min_p)
      score = jnp.where(cand, z + gumbel(key, offs, math), ninf)
      c["best"], c["idx"], c["bz"], c["bx"] = _gumbel_max_update(
          (c["best"], c["idx"], c["bz"], c["bx"]), score, offs, z, x)
    if check:
      above = z > pivot
      if top_k is not None:
        c["count"] = c["count"] + above.astype(i32)
      if top_p is not None:
        c["mass"] = c["mass"] + jnp.where(above, _exp(z - m, math), f32(0.0))
    return c

  init = {}
  if stats:
    init.update(m=full(-jnp.inf), s=full(0.0))
    if scaled:
      init.update(m1=full(-jnp.inf), s1=full(0.0))
  if sample:
    init.update(best=full(-jnp.inf), idx=full(-1, i32), bz=full(-jnp.inf), bx=full(-jnp.inf))
  if check:
    init.update(count=full(0, i32), mass=full(0.0))
  # an int32 bound: a Python int in a where would take the condition's type (an i1 loop bound)
  trips = jnp.where(active, i32(chunk // block), i32(0))
  c = lax.fori_loop(0, trips, body, init)

  outs = iter(out_refs)
  if stats:
    mx, sx = _lane_softmax_reduce(c["m"], c["s"])
    mx1, sx1 = _lane_softmax_reduce(c["m1"], c["s1"]) if scaled else (mx, sx)
    for value in (mx, sx, mx1, sx1):
      next(outs)[...] = value
  if sample:
    tok, ztok, xtok = _gumbel_max_reduce(c["best"], c["idx"], c["bz"], c["bx"], vocab)
    for value in (jnp.max(c["best"]), tok, ztok, xtok):
      next(outs)[...] = value
  if check:
    next(outs)[...] = jnp.sum(c["count"]) if top_k is not None else i32(0)
    next(outs)[...] = jnp.sum(c["mass"]) if top_p is not None else f32(0.0)
  if check:
    written_refs = list(outs)

    @pl.when(pl.program_id(1) == 0)
    def _write_state():
      values = written + tuple(state._replace(done=state.done.astype(i32)))
      for ref, value in zip(written_refs, values):
        ref[...] = value


def combine_stats(m_xC, s_xC):
  """Per-chunk (max, sum exp(z - max)) -> the row's: M = max_c m_c, S = sum_c s_c exp(m_c - M).
  Reduces the last axis: [B, C] in XLA, one row's [C] inside a kernel."""
  m = jnp.max(m_xC, axis=-1)
  return m, jnp.sum(jnp.where(m_xC == -jnp.inf, 0.0, s_xC * jnp.exp(m_xC - m[..., None])),
                    axis=-1)


def first_state(tok, ztok, xtok) -> SplitState:
  """The state after round 0's draw: undecided unless the row had no finite candidate."""
  return SplitState(tok < 0, jnp.full_like(tok, -1), jnp.full_like(xtok, -jnp.inf),
                    jnp.ones_like(tok), tok, ztok, xtok)


def combine_draws(best_xC, idx_xC, z_xC, x_xC):
  """Per-chunk Gumbel-max winners -> the row's (token or -1, z, x): the largest score, the smallest
  index among equal scores (the rule inside a chunk, so the split changes no draw). Reduces the
  last axis: [B, C] in XLA, one row's [C] inside a kernel."""
  v = jnp.iinfo(jnp.int32).max
  top = jnp.max(best_xC, axis=-1, keepdims=True)
  won = (best_xC == top) & (idx_xC >= 0)
  tok = jnp.min(jnp.where(won, idx_xC, v), axis=-1)
  hit = won & (idx_xC == tok[..., None])
  pick = lambda a: jnp.max(jnp.where(hit, a, -jnp.inf), axis=-1)
  return jnp.where(tok < v, tok, -1), pick(z_xC), pick(x_xC)


def _split_call(logits_BxV, seeds_B, *row_inputs, chunk, n_chunks, cfg, settings, rnd=0,
                stats=False, sample=False, check=False, prev_parts=(), interpret=False):
  """One launch of ``_chunk_kernel`` over the grid (B, C) -> its outputs in order: the [B, C]
  partials, then, for a check launch, what its rows' first programs write ([B] each): launch 1
  (``prev_parts`` = launch 0's eight statistics and draw partials) m, S, m1, S1 and the first
  ``SplitState``; a later one (``row_inputs`` = m, S and the state the previous launch wrote,
  ``prev_parts`` = its six check and draw partials) the advanced state."""
  b, v = logits_BxV.shape
  f32, i32 = jnp.float32, jnp.int32
  first = check and len(prev_parts) == 8
  kinds = ([f32] * 4 if stats else []) + ([f32, i32, f32, f32] if sample else []) + (
      [i32, f32] if check else [])
  if not check and len(row_inputs) > 1:
    raise ValueError("launch 0 takes at most the row max m (every row active, pivot -inf)")
  if sample and not check and settings["log_min_p"] is not None and len(row_inputs) != 1:
    raise ValueError("a min-p draw in launch 0 needs the row max m (its floor is m + log min_p)")
  kernel = functools.partial(_chunk_kernel, vocab=v, block=cfg.block, chunk=chunk,
                             n_chunks=n_chunks, rnd=rnd, stats=stats, sample=sample, check=check,
                             first=first, with_m=not check and len(row_inputs) == 1, **settings)
  row = pl.BlockSpec((None,), lambda i, c: (i,))
  cell = pl.BlockSpec((None, None), lambda i, c: (i, c))
  partials = pl.BlockSpec((None, n_chunks), lambda i, c: (i, 0))
  out_shape = [jax.ShapeDtypeStruct((b, n_chunks), k) for k in kinds]
  written = (((f32,) * 4 if first else ()) + _STATE_DTYPES) if check else ()
  out_shape += [jax.ShapeDtypeStruct((b,), k) for k in written]
  out_specs = [cell] * len(kinds) + [row] * len(written)
  compiler_params = None if interpret else plgpu.CompilerParams(num_warps=cfg.num_warps,
                                                                 num_stages=cfg.num_stages)
  return pl.pallas_call(
      kernel, grid=(b, n_chunks), out_shape=out_shape,
      in_specs=[pl.BlockSpec((None, v), lambda i, c: (i, 0)), row] + [row] * len(row_inputs)
      + [partials] * len(prev_parts),
      out_specs=out_specs, compiler_params=compiler_params, interpret=interpret,
      name=f"sample_split_{'s' * stats}{'d' * sample}{'c' * check}{'f' * first}")(
          logits_BxV, seeds_B, *row_inputs, *prev_parts)


def _row_call(logits_BxV, seeds_B, pivot_B, round_B, active_B, *, cfg, settings, interpret):
  """One launch of ``_row_kernel`` (one program per row) -> (token_B, model_logp_B, rounds_B)."""
  b, v = logits_BxV.shape
  kernel = functools.partial(_row_kernel, vocab=v, block=cfg.block, max_rounds=cfg.max_rounds,
                             **settings)
  compiler_params = None if interpret else plgpu.CompilerParams(num_warps=cfg.num_warps,
                                                                 num_stages=cfg.num_stages)
  row = pl.BlockSpec((None,), lambda i: (i,))
  out_shape = (jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.float32),
               jax.ShapeDtypeStruct((b,), jnp.int32))
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(b,),
      in_specs=[pl.BlockSpec((None, v), lambda i: (i, 0)), row, row, row, row],
      out_specs=(row, row, row), compiler_params=compiler_params, interpret=interpret,
      name="sample_top_k_top_p_min_p")(logits_BxV, seeds_B, pivot_B, round_B, active_B)


def _sample_split(logits_BxV, seeds_B, *, chunk, n_chunks, cfg, settings, interpret):
  """The split path: rounds 0 .. R-1 (R = min(split_rounds, max_rounds)) over B x C programs.
  Launch 0 draws round 0 (with the statistics); launch r >= 1 checks round r - 1's candidate and
  draws round r's in one pass, after combining the previous launch's partials itself, so XLA
  combines only after the last launch. Rows still rejected continue in ``_row_kernel`` from round
  R and the last rejected pivot."""
  b, _ = logits_BxV.shape
  i32 = jnp.int32
  call = functools.partial(_split_call, logits_BxV, seeds_B, chunk=chunk, n_chunks=n_chunks,
                           cfg=cfg, settings=settings, interpret=interpret)
  top_k, top_p = settings["top_k"], settings["top_p"]
  ones = jnp.ones((b,), i32)
  if settings["log_min_p"] is not None:  # min-p needs the row max before any draw
    st = call(stats=True)
    parts = tuple(st) + tuple(call(combine_stats(st[0], st[1])[0], sample=True))
  else:
    parts = tuple(call(stats=True, sample=True))
  if top_k is None and top_p is None:  # every first draw is accepted
    m1, s1 = combine_stats(parts[2], parts[3])
    tok, _, xtok = combine_draws(*parts[4:])
    return tok, xtok - m1 - jnp.log(s1), ones
  n_split = min(cfg.split_rounds, cfg.max_rounds or cfg.split_rounds)
  row_inputs = ()
  for r in range(1, n_split + 1):  # launch r: check round r - 1's candidate, draw round r's
    last = r == n_split
    out = call(*row_inputs, rnd=r, sample=not last, check=True, prev_parts=parts)
    n_parts = 2 if last else 6
    if r == 1:
      m, s, m1, s1 = out[n_parts:n_parts + 4]
    state = out[-7:]  # the state this launch combined (before its own partials)
    parts = tuple(out[:2]) if last else tuple(out[4:6]) + tuple(out[:4])
    row_inputs = (m, s, *state)
  return _finish_split(logits_BxV, seeds_B, state, parts[0], parts[1], s, m1, s1, n_split,
                       cfg=cfg, settings=settings, interpret=interpret)


def _finish_split(logits_BxV, seeds_B, state, count_BxC, mass_BxC, s, m1, s1, n_split, *, cfg,
                  settings, interpret):
  """After the Gumbel split launches: check the last candidate and continue the rows it rejects,
  in one launch (``_finish_call``), or with ``fused_finish=False`` in XLA on the last launch's
  [B, C] partials, then ``_continue_rows``."""
  i32 = jnp.int32
  if cfg.fused_finish:  # one candidate per round: [B] -> [B, 1] and [B, C] -> [B, C, 1]
    return _finish_call(logits_BxV, seeds_B, (*state[:4], *(a[:, None] for a in state[4:])),
                        count_BxC[..., None], mass_BxC[..., None], s, m1, s1, n_split, cfg=cfg,
                        settings=settings, interpret=interpret)
  state = SplitState(state[0] != 0, *state[1:])
  state = advance(state, i32(n_split), count_BxC, mass_BxC, None, s, top_k=settings["top_k"],
                  top_p=settings["top_p"])
  return _continue_rows(logits_BxV, seeds_B, state, state.ztok, m1, s1, n_split, cfg=cfg,
                        settings=settings, interpret=interpret)


def _continue_rows(logits_BxV, seeds_B, state, pivot_B, m1, s1, n_split, *, cfg, settings,
                   interpret, candidates: int = 1):
  """Rows still rejected after the split launches continue in ``_row_kernel`` from round
  ``n_split`` and ``pivot_B`` (the last rejected candidate's z), unless ``max_rounds`` is reached.
  -> (token_B, model_logp_B, rounds_B); with K ``candidates`` per split round, the split rounds
  count K each in rounds_B."""
  b = logits_BxV.shape[0]
  i32 = jnp.int32
  logp = state.result_x - m1 - jnp.log(s1)
  split_count = n_split * candidates
  if cfg.max_rounds is not None and n_split >= cfg.max_rounds:  # the cap is reached here
    return (jnp.where(state.done, state.result, -1), logp,
            jnp.where(state.done, state.rounds, split_count))
  row_tok, row_logp, row_rounds = _row_call(
      logits_BxV, seeds_B, pivot_B, jnp.full((b,), n_split, i32), (~state.done).astype(i32),
      cfg=cfg, settings=settings, interpret=interpret)
  return (jnp.where(state.done, state.result, row_tok), jnp.where(state.done, logp, row_logp),
          jnp.where(state.done, state.rounds, row_rounds + (split_count - n_split)))


def _finish_kernel(x_ref, seed_ref, m1_ref, s1_ref, s_ref, *refs, n_chunks: int, n_split: int,
                   candidates: int, cap_reached: bool, **settings):
  """One program per row after the split path's last check launch: combines that launch's
  [C, K] count / mass partials of the state's K candidates (``advance_candidates``: accept the
  first passing one) and writes the row's token, model log-prob and rounds; a row still rejected
  continues in ``_row_rounds`` from round ``n_split`` and the highest rejected candidate, in the
  same program (unless ``max_rounds`` is reached: token -1). Replaces XLA's combine and the
  leftover-row launch of ``_continue_rows`` with one launch that draws the same tokens."""
  *state_refs, count_ref, mass_ref, tok_ref, logp_ref, rounds_ref = refs
  state = SplitState(*(r[...] for r in state_refs))
  count = _load_partials_ck(count_ref, n_chunks, candidates, 0)
  mass = _load_partials_ck(mass_ref, n_chunks, candidates, 0.0)
  _finish_row(x_ref, seed_ref[...], m1_ref[...], s1_ref[...], s_ref[...], state, count, mass,
              tok_ref, logp_ref, rounds_ref, n_split=n_split, candidates=candidates,
              cap_reached=cap_reached, **settings)


def _finish_row(x_ref, seed, m1, s1, s, state: SplitState, count, mass, tok_ref, logp_ref,
                rounds_ref, *, n_split: int, candidates: int, cap_reached: bool, **settings):
  """``_finish_kernel``'s decision and continuation for one row inside a kernel (``state`` as
  stored, done int32; ``count`` / ``mass`` the row's [pow2(C), K] partials); writes the row's
  token, model log-prob and rounds."""
  f32, i32 = jnp.float32, jnp.int32
  state = state._replace(done=state.done != 0)
  state, _, pivot = advance_candidates(state, n_split - 1, count, mass, s,
                                       top_k=settings["top_k"], top_p=settings["top_p"])

  @pl.when(state.done)
  def _decided():
    tok_ref[...] = state.result
    logp_ref[...] = state.result_x - m1 - jnp.log(s1)
    rounds_ref[...] = state.rounds

  @pl.when(~state.done)
  def _rejected():
    if cap_reached:
      tok_ref[...] = i32(-1)
      logp_ref[...] = f32(jnp.nan)
      rounds_ref[...] = i32(n_split * candidates)
    else:
      tok, logp, rounds = _row_rounds(x_ref, seed, i32(n_split), pivot, **settings)
      tok_ref[...], logp_ref[...] = tok, logp
      rounds_ref[...] = rounds + i32(n_split * (candidates - 1))


def _finish_call(logits_BxV, seeds_B, state, count_BxCxK, mass_BxCxK, s, m1, s1, n_split, *,
                 cfg, settings, interpret):
  """One launch of ``_finish_kernel`` (a program per row) -> (token_B, model_logp_B, rounds_B).
  ``state``: the [B] fields as stored (done int32), its candidates [B, K]."""
  b, v = logits_BxV.shape
  _, n_chunks, k_count = count_BxCxK.shape
  kernel = functools.partial(
      _finish_kernel, n_chunks=n_chunks, n_split=n_split, candidates=k_count,
      cap_reached=cfg.max_rounds is not None and n_split >= cfg.max_rounds, vocab=v,
      block=cfg.block, max_rounds=cfg.max_rounds, **settings)
  row = pl.BlockSpec((None,), lambda i: (i,))
  per_k = pl.BlockSpec((None, k_count), lambda i: (i, 0))
  parts = pl.BlockSpec((None, n_chunks, k_count), lambda i: (i, 0, 0))
  compiler_params = None if interpret else plgpu.CompilerParams(num_warps=cfg.num_warps,
                                                                 num_stages=cfg.num_stages)
  return pl.pallas_call(
      kernel, grid=(b,),
      out_shape=(jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.float32),
                 jax.ShapeDtypeStruct((b,), jnp.int32)),
      in_specs=[pl.BlockSpec((None, v), lambda i: (i, 0))] + [row] * 8 + [per_k] * 3
      + [parts] * 2,
      out_specs=(row, row, row), compiler_params=compiler_params, interpret=interpret,
      name="sample_split_finish")(logits_BxV, seeds_B, m1, s1, s, *state, count_BxCxK,
                                  mass_BxCxK)


def round_uniform(seed_u32, r_i32, level: int):
  """u uniform on (0, 1) per (row seed, round, level) for the "cdf" draw's three levels (chunk,
  block, token; candidate k of a round uses levels 3k, 3k + 1, 3k + 2): 23 bits of a further hash
  of ``round_key``, (k + 1/2) 2^-23, exact in float32 (never 0 or 1)."""
  h = fmix32(round_key(seed_u32, r_i32) ^ _u32((0x5BD1E995 * (level + 1)) % 2**32))
  return ((h >> _u32(9)).astype(jnp.int32).astype(jnp.float32) + np.float32(0.5)) * np.float32(
      2.0**-23)


def advance_candidates(state: SplitState, first_round: int, count_xCxK, mass_xCxK, s, *, top_k,
                       top_p):
  """The "cdf" draw's check of a round's K candidates (``state.tok`` / ``ztok`` / ``xtok`` [..., K],
  numbered ``first_round`` K + k in drawing order): candidate k passes iff #{z > z_k} < top_k and
  sum_{z > z_k} exp(z - m) / S < top_p (sums over the chunk axis of the [..., C, K] partials); a
  row still undecided accepts its first passing candidate (rounds = first_round K + k + 1).
  Returns (state, w_xC, pivot): for a row whose K candidates all failed, the next round's set is
  {z > pivot}, pivot = the highest candidate z (every z <= it is outside the kept set, an upper
  set of z), and w_xC its per-chunk masses (that candidate's partials). Runs in XLA on [B, C, K]
  and inside ``_locate_kernel`` on one row's [C, K] (state fields scalars and [K] there)."""
  k_count = state.tok.shape[-1]
  lane = lax.broadcasted_iota(jnp.int32, state.tok.shape, state.tok.ndim - 1)
  lift = lambda a: a[..., None]
  ok = (state.tok >= 0) & ~lift(state.done)
  if top_k is not None:
    ok = ok & (jnp.sum(count_xCxK, axis=-2) < top_k)
  if top_p is not None:
    ok = ok & (jnp.sum(mass_xCxK, axis=-2) / lift(s) < jnp.float32(top_p))
  first = jnp.min(jnp.where(ok, lane, k_count), axis=-1)
  accept = first < k_count
  at_first = lane == lift(first)
  tok = jnp.max(jnp.where(at_first, state.tok, -1), axis=-1)
  xtok = jnp.max(jnp.where(at_first, state.xtok, -jnp.inf), axis=-1)
  state = state._replace(done=state.done | accept, result=jnp.where(accept, tok, state.result),
                         result_x=jnp.where(accept, xtok, state.result_x),
                         rounds=jnp.where(accept, first_round * k_count + first + 1,
                                          state.rounds))
  valid_z = jnp.where(state.tok >= 0, state.ztok, -jnp.inf)
  pivot = jnp.max(valid_z, axis=-1)
  top = jnp.min(jnp.where(valid_z == lift(pivot), lane, k_count), axis=-1)
  w = jnp.sum(jnp.where((lane == lift(top))[..., None, :], mass_xCxK, 0.0), axis=-1)
  return state, w, pivot


def _mass_kernel(x_ref, *refs, vocab: int, block: int, chunk: int, n_chunks: int,
                 temperature: float, top_k: int | None, log_min_p: float | None, math: str,
                 floor: bool):
  """One (row, chunk) program of the "cdf" draw: over the chunk, for each of the row's K pivots
  p_k (``pivot_ref``: [K]), #{v in R_k} (with top-k) and w_ck = sum_{v in R_k} exp(z_v - m),
  R_k = ``_in_set(z, p_k)``. With the pivots = the candidates' z this is their check (the count
  and mass above each) and, at once, the chunk's mass in the next round's set; with pivots -inf
  and min-p, the first round's masses. Rows marked done (the state's ``done``, read as written by
  the locate launch) read nothing. ``floor``: the min-p floor set's masses before the first
  round (every row, one pivot -inf), the row max combined in each program from the statistics
  launch's [C] partials (``refs`` = their max and sum partials), so no XLA step runs between."""
  f32 = jnp.float32
  start = pl.program_id(1) * chunk
  if floor:
    m_parts_ref, s_parts_ref, count_ref, mass_ref = refs
    m = combine_stats(_load_partials(m_parts_ref, n_chunks, -jnp.inf),
                      _load_partials(s_parts_ref, n_chunks, 0.0))[0]
    active, pivots = jnp.bool_(True), jnp.full((1,), -jnp.inf, f32)
  else:
    done_ref, pivot_ref, m_ref, count_ref, mass_ref = refs
    active, pivots, m = done_ref[...] == 0, pivot_ref[...], m_ref[...]
  count_ref[...], mass_ref[...] = _chunk_masses(
      x_ref, start, active, pivots, m, vocab=vocab, block=block, chunk=chunk,
      temperature=temperature, top_k=top_k, log_min_p=log_min_p, math=math)


def _chunk_masses(x_ref, start, active, pivots, m, *, vocab: int, block: int, chunk: int,
                  temperature: float, top_k: int | None, log_min_p: float | None, math: str):
  """Over entries [start, start + chunk) of a row, for each of K pivots p_k: #{v in R_k} (0
  without top-k) and sum_{v in R_k} exp(z_v - m), R_k = ``_in_set(z, p_k)`` -> ([K], [K]); an
  inactive row reads nothing (zeros)."""
  f32, i32 = jnp.float32, jnp.int32
  lane = lax.broadcasted_iota(i32, (block,), 0)
  k_count = pivots.shape[0]

  def body(i, c):
    _, _, z = _load_block(x_ref, start + i * block, lane, vocab=vocab, temperature=temperature)
    cand = _in_set(z[None, :], pivots[:, None], m, log_min_p)  # [K, block]
    count = c[0] + cand.astype(i32) if top_k is not None else c[0]
    return count, c[1] + jnp.where(cand, _exp(z - m, math)[None, :], f32(0.0))

  trips = jnp.where(active, i32(chunk // block), i32(0))
  count, mass = lax.fori_loop(0, trips, body, (jnp.zeros((k_count, block), i32),
                                               jnp.zeros((k_count, block), f32)))
  return jnp.sum(count, axis=1), jnp.sum(mass, axis=1)


def _load_partials_ck(ref, n_chunks: int, k_count: int, identity, volatile: bool = False):
  """One row's [C, K] per-chunk, per-candidate partials as a [pow2(C), K] tile padded with
  ``identity``; ``volatile=True`` reads them as volatile loads, past the L1 cache (partials that
  other programs of the same launch wrote: the multiprocessors' L1 caches are not coherent; the
  load's cache modifiers do not lower in this JAX version)."""
  width = pl.next_power_of_2(n_chunks)
  row = lax.broadcasted_iota(jnp.int32, (width, k_count), 0)
  return plgpu.load(ref.at[pl.ds(0, width), :], mask=row < n_chunks,
                    other=jnp.array(identity, ref.dtype), volatile=volatile)


def _locate_kernel(x_ref, seed_ref, *refs, vocab: int, block: int, chunk: int, n_chunks: int,
                   temperature: float, top_k: int | None, top_p: float | None,
                   log_min_p: float | None, math: str, rnd: int, first: bool, candidates: int,
                   zero_counters: bool = False):
  """One row's program of the "cdf" draw for round ``rnd``.

  Round 0 (``first``) combines the statistics launch's [C] partials into m, S, m1, S1 (written
  out) and takes w_c = s_c exp(m_c - m) (or, with min-p, the masses of the floor set). A later
  round takes the state and the previous check's [C, K] partials, ``advance_candidates`` (accept
  the first passing candidate), and for a row still rejected takes w_c = the mass above the
  highest rejected candidate. Then each of the K candidates is drawn in three levels, each with
  its own uniform (``round_uniform``), so that each level's float32 resolution (2^-23 of its own
  total) is spent on at most a few thousand entries rather than on the whole row (one level over
  V = 152k entries would round every token's probability to a multiple of ~1e-7 of the row's
  mass): the chunk c* whose cumulative mass first reaches u_1 sum_c w_c; in it, the block whose
  running block sums first reach u_2 w_c*; in that block, the entry whose running sum of
  e = exp(z - m) over R first reaches u_3 sum(e). Where rounding leaves a running sum short, the
  last candidate with e > 0 (the block's, or the last positive block's) is taken.
  P(v) = (w_c* / W) (block sum / w_c*) (e_v / block sum) = e_v / W up to rounding. Writes the
  state (the K candidates unchecked).
  """
  f32, i32 = jnp.float32, jnp.int32
  ninf = f32(-jnp.inf)
  written = ()
  counters_ref = None
  if first:
    parts = [_load_partials(r, n_chunks, ident) for r, ident in zip(refs[:4], (-jnp.inf, 0.0) * 2)]
    refs = refs[4:]
    m, s = combine_stats(parts[0], parts[1])
    written = (m, s) + combine_stats(parts[2], parts[3])
    if log_min_p is not None:
      w = _load_partials(refs[0], n_chunks, 0.0)
      refs = refs[1:]
    else:
      w = jnp.where(parts[0] == -jnp.inf, f32(0.0), parts[1] * jnp.exp(parts[0] - m))
    pivot = ninf
    state = SplitState(jnp.bool_(False), i32(-1), ninf, i32(0),
                       jnp.full((candidates,), -1, i32), jnp.full((candidates,), -jnp.inf, f32),
                       jnp.full((candidates,), -jnp.inf, f32))
    if zero_counters:  # the row's arrival counters of the grid-combined mass launches
      counters_ref = refs[-1]
      refs = refs[:-1]
  else:
    m_ref, s_ref, *refs = refs
    state = SplitState(*(r[...] for r in refs[:7]))
    state = state._replace(done=state.done != 0)
    count = _load_partials_ck(refs[7], n_chunks, candidates, 0)
    mass = _load_partials_ck(refs[8], n_chunks, candidates, 0.0)
    refs = refs[9:]
    m = m_ref[...]
    state, w, pivot = advance_candidates(state, rnd - 1, count, mass, s_ref[...], top_k=top_k,
                                         top_p=top_p)
  state = _locate_row(x_ref, seed_ref[...], m, w, pivot, state, vocab=vocab, block=block,
                      chunk=chunk, n_chunks=n_chunks, temperature=temperature,
                      log_min_p=log_min_p, math=math, rnd=rnd, first=first,
                      candidates=candidates)
  values = written + tuple(state._replace(done=state.done.astype(i32)))
  for ref, value in zip(refs, values):
    ref[...] = value
  if counters_ref is not None:
    counters_ref[...] = jnp.zeros(counters_ref.shape, jnp.int32)


def _locate_row(x_ref, seed, m, w, pivot, state: SplitState, *, vocab: int, block: int,
                chunk: int, n_chunks: int, temperature: float, log_min_p: float | None,
                math: str, rnd: int, first: bool, candidates: int) -> SplitState:
  """The draw of ``_locate_kernel`` for one row inside a kernel: K candidates of round ``rnd``
  from the per-chunk masses ``w`` of the round's set {z > pivot} (rows already done draw
  nothing) -> the state with them as its candidates."""
  f32, i32 = jnp.float32, jnp.int32
  ninf = f32(-jnp.inf)
  width = pl.next_power_of_2(n_chunks)
  clane = lax.broadcasted_iota(i32, (width,), 0)
  klane = lax.broadcasted_iota(i32, (candidates,), 0)
  cum = jnp.cumsum(w)
  last = jnp.max(jnp.where(w > 0, clane, -1))
  draw = (last >= 0) if first else ~state.done & (last >= 0)
  lane = lax.broadcasted_iota(i32, (block,), 0)

  def pick_at(offs, index, *values):
    return tuple(jnp.max(jnp.where(offs == index, v, ninf)) for v in values)

  toks = jnp.full((candidates,), -1, i32)
  zs = xs = jnp.full((candidates,), -jnp.inf, f32)
  for k in range(candidates):
    u_chunk, u_block, u_token = (round_uniform(seed, i32(rnd), 3 * k + level)
                                 for level in range(3))
    cstar = jnp.min(jnp.where((cum >= u_chunk * jnp.sum(w)) & (w > 0), clane, width))
    cstar = jnp.where(cstar < width, cstar, last)  # rounding: t past the last cumulative sum
    t_block = u_block * jnp.sum(jnp.where(clane == cstar, w, f32(0.0)))
    start = jnp.maximum(cstar, 0) * chunk

    def body(i, c, start=start, t_block=t_block, u_token=u_token):
      acc, found, tok, ztok, xtok = c
      offs, x, z = _load_block(x_ref, start + i * block, lane, vocab=vocab,
                               temperature=temperature)
      e = jnp.where(_in_set(z, pivot, m, log_min_p), _exp(z - m, math), f32(0.0))
      bsum = jnp.sum(e)
      # this block's draw: the first entry where its running sum reaches u_3 bsum (else its last
      # positive entry); taken if this is the block where the chunk's running sum reaches
      # t_block, and kept as the fallback while no block has (the last positive block's draw)
      positive = e > 0
      hit = jnp.min(jnp.where(positive & (jnp.cumsum(e) >= u_token * bsum), offs, vocab))
      pick = jnp.where(hit < vocab, hit, jnp.max(jnp.where(positive, offs, -1)))
      pz, px = pick_at(offs, pick, z, x)
      take = ~found & (bsum > 0)
      return (acc + bsum, found | (take & (acc + bsum >= t_block)), jnp.where(take, pick, tok),
              jnp.where(take, pz, ztok), jnp.where(take, px, xtok))

    trips = jnp.where(draw, i32(chunk // block), i32(0))
    _, _, tok, ztok, xtok = lax.fori_loop(0, trips, body,
                                          (f32(0.0), jnp.bool_(False), i32(-1), ninf, ninf))
    toks, zs, xs = (jnp.where(klane == k, v, vec) for v, vec in ((tok, toks), (ztok, zs),
                                                                   (xtok, xs)))
  empty = jnp.max(toks) < 0  # no entry in the round's set (a row without a finite logit)
  keep = state.done
  state = state._replace(done=keep | empty, tok=jnp.where(keep, state.tok, toks),
                         ztok=jnp.where(keep, state.ztok, zs), xtok=jnp.where(keep, state.xtok, xs))
  return state


def _mass_call(logits_BxV, *inputs, chunk, n_chunks, cfg, settings, interpret,
               floor: bool = False):
  """One launch of ``_mass_kernel`` over the grid (B, C) -> (count_BxCxK, mass_BxCxK);
  ``inputs`` = (done_B, pivot_BxK, m_B), or with ``floor`` the statistics launch's max and sum
  partials [B, C] (K = 1)."""
  b, v = logits_BxV.shape
  k_count = 1 if floor else inputs[1].shape[1]
  kernel = functools.partial(_mass_kernel, vocab=v, block=cfg.block, chunk=chunk,
                             n_chunks=n_chunks, temperature=settings["temperature"],
                             top_k=settings["top_k"], log_min_p=settings["log_min_p"],
                             math=settings["math"], floor=floor)
  row = pl.BlockSpec((None,), lambda i, c: (i,))
  cell = pl.BlockSpec((None, None, k_count), lambda i, c: (i, c, 0))
  if floor:
    specs = [pl.BlockSpec((None, n_chunks), lambda i, c: (i, 0))] * 2
  else:
    specs = [row, pl.BlockSpec((None, k_count), lambda i, c: (i, 0)), row]
  compiler_params = None if interpret else plgpu.CompilerParams(num_warps=cfg.num_warps,
                                                                 num_stages=cfg.num_stages)
  return pl.pallas_call(
      kernel, grid=(b, n_chunks),
      out_shape=(jax.ShapeDtypeStruct((b, n_chunks, k_count), jnp.int32),
                 jax.ShapeDtypeStruct((b, n_chunks, k_count), jnp.float32)),
      in_specs=[pl.BlockSpec((None, v), lambda i, c: (i, 0))] + specs,
      out_specs=(cell, cell), compiler_params=compiler_params, interpret=interpret,
      name=f"sample_cdf_mass{'_floor' * floor}")(logits_BxV, *inputs)


def _mass_combine_kernel(x_ref, seed_ref, counters_in_ref, m_ref, s_ref, m1_ref, s1_ref, *refs,
                         vocab: int, block: int, chunk: int, n_chunks: int, temperature: float,
                         top_k: int | None, top_p: float | None, log_min_p: float | None,
                         math: str, rnd: int, n_split: int, candidates: int, cap_reached: bool,
                         max_rounds: int | None, interpret: bool):
  """One (row, chunk) program of the "cdf" draw's round-``rnd`` check with the combine in the
  same launch (``GpuConfig(grid_combine=True)``): ``_mass_kernel``'s pass over the chunk for the
  row's K candidates (the state the previous launch wrote), its [K] count and mass written into
  the row's [C, K] partials, then an atomic increment of the row's arrival counter (round ``rnd``
  of ``counters``, zeroed by the first locate launch). The program that arrives last (the
  counter's old value is C - 1) has all C partials: it reads them past the L1 cache and does what
  the next launch would do, on one program per row -- ``_locate_row`` (decide the candidates,
  draw round ``rnd``'s) for ``rnd < n_split``, ``_finish_row`` for the last round. On a GPU a CTA
  barrier orders the partial's stores before the increment (acquire-release, GPU scope: Triton's
  default for atomics) and the increment before the last program's reads; interpret mode runs
  the programs one after another, so the last in grid order is the last to arrive."""
  i32 = jnp.int32
  *state_refs, count_ref, mass_ref, counters_ref = refs[:10]
  out_refs = refs[10:]
  del counters_in_ref  # aliased with counters_ref
  state = SplitState(*(r[...] for r in state_refs))
  c = pl.program_id(1)
  m = m_ref[...]
  count, mass = _chunk_masses(x_ref, c * chunk, state.done == 0, state.ztok, m, vocab=vocab,
                              block=block, chunk=chunk, temperature=temperature, top_k=top_k,
                              log_min_p=log_min_p, math=math)
  count_ref[pl.ds(c, 1), :] = count[None, :]
  mass_ref[pl.ds(c, 1), :] = mass[None, :]
  if not interpret:
    plgpu.debug_barrier()  # every thread's stores before the increment
  stride = counters_ref.shape[0] // pl.num_programs(0)  # counters per row (a power of two)
  old = plgpu.atomic_add(counters_ref, pl.program_id(0) * stride + (rnd - 1), i32(1))

  @pl.when(old == n_chunks - 1)
  def _combine():
    if not interpret:
      plgpu.debug_barrier()
    count_ck = _load_partials_ck(count_ref, n_chunks, candidates, 0, volatile=True)
    mass_ck = _load_partials_ck(mass_ref, n_chunks, candidates, 0.0, volatile=True)
    settings = dict(vocab=vocab, block=block, temperature=temperature, top_k=top_k,
                    top_p=top_p, log_min_p=log_min_p, math=math)
    if rnd == n_split:
      _finish_row(x_ref, seed_ref[...], m1_ref[...], s1_ref[...], s_ref[...], state, count_ck,
                  mass_ck, *out_refs, n_split=n_split, candidates=candidates,
                  cap_reached=cap_reached, max_rounds=max_rounds, **settings)
    else:
      st, w, pivot = advance_candidates(state._replace(done=state.done != 0), rnd - 1, count_ck,
                                        mass_ck, s_ref[...], top_k=top_k, top_p=top_p)
      st = _locate_row(x_ref, seed_ref[...], m, w, pivot, st, vocab=vocab, block=block,
                       chunk=chunk, n_chunks=n_chunks, temperature=temperature,
                       log_min_p=log_min_p, math=math, rnd=rnd, first=False,
                       candidates=candidates)
      for ref, value in zip(out_refs, st._replace(done=st.done.astype(i32))):
        ref[...] = value


def _mass_combine_call(logits_BxV, seeds_B, counters, m, s, m1, s1, state, *, rnd, n_split,
                       chunk, n_chunks, cfg, settings, interpret):
  """One launch of ``_mass_combine_kernel`` over the grid (B, C) -> (counters, the state for
  round ``rnd``'s candidates) for ``rnd < n_split``, (counters, token_B, model_logp_B, rounds_B)
  for the last round. The [B, C, K] partials are written too (scratch for the combine)."""
  b, v = logits_BxV.shape
  k_count = cfg.candidates
  kernel = functools.partial(
      _mass_combine_kernel, vocab=v, block=cfg.block, chunk=chunk, n_chunks=n_chunks, rnd=rnd,
      n_split=n_split, candidates=k_count,
      cap_reached=cfg.max_rounds is not None and n_split >= cfg.max_rounds,
      max_rounds=cfg.max_rounds, interpret=interpret, **settings)
  row = pl.BlockSpec((None,), lambda i, c: (i,))
  per_k = pl.BlockSpec((None, k_count), lambda i, c: (i, 0))
  parts = pl.BlockSpec((None, n_chunks, k_count), lambda i, c: (i, 0, 0))
  every = pl.BlockSpec((counters.shape[0],), lambda i, c: (0,))
  last = rnd == n_split
  out_shape = [jax.ShapeDtypeStruct((b, n_chunks, k_count), jnp.int32),
               jax.ShapeDtypeStruct((b, n_chunks, k_count), jnp.float32),
               jax.ShapeDtypeStruct(counters.shape, jnp.int32)]
  if last:
    out_shape += [jax.ShapeDtypeStruct((b,), k) for k in (jnp.int32, jnp.float32, jnp.int32)]
    out_specs = [parts, parts, every, row, row, row]
  else:
    out_shape += [jax.ShapeDtypeStruct((b,), k) for k in _STATE_DTYPES[:4]]
    out_shape += [jax.ShapeDtypeStruct((b, k_count), k) for k in _STATE_DTYPES[4:]]
    out_specs = [parts, parts, every] + [row] * 4 + [per_k] * 3
  compiler_params = None if interpret else plgpu.CompilerParams(num_warps=cfg.num_warps,
                                                                 num_stages=cfg.num_stages)
  outs = pl.pallas_call(
      kernel, grid=(b, n_chunks), out_shape=out_shape,
      in_specs=[pl.BlockSpec((None, v), lambda i, c: (i, 0)), row, every, row, row, row, row]
      + [row] * 4 + [per_k] * 3,
      out_specs=out_specs, input_output_aliases={2: 2}, compiler_params=compiler_params,
      interpret=interpret, name=f"sample_cdf_mass_combine{'_finish' * last}")(
          logits_BxV, seeds_B, counters, m, s, m1, s1, *state)
  return outs[2], tuple(outs[3:])


def _locate_call(logits_BxV, seeds_B, *inputs, chunk, n_chunks, cfg, settings, rnd, first,
                 interpret, counters_per_row: int = 0):
  """One launch of ``_locate_kernel`` (a program per row) -> round 0 (``first``; ``inputs`` = the
  statistics launch's four [B, C] partials, and with min-p the floor set's masses): m, S, m1, S1
  and the state; a later round (``inputs`` = m, S, the state, the check's [B, C, K] count and mass
  partials): the state. The state's candidates (tok, ztok, xtok) are [B, K]."""
  b, v = logits_BxV.shape
  f32, k_count = jnp.float32, cfg.candidates
  kernel = functools.partial(_locate_kernel, vocab=v, block=cfg.block, chunk=chunk,
                             n_chunks=n_chunks, rnd=rnd, first=first, candidates=k_count,
                             zero_counters=counters_per_row > 0, **settings)
  row = pl.BlockSpec((None,), lambda i: (i,))
  per_k = pl.BlockSpec((None, k_count), lambda i: (i, 0))
  specs = []
  for x in inputs:
    if x.ndim == 1:
      specs.append(row)
    elif x.ndim == 3:
      specs.append(pl.BlockSpec((None, n_chunks, k_count), lambda i: (i, 0, 0)))
    else:  # [B, C] statistics partials, or the state's [B, K] candidates
      specs.append(pl.BlockSpec((None, x.shape[1]), lambda i: (i, 0)))
  written = ((f32,) * 4 if first else ()) + _STATE_DTYPES
  shapes = [(b,)] * (len(written) - 3) + [(b, k_count)] * 3
  out_shape = [jax.ShapeDtypeStruct(sh, k) for sh, k in zip(shapes, written)]
  out_specs = [row] * (len(written) - 3) + [per_k] * 3
  if counters_per_row:  # the arrival counters of the grid-combined launches (a power of two per
    # row, Triton's block sizes), row-major, zeroed
    out_shape.append(jax.ShapeDtypeStruct((b * counters_per_row,), jnp.int32))
    out_specs.append(pl.BlockSpec((counters_per_row,), lambda i: (i,)))
  compiler_params = None if interpret else plgpu.CompilerParams(num_warps=cfg.num_warps,
                                                                 num_stages=cfg.num_stages)
  return pl.pallas_call(
      kernel, grid=(b,), out_shape=out_shape,
      in_specs=[pl.BlockSpec((None, v), lambda i: (i, 0)), row] + specs,
      out_specs=out_specs, compiler_params=compiler_params,
      interpret=interpret, name=f"sample_cdf_locate{'_first' * first}")(logits_BxV, seeds_B,
                                                                         *inputs)


def _sample_split_cdf(logits_BxV, seeds_B, *, chunk, n_chunks, cfg, settings, interpret):
  """The split path with the "cdf" draw: a statistics launch over B x C programs, then per round
  a locate launch (a program per row: decide the previous round's K candidates, draw the next K)
  and a mass launch over B x C (check the K candidates, the next round's per-chunk masses), then
  the finish launch (``_finish_call``: the last candidates decided, rows still rejected continued
  in ``_row_rounds`` from the highest rejected candidate); with ``grid_combine`` the mass
  launches do the locate / finish work themselves. With min-p a floor mass launch (the first
  round's set) runs before the first locate. No XLA step between the launches."""
  b, _ = logits_BxV.shape
  i32 = jnp.int32
  kw = dict(chunk=chunk, n_chunks=n_chunks, cfg=cfg, settings=settings, interpret=interpret)
  ones = jnp.ones((b,), i32)
  st = tuple(_split_call(logits_BxV, seeds_B, stats=True, **kw))
  if settings["log_min_p"] is not None:  # the first round's set is the min-p floor's
    floor = _mass_call(logits_BxV, st[0], st[1], floor=True, **kw)[1]
    st += (floor[..., 0],)
  n_split = min(cfg.split_rounds, cfg.max_rounds or cfg.split_rounds)
  decide = settings["top_k"] is not None or settings["top_p"] is not None
  grid = cfg.grid_combine and decide
  m, s, m1, s1, *state = _locate_call(logits_BxV, seeds_B, *st, rnd=0, first=True,
                                      counters_per_row=pl.next_power_of_2(n_split) if grid
                                      else 0, **kw)
  if not decide:  # every first draw is accepted
    tok, xtok = state[4][:, 0], state[6][:, 0]
    return tok, xtok - m1 - jnp.log(s1), ones
  if grid:  # each mass launch's last program per row combines (no locate / finish launches)
    *state, counters = state
    for r in range(1, n_split + 1):
      counters, state = _mass_combine_call(logits_BxV, seeds_B, counters, m, s, m1, s1, state,
                                           rnd=r, n_split=n_split, **kw)
    return state
  for r in range(1, n_split + 1):
    count, mass = _mass_call(logits_BxV, state[0], state[5], m, **kw)
    if r < n_split:
      state = _locate_call(logits_BxV, seeds_B, m, s, *state, count, mass, rnd=r, first=False,
                           **kw)
  if cfg.fused_finish:
    return _finish_call(logits_BxV, seeds_B, state, count, mass, s, m1, s1, n_split, cfg=cfg,
                        settings=settings, interpret=interpret)
  state, _, pivot = advance_candidates(SplitState(state[0] != 0, *state[1:]), n_split - 1, count,
                                       mass, s, top_k=settings["top_k"], top_p=settings["top_p"])
  return _continue_rows(logits_BxV, seeds_B, state, pivot, m1, s1, n_split, cfg=cfg,
                        settings=settings, interpret=interpret, candidates=cfg.candidates)


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p", "min_p", "config",
                                             "interpret"))
def sample_gpu(logits_BxV, seeds_B, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, min_p: float | None = None,
               config: GpuConfig | None = None, interpret: bool = False):
  """One token per row through the Triton kernel -> (token_B, model_logp_B, rounds_B).

  Args:
    logits_BxV: bf16 / f16 / f32 logits (read as float32 in the kernel, never copied or padded).
    seeds_B: uint32 per-row seeds of the in-kernel hash (e.g. ``jax.random.bits(key, (B,))``).
    temperature: > 0 (greedy is not a kernel case).
    top_k, top_p, min_p: as ``process_logits``; None (or k >= V, p = 1, min_p = 0) = not applied.
      top_k and top_p together raise ``KernelShapeError``.
    config: ``GpuConfig``; None: ``default_config(B, V, top_k=..., top_p=..., min_p=...)`` (the
      split path, fast_math, block 2048, no rounds cap; the cdf draw from B x V >= 16 x 49,152
      for top-k / top-p).
    interpret: Pallas interpret mode (CPU tests).
  Returns:
    token_B int32: the sampled token, or -1 where ``max_rounds`` rounds all rejected (or the row
      has no finite logit); model_logp_B float32: log_softmax(logits)[token] at temperature 1
      without truncation (garbage where token is -1); rounds_B int32: rounds run (the round of
      the accepted draw + 1).
  """
  b, v = logits_BxV.shape
  if top_k is not None and top_k >= v:
    top_k = None
  if top_p is not None and top_p >= 1.0:
    top_p = None
  if min_p is not None and min_p <= 0.0:
    min_p = None
  cfg = config or default_config(b, v, top_k=top_k, top_p=top_p, min_p=min_p)
  check_config(cfg)
  if top_k is not None and top_p is not None:
    raise KernelShapeError("top_k together with top_p is not a kernel case (the top-p mass is "
                           "renormalised over the top-k set): use impl='xla'")
  settings = dict(temperature=float(temperature), top_k=top_k, top_p=top_p,
                  log_min_p=None if min_p is None else float(np.log(np.float32(min_p))),
                  math="exact" if not cfg.fast_math else "fast" if interpret else "ptx")
  seeds_B = seeds_B.astype(jnp.uint32)
  chunk, n_chunks = chunks_per_row(b, v, cfg)
  if cfg.split and n_chunks > 1:
    split = _sample_split_cdf if cfg.draw == "cdf" else _sample_split
    return split(logits_BxV, seeds_B, chunk=chunk, n_chunks=n_chunks, cfg=cfg, settings=settings,
                 interpret=interpret)
  return _row_call(logits_BxV, seeds_B, jnp.full((b,), -jnp.inf, jnp.float32),
                   jnp.zeros((b,), jnp.int32), jnp.ones((b,), jnp.int32), cfg=cfg,
                   settings=settings, interpret=interpret)
