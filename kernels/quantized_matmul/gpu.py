"""GPU Pallas (Triton backend) weight-only quantized matmul: int8 per channel / per group, packed
int4 per group, dequantisation fused into the K loop.

One program computes a [block_m, block_n] tile of y over one K split (grid = M tiles x N tiles x
K splits, M fastest so that programs sharing a weight tile run together and reuse it from L2).
Per step of ``block_k`` rows of K (one quantization group when grouped):

    int8:  part = x[:, k:k+bk] @ bf16(q[k:k+bk, :])                                   (codes exact)
    int4:  p = packed[k/2 : k/2+bk/2, :];  lo = sext(p & 0xF) (rows k, k+2, ...),
           hi = sext(p >> 4) (rows k+1, k+3, ...);  part = x[:, k::2] @ lo + x[:, k+1::2] @ hi
    group: acc += s_g * (part - z_g * sum_k x[:, k])     (y = sum_g s_g (x_g q_g - z_g sum x_g))
    per channel: acc += part; at the end acc = s * (acc - z * sum_k x)

so the weights are read once, as codes, and never written back dequantised; the integer codes are
exact in bf16 / f16 and the products accumulate in float32 on the tensor cores. The strided x loads
(even / odd columns) pair each activation with its nibble without reordering the weights. K splits
(``split_k``) give small-M decode shapes enough programs to fill the GPU; their float32 partial sums
are added by XLA (a [split_k, M, N] array, small when M is).

Follows the weight-only (W8A16 / W4A16) scheme of LLM.int8() absmax / GPTQ group-wise formats
(Dettmers et al. 2022; Frantar et al. 2023); the kernel structure (dequantise in registers inside a
tiled matmul) is the standard one of mixed-precision GEMM kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class GpuConfig:
  """Tiling of the Triton kernel.

  Attributes:
    block_m: rows of x per program (>= 16: the tensor-core dot's smallest tile).
    block_n: output columns per program (must divide N).
    block_k: rows of K per inner step when per channel (grouped: the group size is the step).
    split_k: K splits run by separate programs, partial sums added afterwards (must divide the
      number of steps).
    num_warps, num_stages: Triton's warps per program and software-pipelining depth.
    unpack: codes -> float. "shift": int8 converted directly, int4 sign-extended with two shifts,
      then an integer-to-float conversion (measured, docs/benchmarks.md). "magic": the exponent
      trick, one OR per nibble instead of the conversion (see ``_unpack_magic``; int8 codes are
      split into two nibbles, 16 hi + lo, and cost two dots); interpret-tested, not yet timed.
  """
  block_m: int = 16
  block_n: int = 128
  block_k: int = 128
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 3
  unpack: str = "shift"


# The exponent trick: a float whose exponent field makes the mantissa's unit 1, OR-ed with a small
# unsigned integer u, is (2^e + u) exactly: bf16 0x4300 = 128 (7 mantissa bits, u < 128), f16
# 0x6400 = 1024 (10 bits, u < 1024). Int4 codes c in [-8, 7] become u = c + 8 (XOR 0x8 per nibble),
# so the tile holds c + 8 + MAGIC and the dot's excess is (8 + MAGIC) * sum(x), subtracted once.
_MAGIC_BITS = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0), jnp.dtype(jnp.float16): (0x6400, 1024.0)}


def _unpack_magic(p_int32, dtype):
  """Packed bytes (int32 holding 0..255) -> (lo, hi) tiles of c + 8 + MAGIC in ``dtype``."""
  bits, _ = _MAGIC_BITS[jnp.dtype(dtype)]
  u = p_int32 ^ 0x88
  lo = lax.bitcast_convert_type(((u & 0xF) | bits).astype(jnp.int16), dtype)
  hi = lax.bitcast_convert_type(((u >> 4) | bits).astype(jnp.int16), dtype)
  return lo, hi


class KernelShapeError(ValueError):
  """The kernel cannot run this shape with this tiling (``impl="auto"`` falls back to XLA)."""


NUM_SMS = 132  # H100 / H200 SXM; only used to size split_k


def _pow2_at_most(n: int, cap: int) -> int:
  p = 1
  while p * 2 <= min(n, cap):
    p *= 2
  return p


def default_config(m: int, k: int, n: int, *, bits: int, group_size: int | None) -> GpuConfig:
  """Tiling heuristic: small M streams weights (narrow M tile, K split to fill the SMs), large M is
  a tiled matmul (128 x 128 tiles). Tuned by ``benchmarks/quantized_matmul.py``."""
  block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
  block_n = 128
  while n % block_n and block_n > 16:
    block_n //= 2
  block_k = group_size or (128 if m <= 64 else 64)
  # warps from the H100 sweep at K x N = 4096 x 14336 (2026-11-26): int4 is faster with 8 warps
  # at M <= 16 (43.4 -> 39.3 us) and M = 512 (527.9 -> 447.8 us), with 4 at M = 64 (76.7 ->
  # 58.8 us) and M = 128 (149.5 -> 97.9 us); int8 keeps 4 up to M = 64, 8 above (within 3%)
  if bits == 4:
    num_warps = 4 if 16 < m <= 128 else 8
  else:
    num_warps = 4 if block_m <= 64 else 8
  programs = -(-m // block_m) * max(n // block_n, 1)
  steps = k // block_k if k % block_k == 0 else 0
  split_k = 1
  while (programs * split_k * 2 <= 2 * NUM_SMS and steps % (split_k * 2) == 0
         and steps // (split_k * 2) >= 2):
    split_k *= 2
  return GpuConfig(block_m, block_n, block_k, split_k, num_warps, 3)


def check_shape(m: int, k: int, n: int, *, bits: int, group_size: int | None, cfg: GpuConfig):
  """Raise ``KernelShapeError`` naming the dimension this tiling cannot cover."""
  step = group_size or cfg.block_k
  for name, v in (("block_m", cfg.block_m), ("block_n", cfg.block_n), ("block_k", step)):
    if v < 16 or v & (v - 1):
      raise KernelShapeError(f"{name}={v}: the Triton kernel needs powers of two >= 16")
  if cfg.unpack not in ("shift", "magic"):
    raise KernelShapeError(f"unpack must be 'shift' or 'magic', got {cfg.unpack!r}")
  if bits == 4 and step < 32:
    raise KernelShapeError(f"int4 step of {step} rows: the kernel needs >= 32 (two dots of >= 16)")
  if n % cfg.block_n:
    raise KernelShapeError(f"N={n} is not a multiple of block_n={cfg.block_n} (pad N, pick a "
                           "block_n that divides it, or use impl='xla')")
  if k % (step * cfg.split_k):
    what = f"group_size={group_size}" if group_size else f"block_k={cfg.block_k}"
    raise KernelShapeError(f"K={k} is not a multiple of {what} x split_k={cfg.split_k}")


def _kernel(x_ref, w_ref, s_ref, *refs, bits: int, step: int, steps: int, grouped: bool,
            has_zeros: bool, magic: bool):
  z_ref, o_ref = refs if has_zeros else (None, refs[0])
  block_m, block_n = x_ref.shape[0], o_ref.shape[-1]
  f32 = jnp.float32

  def body(i, carry):
    acc, xsum = carry
    k0 = i * step
    if bits == 8:
      x = x_ref[:, pl.ds(k0, step)]
      if magic:  # u = c + 128 = 16 hi + lo: two nibble tiles, both through the exponent trick
        u = (w_ref[pl.ds(k0, step), :].astype(jnp.int32) & 0xFF) ^ 0x80
        lo, hi = _unpack_magic(u ^ 0x88, x.dtype)  # undo _unpack_magic's XOR: plain nibbles
        part = (16.0 * jnp.dot(x, hi, preferred_element_type=f32)
                + jnp.dot(x, lo, preferred_element_type=f32))
      else:
        part = jnp.dot(x, w_ref[pl.ds(k0, step), :].astype(x.dtype), preferred_element_type=f32)
      if has_zeros or magic:
        xs = jnp.sum(x.astype(f32), axis=1, keepdims=True)
      if magic:  # tiles hold nibble + MAGIC: 17 MAGIC + 128 per unit of sum(x) to remove
        part = part - (17.0 * _MAGIC_BITS[jnp.dtype(x.dtype)][1] + 128.0) * xs
    else:
      half = step // 2
      x_even = x_ref[:, pl.ds(k0, half, stride=2)]
      x_odd = x_ref[:, pl.ds(k0 + 1, half, stride=2)]
      p = w_ref[pl.ds(i * half, half), :].astype(jnp.int32)
      if magic:  # tiles hold c + offset exactly; the offset's share is removed below
        lo, hi = _unpack_magic(p, x_even.dtype)
      else:
        lo = ((p << 28) >> 28).astype(x_even.dtype)  # low nibble, sign-extended: row 2j
        hi = ((p << 24) >> 28).astype(x_even.dtype)  # high nibble: row 2j + 1
      part = (jnp.dot(x_even, lo, preferred_element_type=f32)
              + jnp.dot(x_odd, hi, preferred_element_type=f32))
      if has_zeros or magic:
        xs = (jnp.sum(x_even.astype(f32), axis=1, keepdims=True)
              + jnp.sum(x_odd.astype(f32), axis=1, keepdims=True))
      if magic:
        part = part - (8.0 + _MAGIC_BITS[jnp.dtype(x_even.dtype)][1]) * xs
    if grouped:
      if has_zeros:
        part = part - z_ref[pl.ds(i, 1), :] * xs
      return acc + part * s_ref[pl.ds(i, 1), :], xsum
    return acc + part, (xsum + xs if has_zeros else xsum)

  init = (jnp.zeros((block_m, block_n), f32), jnp.zeros((block_m, 1), f32))
  acc, xsum = lax.fori_loop(0, steps, body, init)
  if not grouped:
    if has_zeros:
      acc = acc - z_ref[...] * xsum
    acc = acc * s_ref[...]
  o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "config", "interpret"))
def quantized_matmul_gpu(x_MxK, w_q, scales_GxN, zeros_GxN=None, *, bits: int,
                         group_size: int | None, config: GpuConfig | None = None,
                         interpret: bool = False):
  """y = x Ŵ through the Triton kernel; x [M, K] bf16 / f16, returns [M, N] in x's dtype.

  Shapes the tiling cannot cover raise ``KernelShapeError`` (M is padded to block_m; N and K are
  not padded, since padding would copy the whole weight on every call).
  """
  m, k = x_MxK.shape
  n = w_q.shape[1]
  cfg = config or default_config(m, k, n, bits=bits, group_size=group_size)
  check_shape(m, k, n, bits=bits, group_size=group_size, cfg=cfg)
  step = group_size or cfg.block_k
  bm, bn, splits = cfg.block_m, cfg.block_n, cfg.split_k
  m_pad = -(-m // bm) * bm
  x = jnp.pad(x_MxK, ((0, m_pad - m), (0, 0))) if m_pad != m else x_MxK
  k_split = k // splits
  w_rows = k_split // 2 if bits == 4 else k_split
  grouped = group_size is not None
  if grouped:
    s_spec = pl.BlockSpec((k_split // group_size, bn), lambda i, j, s: (s, j))
  else:
    s_spec = pl.BlockSpec((1, bn), lambda i, j, s: (0, j))
  in_specs = [pl.BlockSpec((bm, k_split), lambda i, j, s: (i, s)),
              pl.BlockSpec((w_rows, bn), lambda i, j, s: (s, j)), s_spec]
  args = [x, w_q, scales_GxN.astype(jnp.float32)]
  if zeros_GxN is not None:
    in_specs.append(s_spec)
    args.append(zeros_GxN.astype(jnp.float32))
  if splits == 1:
    out_shape = jax.ShapeDtypeStruct((m_pad, n), x.dtype)
    out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
  else:
    out_shape = jax.ShapeDtypeStruct((splits, m_pad, n), jnp.float32)
    out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
  magic = cfg.unpack == "magic"
  if magic and jnp.dtype(x.dtype) not in _MAGIC_BITS:
    raise KernelShapeError(f"unpack='magic' needs bf16 or f16 activations, got {x.dtype}")
  kernel = functools.partial(_kernel, bits=bits, step=step, steps=k_split // step,
                             grouped=grouped, has_zeros=zeros_GxN is not None, magic=magic)
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
    compiler_params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  y = pl.pallas_call(kernel, out_shape=out_shape, grid=(m_pad // bm, n // bn, splits),
                     in_specs=in_specs, out_specs=out_spec, compiler_params=compiler_params,
                     interpret=interpret, name=f"quantized_matmul_int{bits}")(*args)
  if splits > 1:
    y = jnp.sum(y, axis=0).astype(x.dtype)
  return y[:m]
