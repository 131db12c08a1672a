"""Hopper (sm_90) weight-only quantized matmul in Pallas Mosaic GPU: TMA-streamed codes,
dequantised in registers, ``wgmma`` with the weights as the register operand ("swap AB").

At decode shapes (M <= 64 rows of x) the weight stream sets the time. This kernel computes the
transposed product, one program per ``block_n`` output columns and K split::

    y^T[n, m] = sum_k Ŵ^T[n, k] x^T[k, m]          (A = Ŵ^T tile [block_n, block_k], registers;
                                                    B = x tile [Mp, block_k] in shared memory,
                                                    read transposed; Mp = M padded to 8 / 16 / ...)

so the converted operand is the one ``wgmma`` takes from registers (its left operand must have 64
rows: the output columns fill them, not the few rows of x), the way small-M mixed-input GEMMs
(e.g. Machete / Marlin for W4A16) are arranged. Each step the TMA engine copies one
[block_n, block_k] tile of codes and the matching [Mp, block_k] tile of x into shared memory,
``max_concurrent_steps`` deep (``plgpu.emit_pipeline``), so the weights arrive with no thread
issuing loads; the codes are read into registers and, ``chunk`` columns of K at a time,
converted to x's dtype and multiplied into the float32 accumulator [block_n, Mp] by an
asynchronous ``wgmma`` (at most two chunks' operands live in registers: ``wgmma`` holds its
register operand until it completes). The weights are read once, as codes, and never written
back dequantised. Conversions avoid the integer-to-float instruction (``I2F``, 16 per clock per
SM, slower than the weight stream): int4 / int8 -> bf16 take Mosaic GPU's PRMT / LOP3 paths,
-> f16 the exponent trick (``_codes_to``).

    per channel (group_size None):  A = dtype(q);  the scale (and zero point) is applied to the
        float32 result outside the kernel: y = s (acc - z sum_k x)   (exact, as the Triton kernel)
    grouped:  A[:, group j] = s_j (q - z_j)   in x's dtype ("native") or float32 rounded once

The codes come transposed once, K contiguous (``repack_nk``: int8 [N, K], or int4 [N, K] as
``jnp.int4``, two codes per byte), a load-time layout as mixed-input GEMM libraries use.
Results per K split ([split_k, N, Mp] float32) are summed, scaled and transposed back by XLA in
one small fusion.

Status: compiled for an H100 without a GPU, through Mosaic GPU's whole compiler and ptxas
(``benchmarks/xla_gpu_offline.py --mosaic-qmm``: no register spills for the defaults up to
M = 64); the numerics are tested in Mosaic GPU's interpret mode on the CPU, where the ``wgmma``
with a register operand is replaced by the same product as a ``jnp`` dot (the interpreter
implements ``wgmma`` for shared-memory operands only). Not yet run or timed on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from kernels.quantized_matmul.gpu import NUM_SMS, KernelShapeError

_WGMMA_ROWS = 64  # rows of a wgmma's register operand per warpgroup
_ALIGN = 1024  # Pallas Mosaic GPU rounds every shared-memory buffer up to this


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Tiling of the Mosaic GPU kernel.

  Attributes:
    block_n: output columns per program (a multiple of 64: the wgmma register operand's rows).
    block_k: rows of K per pipeline step (None: 128 bytes of codes per row, 128 for int8 and 256
      for int4, filled in by ``quantized_matmul_mosaic``). A group shorter than the step is a
      slice of it; a longer one spans steps.
    split_k: K splits run by separate programs (fills the GPU when N / block_n is small); their
      float32 partial sums are added by XLA.
    stages: pipeline depth (``max_concurrent_steps``): tiles in flight per program.
    chunk: columns of K per ``wgmma`` inside a step (64: one 128-byte swizzle atom of bf16 x).
    math: grouped dequantisation in "native" (x's dtype, the default: fewer instructions per
      weight) or "f32" (rounded once, as the reference); see ``_dequantize``.
    load: how the codes go from shared memory to registers. "plain": Mosaic GPU's inferred
      wgmma layout (1-2 byte loads per thread); "upcast": 32-bit loads in the wider
      ``WGMMA_UPCAST_4X`` (int4) / ``_2X`` (int8) layout, then a register relayout.
  """
  block_n: int = 128
  block_k: int | None = None
  split_k: int = 1
  stages: int = 4
  chunk: int = 64
  math: str = "native"
  load: str = "plain"


MATHS = ("native", "f32")
LOADS = ("plain", "upcast")
_JAX_VERSION = tuple(int(v) for v in jax.__version__.split(".")[:2])
SMEM_BYTES = 227 * 1024  # shared memory one program may use on sm_90
MAX_ROWS = 64  # beyond this the weight stream no longer sets the time: the tiled kernels do


def _aligned(nbytes: int) -> int:
  return -(-nbytes // _ALIGN) * _ALIGN


def smem_bytes(cfg: MosaicConfig, mp: int, *, bits: int, group_size: int | None,
               has_zeros: bool = False) -> int:
  """Shared memory of one program: ``stages`` x (x tile + code tile + scale / zero tiles) plus
  the float32 output tile, each buffer rounded up to 1 KiB as Pallas allocates them."""
  per_step = _aligned(mp * cfg.block_k * 2) + _aligned(cfg.block_n * cfg.block_k * bits // 8)
  if group_size is not None:
    rows = max(1, cfg.block_k // group_size)
    per_step += (1 + has_zeros) * _aligned(rows * cfg.block_n * 4)
  return cfg.stages * per_step + _aligned(cfg.block_n * mp * 4)


def rows_padded(m: int) -> int:
  """x's rows padded for the wgmma's N dimension: a multiple of 8 (the instruction's step)."""
  return max(8, -(-m // 8) * 8)


def default_config(m: int, k: int, n: int, *, bits: int,
                   group_size: int | None) -> MosaicConfig:
  """block_n 128, 128-byte code rows, 4 stages (fewer when they would not fit in shared
  memory), K split until the programs reach about two per SM (one per SM fits in shared memory
  from about 24 rows), the upcast load for int4. Chosen from the compiled kernels' registers and
  instruction counts (ptxas without a GPU: no spills at M <= 64; 256 columns of int4 reach 255 registers, and
  spill with the plain load);
  the GPU sweep in ``benchmarks/quantized_matmul.py --mosaic`` is to confirm them by time."""
  block_n = 128 if n % 128 == 0 else 64
  block_k = 256 if bits == 4 else 128
  stages = 4
  while stages > 2 and smem_bytes(MosaicConfig(block_n, block_k, 1, stages), rows_padded(m),
                                  bits=bits, group_size=group_size,
                                  has_zeros=True) > SMEM_BYTES:
    stages -= 1
  steps = k // block_k if k % block_k == 0 else 0
  split_k = 1
  while ((n // block_n) * split_k * 2 <= 2 * NUM_SMS and steps % (split_k * 2) == 0
         and steps // (split_k * 2) >= 4
         and (group_size is None or (k // (split_k * 2)) % group_size == 0)):
    split_k *= 2
  # int4: the upcast load (32-bit shared-memory loads + shuffles instead of one byte per load)
  # compiles to 128 registers instead of 198 and 999 PTX instructions per step instead of 1095
  # (M = 16, ``benchmarks/xla_gpu_offline.py --mosaic-qmm``); for int8 the two are within 6%
  load = "upcast" if bits == 4 else "plain"
  return MosaicConfig(block_n=block_n, block_k=block_k, split_k=split_k, stages=stages,
                      load=load)


def repack_nk(w_q, *, bits: int, k: int):
  """Stored codes -> the kernel's layout, once (at load time): int8 [K, N] -> int8 [N, K];
  packed int4 uint8 [ceil(K/2), N] (``formats.pack_int4``: byte i of a column holds rows 2i and
  2i + 1, low nibble first) -> ``jnp.int4`` [N, K]. For int4 that is only a transpose of the
  bytes: ``jnp.int4`` keeps element 2i in the low nibble of byte i, so the result's bytes are
  the Triton kernel's ``w_layout="nk"`` codes (``w_q.T``) too."""
  if bits == 8:
    return jnp.asarray(w_q, jnp.int8).T
  packed_NxKh = jnp.asarray(w_q, jnp.uint8).T
  n = packed_NxKh.shape[0]
  return lax.bitcast_convert_type(packed_NxKh, jnp.int4).reshape(n, -1)[:, :k]


def _is_pow2(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 and not v & (v - 1)


def check_shape(m: int, k: int, n: int, *, bits: int, group_size: int | None, cfg: MosaicConfig):
  """Raise ``KernelShapeError`` naming the dimension this tiling cannot cover."""
  if bits not in (4, 8):
    raise KernelShapeError(f"bits={bits}: the Mosaic kernel takes int8 or int4 codes")
  if m > MAX_ROWS:
    raise KernelShapeError(f"M={m} rows: the Mosaic decode kernel takes up to {MAX_ROWS}")
  if cfg.block_n < _WGMMA_ROWS or cfg.block_n % _WGMMA_ROWS:
    raise KernelShapeError(f"block_n={cfg.block_n}: a multiple of {_WGMMA_ROWS} (the wgmma "
                           f"register operand's rows)")
  block_k = cfg.block_k
  if not _is_pow2(block_k) or block_k < 64:
    raise KernelShapeError(f"block_k={block_k}: a power of two >= 64")
  if not _is_pow2(cfg.chunk) or cfg.chunk < 64 or block_k % cfg.chunk:
    raise KernelShapeError(f"chunk={cfg.chunk}: a power of two >= 64 dividing "
                           f"block_k={block_k} (64 bf16 values are one swizzle atom of x)")
  if group_size is not None and (not _is_pow2(group_size) or group_size < 16):
    raise KernelShapeError(f"group_size={group_size}: a power of two >= 16")
  if not _is_pow2(cfg.split_k):
    raise KernelShapeError(f"split_k={cfg.split_k!r}: a power of two >= 1")
  if not isinstance(cfg.stages, (int, np.integer)) or cfg.stages < 1:
    raise KernelShapeError(f"stages={cfg.stages}: at least 1")
  if cfg.math not in MATHS:
    raise KernelShapeError(f"math={cfg.math!r}: one of {MATHS}")
  if cfg.load not in LOADS:
    raise KernelShapeError(f"load={cfg.load!r}: one of {LOADS}")
  if n % cfg.block_n:
    raise KernelShapeError(f"N={n} is not a multiple of block_n={cfg.block_n}")
  if k % (block_k * cfg.split_k):
    raise KernelShapeError(f"K={k} is not a multiple of block_k={block_k} x "
                           f"split_k={cfg.split_k}")
  if group_size is not None and (k // cfg.split_k) % group_size:
    raise KernelShapeError(f"K={k} / split_k={cfg.split_k} is not a multiple of "
                           f"group_size={group_size} (a K split must hold whole groups)")
  mp = rows_padded(m)
  need = smem_bytes(cfg, mp, bits=bits, group_size=group_size, has_zeros=True)
  if need > SMEM_BYTES:
    raise KernelShapeError(f"{need} bytes of shared memory per program (stages={cfg.stages}, "
                           f"block_n={cfg.block_n}, block_k={block_k}, {mp} rows) "
                           f"> {SMEM_BYTES}: fewer stages or a smaller tile")


def _swizzled(block_cols: int, bits: int):
  """Tiling + swizzle transforms of a shared-memory tile whose rows hold ``block_cols`` values
  of ``bits`` bits (128-byte swizzle for 128-byte rows)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  swizzle = plgpu.find_swizzle(block_cols * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _codes_to(codes, dtype):
  """Integer codes (int4 / int8, |q| <= 128) -> ``dtype``, exactly, without ``I2F``: bf16 by
  Mosaic GPU's PRMT / LOP3 conversions; f16 by the exponent trick, the 16-bit pattern
  0x6480 + q is the half 1152 + q (1024 <= 1152 + q < 2048, where the unit in the last place is
  1), minus 1152; float32 through bf16 (exact for |q| <= 256)."""
  if jnp.dtype(dtype) == jnp.dtype(jnp.float16):
    biased = codes.astype(jnp.int8).astype(jnp.int16) + jnp.int16(0x6480)
    return lax.bitcast_convert_type(biased, jnp.float16) - jnp.float16(1152)
  if jnp.dtype(dtype) == jnp.dtype(jnp.float32):
    return codes.astype(jnp.bfloat16).astype(jnp.float32)
  return codes.astype(dtype)


def _dequantize(codes, s_ref, z_ref, *, k0: int, dtype, group_size: int | None, math: str):
  """One chunk of codes [bn, c] (registers; columns k0 .. k0 + c of the step) -> the wgmma
  operand in ``dtype``. Per channel: the codes (exact integers). Grouped: s_g (q - z_g) per
  group g, with s_ref / z_ref the step's scale / zero-point tiles [rows, bn] (row g = the g-th
  group of the step; one row when a group spans steps), each row read as a [bn] vector. ``math``
  "f32": in float32, rounded to ``dtype`` once (the reference's rounding); "native": in
  ``dtype`` (codes and integer zero points exact there; the scale and the product each rounded:
  within a unit in the last place of the reference's weight, at about a third of the
  instructions)."""
  if group_size is None:
    return _codes_to(codes, dtype)
  ctype = jnp.float32 if math == "f32" else dtype
  q = _codes_to(codes, ctype)
  width = q.shape[1]
  pieces = []
  for start in range(0, width, min(group_size, width)):
    row = (k0 + start) // group_size if s_ref.shape[0] > 1 else 0
    piece = q[:, start:start + group_size] if group_size < width else q
    if z_ref is not None:
      piece = piece - z_ref[row].astype(ctype)[:, None]
    pieces.append(piece * s_ref[row].astype(ctype)[:, None])
  w = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)
  return w.astype(dtype)


def _load_codes(w_smem, *, bits: int, load: str, interpret: bool):
  """The step's codes [bn, bk] from shared memory into registers (``MosaicConfig.load``)."""
  if load == "plain" or interpret:  # the interpreter has no register layouts
    return w_smem[...]
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  wide = plgpu.Layout.WGMMA_UPCAST_4X if bits == 4 else plgpu.Layout.WGMMA_UPCAST_2X
  return plgpu.layout_cast(plgpu.load(w_smem, (), layout=wide), plgpu.Layout.WGMMA)


def _kernel_body(x_gmem, w_gmem, *refs, cfg: MosaicConfig, steps: int, group_size: int | None,
                 has_zeros: bool, bits: int, interpret: bool):
  """One program: output columns [i bn, (i + 1) bn) over K split s (grid ("n", "s"))."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  grouped = group_size is not None
  if grouped:
    s_gmem, *refs = refs
    z_gmem, *refs = refs if has_zeros else (None, *refs)
  o_gmem, o_smem = refs
  block_n, block_k, chunk = cfg.block_n, cfg.block_k, cfg.chunk
  mp = x_gmem.shape[0]
  dtype = x_gmem.dtype
  i = lax.axis_index("n")
  split = lax.axis_index("s")
  cols = pl.ds(i * block_n, block_n)
  k_split = steps * block_k
  x_split = x_gmem.at[:, pl.ds(split * k_split, k_split)]
  w_split = w_gmem.at[cols, pl.ds(split * k_split, k_split)]

  in_specs = [plgpu.BlockSpec((mp, block_k), lambda j: (0, j), transforms=_swizzled(block_k, 16)),
              plgpu.BlockSpec((block_n, block_k), lambda j: (0, j),
                              transforms=_swizzled(block_k, bits))]
  operands = [x_split, w_split]
  if grouped:
    g_split = k_split // group_size
    if group_size <= block_k:  # the step holds block_k / g whole groups
      spec = plgpu.BlockSpec((block_k // group_size, block_n), lambda j: (j, 0))
    else:  # a group spans g / block_k steps: their one scale row
      spec = plgpu.BlockSpec((1, block_n), lambda j: (j // (group_size // block_k), 0))
    for ref in (s_gmem, z_gmem) if has_zeros else (s_gmem,):
      in_specs.append(spec)
      operands.append(ref.at[pl.ds(split * g_split, g_split), cols])

  def run(acc_ref):
    def step(_, x_smem, w_smem, *sz_smem):
      s_ref = sz_smem[0] if grouped else None
      z_ref = sz_smem[1] if has_zeros and grouped else None
      codes = _load_codes(w_smem, bits=bits, load=cfg.load, interpret=interpret)
      for k0 in range(0, block_k, chunk):
        a = _dequantize(codes[:, k0:k0 + chunk] if chunk < block_k else codes, s_ref, z_ref,
                        k0=k0, dtype=dtype, group_size=group_size, math=cfg.math)
        x_chunk = x_smem.at[:, pl.ds(k0, chunk)] if chunk < block_k else x_smem
        if interpret:  # the interpreter's wgmma takes shared-memory operands only: same product
          acc_ref[...] += lax.dot_general(a, x_chunk[...], (((1,), (1,)), ((), ())),
                                          preferred_element_type=jnp.float32)
        else:  # asynchronous: convert the next chunk while this one multiplies
          plgpu.wgmma(acc_ref, a, x_chunk.T)
          plgpu.wgmma_wait(1)
      if not interpret:
        plgpu.wgmma_wait(0)  # before the pipeline reuses this step's shared memory

    plgpu.emit_pipeline(step, grid=(steps,), in_specs=in_specs,
                        max_concurrent_steps=cfg.stages)(*operands)
    return acc_ref[...]

  if interpret:
    def run_zeroed(acc_ref):
      acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
      return run(acc_ref)
    acc = pl.run_scoped(run_zeroed, plgpu.SMEM((block_n, mp), jnp.float32))
  else:
    acc = pl.run_scoped(run, plgpu.ACC((block_n, mp), jnp.float32))
  o_smem[...] = acc
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[split, cols])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "config", "interpret"))
def quantized_matmul_mosaic(x_MxK, w_nk, scales_GxN, zeros_GxN=None, *, bits: int,
                            group_size: int | None, config: MosaicConfig | None = None,
                            interpret: bool = False):
  """y = x Ŵ through the Mosaic GPU kernel, Ŵ[k, n] = s[g(k), n] (q[k, n] - z[g(k), n]),
  g(k) = k // group_size (weight-only W8A16 / W4A16 as in LLM.int8() and GPTQ; the same
  definition as ``quantized_matmul_reference``). x [M, K] bf16 / f16 (M <= 64), ``w_nk`` the
  codes from ``repack_nk`` (int8 or ``jnp.int4`` [N, K]), scales / zeros float32 [G, N] as
  stored. Returns [M, N] in x's dtype. ``interpret``: Mosaic GPU's interpret mode (CPU tests).
  Raises ``KernelShapeError`` for what the tiling cannot cover."""
  m, k = x_MxK.shape
  n = w_nk.shape[0]
  want = jnp.dtype(jnp.int4 if bits == 4 else jnp.int8)
  if w_nk.dtype != want or w_nk.shape != (n, k):
    raise KernelShapeError(f"the Mosaic kernel takes repack_nk's codes, {want} [N, K={k}]; got "
                           f"{w_nk.dtype} {tuple(w_nk.shape)}")
  if jnp.dtype(x_MxK.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise KernelShapeError(f"the Mosaic kernel takes bf16 / f16 activations, got {x_MxK.dtype}")
  cfg = config or default_config(m, k, n, bits=bits, group_size=group_size)
  if cfg.block_k is None:  # 128-byte rows of codes
    cfg = dataclasses.replace(cfg, block_k=256 if bits == 4 else 128)
  check_shape(m, k, n, bits=bits, group_size=group_size, cfg=cfg)
  if group_size is not None and not interpret and _JAX_VERSION < (0, 11):
    raise KernelShapeError(f"group_size={group_size}: the grouped kernel's register slices need "
                           f"Mosaic GPU's layout inference of jax >= 0.11 (this is "
                           f"{jax.__version__}); per-channel codes or the Triton kernel work here")
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  mp = rows_padded(m)
  x = jnp.pad(x_MxK, ((0, mp - m), (0, 0))) if mp != m else x_MxK
  steps = k // (cfg.block_k * cfg.split_k)
  grouped = group_size is not None
  has_zeros = zeros_GxN is not None
  args = [x, w_nk]
  if grouped:
    args.append(scales_GxN.astype(jnp.float32))
    if has_zeros:
      args.append(zeros_GxN.astype(jnp.float32))
  body = functools.partial(_kernel_body, cfg=cfg, steps=steps, group_size=group_size,
                           has_zeros=has_zeros, bits=bits, interpret=interpret)
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=import-outside-toplevel
    interpret_params = InterpretGPUParams()
  else:
    interpret_params = None
  partials = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((cfg.split_k, n, mp), jnp.float32),
      grid=(n // cfg.block_n, cfg.split_k), grid_names=("n", "s"),
      scratch_types=[plgpu.SMEM((cfg.block_n, mp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret_params,
  )(*args)
  y_T = jnp.sum(partials, axis=0)[:, :m]  # [N, M]
  if not grouped:
    s = scales_GxN.astype(jnp.float32)[0][:, None]
    if has_zeros:
      x_sum = jnp.sum(x_MxK.astype(jnp.float32), axis=1)[None, :]
      y_T = y_T - zeros_GxN.astype(jnp.float32)[0][:, None] * x_sum
    y_T = y_T * s
  return y_T.T.astype(x_MxK.dtype)
