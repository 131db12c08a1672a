"""Weight-only quantized matmul ``y = x Ŵ`` that reads the weights as int8 or packed int4 codes.

    y[m, n] = sum_k x[m, k] s[g(k), n] (q[k, n] - z[g(k), n]),   g(k) = k // group_size

Public entry point: ``quantized_matmul(x, w_q, scales, *, bits, group_size, zeros, impl,
interpret)``. Implementations (same signature, same result up to float rounding):

* ``reference.quantized_matmul_reference``: dequantise the kernel with XLA, then ``jnp.dot``: the
  definition every path is tested against.
* ``xla.quantized_matmul_xla`` (``impl="xla"``; the only path on CPU): the same function with
  per-channel scales applied after the matmul of the codes, so XLA reads the codes once instead
  of writing and re-reading a dequantised [K, N] copy; group-wise scales take the reference.
* ``gpu.quantized_matmul_gpu``: Pallas on the Triton backend, dequantisation fused in the K loop,
  K split across programs at decode shapes.
* ``tpu.quantized_matmul_tpu``: Pallas Mosaic, weight tiles dequantised in VMEM.
* ``mosaic.quantized_matmul_mosaic``: Pallas Mosaic GPU for Hopper at decode shapes (M <= 64),
  TMA-pipelined codes repacked once to [N, K] (``mosaic.repack_nk``), ``wgmma`` with the
  dequantised weights as the register operand. Not yet run on a GPU, so not behind ``impl``:
  ``benchmarks/quantized_matmul.py --mosaic`` checks and times it.

``impl="auto"`` picks the kernel on a single-device GPU for the shapes where it was measured
faster than XLA (``benchmarks/quantized_matmul.py``, ``docs/benchmarks.md``) and XLA elsewhere:
a TPU (the Mosaic kernel has not run on one yet: ``TPU_MEASURED``), CPU, several devices (XLA
partitions the dequantise-then-dot over a mesh; a custom call would gather its operands), NF4 /
float32 / shapes the tiling does not cover. ``impl="pallas"`` forces the platform's kernel and raises ``KernelShapeError`` when it cannot run the shape.

Gradients: a custom VJP gives d/dx = dy Ŵᵀ (and d/ds, d/dz) through the XLA path, so QLoRA
can back-propagate through a frozen quantized base; codes get no gradient (they are integers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.quantized_matmul.gpu import (GpuConfig, KernelShapeError, default_config,
                                          quantized_matmul_gpu)
from kernels.quantized_matmul.mosaic import MosaicConfig, quantized_matmul_mosaic, repack_nk
from kernels.quantized_matmul.reference import dequantize, quantized_matmul_reference
from kernels.quantized_matmul.tpu import TpuConfig, quantized_matmul_tpu
from kernels.quantized_matmul.xla import quantized_matmul_xla

__all__ = ["quantized_matmul", "quantized_matmul_reference", "quantized_matmul_xla",
           "quantized_matmul_gpu", "quantized_matmul_mosaic", "MosaicConfig", "repack_nk",
           "quantized_matmul_tpu", "GpuConfig", "TpuConfig", "KernelShapeError", "dequantize",
           "choose_impl"]

IMPLS = ("auto", "xla", "pallas", "pallas_gpu", "pallas_tpu")
_KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)
# GPU rows (M) up to which ``auto`` uses the Triton kernel (docs/benchmarks.md, H200): int8 won at
# M = 1 and lost by 1-15% at M = 16 (the crossover in between is unmeasured; 8 is a guess); int4
# beat XLA's int4 path up to M = 128 and lost at 2048 (512 unmeasured).
GPU_MAX_M = {8: 8, 4: 128}
# The Mosaic TPU kernel is tested in interpret mode only: it has never been compiled or timed on a
# TPU, so ``auto`` keeps XLA there until a TPU run measures it (then set True, as the GPU kernels
# did after their first GPU run).
TPU_MEASURED = False


def _check_args(x, w_q, scales, zeros, bits, group_size, impl):
  if impl not in IMPLS:
    raise ValueError(f"quantized_matmul: impl must be one of {IMPLS}, got {impl!r}")
  if bits not in (4, 8):
    raise ValueError(f"quantized_matmul: bits must be 8 or 4, got {bits!r}")
  if group_size is not None and (isinstance(group_size, bool) or not isinstance(
      group_size, (int, np.integer)) or group_size < 1):
    raise ValueError(f"quantized_matmul: group_size must be a positive int (rows of K per scale, "
                     f"e.g. 32 / 64 / 128) or None (per output channel), got {group_size!r}")
  if getattr(x, "ndim", 0) < 1:
    raise ValueError(f"quantized_matmul: x must be an array [..., K], got "
                     f"{type(x).__name__} of shape {getattr(x, 'shape', None)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    # the XLA path would cast the dequantised kernel to x's integer dtype: silently wrong
    raise ValueError(f"quantized_matmul: x must be floating point (bf16 / f16 / f32), got "
                     f"{x.dtype}")
  if getattr(w_q, "ndim", None) != 2:
    raise ValueError(f"quantized_matmul: w_q must be 2-D [K, N] (int8) or [ceil(K/2), N] (packed "
                     f"int4), got shape {getattr(w_q, 'shape', None)}")
  k, n = x.shape[-1], w_q.shape[1]
  want_dtype = jnp.uint8 if bits == 4 else jnp.int8
  if w_q.dtype != want_dtype:
    raise ValueError(f"quantized_matmul: bits={bits} needs w_q of dtype {jnp.dtype(want_dtype)}, "
                     f"got {w_q.dtype}")
  rows = (k + 1) // 2 if bits == 4 else k
  if w_q.shape[0] != rows:
    raise ValueError(f"quantized_matmul: x has K={k}, so w_q needs {rows} rows for bits={bits}, "
                     f"got {w_q.shape[0]}")
  if scales is None:
    raise ValueError("quantized_matmul: scales are required (float32 [G, N])")
  groups = 1 if group_size is None else -(-k // group_size)
  for name, a in (("scales", scales), ("zeros", zeros)):
    if a is None:
      continue
    if getattr(a, "ndim", None) is None:
      raise ValueError(f"quantized_matmul: {name} must be an array [G, N], got "
                       f"{type(a).__name__}")
    if tuple(a.shape) != (groups, n):
      raise ValueError(f"quantized_matmul: {name} must be [G, N] = [{groups}, {n}] for K={k}, "
                       f"group_size={group_size}, got {tuple(a.shape)}")
  if not jnp.issubdtype(scales.dtype, jnp.floating):
    raise ValueError(f"quantized_matmul: scales must be floating point (float32), got "
                     f"{scales.dtype} (double-quantized scale codes? pass "
                     f"QuantizedWeight.scale_values())")
  if zeros is not None and (zeros.dtype == jnp.bool_ or not (
      jnp.issubdtype(zeros.dtype, jnp.floating) or jnp.issubdtype(zeros.dtype, jnp.integer))):
    raise ValueError(f"quantized_matmul: zeros must be float32 (or integer) zero points, got "
                     f"{zeros.dtype}")


def _check_platform(chosen: str, impl: str, interpret: bool, config):
  """A Pallas kernel forced on a platform it does not compile for, or a config of the wrong kind:
  say so here instead of failing inside the Pallas lowering."""
  if config is not None and not isinstance(config, (GpuConfig, TpuConfig)):
    raise TypeError(f"quantized_matmul: config must be a GpuConfig, a TpuConfig or None, got "
                    f"{type(config).__name__}")
  if isinstance(config, GpuConfig) and config.w_layout != "kn":
    raise ValueError(f"quantized_matmul: w_q comes as stored ([K, N] / [K / 2, N]); "
                     f"w_layout={config.w_layout!r} (codes transposed once, K contiguous) is a "
                     f"layout of kernels.quantized_matmul.gpu.quantized_matmul_gpu only")
  want = {"pallas_gpu": GpuConfig, "pallas_tpu": TpuConfig}.get(chosen)
  if want is None:
    return
  if config is not None and not isinstance(config, want):
    raise TypeError(f"quantized_matmul: impl={impl!r} runs {chosen} and needs a {want.__name__} "
                    f"config, got {type(config).__name__}")
  platform = jax.default_backend()
  needs = ("gpu", "cuda", "rocm") if chosen == "pallas_gpu" else ("tpu",)
  if not interpret and platform not in needs:
    device = "a GPU (Triton)" if chosen == "pallas_gpu" else "a TPU (Mosaic)"
    raise ValueError(f"quantized_matmul: impl={impl!r} runs the {chosen} kernel, which needs "
                     f"{device}, but the default backend is {platform!r}; pass interpret=True "
                     f"(Pallas interpret mode, for tests) or use impl='auto' / 'xla'")


def choose_impl(m: int, k: int, n: int, *, bits: int, group_size: int | None, dtype,
                impl: str = "auto", platform: str | None = None) -> str:
  """Resolve ``impl`` to "xla", "pallas_gpu" or "pallas_tpu" for this shape and platform."""
  if impl not in IMPLS:
    raise ValueError(f"choose_impl: impl must be one of {IMPLS}, got {impl!r}")
  platform = platform or jax.default_backend()
  if impl == "xla":
    return "xla"
  if impl == "pallas":
    impl = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
  if impl != "auto":
    return impl
  if platform not in ("gpu", "cuda", "rocm", "tpu") or jax.device_count() > 1:
    return "xla"
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _KERNEL_DTYPES]:
    return "xla"
  try:
    if platform == "tpu":
      if not TPU_MEASURED:
        return "xla"
      from kernels.quantized_matmul import tpu  # pylint: disable=import-outside-toplevel
      tpu.check_shape(m, k, n, bits=bits, group_size=group_size,
                      cfg=tpu.default_config(m, k, n, group_size=group_size))
      return "pallas_tpu"
    if m > GPU_MAX_M[bits]:
      return "xla"
    from kernels.quantized_matmul import gpu  # pylint: disable=import-outside-toplevel
    gpu.check_shape(m, k, n, bits=bits, group_size=group_size,
                    cfg=default_config(m, k, n, bits=bits, group_size=group_size))
    return "pallas_gpu"
  except KernelShapeError:
    return "xla"


def _forward(x_MxK, w_q, scales, zeros, *, bits, group_size, impl, interpret, config):
  if impl == "xla":
    return quantized_matmul_xla(x_MxK, w_q, scales, bits=bits, group_size=group_size,
                                zeros_GxN=zeros)
  if impl == "pallas_gpu":
    return quantized_matmul_gpu(x_MxK, w_q, scales, zeros, bits=bits, group_size=group_size,
                                config=config, interpret=interpret)
  return quantized_matmul_tpu(x_MxK, w_q, scales, zeros, bits=bits, group_size=group_size,
                              config=config, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _qmm(x, w_q, scales, zeros, bits, group_size, impl, interpret, config):
  return _forward(x, w_q, scales, zeros, bits=bits, group_size=group_size, impl=impl,
                  interpret=interpret, config=config)


def _qmm_fwd(x, w_q, scales, zeros, bits, group_size, impl, interpret, config):
  y = _qmm(x, w_q, scales, zeros, bits, group_size, impl, interpret, config)
  return y, (x, w_q, scales, zeros)


def _qmm_bwd(bits, group_size, impl, interpret, config, res, dy):
  del impl, interpret, config
  x, w_q, scales, zeros = res
  ref = functools.partial(lambda x_, s_, z_: quantized_matmul_xla(
      x_, w_q, s_, bits=bits, group_size=group_size, zeros_GxN=z_))
  _, vjp = jax.vjp(ref, x, scales, zeros)
  dx, ds, dz = vjp(dy)
  return dx, np.zeros(w_q.shape, jax.dtypes.float0), ds, dz


_qmm.defvjp(_qmm_fwd, _qmm_bwd)


def quantized_matmul(x, w_q, scales, *, bits: int = 8, group_size: int | None = None, zeros=None,
                     impl: str = "auto", interpret: bool = False, config=None):
  """y = x Ŵ, Ŵ[k, n] = scales[g(k), n] (q[k, n] - zeros[g(k), n]), in x's dtype.

  Weight-only quantization (W8A16 / W4A16): LLM.int8() absmax codes (Dettmers et al. 2022),
  group-wise int4 as written by GPTQ / AWQ (Frantar et al. 2023; Lin et al. 2024), stored as in
  ``postrl.quant.formats`` (int4 packed two per byte, low nibble = even row of K).

  Args:
    x: activations [..., K] (bf16 / f16 for the kernels; f32 runs through XLA).
    w_q: int8 codes [K, N] (bits=8) or uint8 packed int4 [ceil(K/2), N] (bits=4).
    scales: float32 [G, N]; G = 1 (per output channel, group_size=None) or ceil(K / group_size).
    bits: 8 or 4.
    group_size: rows of K per scale (32 / 64 / 128), None = per channel.
    zeros: float32 zero points [G, N] (asymmetric codes) or None.
    impl: "auto" | "xla" | "pallas" (this platform's kernel) | "pallas_gpu" | "pallas_tpu".
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    config: a ``GpuConfig`` / ``TpuConfig`` tiling (default: the per-shape heuristic).
  Returns:
    [..., N] in x's dtype.
  Raises:
    ValueError: an argument that does not fit (named with the shape / dtype it needs): integer x,
      w_q rows that do not match x's K, scales / zeros not [G, N] or not numbers, a group_size
      that is not a positive int, a Pallas impl on a platform it does not compile for without
      ``interpret``. ``KernelShapeError`` (a ValueError): a forced kernel that cannot tile the
      shape. TypeError: a config of the wrong kind for the kernel.
  """
  x, w_q, scales, zeros = (jnp.asarray(a) if isinstance(a, (list, tuple)) else a
                           for a in (x, w_q, scales, zeros))
  _check_args(x, w_q, scales, zeros, bits, group_size, impl)
  lead, k = x.shape[:-1], x.shape[-1]
  m = int(np.prod(lead)) if lead else 1
  n = w_q.shape[1]
  chosen = choose_impl(m, k, n, bits=bits, group_size=group_size, dtype=x.dtype, impl=impl,
                       platform="cpu" if interpret and impl == "auto" else None)
  _check_platform(chosen, impl, interpret, config)
  if m == 0 or n == 0:  # nothing to compute; the kernels cannot take an empty grid
    return jnp.zeros((*lead, n), x.dtype)
  x_MxK = x.reshape(m, k)
  y = _qmm(x_MxK, w_q, scales, zeros, bits, group_size, chosen, interpret, config)
  return y.reshape(*lead, n)
