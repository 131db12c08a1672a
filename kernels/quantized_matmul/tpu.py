"""TPU Pallas (Mosaic) weight-only quantized matmul: int8 / packed int4, per channel or per group.

Grid (M tiles, N tiles, K tiles), K innermost ("arbitrary") with a float32 accumulator in VMEM.
Each step dequantises its weight tile in VMEM and feeds the MXU:

    ŵ[k, n] = s[g(k), n] (q[k, n] - z[g(k), n])   (float32, then x's dtype)
    acc += x[:, k-tile] @ ŵ                          int8
    acc += x_even[:, tile] @ ŵ_lo + x_odd[:, tile] @ ŵ_hi    int4 (lo nibble = even row of K)

so the weights stream from HBM as codes (int8 or two per byte) and are never written back
dequantised. TPUs cannot load every other lane of a row, so the wrapper splits x into its even and
odd columns (an [M, K] copy, small at decode shapes). The K tile spans whole groups; scales and zero
points of the tile are broadcast over their group's rows (a sublane reshape, no lane slicing).

Verified against the reference in interpret mode (CI); not yet run on TPU hardware.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels.quantized_matmul.gpu import KernelShapeError


@dataclasses.dataclass(frozen=True)
class TpuConfig:
  """Tiling: block_m (multiple of 8), block_n (multiple of 128), block_k (multiple of 256 and of
  the group size)."""
  block_m: int = 128
  block_n: int = 256
  block_k: int = 512


def default_config(m: int, k: int, n: int, *, group_size: int | None) -> TpuConfig:
  """Largest standard tiles that divide the problem (M is padded to block_m)."""
  block_m = 8 if m <= 8 else 32 if m <= 32 else 128
  block_n = next((b for b in (512, 256, 128) if n % b == 0), 128)
  block_k = next((b for b in (1024, 512, 256) if k % b == 0 and b % (group_size or 1) == 0), 256)
  return TpuConfig(block_m, block_n, block_k)


def check_shape(m, k, n, *, bits, group_size, cfg: TpuConfig):
  """Raise ``KernelShapeError`` naming what this tiling cannot cover."""
  for name in ("block_m", "block_n", "block_k"):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise KernelShapeError(f"TpuConfig.{name}={v!r}: must be a positive int")
  if bits == 4 and cfg.block_k % 2:
    # a K tile holds block_k / 2 packed rows: an odd tile would drop or shift a row of K
    raise KernelShapeError(f"int4 needs an even block_k (two rows of K per packed byte), got "
                           f"{cfg.block_k}")
  if n % cfg.block_n:
    raise KernelShapeError(f"N={n} is not a multiple of block_n={cfg.block_n}")
  if k % cfg.block_k:
    raise KernelShapeError(f"K={k} is not a multiple of block_k={cfg.block_k}")
  if group_size is not None and cfg.block_k % group_size:
    raise KernelShapeError(f"block_k={cfg.block_k} is not a multiple of group_size={group_size}")
  if bits == 4 and (group_size or 2) % 2:
    raise KernelShapeError(f"int4 needs an even group size, got {group_size}")


def _expand(a_GxN, rows: int):
  """[G, N] per-group values -> [rows, N], each group's value repeated rows / G times."""
  g, n = a_GxN.shape
  return jnp.broadcast_to(a_GxN[:, None, :], (g, rows // g, n)).reshape(rows, n)


def _kernel(*refs, bits: int, has_zeros: bool, groups_per_tile: int | None):
  n_x = 2 if bits == 4 else 1
  x_refs, (w_ref, s_ref), rest = refs[:n_x], refs[n_x:n_x + 2], refs[n_x + 2:]
  z_ref, o_ref, acc_ref = rest if has_zeros else (None, *rest)
  kk = pl.program_id(2)

  @pl.when(kk == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  if groups_per_tile is None:  # per channel: one row of scales
    s, z = s_ref[...], (z_ref[...] if has_zeros else None)
  else:
    rows = pl.ds(kk * groups_per_tile, groups_per_tile)
    s, z = s_ref[rows, :], (z_ref[rows, :] if has_zeros else None)

  def dequant(q_f32):
    rows = q_f32.shape[0]
    s_rows = _expand(s, rows) if s.shape[0] > 1 else s
    if z is not None:
      q_f32 = q_f32 - (_expand(z, rows) if z.shape[0] > 1 else z)
    return (q_f32 * s_rows).astype(x_refs[0].dtype)

  if bits == 8:
    w = dequant(w_ref[...].astype(jnp.float32))
    acc_ref[...] += jnp.dot(x_refs[0][...], w, preferred_element_type=jnp.float32)
  else:
    p = w_ref[...].astype(jnp.int32)
    lo = dequant(((p << 28) >> 28).astype(jnp.float32))
    hi = dequant(((p << 24) >> 28).astype(jnp.float32))
    acc_ref[...] += (jnp.dot(x_refs[0][...], lo, preferred_element_type=jnp.float32)
                     + jnp.dot(x_refs[1][...], hi, preferred_element_type=jnp.float32))

  @pl.when(kk == pl.num_programs(2) - 1)
  def _store():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "config", "interpret"))
def quantized_matmul_tpu(x_MxK, w_q, scales_GxN, zeros_GxN=None, *, bits: int,
                         group_size: int | None, config: TpuConfig | None = None,
                         interpret: bool = False):
  """y = x Ŵ through the Mosaic kernel; x [M, K], returns [M, N] in x's dtype."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  m, k = x_MxK.shape
  n = w_q.shape[1]
  if m == 0 or n == 0:  # an empty grid: nothing to compute
    return jnp.zeros((m, n), x_MxK.dtype)
  cfg = config or default_config(m, k, n, group_size=group_size)
  check_shape(m, k, n, bits=bits, group_size=group_size, cfg=cfg)
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  m_pad = -(-m // bm) * bm
  x = jnp.pad(x_MxK, ((0, m_pad - m), (0, 0))) if m_pad != m else x_MxK
  if bits == 4:
    xs = [x[:, 0::2], x[:, 1::2]]
    x_specs = [pl.BlockSpec((bm, bk // 2), lambda i, j, kk: (i, kk))] * 2
    w_spec = pl.BlockSpec((bk // 2, bn), lambda i, j, kk: (kk, j))
  else:
    xs = [x]
    x_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk))]
    w_spec = pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))
  groups = scales_GxN.shape[0]
  s_spec = pl.BlockSpec((groups, bn), lambda i, j, kk: (0, j))  # all groups of the column tile
  args = [*xs, w_q, scales_GxN.astype(jnp.float32)]
  in_specs = [*x_specs, w_spec, s_spec]
  if zeros_GxN is not None:
    args.append(zeros_GxN.astype(jnp.float32))
    in_specs.append(s_spec)
  kernel = functools.partial(_kernel, bits=bits, has_zeros=zeros_GxN is not None,
                             groups_per_tile=None if group_size is None else bk // group_size)
  y = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m_pad, n), x.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=(m_pad // bm, n // bn, k // bk), in_specs=in_specs,
          out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
          scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret, name=f"quantized_matmul_int{bits}_tpu")(*args)
  return y[:m]
