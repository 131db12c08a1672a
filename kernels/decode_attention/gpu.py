"""Decode attention on GPU, Pallas on the Triton backend (flash-decoding: Dao et al. 2023,
"Flash-Decoding for long-context inference"; the online softmax of Milakov & Gimelshein 2018).

Grid (B, K, C): program (b, k, c) takes the G query heads of key/value head k in row b (padded to
16 rows, ``tl.dot``'s smallest tile) and the c-th chunk of the row's valid slots, [c n, (c + 1) n)
cut at L_b, and streams it in blocks of ``block_s`` slots:

    s = q k_blk^T / sqrt(D)            (masked past L_b)
    m' = max(m, max_j s_j),  l = l e^{m - m'} + sum_j e^{s_j - m'},
    acc = acc e^{m - m'} + e^{s - m'} v_blk

It writes the unnormalised (acc, m, l) of its chunk; XLA combines the C chunks of a row:
out = sum_c e^{m_c - M} acc_c / sum_c e^{m_c - M} l_c, M = max_c m_c. Slots at or past L_b are never
read, so a step costs the valid prefix of the cache, not all P + N slots as the masked einsum does,
and the whole attention is one kernel and one small XLA fusion instead of XLA's score, softmax,
probability and transpose fusions (~6 launches per layer at batch 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

PAD_GROUPS = 16  # query heads per program padded to tl.dot's smallest tile
NUM_SMS = 132    # H100 / H200 multiprocessors: the default chunk count aims at a few programs each


@dataclasses.dataclass(frozen=True)
class GpuConfig:
  """Launch settings.

  Attributes:
    block_s: cache slots per step (a power of two >= 16).
    chunks: programs per (row, kv head) along the slots; None: enough for ~2 programs per SM
      (``default_chunks``).
    num_warps, num_stages: Triton's warps per program and pipelining depth.
  """
  block_s: int = 64
  chunks: int | None = None
  num_warps: int = 4
  num_stages: int = 2


class KernelShapeError(ValueError):
  """The kernel cannot run these shapes or settings (``impl="auto"`` falls back to XLA)."""


def check_shapes(h: int, k: int, d: int, cfg: GpuConfig):
  """Raise ``KernelShapeError`` naming what the kernel cannot take."""
  if cfg.block_s < 16 or cfg.block_s & (cfg.block_s - 1):
    raise KernelShapeError(f"block_s={cfg.block_s}: needs a power of two >= 16")
  if cfg.chunks is not None and cfg.chunks < 1:
    raise KernelShapeError(f"chunks={cfg.chunks}: needs at least 1")
  if d < 16 or d & (d - 1):
    raise KernelShapeError(f"head_dim={d}: the Triton kernel needs a power of two >= 16")
  if h % k:
    raise KernelShapeError(f"{h} query heads are not a multiple of {k} key/value heads")
  if h // k > PAD_GROUPS:
    raise KernelShapeError(f"{h // k} query heads per key/value head: at most {PAD_GROUPS}")


def default_chunks(b: int, k: int, s: int, block_s: int) -> int:
  """Chunks per (row, kv head): ~2 programs per SM in all, at least 2 blocks per chunk."""
  return max(1, min(-(-2 * NUM_SMS // (b * k)), s // (2 * block_s)))


def chunk_layout(b: int, k: int, s: int, cfg: GpuConfig) -> tuple[int, int]:
  """(slots per chunk, chunks): ``cfg.chunks`` (None: ``default_chunks``) chunks of whole
  ``block_s`` blocks covering the S slots (fewer chunks where whole blocks cover S sooner)."""
  chunks = cfg.chunks or default_chunks(b, k, s, cfg.block_s)
  chunk = -(-s // chunks)
  chunk = -(-chunk // cfg.block_s) * cfg.block_s  # whole blocks per chunk
  return chunk, -(-s // chunk)


def attend_chunk(length, chunk_index, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *,
                 block_s: int, chunk: int, scale: float, groups: int, lead=(), trail=(),
                 volatile: bool = False):
  """The unnormalised (acc [16, D], m [16], l [16]) of chunk ``chunk_index`` of one (row, key /
  value head): its valid slots [c n, (c + 1) n) cut at ``length`` (module doc). ``q_ref`` [16, D]
  and the three outputs are that pair's views; the caches are read as ``k_ref[(*lead, slots,
  *trail)]`` (``lead=(), trail=(slice(None),)`` for [S, D] views, ``(b,), (k, slice(None))`` for
  whole [B, S, K, D] caches: Pallas Triton takes one indexer per ref). ``volatile``: q and the
  caches read past L1 (data other programs of the same launch wrote: the persistent layer)."""
  f32 = jnp.float32
  start = chunk_index * chunk
  end = jnp.minimum(start + chunk, length)
  steps = jnp.maximum(pl.cdiv(end - start, block_s), 0)
  real = lax.broadcasted_iota(jnp.int32, (PAD_GROUPS,), 0) < groups  # rows past G: never written
  q = plgpu.load(q_ref, mask=real[:, None], other=0.0, volatile=volatile)  # [16, D], cache dtype
  rows = lax.broadcasted_iota(jnp.int32, (block_s,), 0)
  trail = trail or (slice(None),)

  def body(i, carry):
    m, l, acc = carry
    s0 = start + i * block_s
    valid = s0 + rows < end
    at = (*lead, pl.ds(s0, block_s), *trail)
    k = plgpu.load(k_ref.at[at], mask=valid[:, None], other=0.0, volatile=volatile)
    v = plgpu.load(v_ref.at[at], mask=valid[:, None], other=0.0, volatile=volatile)
    s = jnp.dot(q, k.T, preferred_element_type=f32) * f32(scale)  # [16, block_s]
    s = jnp.where(valid[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=f32)
    return m_new, l, acc

  g, d = q.shape
  m, l, acc = lax.fori_loop(0, steps, body, (jnp.full((g,), -jnp.inf, f32), jnp.zeros((g,), f32),
                                             jnp.zeros((g, d), f32)))
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _kernel(lengths_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, **settings):
  """Program (b, k, c) of the grid (module doc): ``attend_chunk`` on its blocks."""
  attend_chunk(lengths_ref[...], pl.program_id(2), q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref,
               **settings)


def combine_chunks(acc_BxKxCxGxD, m_BxKxCxG, l_BxKxCxG):
  """Per-chunk (unnormalised sum acc_c, max m_c, normaliser l_c) -> the attention output
  [B, K, G, D]: sum_c e^{m_c - M} acc_c / sum_c e^{m_c - M} l_c, M = max_c m_c (chunks with no
  valid slot, m_c = -inf, weigh 0)."""
  m = jnp.max(m_BxKxCxG, axis=2, keepdims=True)
  w = jnp.where(m_BxKxCxG == -jnp.inf, 0.0, jnp.exp(m_BxKxCxG - m))  # empty chunks weigh 0
  num = jnp.sum(w[..., None] * acc_BxKxCxGxD, axis=2)
  return num / jnp.sum(w * l_BxKxCxG, axis=2)[..., None]


def decode_attention_partials(q_BxKxPxD, k_BxSxKxD, v_BxSxKxD, lengths_B, *, groups: int,
                              config: GpuConfig | None = None, interpret: bool = False):
  """The kernel alone: per chunk c of row b's valid slots and key/value head k, the unnormalised
  (acc [B, K, C, 16, D], m [B, K, C, 16], l [B, K, C, 16]) of its ``PAD_GROUPS``-padded query
  heads, float32. ``q_BxKxPxD`` holds the ``groups`` = H / K query heads of each key/value head in
  its first rows of P = ``PAD_GROUPS`` (the rest are not read), in the cache dtype; only the first
  ``groups`` rows of the outputs are meaningful. ``combine_chunks`` (XLA) or a fused consumer
  (``kernels.decode_block``'s output projection) turns them into the attention output."""
  cfg = config or GpuConfig()
  B, K, P, D = q_BxKxPxD.shape
  S = k_BxSxKxD.shape[1]
  check_shapes(groups * K, K, D, cfg)
  if P != PAD_GROUPS:
    raise KernelShapeError(f"q has {P} query rows per key/value head, expected {PAD_GROUPS}")
  chunk, chunks = chunk_layout(B, K, S, cfg)
  kernel = functools.partial(_kernel, block_s=cfg.block_s, chunk=chunk, scale=1 / math.sqrt(D),
                             groups=groups)
  compiler_params = None
  if not interpret:
    compiler_params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  f32 = jnp.float32
  cache_spec = pl.BlockSpec((None, S, None, D), lambda b, k, c: (b, 0, k, 0))
  return pl.pallas_call(
      kernel, grid=(B, K, chunks),
      in_specs=[pl.BlockSpec((None,), lambda b, k, c: (b,)),
                pl.BlockSpec((None, None, PAD_GROUPS, D), lambda b, k, c: (b, k, 0, 0)),
                cache_spec, cache_spec],
      out_specs=[pl.BlockSpec((None, None, None, PAD_GROUPS, D), lambda b, k, c: (b, k, c, 0, 0)),
                 pl.BlockSpec((None, None, None, PAD_GROUPS), lambda b, k, c: (b, k, c, 0)),
                 pl.BlockSpec((None, None, None, PAD_GROUPS), lambda b, k, c: (b, k, c, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, K, chunks, PAD_GROUPS, D), f32),
                 jax.ShapeDtypeStruct((B, K, chunks, PAD_GROUPS), f32),
                 jax.ShapeDtypeStruct((B, K, chunks, PAD_GROUPS), f32)],
      compiler_params=compiler_params, interpret=interpret, name="decode_attention")(
          lengths_B.astype(jnp.int32), q_BxKxPxD, k_BxSxKxD, v_BxSxKxD)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def decode_attention_gpu(q_BxHxD, k_BxSxKxD, v_BxSxKxD, lengths_B, *,
                         config: GpuConfig | None = None, interpret: bool = False):
  """[B, H, D] attention of one query per row over the first ``lengths_B[b]`` >= 1 cache slots
  (module doc); float32 statistics, the output in the cache dtype."""
  B, H, D = q_BxHxD.shape
  K = k_BxSxKxD.shape[2]
  check_shapes(H, K, D, config or GpuConfig())
  G = H // K
  q = q_BxHxD.astype(k_BxSxKxD.dtype).reshape(B, K, G, D)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, PAD_GROUPS - G), (0, 0)))
  acc, m, l = decode_attention_partials(q, k_BxSxKxD, v_BxSxKxD, lengths_B, groups=G,
                                        config=config, interpret=interpret)
  out = combine_chunks(acc[:, :, :, :G], m[:, :, :, :G], l[:, :, :, :G])
  return out.reshape(B, H, D).astype(k_BxSxKxD.dtype)
