"""kernels.quantized_matmul.mosaic: the Hopper (Mosaic GPU) swap-AB kernel in Mosaic GPU's
interpret mode on CPU against the exact product and the reference, its tiling checks, the load-time
repack, and its lowering for sm_90 (Mosaic GPU's Python lowering and layout inference)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.quantized_matmul import KernelShapeError, quantized_matmul_reference
from kernels.quantized_matmul import mosaic
from postrl.quant import formats
from tests.kernels.test_quantized_matmul import _quantize, _rel_err, _x


def _run(x, q, s, z, *, bits, group, cfg=None):
  w_nk = mosaic.repack_nk(q, bits=bits, k=x.shape[1])
  return mosaic.quantized_matmul_mosaic(x, w_nk, s, z, bits=bits, group_size=group, config=cfg,
                                        interpret=True)


# (bits, group, symmetric, m, dtype, config overrides): every format, row counts that pad to
# 8 / 16 / 40, a K split, 64-column tiles, a pipeline deeper than the K loop, one wgmma per step
# (chunk = block_k) and two, groups shorter than a chunk, as long as one, longer than a step,
# float32 dequantisation, f16 activations (the exponent-trick conversion), the upcast load
CASES = [
    (8, None, True, 1, jnp.bfloat16, {}),
    (8, None, False, 3, jnp.float16, dict(split_k=2)),
    (4, None, True, 9, jnp.bfloat16, dict(block_n=64)),
    (4, None, False, 1, jnp.float16, dict(stages=8)),
    (8, 32, True, 16, jnp.bfloat16, dict(block_n=64, split_k=2, chunk=128)),
    (8, 128, False, 5, jnp.float16, {}),
    (8, 256, True, 2, jnp.bfloat16, {}),
    (4, 32, True, 33, jnp.bfloat16, {}),
    (4, 64, False, 2, jnp.float16, dict(split_k=2, stages=2)),
    (4, 128, True, 4, jnp.bfloat16, dict(math="f32", chunk=128)),
    (4, 64, False, 7, jnp.float16, dict(math="f32", block_n=64, load="upcast")),
    (4, 512, False, 8, jnp.bfloat16, {}),
]


@pytest.mark.parametrize("bits,group,symmetric,m,dtype,over", CASES)
def test_mosaic_kernel_matches_exact_product(bits, group, symmetric, m, dtype, over):
  k, n = 512, 256
  q, s, z, w_hat = _quantize(k, n, bits, group, symmetric)
  x = _x(m, k, dtype)
  cfg = dataclasses.replace(mosaic.default_config(m, k, n, bits=bits, group_size=group), **over)
  y = _run(x, q, s, z, bits=bits, group=group, cfg=cfg)
  assert y.shape == (m, n) and y.dtype == dtype
  # bf16 output rounding is ~2e-3 relative (plus the per-weight rounding of the grouped operand);
  # a scale on the wrong group or column, a zero point with the wrong sign, a swapped nibble or
  # a dropped K split gives O(0.1-1)
  assert _rel_err(y, x, w_hat) < 6e-3
  # and it is the reference's product (the XLA path it would replace)
  ref = quantized_matmul_reference(x, q, s, bits=bits, group_size=group, zeros_GxN=z)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32),
                             rtol=3e-2, atol=3e-2 * float(jnp.max(jnp.abs(ref.astype(jnp.float32)))))


def test_codes_convert_exactly_without_an_integer_to_float_instruction():
  """The f16 exponent trick and the bf16 / f32 conversions give every int8 code exactly."""
  codes = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(16, 16)
  for dtype in (jnp.float16, jnp.bfloat16, jnp.float32):
    got = mosaic._codes_to(codes, dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.arange(-128, 128).reshape(16, 16))
  nibbles = jnp.arange(-8, 8, dtype=jnp.int32).astype(jnp.int4).reshape(2, 8)
  np.testing.assert_array_equal(np.asarray(mosaic._codes_to(nibbles, jnp.float16), np.float32),
                                np.arange(-8, 8).reshape(2, 8))


def test_mosaic_f32_dequantisation_rounds_as_the_reference():
  """math="f32" rounds s (q - z) to bf16 once, as the reference does: the results agree to the
  summation order (here: every entry within one bf16 unit of the output)."""
  k, n, m = 512, 128, 3
  q, s, z, _ = _quantize(k, n, 4, 64, False)
  x = _x(m, k)
  cfg = dataclasses.replace(mosaic.default_config(m, k, n, bits=4, group_size=64), math="f32",
                            block_n=64)
  y = np.asarray(_run(x, q, s, z, bits=4, group=64, cfg=cfg), np.float32)
  ref = np.asarray(quantized_matmul_reference(x, q, s, bits=4, group_size=64, zeros_GxN=z),
                   np.float32)
  ulp = np.abs(ref) * 2.0**-7 + 1e-6
  assert np.all(np.abs(y - ref) <= ulp)


def test_a_config_without_block_k_takes_128_byte_rows():
  """MosaicConfig() leaves block_k to the kernel: 256 int4 / 128 int8 rows of K per step (a K of
  384 is not a multiple of 256, so int4 refuses it by name and int8 runs)."""
  q4, s4, _, _ = _quantize(384, 128, 4, None, True)
  with pytest.raises(KernelShapeError, match="block_k=256"):
    _run(_x(1, 384), q4, s4, None, bits=4, group=None, cfg=mosaic.MosaicConfig())
  q8, s8, _, w_hat = _quantize(384, 128, 8, None, True)
  x = _x(1, 384)
  assert _rel_err(_run(x, q8, s8, None, bits=8, group=None, cfg=mosaic.MosaicConfig()), x,
                  w_hat) < 4e-3


def test_mosaic_kernel_f16_and_per_row_independence():
  """f16 activations; each output row depends on its own x row only (padding rows of x are
  zero and never leak into a real row): changing row 2 of x changes row 2 of y alone."""
  k, n, m = 256, 128, 5
  q, s, z, w_hat = _quantize(k, n, 8, None, True)
  x = _x(m, k, jnp.float16)
  y = _run(x, q, s, z, bits=8, group=None)
  assert y.dtype == jnp.float16 and _rel_err(y, x, w_hat) < 3e-3
  y2 = _run(x.at[2].multiply(-2.0), q, s, z, bits=8, group=None)
  changed = np.any(np.asarray(y2) != np.asarray(y), axis=1)
  assert changed.tolist() == [False, False, True, False, False]


def test_repack_nk_is_the_transposed_codes():
  k, n = 64, 32
  q4, *_ = _quantize(k, n, 4, 32, True)
  codes = formats.unpack_int4(q4, k)
  w4 = mosaic.repack_nk(q4, bits=4, k=k)
  assert w4.dtype == jnp.int4 and w4.shape == (n, k)
  np.testing.assert_array_equal(np.asarray(w4.astype(jnp.int8)), np.asarray(codes).T)
  # its bytes are the stored bytes transposed: the Triton kernel's w_layout="nk" codes
  as_bytes = jax.lax.bitcast_convert_type(w4.reshape(n, k // 2, 2), jnp.uint8)
  np.testing.assert_array_equal(np.asarray(as_bytes), np.asarray(q4).T)
  # odd K: the last byte's unused high nibble is dropped
  q_odd, *_ = _quantize(k - 1, n, 4, None, True)
  w_odd = mosaic.repack_nk(q_odd, bits=4, k=k - 1)
  assert w_odd.shape == (n, k - 1)
  np.testing.assert_array_equal(np.asarray(w_odd.astype(jnp.int8)),
                                np.asarray(formats.unpack_int4(q_odd, k - 1)).T)
  q8, *_ = _quantize(k, n, 8, None, True)
  w8 = mosaic.repack_nk(q8, bits=8, k=k)
  assert w8.dtype == jnp.int8 and w8.shape == (n, k)
  np.testing.assert_array_equal(np.asarray(w8), np.asarray(q8).T)


def test_default_config_fills_the_gpu_and_fits_shared_memory():
  # decode shape 4096 x 4096, int4: 32 column tiles of 128, K split until about two per SM
  cfg = mosaic.default_config(1, 4096, 4096, bits=4, group_size=128)
  assert (cfg.block_n, cfg.block_k) == (128, 256)
  assert 64 < (4096 // cfg.block_n) * cfg.split_k <= 2 * mosaic.NUM_SMS
  mosaic.check_shape(1, 4096, 4096, bits=4, group_size=128, cfg=cfg)
  # 64 rows: four stages would not fit in shared memory, so fewer
  cfg64 = mosaic.default_config(64, 4096, 4096, bits=4, group_size=128)
  assert cfg64.stages < 4
  assert mosaic.smem_bytes(cfg64, 64, bits=4, group_size=128, has_zeros=True) <= mosaic.SMEM_BYTES
  # a group longer than the 128-byte step spans steps; K splits hold whole groups
  long = mosaic.default_config(1, 4096, 4096, bits=8, group_size=1024)
  assert long.block_k == 128 and (4096 // long.split_k) % 1024 == 0


@pytest.mark.parametrize("m,k,n,bits,group,cfg,match", [
    (65, 512, 256, 8, None, mosaic.MosaicConfig(block_k=128), "M=65"),
    (1, 512, 96, 8, None, mosaic.MosaicConfig(block_n=64, block_k=128), "N=96"),
    (1, 512, 256, 8, None, mosaic.MosaicConfig(block_n=96, block_k=128), "block_n=96"),
    (1, 384, 256, 8, None, mosaic.MosaicConfig(block_k=256), "K=384"),
    (1, 512, 256, 8, None, mosaic.MosaicConfig(block_k=128, split_k=8), "split_k=8"),
    (1, 512, 256, 4, 48, mosaic.MosaicConfig(block_k=256), "group_size=48"),
    (1, 512, 256, 4, 8, mosaic.MosaicConfig(block_k=256), "group_size=8"),
    (1, 512, 256, 4, None, mosaic.MosaicConfig(block_k=None), "block_k=None"),
    (1, 512, 256, 4, None, mosaic.MosaicConfig(block_k=256, math="f64"), "math='f64'"),
    (64, 4096, 256, 8, None, mosaic.MosaicConfig(block_n=256, block_k=512, stages=8),
     "shared memory"),
    (1, 512, 256, 8, None, mosaic.MosaicConfig(block_k=128, chunk=32), "chunk=32"),
    (1, 512, 256, 8, None, mosaic.MosaicConfig(block_k=128, load="tma"), "load='tma'"),
    (1, 4096, 256, 4, 1024, mosaic.MosaicConfig(block_k=256, split_k=8), "whole groups"),
])
def test_check_shape_names_what_does_not_fit(m, k, n, bits, group, cfg, match):
  with pytest.raises(KernelShapeError, match=match):
    mosaic.check_shape(m, k, n, bits=bits, group_size=group, cfg=cfg)


def test_mosaic_kernel_refuses_codes_not_repacked_and_f32_activations():
  k, n = 256, 128
  q, s, _, _ = _quantize(k, n, 4, 64, True)
  with pytest.raises(KernelShapeError, match="repack_nk"):  # the stored packed uint8 codes
    mosaic.quantized_matmul_mosaic(_x(1, k), q, s, bits=4, group_size=64, interpret=True)
  w_nk = mosaic.repack_nk(q, bits=4, k=k)
  with pytest.raises(KernelShapeError, match="bf16 / f16"):
    mosaic.quantized_matmul_mosaic(_x(1, k, jnp.float32), w_nk, s, bits=4, group_size=64,
                                   interpret=True)


def _lower_for_sm90(m, k, n, bits, group, zeros, dtype=jnp.bfloat16, load="plain"):
  wdt = jnp.int4 if bits == 4 else jnp.int8
  g = 1 if group is None else k // group
  args = [jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((n, k), wdt),
          jax.ShapeDtypeStruct((g, n), jnp.float32)]
  if zeros:
    args.append(jax.ShapeDtypeStruct((g, n), jnp.float32))
  cfg = dataclasses.replace(mosaic.default_config(m, k, n, bits=bits, group_size=group), load=load)
  f = jax.jit(lambda *a: mosaic.quantized_matmul_mosaic(*a, bits=bits, group_size=group,
                                                        config=cfg))
  return f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("bits,zeros,dtype,load", [(8, False, jnp.bfloat16, "plain"),
                                                   (4, True, jnp.float16, "plain"),
                                                   (4, False, jnp.bfloat16, "upcast")])
def test_per_channel_kernel_lowers_for_sm90(bits, zeros, dtype, load):
  """Mosaic GPU's lowering (TMA pipeline, layout inference, wgmma with the register operand) runs
  without a GPU: a layout it cannot infer or a tile it cannot copy fails here, not on the GPU."""
  text = _lower_for_sm90(16, 4096, 4096, bits, None, zeros, dtype=dtype, load=load)
  assert "mosaic_gpu" in text


@pytest.mark.skipif(mosaic._JAX_VERSION < (0, 11),
                    reason="the grouped kernel's register slices need Mosaic GPU's layout "
                    "inference of jax >= 0.11 (the GPU machine's; it lowers there offline)")
@pytest.mark.parametrize("group,zeros", [(32, True), (128, False)])
def test_grouped_kernel_lowers_for_sm90(group, zeros):
  text = _lower_for_sm90(16, 4096, 4096, 4, group, zeros)
  assert "mosaic_gpu" in text


@pytest.mark.skipif(mosaic._JAX_VERSION >= (0, 11), reason="the guard is for jax < 0.11")
def test_grouped_kernel_refuses_an_older_mosaic_gpu_by_name():
  """On jax < 0.11 the grouped kernel would fail inside Mosaic GPU's layout inference; it says
  which version it needs instead (interpret mode, which has no layout inference, still runs)."""
  q, s, _, _ = _quantize(512, 256, 4, 64, True)
  w_nk = mosaic.repack_nk(q, bits=4, k=512)
  args = (jax.ShapeDtypeStruct((1, 512), jnp.bfloat16), w_nk, s)
  f = jax.jit(lambda *a: mosaic.quantized_matmul_mosaic(*a, bits=4, group_size=64))
  with pytest.raises(KernelShapeError, match="jax >= 0.11"):
    f.trace(*args).lower(lowering_platforms=("cuda",))
