"""kernels.quantized_matmul on bad or edge-case input: every refusal names the argument, nothing
fails inside JAX / Pallas, and nothing is silently wrong (an integer x, scale codes passed as
scales, an odd int4 K tile)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.quantized_matmul import (GpuConfig, KernelShapeError, TpuConfig, choose_impl,
                                      quantized_matmul, quantized_matmul_reference)
from kernels.quantized_matmul import gpu as qgpu
from kernels.quantized_matmul import tpu as qtpu
from postrl.quant import formats


from tests.kernels.test_quantized_matmul import _quantize, _x  # noqa: E402  (shared helpers)


@pytest.mark.parametrize("group_size", [0, -32, True, 32.0])
def test_group_size_must_be_a_positive_int(group_size):
  # 0 used to raise ZeroDivisionError, True was taken as a group of 1 row, -32 asked for G = -2
  q, s, z, _ = _quantize(64, 32, 4, 32, False)
  with pytest.raises(ValueError, match=f"group_size must be a positive int .* got {group_size}"):
    quantized_matmul(_x(2, 64), q, s, bits=4, group_size=group_size, zeros=z)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_])
@pytest.mark.parametrize("impl", ["auto", "pallas_gpu"])
def test_integer_activations_are_refused(dtype, impl):
  # the XLA path cast the dequantised kernel to x's integer dtype and returned an integer product
  q, s, _, _ = _quantize(64, 32, 8, None, True)
  with pytest.raises(ValueError, match=f"x must be floating point .* got {jnp.dtype(dtype)}"):
    quantized_matmul(jnp.ones((2, 64), dtype), q, s, impl=impl, interpret=True,
                     config=GpuConfig(16, 32, 32) if impl != "auto" else None)


def test_scales_and_zeros_dtypes():
  q, s, z, w_hat = _quantize(64, 32, 4, 32, False)
  x = _x(2, 64, jnp.float32)
  # int8 scales are what QuantizedWeight stores under double quantization (codes, not values)
  codes, _, _ = formats.double_quantize(s)
  with pytest.raises(ValueError, match="scales must be floating point .* got int8 .*scale_values"):
    quantized_matmul(x, q, codes, bits=4, group_size=32, zeros=z)
  with pytest.raises(ValueError, match="zeros must be float32 .* got bool"):
    quantized_matmul(x, q, s, bits=4, group_size=32, zeros=z > 0)
  with pytest.raises(ValueError, match="scales are required"):
    quantized_matmul(x, q, None, bits=4, group_size=32, zeros=z)
  # integer zero points (as other libraries store them) are exact in float32: same result
  np.testing.assert_allclose(
      quantized_matmul(x, q, s, bits=4, group_size=32, zeros=z.astype(jnp.int32)),
      quantized_matmul(x, q, s, bits=4, group_size=32, zeros=z), rtol=1e-6)
  np.testing.assert_allclose(quantized_matmul(x, q, s, bits=4, group_size=32, zeros=z),
                             np.asarray(x) @ np.asarray(w_hat), rtol=1e-5, atol=1e-5)


def test_x_must_be_an_array_with_a_k_axis():
  q, s, _, _ = _quantize(64, 32, 8, None, True)
  with pytest.raises(ValueError, match=r"x must be an array \[..., K\]"):
    quantized_matmul(jnp.zeros((), jnp.float32), q, s)
  # a single row without batch axes is [K] -> [N]
  assert quantized_matmul(jnp.zeros((64,), jnp.float32), q, s).shape == (32,)


@pytest.mark.parametrize("impl,cfg", [("xla", None), ("pallas_gpu", GpuConfig(16, 32, 32)),
                                      ("pallas_gpu", None), ("pallas_tpu", None)])
def test_empty_batch_gives_an_empty_result(impl, cfg):
  # M = 0 used to fail in the Pallas wrappers (a [block_m, K] slice of a [0, K] array), so a GPU
  # call with impl="auto" (which picks the kernel for small M) failed on an empty batch
  k, n = 256, 128
  q, s, _, _ = _quantize(k, n, 8, None, True)
  x = jnp.zeros((0, 3, k), jnp.bfloat16)
  y = quantized_matmul(x, q, s, impl=impl, interpret=True, config=cfg)
  assert y.shape == (0, 3, n) and y.dtype == jnp.bfloat16
  gx = jax.grad(lambda a: jnp.sum(quantized_matmul(a, q, s, impl=impl, interpret=True,
                                                   config=cfg).astype(jnp.float32)))(x)
  assert gx.shape == x.shape
  for kernel in (qgpu.quantized_matmul_gpu, qtpu.quantized_matmul_tpu):  # the public wrappers
    assert kernel(x.reshape(0, k), q, s, bits=8, group_size=None, interpret=True).shape == (0, n)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU refusal")
@pytest.mark.parametrize("impl,device", [("pallas", "a GPU"), ("pallas_gpu", "a GPU"),
                                         ("pallas_tpu", "a TPU")])
def test_forcing_a_kernel_on_cpu_without_interpret_says_what_it_needs(impl, device):
  # used to fail inside the Pallas lowering ("Only interpret mode is supported on CPU backend")
  k, n = 256, 128
  q, s, _, _ = _quantize(k, n, 8, None, True)
  with pytest.raises(ValueError, match=f"impl='{impl}' runs the .* needs {device}.* backend is "
                                       "'cpu'; pass interpret=True"):
    quantized_matmul(_x(2, k), q, s, impl=impl)


def test_config_of_the_wrong_kind_is_refused():
  q, s, _, _ = _quantize(64, 32, 8, None, True)
  x = _x(2, 64)
  with pytest.raises(TypeError, match="impl='pallas_gpu' .* needs a GpuConfig config, got "
                                      "TpuConfig"):
    quantized_matmul(x, q, s, impl="pallas_gpu", interpret=True, config=TpuConfig())
  with pytest.raises(TypeError, match="needs a TpuConfig config, got GpuConfig"):
    quantized_matmul(x, q, s, impl="pallas_tpu", interpret=True, config=GpuConfig())
  with pytest.raises(TypeError, match="config must be a GpuConfig, a TpuConfig or None, got dict"):
    quantized_matmul(x, q, s, impl="pallas_gpu", interpret=True, config={"block_m": 16})
  with pytest.raises(ValueError, match="choose_impl: impl must be one of"):
    choose_impl(1, 64, 32, bits=8, group_size=None, dtype=jnp.bfloat16, impl="cuda")


def test_tilings_that_would_divide_by_zero_or_drop_a_row_are_refused():
  with pytest.raises(KernelShapeError, match="split_k=0: the number of K splits must be"):
    qgpu.check_shape(16, 256, 64, bits=8, group_size=None, cfg=GpuConfig(split_k=0))
  with pytest.raises(KernelShapeError, match="TpuConfig.block_k=0: must be a positive int"):
    qtpu.check_shape(8, 256, 128, bits=8, group_size=None, cfg=TpuConfig(8, 128, 0))
  # an odd int4 K tile covers (block_k - 1) / 2 packed rows: the last row of K was dropped
  # (relative error 3e-2 instead of 2e-3, no error raised)
  k, n = 255, 128
  q, s, _, _ = _quantize(k, n, 4, None, True)
  with pytest.raises(KernelShapeError, match="int4 needs an even block_k .* got 255"):
    quantized_matmul(_x(3, k), q, s, bits=4, impl="pallas_tpu", interpret=True,
                     config=TpuConfig(8, 128, 255))
  # the same call through XLA is right (to float32 rounding: it scales after the sum over K)
  x = _x(3, k, jnp.float32)
  ref = quantized_matmul_reference(x, q, s, bits=4)
  np.testing.assert_allclose(quantized_matmul(x, q, s, bits=4), ref, rtol=1e-5,
                             atol=1e-6 * float(jnp.abs(ref).max()))
