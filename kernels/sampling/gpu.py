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

Randomness: g_v^r = -log(-log1p(-w)), w uniform in (0, 1) from h = a counter-based hash (two
murmur3 fmix32 rounds) of (row seed, vocabulary index v, round r); the row seeds come from a
``jax.random`` key outside the kernel. In float32 the Gumbel variables lie in [-2.81, 22.2], so a
token more than ~25 nats below the round's most probable candidate (relative probability
< 1.4e-11) is never drawn; ``jax.random.categorical``'s float32 Gumbel variables, in
[-4.47, 16.6], cut at ~21 nats.

Not computed: the normaliser of the truncated distribution (it needs the exact top-k / top-p
threshold), hence not the sampling log-prob; callers that need it use the XLA path. top-k together
with top-p is not run here (the top-p mass is renormalised over the top-k set, whose total needs
the k-th largest value): ``kernels.sampling`` sends it to XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class GpuConfig:
  """Launch settings of the Triton kernel.

  Attributes:
    block: vocabulary entries per step of the stream (a power of two >= 16).
    max_rounds: rejection rounds before a row is handed back as token -1 (>= 1).
    num_warps, num_stages: Triton's warps per program and software-pipelining depth.
  """
  block: int = 2048
  max_rounds: int = 32
  num_warps: int = 8
  num_stages: int = 2


class KernelShapeError(ValueError):
  """The kernel cannot run these settings (``impl="auto"`` falls back to XLA)."""


def check_config(cfg: GpuConfig):
  """Raise ``KernelShapeError`` naming the setting the kernel cannot use."""
  if cfg.block < 16 or cfg.block & (cfg.block - 1):
    raise KernelShapeError(f"block={cfg.block}: the Triton kernel needs a power of two >= 16")
  if cfg.max_rounds < 1:
    raise KernelShapeError(f"max_rounds={cfg.max_rounds}: needs at least one round")


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


def gumbel(key_u32, index_i32):
  """Gumbel(0, 1) variables -log(-log(1 - w)) for vocabulary indices ``index`` under ``key``.

  h = fmix32(fmix32(index + key) ^ key); w = (h >> 1) 2^-31 + 2^-32, uniform on (0, 1) and fine
  near 0 (float32 keeps 24 significant bits), clamped to 1 - 2^-24; -log(1 - w) is computed as
  -log1p(-w), accurate for small w, where the largest Gumbel values come from. The variables lie
  in [-2.81, 22.2].
  """
  h = fmix32(fmix32(index_i32.astype(jnp.uint32) + key_u32) ^ key_u32)
  w = (h >> _u32(1)).astype(jnp.int32).astype(jnp.float32) * np.float32(2.0**-31)
  w = jnp.minimum(w + np.float32(2.0**-32), np.float32(1.0 - 2.0**-24))
  return -jnp.log(-jnp.log1p(-w))


def _lane_softmax_update(m, s, v):
  """Per-lane running (max, sum exp(v - max)) after one more element v per lane: one exp per
  element, no reduction. -inf elements add nothing (and make no NaN)."""
  e = jnp.exp(-jnp.abs(v - m))
  s = jnp.where(v > m, s * e + 1.0, jnp.where(v == -jnp.inf, s, s + e))
  return jnp.maximum(m, v), s


def _lane_softmax_reduce(m, s):
  """Per-lane (max, sum) -> the row's max and sum exp(v - max)."""
  mx = jnp.max(m)
  return mx, jnp.sum(jnp.where(m == -jnp.inf, 0.0, s * jnp.exp(m - mx)))


def _kernel(x_ref, seed_ref, tok_ref, logp_ref, rounds_ref, *, vocab: int, block: int,
            temperature: float, top_k: int | None, top_p: float | None, log_min_p: float | None,
            max_rounds: int):
  """One row: statistics, rejection rounds, outputs. Every pass keeps per-lane accumulators of
  shape [block] and reduces them once at its end (no reduction per block)."""
  f32, i32 = jnp.float32, jnp.int32
  ninf = f32(-jnp.inf)
  nblocks = pl.cdiv(vocab, block)
  lane = lax.broadcasted_iota(i32, (block,), 0)
  seed = seed_ref[...]
  scaled = temperature != 1.0
  full = lambda v, dtype=f32: jnp.full((block,), v, dtype)

  def load(i):
    offs = i * block + lane
    x = plgpu.load(x_ref.at[pl.ds(i * block, block)], mask=offs < vocab,
                   other=jnp.array(-jnp.inf, x_ref.dtype)).astype(f32)
    return offs, x, (x / f32(temperature) if scaled else x)

  def stats_init():
    return (full(-jnp.inf), full(0.0)) * (2 if scaled else 1)

  def stats_update(c, x, z):
    m, s = _lane_softmax_update(c[0], c[1], z)
    if not scaled:
      return m, s
    return (m, s) + _lane_softmax_update(c[2], c[3], x)

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
      best, idx, bz, bx = c[:4]
      offs, x, z = load(i)
      cand = z > pivot
      if floor is not None:
        cand = cand & (z - floor[0] >= floor[1])
      score = jnp.where(cand, z + gumbel(key, offs), ninf)
      take = score > best
      out = (jnp.where(take, score, best), jnp.where(take, offs, idx), jnp.where(take, z, bz),
             jnp.where(take, x, bx) if scaled else bx)
      if with_stats:
        out += stats_update(c[4:], x, z)
      return out

    init = (full(-jnp.inf), full(-1, i32), full(-jnp.inf), full(-jnp.inf))
    if with_stats:
      init += stats_init()
    c = lax.fori_loop(0, nblocks, body, init)
    best, idx, bz, bx = c[:4]
    top = jnp.max(best)
    won = (best == top) & (idx >= 0)
    tok = jnp.min(jnp.where(won, idx, vocab))
    tok = jnp.where(tok < vocab, tok, -1)
    hit = won & (idx == tok)
    ztok = jnp.max(jnp.where(hit, bz, ninf))
    xtok = jnp.max(jnp.where(hit, bx, ninf)) if scaled else ztok
    return (tok, ztok, xtok) + (stats_reduce(c[4:]) if with_stats else ())

  def accepts(ztok, m, s):
    """True where the token of scaled logit ``ztok`` is in the top-k / top-p kept set: the count
    and the mass (relative to m) of the tokens strictly above it."""
    def body(i, c):
      count, mass = c
      _, _, z = load(i)
      above = z > ztok
      count = count + above.astype(i32) if top_k is not None else count
      if top_p is not None:
        mass = mass + jnp.where(above, jnp.exp(z - m), f32(0.0))
      return count, mass
    count, mass = lax.fori_loop(0, nblocks, body, (full(0, i32), full(0.0)))
    ok = jnp.bool_(True)
    if top_k is not None:
      ok = ok & (jnp.sum(count) < top_k)
    if top_p is not None:
      ok = ok & (jnp.sum(mass) / s < f32(top_p))
    return ok

  floor = None
  if log_min_p is not None:
    m, s, m1, s1 = stats_pass()
    floor = (m, f32(log_min_p))
    tok, ztok, xtok = sample_pass(i32(0), ninf, floor, False)
  else:
    tok, ztok, xtok, m, s, m1, s1 = sample_pass(i32(0), ninf, None, True)
  found = tok >= 0
  rounds = i32(1)
  if top_k is not None or top_p is not None:
    ok = found & accepts(ztok, m, s)

    def cond(c):
      r, done = c[0], c[1]
      return (r < max_rounds) & ~done

    def body(c):
      r, _, _, ztok_prev, _ = c
      tok, ztok, xtok = sample_pass(r, ztok_prev, floor, False)
      found = tok >= 0
      ok = found & accepts(ztok, m, s)
      return r + 1, ok | ~found, jnp.where(ok, tok, i32(-1)), ztok, xtok

    rounds, _, tok, ztok, xtok = lax.while_loop(
        cond, body, (rounds, ok | ~found, jnp.where(ok, tok, i32(-1)), ztok, xtok))
  tok_ref[...] = tok
  logp_ref[...] = xtok - m1 - jnp.log(s1)
  rounds_ref[...] = rounds


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
    config: ``GpuConfig`` (default: block 2048, 32 rounds).
    interpret: Pallas interpret mode (CPU tests).
  Returns:
    token_B int32: the sampled token, or -1 where ``max_rounds`` rounds all rejected (or the row
      has no finite logit); model_logp_B float32: log_softmax(logits)[token] at temperature 1
      without truncation (garbage where token is -1); rounds_B int32: rounds run.
  """
  cfg = config or GpuConfig()
  check_config(cfg)
  b, v = logits_BxV.shape
  if top_k is not None and top_k >= v:
    top_k = None
  if top_p is not None and top_p >= 1.0:
    top_p = None
  if min_p is not None and min_p <= 0.0:
    min_p = None
  if top_k is not None and top_p is not None:
    raise KernelShapeError("top_k together with top_p is not a kernel case (the top-p mass is "
                           "renormalised over the top-k set): use impl='xla'")
  kernel = functools.partial(
      _kernel, vocab=v, block=cfg.block, temperature=float(temperature), top_k=top_k, top_p=top_p,
      log_min_p=None if min_p is None else float(np.log(np.float32(min_p))),
      max_rounds=cfg.max_rounds)
  compiler_params = None
  if not interpret:
    compiler_params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  row = pl.BlockSpec((None,), lambda i: (i,))
  out_shape = (jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.float32),
               jax.ShapeDtypeStruct((b,), jnp.int32))
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(b,),
      in_specs=[pl.BlockSpec((None, v), lambda i: (i, 0)), row],
      out_specs=(row, row, row), compiler_params=compiler_params, interpret=interpret,
      name="sample_top_k_top_p_min_p")(logits_BxV, seeds_B.astype(jnp.uint32))

