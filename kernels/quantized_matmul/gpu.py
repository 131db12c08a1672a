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
import numpy as np
from jax import lax
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class GpuConfig:
  """Tiling of the Triton kernel.

  Attributes:
    block_m: rows of x per program (>= 16 for "dot" / "dot_t": the tensor-core dot's smallest
      tile; 1, 2, 4 or 8 for "fma").
    block_n: output columns per program (must divide N).
    block_k: rows of K per inner step when per channel (grouped: the group size is the step).
    split_k: K splits run by separate programs, partial sums added afterwards (must divide the
      number of steps).
    num_warps, num_stages: Triton's warps per program and software-pipelining depth.
    unpack: codes -> float. "shift": int8 converted directly, int4 sign-extended with two shifts,
      then an integer-to-float conversion (measured, docs/benchmarks.md). "magic": the exponent
      trick, one OR per nibble instead of the conversion (see ``_unpack_magic``; in the dot
      kernels int8 codes are split into two nibbles, 16 hi + lo, and cost two dots; measured
      slower on the H100 there). In the "fma" kernel "magic" builds float32 values
      (2^23 + u) - (2^23 + offset): an OR and a subtraction, both at full rate.
      "prmt" (int4, "dot" / "dot_t", bf16 / f16 activations): the nibbles become exact floats
      two per instruction through inline PTX (``prmt_unpack_asm``), with no integer-to-float
      conversion and no offset left to remove; compiled for sm_90 at M = 16 the loop has 357
      instructions ("kn") or 282 ("nk") and no ``I2F``, against the shift unpack's 411 with 64
      ``I2F``. Not yet timed.
    kernel: how a step's product is formed.
      "dot": x [bm, k] @ W [k, bn] on the tensor cores (measured, the default).
      "dot_t": the same product with the weights as the dot's left operand, W^T [bn, k] @ x^T
        [k, bm] -> y^T (the "swap AB" arrangement of small-M mixed-precision GEMMs: the converted
        operand is the one the tensor-core instruction can take from registers); y^T is
        transposed back in registers before the store. Timed on an H100 at M = 1 and 16: slower
        than "dot" at every shape (e.g. int8 57.1 vs 33.4 us at 4096 x 14336, M = 1).
      "fma": no tensor cores, for block_m <= 8 rows: each code is converted to float32 once and
        multiplied into every row, y[m, n] += sum_k x[m, k] w[k, n] (a GEMV that reads the
        weights once and spends one FMA per weight and row). Timed on an H100 at M = 1: the
        fastest int4 kernel at all four shapes (1.06-1.23x "dot"), slower than "dot" for int8
        (``default_kernel``).
    fma_reduce: where the "fma" kernel reduces over k: "step" (each step's [k, n] products
      summed over k at once: a reduction across threads per step) or "end" (tile-shaped
      accumulators, dequantised per element, reduced once after the loop: no per-step
      shuffles or barriers, more registers per row, so for a row or two). On an H100 at M = 1,
      int4: "end" 2.1-2.3x faster than "step"; int8: within 10% either way.
    x_load: how the int4 "dot" / "dot_t" kernels read x's even and odd columns of a step (the
      rows of K that the low and high nibbles hold). "strided": two loads with stride 2 (the
      measured default). "split": one contiguous [bm, step] load, split into even and odd
      columns in registers. Compiled for sm_90 at M = 512 (4096 x 14336, block 128 x 128), the
      strided loads are 64 scalar 16-bit global loads and 64 shared stores per thread per step
      (no asynchronous copy); split loads x with pipelined ``cp.async`` 16-byte copies and cuts
      the loop from 694 to 562 instructions (``benchmarks/triton_offline.py``). Not yet timed.
      int8 and "fma" read x contiguously either way.
    w_layout: how the codes are laid out in memory. "kn": as stored by ``postrl.quant``, [K, N]
      (int8) or [K / 2, N] (int4), N contiguous. "nk": transposed, [N, K] or [N, K / 2], K
      contiguous (a one-time repack of the weights, as mixed-input GEMM libraries do at load
      time; "dot" / "dot_t" only). A tensor-core operand's thread holds neighbouring rows of K,
      which are 1 byte apart in "nk" but a whole row apart in "kn": compiled for sm_90 at
      M = 16 (4096 x 14336), the "kn" int8 loop reads shared memory one byte per weight (128
      ``LDS.U8`` per thread per step, 802 instructions) and "nk" with matrix loads (8 ``LDSM`` +
      16 ``LDS.64``, 493 instructions); int4 411 -> 383 (``benchmarks/triton_offline.py``).
      Not yet timed.
  """
  block_m: int = 16
  block_n: int = 128
  block_k: int = 128
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 3
  unpack: str = "shift"
  kernel: str = "dot"
  fma_reduce: str = "step"
  x_load: str = "strided"
  w_layout: str = "kn"


KERNELS = ("dot", "dot_t", "fma")
UNPACKS = ("shift", "magic", "prmt")
W_LAYOUTS = ("kn", "nk")
FMA_MAX_ROWS = 8  # the "fma" kernel spends block_m FMAs per weight: a GEMV for a few rows only


# The exponent trick: a float whose exponent field makes the mantissa's unit 1, OR-ed with a small
# unsigned integer u, is (2^e + u) exactly: bf16 0x4300 = 128 (7 mantissa bits, u < 128), f16
# 0x6400 = 1024 (10 bits, u < 1024), f32 0x4B000000 = 2^23 (23 bits). Int4 codes c in [-8, 7]
# become u = c + 8 (XOR 0x8 per nibble), so the tile holds c + 8 + MAGIC; the dot kernels remove
# the excess (8 + MAGIC) * sum(x) once, the fma kernel subtracts (8 + MAGIC) from each float32.
_MAGIC_BITS = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0, jnp.int16),
               jnp.dtype(jnp.float16): (0x6400, 1024.0, jnp.int16),
               jnp.dtype(jnp.float32): (0x4B000000, 2.0**23, jnp.int32)}


def _magic_float(u_int32, dtype):
  """Unsigned integers u (int32, u < 2^mantissa bits) -> floats MAGIC + u in ``dtype``, exactly."""
  bits, _, int_type = _MAGIC_BITS[jnp.dtype(dtype)]
  return lax.bitcast_convert_type((u_int32 | bits).astype(int_type), dtype)


def _unpack_magic(p_int32, dtype):
  """Packed bytes (int32 holding 0..255) -> (lo, hi) tiles of c + 8 + MAGIC in ``dtype``."""
  u = p_int32 ^ 0x88
  return _magic_float(u & 0xF, dtype), _magic_float(u >> 4, dtype)


# unpack="prmt": int4 -> bf16 / f16 without an integer-to-float conversion, two codes per
# instruction (the "lop3" dequantisation of FasterTransformer-style mixed-input GEMMs, here for the
# plain byte layout). A 32-bit register holds 4 packed bytes (4 neighbouring codes' bytes of one
# packed row); XOR 0x88888888 makes every nibble u = c + 8; PRMT moves bytes (0, 1) (or (2, 3))
# into the low bytes of the two 16-bit halves; LOP3 computes (t & 0x000F000F) | MAGIC2: two floats
# MAGIC + u at once (bf16 MAGIC = 128 = 0x4300, f16 1024 = 0x6400: the mantissa's unit is 1); one
# packed FMA, t * 1 + (-(MAGIC + 8)), leaves c exactly. The high nibbles take the same path after a
# 4-bit right shift. Per 8 codes: 2 XOR, 1 SHR, 4 PRMT, 4 LOP3, 4 HFMA2, all full-rate (the shift
# unpack spends 8 I2F, conversions at 16 per clock per SM on Hopper, plus sign extensions).
_PRMT_CONSTANTS = {jnp.dtype(jnp.bfloat16): ("bf16x2", 0x43004300, 0x3F803F80, 0xC308C308),
                   jnp.dtype(jnp.float16): ("f16x2", 0x64006400, 0x3C003C00, 0xE408E408)}


def prmt_unpack_asm(dtype, high: bool) -> str:
  """PTX of one half of the "prmt" unpack: $2 = 4 packed bytes; $0 = the low (``high``: the high)
  nibbles of bytes 0 and 1 as a pair of ``dtype`` values (byte 0's in the low half), $1 = those of
  bytes 2 and 3. PTX's packed FMA takes no immediates, so its constants go through registers."""
  kind, magic, one, neg_offset = _PRMT_CONSTANTS[jnp.dtype(dtype)]
  lines = ["{", ".reg .b32 u, t, one, off;", f"mov.b32 one, {one:#010x};",
           f"mov.b32 off, {neg_offset:#010x};", "xor.b32 u, $2, 0x88888888;"]
  if high:
    lines.append("shr.u32 u, u, 4;")
  for out, selector in enumerate(("0x0100", "0x0302")):
    lines += [f"prmt.b32 t, u, u, {selector};",
              f"lop3.b32 t, t, 0x000F000F, {magic:#010x}, 0xEA;",  # 0xEA: (a & b) | c
              f"fma.rn.{kind} ${out}, t, one, off;"]
  return "\n".join(lines + ["}"])


def _unpack_prmt(p_uint8, dtype, interpret: bool):
  """Packed int4 bytes [r, c] (uint8) -> (lo, hi) [r, c] codes in ``dtype`` (bf16 / f16), exact,
  through ``prmt_unpack_asm``. Interpret mode cannot run PTX: there the same bit operations
  (``_unpack_magic``, then the offset removed in ``dtype``) stand in; ``tests/kernels`` runs the
  PTX itself through an instruction-level emulator."""
  if interpret:
    offset = _MAGIC_BITS[jnp.dtype(dtype)][1] + 8.0
    return tuple(t - jnp.asarray(offset, dtype) for t in _unpack_magic(p_uint8.astype(jnp.int32),
                                                                        dtype))
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
  shape = jax.ShapeDtypeStruct(p_uint8.shape, dtype)
  # two single-result calls: JAX's lowering of a multi-result inline asm returns one value
  return tuple(plgpu.elementwise_inline_asm(prmt_unpack_asm(dtype, high), args=[p_uint8],
                                            constraints="=r,=r,r", pack=4,
                                            result_shape_dtypes=[shape])[0]
               for high in (False, True))


class KernelShapeError(ValueError):
  """The kernel cannot run this shape with this tiling (``impl="auto"`` falls back to XLA)."""


NUM_SMS = 132  # H100 / H200 SXM; only used to size split_k


def _pow2_at_most(n: int, cap: int) -> int:
  p = 1
  while p * 2 <= min(n, cap):
    p *= 2
  return p


def default_kernel(m: int, bits: int) -> str:
  """The kernel ``default_config`` picks: "fma" for int4 at M = 1, else "dot".

  Measured on an H100 (``benchmarks/quantized_matmul.py --variants``, 2026-11-26, M = 1,
  K x N = 4096 x 4096 / 4096 x 14336 / 14336 x 4096 / 8192 x 8192): int4 with "fma" (shift
  unpack, one reduction at the end) 13.0 / 30.5 / 28.3 / 31.3 us against "dot" 13.8 / 37.6 / 33.8
  / 38.4 us; int8 "dot" stayed the fastest (12.6 / 33.4 / 30.9 / 34.5 us, "fma" 14.3 / 40.4 / 40.1
  / 41.2 at its best); "dot_t" lost everywhere. M = 2..8 are unmeasured for "fma": "dot"."""
  return "fma" if bits == 4 and m == 1 else "dot"


def default_config(m: int, k: int, n: int, *, bits: int, group_size: int | None,
                   kernel: str | None = None) -> GpuConfig:
  """Tiling heuristic: small M streams weights (narrow M tile, K split to fill the SMs), large M is
  a tiled matmul (128 x 128 tiles). Tuned by ``benchmarks/quantized_matmul.py``.

  ``kernel`` None: ``default_kernel(m, bits)``. ``kernel="fma"`` (M <= 8) takes an M tile of the
  next power of two >= M, 8 warps, the shift unpack (faster than the exponent trick on the H100
  for int4 at all four shapes: 30.5 vs 34.9 us at 4096 x 14336, though its sm_90 loop has more
  instructions) and, up to 4 rows, tile-shaped accumulators reduced once at the end (int4 at
  4096 x 14336: 34.9 vs 72.2 us with a reduction per step). "dot_t" takes the "dot" tiling."""
  kernel = kernel or default_kernel(m, bits)
  if kernel == "fma":
    block_m = pl.next_power_of_2(m)
    num_warps = 8
  else:
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    # warps from the H100 sweep at K x N = 4096 x 14336 (2026-11-26): int4 is faster with 8 warps
    # at M <= 16 (43.4 -> 39.3 us) and M = 512 (527.9 -> 447.8 us), with 4 at M = 64 (76.7 ->
    # 58.8 us) and M = 128 (149.5 -> 97.9 us); int8 keeps 4 up to M = 64, 8 above (within 3%)
    if bits == 4:
      num_warps = 4 if 16 < m <= 128 else 8
    else:
      num_warps = 4 if block_m <= 64 else 8
  block_n = 128
  while n % block_n and block_n > 16:
    block_n //= 2
  block_k = group_size or (128 if m <= 64 else 64)
  programs = -(-m // block_m) * max(n // block_n, 1)
  steps = k // block_k if k % block_k == 0 else 0
  split_k = 1
  while (programs * split_k * 2 <= 2 * NUM_SMS and steps % (split_k * 2) == 0
         and steps // (split_k * 2) >= 2):
    split_k *= 2
  if kernel == "fma" and block_m <= 4:
    return GpuConfig(block_m, block_n, block_k, split_k, num_warps, 3, kernel=kernel,
                     fma_reduce="end")
  return GpuConfig(block_m, block_n, block_k, split_k, num_warps, 3, kernel=kernel)


def check_shape(m: int, k: int, n: int, *, bits: int, group_size: int | None, cfg: GpuConfig):
  """Raise ``KernelShapeError`` naming the dimension this tiling cannot cover."""
  step = group_size or cfg.block_k
  if cfg.kernel not in KERNELS:
    raise KernelShapeError(f"kernel must be one of {KERNELS}, got {cfg.kernel!r}")
  if cfg.kernel == "fma":
    if cfg.block_m > FMA_MAX_ROWS or cfg.block_m & (cfg.block_m - 1):
      raise KernelShapeError(f"block_m={cfg.block_m}: the fma kernel takes a power of two <= "
                             f"{FMA_MAX_ROWS} rows (M={m}; use kernel='dot' for more rows)")
    if m > cfg.block_m:
      raise KernelShapeError(f"M={m} rows do not fit the fma kernel's block_m={cfg.block_m}")
  dims = (("block_n", cfg.block_n), ("block_k", step))
  if cfg.kernel != "fma":
    dims = (("block_m", cfg.block_m),) + dims
  for name, v in dims:
    if v < 16 or v & (v - 1):
      raise KernelShapeError(f"{name}={v}: the Triton kernel needs powers of two >= 16")
  if isinstance(cfg.split_k, bool) or not isinstance(cfg.split_k, (int, np.integer)) or (
      cfg.split_k < 1):
    raise KernelShapeError(f"split_k={cfg.split_k!r}: the number of K splits must be an int >= 1")
  if cfg.unpack not in UNPACKS:
    raise KernelShapeError(f"unpack must be one of {UNPACKS}, got {cfg.unpack!r}")
  if cfg.unpack == "prmt" and (bits != 4 or cfg.kernel == "fma"):
    raise KernelShapeError(f"unpack='prmt' is for int4 codes in the 'dot' / 'dot_t' kernels, got "
                           f"bits={bits}, kernel={cfg.kernel!r}")
  if cfg.w_layout not in W_LAYOUTS:
    raise KernelShapeError(f"w_layout must be one of {W_LAYOUTS}, got {cfg.w_layout!r}")
  if cfg.w_layout == "nk" and cfg.kernel == "fma":
    raise KernelShapeError("w_layout='nk' is for the 'dot' / 'dot_t' kernels, not 'fma'")
  if cfg.fma_reduce not in ("step", "end"):
    raise KernelShapeError(f"fma_reduce must be 'step' or 'end', got {cfg.fma_reduce!r}")
  if cfg.x_load not in ("strided", "split"):
    raise KernelShapeError(f"x_load must be 'strided' or 'split', got {cfg.x_load!r}")
  if bits == 4 and step < 32:
    raise KernelShapeError(f"int4 step of {step} rows: the kernel needs >= 32 (two dots of >= 16)")
  if n % cfg.block_n:
    raise KernelShapeError(f"N={n} is not a multiple of block_n={cfg.block_n} (pad N, pick a "
                           "block_n that divides it, or use impl='xla')")
  if k % (step * cfg.split_k):
    what = f"group_size={group_size}" if group_size else f"block_k={cfg.block_k}"
    raise KernelShapeError(f"K={k} is not a multiple of {what} x split_k={cfg.split_k}")


def _kernel(x_ref, w_ref, s_ref, *refs, bits: int, step: int, steps: int, grouped: bool,
            has_zeros: bool, magic: bool, transposed: bool, x_split: bool = False,
            prmt: bool = False, nk: bool = False, interpret: bool = False):
  """The tensor-core kernels ("dot", and "dot_t" when ``transposed``: the accumulator is y^T).
  ``nk``: the codes come as [N, K'] (``GpuConfig.w_layout="nk"``), so each step's tile is
  [bn, kk] and the dots contract its second axis."""
  z_ref, o_ref = refs if has_zeros else (None, refs[0])
  block_m, block_n = x_ref.shape[0], o_ref.shape[-1]
  f32 = jnp.float32
  w_axis = 1 if nk else 0  # the tile axis that runs along K

  def mm(x, w):  # x [bm, kk] . w [kk, bn] (or [bn, kk] when nk), in the accumulator's orientation
    if transposed:
      return lax.dot_general(w, x, (((w_axis,), (1,)), ((), ())), preferred_element_type=f32)
    return lax.dot_general(x, w, (((1,), (w_axis,)), ((), ())), preferred_element_type=f32)

  def w_tile(start, size):  # rows [start, start + size) of the codes along K, as stored
    return w_ref[:, pl.ds(start, size)] if nk else w_ref[pl.ds(start, size), :]

  def x_sum(x):  # sum_k x[:, k] as a column [bm, 1] (or a row [1, bm] when transposed)
    sums = jnp.sum(x.astype(f32), axis=1)
    return sums[None, :] if transposed else sums[:, None]

  def per_n(ref, g):  # group g's [G, N] row as [1, bn] (or the column [bn, 1] when transposed)
    return ref[g, :][:, None] if transposed else ref[pl.ds(g, 1), :]

  def body(i, carry):
    acc, xsum = carry
    k0 = i * step
    if bits == 8:
      x = x_ref[:, pl.ds(k0, step)]
      if magic:  # u = c + 128 = 16 hi + lo: two nibble tiles, both through the exponent trick
        u = (w_tile(k0, step).astype(jnp.int32) & 0xFF) ^ 0x80
        lo, hi = _unpack_magic(u ^ 0x88, x.dtype)  # undo _unpack_magic's XOR: plain nibbles
        part = 16.0 * mm(x, hi) + mm(x, lo)
      else:
        part = mm(x, w_tile(k0, step).astype(x.dtype))
      if has_zeros or magic:
        xs = x_sum(x)
      if magic:  # tiles hold nibble + MAGIC: 17 MAGIC + 128 per unit of sum(x) to remove
        part = part - (17.0 * _MAGIC_BITS[jnp.dtype(x.dtype)][1] + 128.0) * xs
    else:
      half = step // 2
      if x_split:  # one contiguous load, the even / odd columns split in registers
        x_even, x_odd = lax.unstack(x_ref[:, pl.ds(k0, step)].reshape(block_m, half, 2), axis=2)
      else:
        x_even = x_ref[:, pl.ds(k0, half, stride=2)]
        x_odd = x_ref[:, pl.ds(k0 + 1, half, stride=2)]
      p = w_tile(i * half, half)
      if prmt:  # exact codes, two per instruction (``prmt_unpack_asm``)
        lo, hi = _unpack_prmt(p, x_even.dtype, interpret)
      elif magic:  # tiles hold c + offset exactly; the offset's share is removed below
        lo, hi = _unpack_magic(p.astype(jnp.int32), x_even.dtype)
      else:
        p = p.astype(jnp.int32)
        lo = ((p << 28) >> 28).astype(x_even.dtype)  # low nibble, sign-extended: row 2j
        hi = ((p << 24) >> 28).astype(x_even.dtype)  # high nibble: row 2j + 1
      part = mm(x_even, lo) + mm(x_odd, hi)
      if has_zeros or magic:
        xs = x_sum(x_even) + x_sum(x_odd)
      if magic:
        part = part - (8.0 + _MAGIC_BITS[jnp.dtype(x_even.dtype)][1]) * xs
    if grouped:
      if has_zeros:
        part = part - per_n(z_ref, i) * xs
      return acc + part * per_n(s_ref, i), xsum
    return acc + part, (xsum + xs if has_zeros else xsum)

  acc_shape = (block_n, block_m) if transposed else (block_m, block_n)
  xsum_shape = (1, block_m) if transposed else (block_m, 1)
  init = (jnp.zeros(acc_shape, f32), jnp.zeros(xsum_shape, f32))
  acc, xsum = lax.fori_loop(0, steps, body, init)
  if not grouped:
    if has_zeros:
      acc = acc - per_n(z_ref, 0) * xsum
    acc = acc * per_n(s_ref, 0)
  o_ref[...] = (acc.T if transposed else acc).astype(o_ref.dtype)


def _codes_f32(w_ref, i: int, step: int, bits: int, magic: bool):
  """Step i's weight codes as float32 tiles: [q] ([step, bn], int8) or [lo, hi] (int4, each
  [step / 2, bn]: K rows k0, k0 + 2, ... and k0 + 1, k0 + 3, ...). Exact either way."""
  f32 = jnp.float32
  if bits == 8:
    q = w_ref[pl.ds(i * step, step), :]
    if not magic:
      return [q.astype(f32)]
    u = (q.astype(jnp.int32) & 0xFF) ^ 0x80  # c + 128
    return [_magic_float(u, f32) - (_MAGIC_BITS[jnp.dtype(f32)][1] + 128.0)]
  half = step // 2
  p = w_ref[pl.ds(i * half, half), :].astype(jnp.int32)
  if magic:
    offset = _MAGIC_BITS[jnp.dtype(f32)][1] + 8.0
    return [t - offset for t in _unpack_magic(p, f32)]
  return [((p << 28) >> 28).astype(f32), ((p << 24) >> 28).astype(f32)]


def _x_columns(x_ref, row: int, i, step: int, bits: int):
  """Row ``row`` of x over step i as float32 columns [kk, 1] matching ``_codes_f32``'s tiles."""
  k0, r = i * step, pl.ds(row, 1)
  if bits == 8:
    return [x_ref[r, pl.ds(k0, step)].astype(jnp.float32).T]
  half = step // 2
  return [x_ref[r, pl.ds(k0, half, stride=2)].astype(jnp.float32).T,
          x_ref[r, pl.ds(k0 + 1, half, stride=2)].astype(jnp.float32).T]


def _store_rows(o_ref, s_ref, z_ref, accs, xsums, grouped: bool):
  """The fma kernels' output rows: y_m = acc_m when grouped (scales applied per group), else
  y_m = s (acc_m - z sum_k x[m, k]) with the per-channel scale and zero point."""
  for row, (acc, xsum) in enumerate(zip(accs, xsums)):
    if not grouped:
      if z_ref is not None:
        acc = acc - z_ref[0, :] * xsum
      acc = acc * s_ref[0, :]
    o_ref[row, :] = acc.astype(o_ref.dtype)


def _fma_kernel(x_ref, w_ref, s_ref, *refs, bits: int, step: int, steps: int, grouped: bool,
                has_zeros: bool, magic: bool):
  """The "fma" kernel: per step the codes become float32 once, then every row m of the M tile
  accumulates part_m[n] = sum_k x[m, k] w[k, n] with plain FMAs and a reduction over k (no
  tensor cores, no layout change of the weights). Scales and zero points as in ``_kernel``."""
  z_ref, o_ref = refs if has_zeros else (None, refs[0])
  block_m, block_n = x_ref.shape[0], o_ref.shape[-1]
  f32 = jnp.float32

  def body(i, carry):
    tiles = _codes_f32(w_ref, i, step, bits, magic)
    out = []
    for row, (acc, xsum) in enumerate(carry):
      cols = _x_columns(x_ref, row, i, step, bits)
      part = sum(jnp.sum(x * w, axis=0) for x, w in zip(cols, tiles))  # [bn]
      xs = sum(jnp.sum(x) for x in cols) if has_zeros else None
      if grouped:
        if has_zeros:
          part = part - z_ref[i, :] * xs
        out.append((acc + part * s_ref[i, :], xsum))
      else:
        out.append((acc + part, xsum + xs if has_zeros else xsum))
    return tuple(out)

  init = tuple((jnp.zeros((block_n,), f32), jnp.zeros((), f32)) for _ in range(block_m))
  rows = lax.fori_loop(0, steps, body, init)
  _store_rows(o_ref, s_ref, z_ref, [acc for acc, _ in rows], [xsum for _, xsum in rows], grouped)


def _fma_kernel_reduce_at_end(x_ref, w_ref, s_ref, *refs, bits: int, step: int, steps: int,
                              grouped: bool, has_zeros: bool, magic: bool):
  """The "fma" kernel with ``GpuConfig.fma_reduce="end"``: each row keeps tile-shaped
  accumulators (int4: one for the even and one for the odd rows of K),
  acc[k, n] += x[m, k] s_g[n] (q[k, n] - z_g[n]) when grouped (dequantised per element, so the
  groups share one accumulator), and reduces over k once after the loop instead of once per step
  (that reduction crosses threads: shuffles, shared memory, barriers). Per-channel scales and
  zero points are applied after the reduction, as in ``_kernel``."""
  z_ref, o_ref = refs if has_zeros else (None, refs[0])
  block_m = x_ref.shape[0]
  f32 = jnp.float32
  rows = step // 2 if bits == 4 else step
  n_tiles = 2 if bits == 4 else 1

  def body(i, carry):
    accs, xsums = carry
    tiles = _codes_f32(w_ref, i, step, bits, magic)
    if grouped:
      scale = s_ref[i, :][None, :]
      if has_zeros:
        zero = z_ref[i, :][None, :]
        tiles = [(t - zero) * scale for t in tiles]
      else:
        tiles = [t * scale for t in tiles]
    new_accs, new_xsums = [], []
    for row in range(block_m):
      cols = _x_columns(x_ref, row, i, step, bits)
      new_accs.append(tuple(a + x * t for a, x, t in zip(accs[row], cols, tiles)))
      new_xsums.append(xsums[row] + sum(jnp.sum(x) for x in cols) if has_zeros and not grouped
                       else xsums[row])
    return tuple(new_accs), tuple(new_xsums)

  init = (tuple(tuple(jnp.zeros((rows, o_ref.shape[-1]), f32) for _ in range(n_tiles))
                for _ in range(block_m)),
          tuple(jnp.zeros((), f32) for _ in range(block_m)))
  accs, xsums = lax.fori_loop(0, steps, body, init)
  _store_rows(o_ref, s_ref, z_ref, [sum(jnp.sum(a, axis=0) for a in tiles) for tiles in accs],
              xsums, grouped)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "config", "interpret"))
def quantized_matmul_gpu(x_MxK, w_q, scales_GxN, zeros_GxN=None, *, bits: int,
                         group_size: int | None, config: GpuConfig | None = None,
                         interpret: bool = False):
  """y = x Ŵ through the Triton kernel; x [M, K] bf16 / f16, returns [M, N] in x's dtype.

  Shapes the tiling cannot cover raise ``KernelShapeError`` (M is padded to block_m; N and K are
  not padded, since padding would copy the whole weight on every call). With a config of
  ``w_layout="nk"``, ``w_q`` is the transposed codes, [N, K] (int8) or [N, K / 2] (int4).
  """
  m, k = x_MxK.shape
  nk = config is not None and config.w_layout == "nk"
  n = w_q.shape[0] if nk else w_q.shape[1]
  k_rows = k // 2 if bits == 4 else k
  if nk and w_q.shape[1] != k_rows:
    raise KernelShapeError(f"w_layout='nk' needs codes [N, {k_rows}] for K={k}, bits={bits}; got "
                           f"{tuple(w_q.shape)}")
  if m == 0 or n == 0:  # an empty grid: nothing to compute
    return jnp.zeros((m, n), x_MxK.dtype)
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
              pl.BlockSpec((bn, w_rows), lambda i, j, s: (j, s)) if nk else
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
  if cfg.unpack != "shift" and cfg.kernel != "fma" and jnp.dtype(x.dtype) not in (
      jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    # the dot kernels' tiles hold MAGIC + u in x's dtype: exact for bf16 / f16 only
    raise KernelShapeError(f"unpack={cfg.unpack!r} needs bf16 or f16 activations, got {x.dtype}")
  common = dict(bits=bits, step=step, steps=k_split // step, grouped=grouped,
                has_zeros=zeros_GxN is not None, magic=magic)
  if cfg.kernel == "fma":
    kernel = functools.partial(
        _fma_kernel_reduce_at_end if cfg.fma_reduce == "end" else _fma_kernel, **common)
  else:
    kernel = functools.partial(_kernel, transposed=cfg.kernel == "dot_t",
                               x_split=cfg.x_load == "split", prmt=cfg.unpack == "prmt",
                               nk=nk, interpret=interpret, **common)
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
    compiler_params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  y = pl.pallas_call(kernel, out_shape=out_shape, grid=(m_pad // bm, n // bn, splits),
                     in_specs=in_specs, out_specs=out_spec, compiler_params=compiler_params,
                     interpret=interpret, name=f"quantized_matmul_int{bits}_{cfg.kernel}")(*args)
  if splits > 1:
    y = jnp.sum(y, axis=0).astype(x.dtype)
  return y[:m]
