"""The XLA path of ``quantized_matmul`` (``impl="xla"``, and what ``auto`` falls back to): the same
function as the reference, written so that XLA reads the codes once.

Per output channel (one scale row, G = 1) the scale comes out of the sum over K:

    y[m, n] = s[n] (sum_k x[m, k] q[k, n] - z[n] sum_k x[m, k])

so the matmul runs on the codes cast to x's dtype (exact: int8 and int4 codes are integers of at
most 8 bits, which bf16 and f16 hold exactly), and the scale and zero point are an epilogue on
[M, N]. XLA's GPU compiler fuses that cast into its Triton GEMM's operand load, so the codes are
read once as bytes and no dequantised [K, N] copy is written. The reference's form,
``x @ bf16(s (q - z))``, scales the [K, N] codes first, and XLA writes that bf16 [K, N] product to
memory and reads it back: compiled for an H100 (``benchmarks/xla_gpu_offline.py``, 2026-11-27),
[16, 8192] x int8 [8192, 8192] writes a bf16 [8192, 8192] kernel in the reference's form and
nothing of size K x N in this one; the H200 table's "XLA deq" column (docs/benchmarks.md), which
``auto``'s crossover to XLA at int8 M > 8 was read from, timed this form.

Group-wise scales (G > 1) cannot leave the sum over K in one matmul; they take the reference
(dequantise, round to x's dtype, then dot), whose one dequantised copy per call is what a
prefill-sized M amortises. Results agree with the reference to x's rounding: the reference rounds
the dequantised kernel to x's dtype, this path rounds only the output.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels.quantized_matmul.reference import quantized_matmul_reference
from postrl.quant import formats


def quantized_matmul_xla(x_MxK, w_q, scales_GxN, *, bits: int = 8, group_size: int | None = None,
                         zeros_GxN=None):
  """y = x Ŵ as ``quantized_matmul_reference`` (same arguments), codes read once for per-channel
  scales: y = s ⊙ (x q - (x 1) z) (module docstring); group-wise scales take the reference."""
  if scales_GxN.shape[0] != 1:
    return quantized_matmul_reference(x_MxK, w_q, scales_GxN, bits=bits, group_size=group_size,
                                      zeros_GxN=zeros_GxN)
  k = x_MxK.shape[-1]
  codes = formats.unpack_int4(w_q, k) if bits == 4 else w_q
  acc = jnp.dot(x_MxK, codes.astype(x_MxK.dtype), preferred_element_type=jnp.float32)
  if zeros_GxN is not None:
    row_sums = jnp.sum(x_MxK.astype(jnp.float32), axis=-1, keepdims=True)
    acc = acc - row_sums * zeros_GxN[0].astype(jnp.float32)
  return (acc * scales_GxN[0].astype(jnp.float32)).astype(x_MxK.dtype)
