"""GPU Pallas (Triton backend) fused beam step: one pass over the logits gives each row's
log-sum-exp and its top-K logits; a tiny XLA merge turns them into the step's K candidates.

Kernel (``_kernel``): grid = rows x splits, where rows are the B W beams and splits cut each row's
vocabulary into contiguous chunks (1 when there are enough rows to fill the GPU; more at small
batch so that a few long rows still spread over the SMs). Each program streams its chunk once, in
power-of-two blocks of ``block_v`` tokens (the ragged tail masked to -inf), in float32:

    online log-sum-exp:  m' = max(m, max_j x_j),  s' = s e^(m - m') + sum_j e^(x_j - m')
    running top-K:       a set of K (logit, index) slots and its worst slot (smallest logit,
                         largest index among equal logits). If the block's best element beats
                         it, it replaces the worst slot and is masked out of the block, and
                         again, until the block's best no longer beats the worst (at most K
                         rounds of max + mask; none for most blocks once the set is good, since a
                         block whose max is below the worst is skipped with one comparison).

Because log_softmax is a per-row shift, a row's top-K logits are its top-K log-probabilities, and
its top-K candidates S_w + log p; ordering (logit, smaller index) is lax.top_k's tie rule. Padded
slots (K rounded up to a power of two) hold +inf so they are never the worst, and empty slots hold
-inf with an index V + slot (after every real index, so a real -inf logit is kept before them).

XLA after the kernel (``_candidates`` / ``beam_step_gpu``): combine the splits' partial
log-sum-exps, turn the [W x splits x K] logits of a batch row into candidates
S_w + x - lse_w, and take the K best by (value desc, flat index w V + v asc) with a two-key sort,
so the result follows lax.top_k's rule on the whole W x V array. A beam whose candidates are all
-inf (a dead beam, S = -inf, or a row of -inf logits) takes its K smallest token ids, as lax.top_k
would among equal -inf values. The split is deliberate: the cross-beam step touches W x K values
per batch row, the kernel the W x V logits.

Limits: K <= 32 (the per-row set lives in registers); logits finite or -inf (NaN / +inf rows give
an unspecified order). Values agree with the reference to float rounding (the log-sum-exp is
accumulated in another order), so candidates that differ by an ulp may order differently.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

MAX_K = 32
NUM_SMS = 132  # H100 / H200 SXM; only used to choose the number of vocabulary splits
_BIG = 2**31 - 1  # index of masked-out / taken block elements: after every real index


@dataclasses.dataclass(frozen=True)
class GpuConfig:
  """Tiling of the Triton kernel.

  Attributes:
    block_v: tokens per step of a program's loop (a power of two).
    splits: vocabulary chunks per row, each its own program (None: ``default_splits``).
    num_warps, num_stages: Triton's warps per program and software-pipelining depth.
    insert: how a block that may hold better elements is merged into the running set: "while"
      (replace the worst slot while the block's best beats it: as many rounds as elements enter)
      or "rounds" (k rounds, each a no-op once nothing beats the worst: a static loop, for
      compilers that handle a data-dependent loop badly).
  """
  block_v: int = 1024
  splits: int | None = None
  num_warps: int = 4
  num_stages: int = 2
  insert: str = "while"


def next_pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def default_config(rows: int, v: int) -> GpuConfig:
  """``block_v`` = min(1024, next power of two >= V); splits from ``default_splits``."""
  block = min(1024, next_pow2(v))
  return GpuConfig(block_v=block, splits=default_splits(rows, v, block))


def default_splits(rows: int, v: int, block_v: int) -> int:
  """Vocabulary chunks per row so that rows x splits >= 2 programs per SM, each chunk >= 2 blocks
  (1 when the rows alone fill the GPU)."""
  blocks = -(-v // block_v)
  want = -(-2 * NUM_SMS // max(rows, 1))
  per = max(2, -(-blocks // want))
  return max(1, -(-blocks // per))


def check_config(v: int, k: int, cfg: GpuConfig):
  """Raise ValueError naming the setting the kernel cannot run."""
  if not 1 <= k <= MAX_K:
    raise ValueError(f"k={k}: the Triton kernel keeps at most {MAX_K} candidates per row "
                     f"(use impl='xla')")
  if cfg.block_v < 16 or cfg.block_v & (cfg.block_v - 1):
    raise ValueError(f"block_v={cfg.block_v}: the Triton kernel needs a power of two >= 16")
  if cfg.insert not in ("while", "rounds"):
    raise ValueError(f"insert must be 'while' or 'rounds', got {cfg.insert!r}")
  if cfg.splits is not None and not 1 <= cfg.splits <= -(-v // cfg.block_v):
    raise ValueError(f"splits={cfg.splits} must be in [1, ceil(V / block_v)] = "
                     f"[1, {-(-v // cfg.block_v)}] for V={v}")


def _best(x_N, i_N):
  """(max value, smallest index holding it)."""
  m = jnp.max(x_N)
  return m, jnp.min(jnp.where(x_N == m, i_N, _BIG))


def _worst(v_K, i_K):
  """(min value, largest index holding it): the slot a better element replaces."""
  m = jnp.min(v_K)
  return m, jnp.max(jnp.where(v_K == m, i_K, -1))


def _beats(m, i, wv, wi):
  return (m > wv) | ((m == wv) & (i < wi))


def _kernel(x_ref, val_ref, idx_ref, lse_ref, *, v: int, k: int, kp: int, block: int,
            blocks: int, insert_loop: str):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
  f32, i32, neg = jnp.float32, jnp.int32, -jnp.inf
  base = pl.program_id(1) * (blocks * block)
  slots = lax.iota(i32, kp)
  top_v = jnp.where(slots < k, neg, jnp.inf).astype(f32)  # slots >= k are never the worst
  top_i = v + slots
  wv, wi = _worst(top_v, top_i)

  def insert(c):
    bx, bi, tv, ti, wv, wi, m, i = c
    slot = ti == wi
    tv, ti = jnp.where(slot, m, tv), jnp.where(slot, i, ti)
    taken = bi == i
    bx, bi = jnp.where(taken, neg, bx), jnp.where(taken, _BIG, bi)
    return (bx, bi, tv, ti, *_worst(tv, ti), *_best(bx, bi))

  def merge_block(x, cols, tv, ti, wv, wi, bmax):
    bi = jnp.where(cols < v, cols, _BIG)
    c = (x, bi, tv, ti, wv, wi, bmax, jnp.min(jnp.where(x == bmax, bi, _BIG)))
    beats = lambda c: _beats(c[6], c[7], c[4], c[5])
    if insert_loop == "while":
      c = lax.while_loop(beats, insert, c)
    else:  # at most k elements of a block enter the set
      c = lax.fori_loop(0, k, lambda _, c: jax.tree.map(
          functools.partial(jnp.where, beats(c)), insert(c), c), c)
    return c[2:6]

  def body(j, carry):
    m, s, tv, ti, wv, wi = carry
    start = base + j * block
    cols = start + lax.iota(i32, block)
    x = plgpu.load(x_ref.at[pl.ds(start, block)], mask=cols < v, other=neg).astype(f32)
    bmax = jnp.max(x)
    m_new = jnp.maximum(m, bmax)
    shift = jnp.where(m_new == neg, 0.0, m_new)  # an all -inf prefix: s stays 0, no NaN
    s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(x - shift))
    # later blocks hold larger indices: an equal logit cannot beat a real worst slot
    tv, ti, wv, wi = lax.cond(bmax >= wv, merge_block, lambda x, c, *a: a[:4],
                              x, cols, tv, ti, wv, wi, bmax)
    return m_new, s, tv, ti, wv, wi

  init = (jnp.asarray(neg, f32), jnp.asarray(0.0, f32), top_v, top_i, wv, wi)
  m, s, top_v, top_i, _, _ = lax.fori_loop(0, blocks, body, init)
  plgpu.store(val_ref, top_v)
  plgpu.store(idx_ref, top_i)
  plgpu.store(lse_ref, m + jnp.log(s))  # -inf for an empty or all -inf chunk


@functools.partial(jax.jit, static_argnames=("k", "config", "interpret"))
def topk_partials_gpu(logits_RxV, k: int, *, config: GpuConfig | None = None,
                      interpret: bool = False):
  """The kernel alone: per row and split, the top-k logits and the chunk's log-sum-exp.

  Returns:
    (values [R, S, k] float32 logits, unsorted; index [R, S, k] int32 (>= V: an empty slot);
    lse [R, S] float32).
  """
  r, v = logits_RxV.shape
  cfg = config or default_config(r, v)
  check_config(v, k, cfg)
  splits = cfg.splits or default_splits(r, v, cfg.block_v)
  blocks = -(-(-(-v // cfg.block_v)) // splits)  # per program
  kp = next_pow2(k)
  kernel = functools.partial(_kernel, v=v, k=k, kp=kp, block=cfg.block_v, blocks=blocks,
                             insert_loop=cfg.insert)
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
    compiler_params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  vals, idx, lse = pl.pallas_call(
      kernel, grid=(r, splits),
      in_specs=[pl.BlockSpec((None, v), lambda i, s: (i, 0))],
      out_specs=[pl.BlockSpec((None, None, kp), lambda i, s: (i, s, 0)),
                 pl.BlockSpec((None, None, kp), lambda i, s: (i, s, 0)),
                 pl.BlockSpec((None, None), lambda i, s: (i, s))],
      out_shape=[jax.ShapeDtypeStruct((r, splits, kp), jnp.float32),
                 jax.ShapeDtypeStruct((r, splits, kp), jnp.int32),
                 jax.ShapeDtypeStruct((r, splits), jnp.float32)],
      compiler_params=compiler_params, interpret=interpret, name="log_softmax_topk")(logits_RxV)
  return vals[..., :k], idx[..., :k], lse


def _combine_lse(lse_RxS):
  if lse_RxS.shape[-1] == 1:
    return lse_RxS[..., 0]
  return jax.nn.logsumexp(lse_RxS, axis=-1)


def _candidates(vals_RxSxK, idx_RxSxK, lse_R, scores_R, v: int):
  """Row candidates S + x - lse [R, C] with their token ids (C = S k); a row whose candidates are
  all -inf gets the token ids 0..C-1 (lax.top_k's choice among equal values), empty slots -inf
  with the token id V (dropped by the caller's index key)."""
  r = vals_RxSxK.shape[0]
  vals, idx = vals_RxSxK.reshape(r, -1), idx_RxSxK.reshape(r, -1)
  logp = jnp.where(lse_R[:, None] == -jnp.inf, -jnp.inf, vals - lse_R[:, None])
  cand = logp if scores_R is None else scores_R[:, None] + logp
  dead = ((lse_R == -jnp.inf) if scores_R is None else
          (lse_R == -jnp.inf) | (scores_R == -jnp.inf))[:, None]
  token = jnp.where(dead, lax.broadcasted_iota(jnp.int32, idx.shape, 1), idx)
  cand = jnp.where(dead | (token >= v), -jnp.inf, cand)
  return cand, jnp.minimum(token, v)


def _top_by_value_then_index(cand_NxC, key_NxC, k: int):
  """The k best columns by (value desc, key asc): lax.top_k's order when key is the index."""
  neg, key = lax.sort((-cand_NxC, key_NxC), dimension=1, num_keys=2)
  return -neg[:, :k], key[:, :k]


@functools.partial(jax.jit, static_argnames=("k", "config", "interpret"))
def log_softmax_topk_gpu(logits_RxV, k: int, *, config: GpuConfig | None = None,
                         interpret: bool = False):
  """(values [R, k], index [R, k], lse [R]) through the kernel and the XLA merge of its splits."""
  r, v = logits_RxV.shape
  vals, idx, lse_part = topk_partials_gpu(logits_RxV, k, config=config, interpret=interpret)
  lse = _combine_lse(lse_part)
  cand, token = _candidates(vals, idx, lse, None, v)
  key = jnp.where(token >= v, _BIG, token)
  values, index = _top_by_value_then_index(cand, key, k)
  return values, index, lse


@functools.partial(jax.jit, static_argnames=("k", "config", "interpret"))
def beam_step_gpu(logits_BxWxV, scores_BxW, k: int, *, config: GpuConfig | None = None,
                  interpret: bool = False):
  """(values, beam, token [B, k], lse [B, W]): the kernel per beam row, then the cross-beam top-k
  of the W x S x k row candidates in XLA (module doc)."""
  b, w, v = logits_BxWxV.shape
  kr = min(k, v)  # a row contributes at most V candidates
  vals, idx, lse_part = topk_partials_gpu(logits_BxWxV.reshape(b * w, v), kr, config=config,
                                          interpret=interpret)
  lse = _combine_lse(lse_part)
  cand, token = _candidates(vals, idx, lse, scores_BxW.reshape(-1).astype(jnp.float32), v)
  c = cand.shape[1]
  beam_of = lax.broadcasted_iota(jnp.int32, (b * w, c), 0) % w
  flat = jnp.where(token >= v, _BIG, beam_of * v + token)
  values, flat = _top_by_value_then_index(cand.reshape(b, w * c), flat.reshape(b, w * c), k)
  return values, flat // v, flat % v, lse.reshape(b, w)
