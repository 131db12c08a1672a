"""Pure-jnp reference of the weight-only quantized matmul: dequantise the whole kernel, then dot.

    y[m, n] = sum_k x[m, k] * s[g(k), n] * (q[k, n] - z[g(k), n]),    g(k) = k // group_size

q are the integer codes (int8 [K, N], or int4 packed two per byte [ceil(K/2), N] with the low
nibble holding row 2i, as in ``postrl.quant.formats``), s the float32 scales [G, N], z the optional
float32 zero points [G, N] (G = 1 per output channel, else ceil(K / group_size)). The dequantised
kernel is rounded to x's dtype before the dot (as XLA's dequantise-then-dot path does) and the dot
accumulates in float32. This is what every kernel is tested against, and the XLA path of
``kernels.quantized_matmul`` (``impl="xla"``).
"""

from __future__ import annotations

import jax.numpy as jnp

from postrl.quant import formats


def dequantize(w_q, scales_GxN, zeros_GxN=None, *, bits: int, group_size: int | None, k: int):
  """Codes -> float32 kernel [k, N]: s (q - z) per group along K (``formats.dequantize_codes``)."""
  codes = formats.unpack_int4(w_q, k) if bits == 4 else w_q
  spec = formats.QuantSpec(bits=bits, group_size=group_size, symmetric=zeros_GxN is None)
  return formats.dequantize_codes(codes, scales_GxN, zeros_GxN, spec)


def quantized_matmul_reference(x_MxK, w_q, scales_GxN, *, bits: int = 8,
                               group_size: int | None = None, zeros_GxN=None):
  """y = x Ŵ with Ŵ = dequantize(w_q, scales, zeros) in x's dtype, float32 accumulation.

  Args:
    x_MxK: activations [..., K] (bf16, f16 or f32).
    w_q: int8 codes [K, N] (bits=8) or uint8 packed int4 [ceil(K/2), N] (bits=4).
    scales_GxN: float32 scales.
    bits: 8 or 4.
    group_size: rows of K per scale, None = per output channel.
    zeros_GxN: float32 zero points or None (symmetric).
  Returns:
    [..., N] in x's dtype.
  """
  k = x_MxK.shape[-1]
  w = dequantize(w_q, scales_GxN, zeros_GxN, bits=bits, group_size=group_size, k=k)
  y = jnp.dot(x_MxK, w.astype(x_MxK.dtype), preferred_element_type=jnp.float32)
  return y.astype(x_MxK.dtype)
