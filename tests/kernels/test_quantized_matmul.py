"""kernels.quantized_matmul: the Triton and Mosaic kernels (interpret mode on CPU) against the
pure-jnp reference, the dispatcher, the custom VJP and the argument checks."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.quantized_matmul import (GpuConfig, KernelShapeError, TpuConfig, choose_impl,
                                      quantized_matmul, quantized_matmul_reference)
from kernels.quantized_matmul import gpu as qgpu
from postrl.quant import formats
from tests.kernels.triton_ir import cuda_lowering

# (bits, group_size, symmetric)
FORMATS = [(8, None, True), (8, None, False), (8, 32, True), (4, 32, True), (4, 64, False),
           (4, None, True)]


def _quantize(k, n, bits, group, symmetric, seed=0):
  w = jax.random.normal(jax.random.key(seed), (k, n), jnp.float32)
  spec = formats.QuantSpec(bits=bits, group_size=group, symmetric=symmetric)
  s, z = formats.quant_params(w, spec)
  q = formats.quantize_codes(w, s, z, spec)
  return (formats.pack_int4(q) if bits == 4 else q), s, z, formats.dequantize_codes(q, s, z, spec)


def _x(m, k, dtype=jnp.bfloat16, seed=1):
  return jax.random.normal(jax.random.key(seed), (m, k), jnp.float32).astype(dtype)


def _rel_err(y, x, w_hat):
  exact = np.asarray(x, np.float64) @ np.asarray(w_hat, np.float64)
  y = np.asarray(y.astype(jnp.float32), np.float64)
  assert np.all(np.isfinite(y))
  return np.linalg.norm(y - exact) / np.linalg.norm(exact)


@pytest.mark.parametrize("bits,group,symmetric", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 128])
def test_gpu_kernel_matches_exact_product(bits, group, symmetric, m):
  k, n = 256, 64
  q, s, z, w_hat = _quantize(k, n, bits, group, symmetric)
  x = _x(m, k)
  cfg = GpuConfig(block_m=16, block_n=32, block_k=64, split_k=2 if m < 16 else 1)
  y = quantized_matmul(x, q, s, bits=bits, group_size=group, zeros=z, impl="pallas_gpu",
                       interpret=True, config=cfg)
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  # bf16 output rounding is ~2e-3 relative; a swapped nibble, a wrong zero-point sign or a scale on
  # the wrong group gives O(1).
  assert _rel_err(y, x, w_hat) < 8e-3


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, False), (4, 32, True), (4, None, True),
                                                  (8, 128, True)])
@pytest.mark.parametrize("m", [1, 17])
def test_tpu_kernel_matches_exact_product(bits, group, symmetric, m):
  k, n = 512, 256
  q, s, z, w_hat = _quantize(k, n, bits, group, symmetric)
  x = _x(m, k)
  y = quantized_matmul(x, q, s, bits=bits, group_size=group, zeros=z, impl="pallas_tpu",
                       interpret=True, config=TpuConfig(block_m=8, block_n=128, block_k=256))
  assert y.shape == (m, n)
  assert _rel_err(y, x, w_hat) < 8e-3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, None, False), (4, 128, False),
                                                  (8, None, True), (8, 64, False)])
def test_gpu_kernel_magic_unpack_matches_exact_product(dtype, bits, group, symmetric):
  # the exponent trick leaves c + 8 + 128 (bf16) or c + 8 + 1024 (f16) in an int4 tile, and int8
  # codes as two such nibbles; a wrong offset correction shifts every output by a multiple of sum(x)
  k, n = 256, 64
  q, s, z, w_hat = _quantize(k, n, bits, group, symmetric, seed=7)
  x = _x(3, k, dtype)
  cfg = GpuConfig(block_m=16, block_n=32, block_k=64, split_k=2, unpack="magic")
  y = quantized_matmul(x, q, s, bits=bits, group_size=group, zeros=z, impl="pallas_gpu",
                       interpret=True, config=cfg)
  assert _rel_err(y, x, w_hat) < (8e-3 if dtype == jnp.bfloat16 else 1e-3)
  # float32 activations: the dot kernels' tiles would hold 2^23 + u, and removing the offset
  # from the sums would cancel most digits; refused (the fma kernel's float32 path subtracts it
  # per element and takes any activation dtype)
  with pytest.raises(KernelShapeError, match="needs bf16 or f16 activations, got float32"):
    quantized_matmul(x.astype(jnp.float32), q, s, bits=bits, group_size=group, zeros=z,
                     impl="pallas_gpu", interpret=True, config=cfg)
  with pytest.raises(KernelShapeError, match="unpack must be"):
    quantized_matmul(x, q, s, bits=bits, group_size=group, zeros=z, impl="pallas_gpu",
                     interpret=True, config=GpuConfig(block_m=16, block_n=32, unpack="lut"))


@pytest.mark.parametrize("reduce", ["step", "end"])
@pytest.mark.parametrize("unpack", ["shift", "magic"])
@pytest.mark.parametrize("bits,group,symmetric", FORMATS)
@pytest.mark.parametrize("m", [1, 3])
def test_gpu_fma_kernel_matches_exact_product(reduce, unpack, bits, group, symmetric, m):
  # the GEMV kernel: codes -> float32 (a conversion, or 2^23 + u - (2^23 + offset)), one FMA per
  # weight and row; a wrong magic offset moves every output by a multiple of sum(x), a swapped
  # row of the M tile or a swapped nibble gives O(1) errors
  k, n = 256, 64
  q, s, z, w_hat = _quantize(k, n, bits, group, symmetric, seed=3)
  x = _x(m, k, seed=m)
  cfg = GpuConfig(block_m=4 if m == 3 else 1, block_n=32, block_k=64, split_k=2, kernel="fma",
                  unpack=unpack, fma_reduce=reduce)
  y = quantized_matmul(x, q, s, bits=bits, group_size=group, zeros=z, impl="pallas_gpu",
                       interpret=True, config=cfg)
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  assert _rel_err(y, x, w_hat) < 8e-3


@pytest.mark.parametrize("unpack", ["shift", "magic"])
@pytest.mark.parametrize("bits,group,symmetric", [(8, None, False), (8, 32, True), (4, 32, False),
                                                  (4, None, True)])
@pytest.mark.parametrize("m", [1, 17])
def test_gpu_transposed_dot_kernel_matches_exact_product(unpack, bits, group, symmetric, m):
  # "dot_t" accumulates y^T = W^T x^T: the scales and zero points are columns there and the tile
  # is transposed back before the store; M != block_n catches a missed transpose
  k, n = 256, 64
  q, s, z, w_hat = _quantize(k, n, bits, group, symmetric, seed=5)
  x = _x(m, k, seed=11)
  cfg = GpuConfig(block_m=16, block_n=32, block_k=64, split_k=2 if m == 1 else 1,
                  kernel="dot_t", unpack=unpack)
  y = quantized_matmul(x, q, s, bits=bits, group_size=group, zeros=z, impl="pallas_gpu",
                       interpret=True, config=cfg)
  assert y.shape == (m, n)
  assert _rel_err(y, x, w_hat) < 8e-3


@pytest.mark.parametrize("kernel,unpack", [("dot", "shift"), ("dot", "magic"), ("dot_t", "shift")])
@pytest.mark.parametrize("group,symmetric", [(32, False), (None, True)])
def test_gpu_int4_split_x_load_matches_exact_product(kernel, unpack, group, symmetric):
  # x_load="split": one contiguous x load, even / odd columns split in registers; pairing a
  # nibble with the wrong column (even <-> odd) gives O(1) errors
  k, n, m = 256, 64, 17
  q, s, z, w_hat = _quantize(k, n, 4, group, symmetric, seed=7)
  x = _x(m, k, seed=13)
  cfg = GpuConfig(block_m=16, block_n=32, block_k=64, kernel=kernel, unpack=unpack,
                  x_load="split")
  y = quantized_matmul(x, q, s, bits=4, group_size=group, zeros=z, impl="pallas_gpu",
                       interpret=True, config=cfg)
  assert y.shape == (m, n)
  assert _rel_err(y, x, w_hat) < 8e-3


@pytest.mark.parametrize("kernel", ["dot", "dot_t"])
@pytest.mark.parametrize("unpack,layout,bits,group,symmetric", [
    (unpack, layout, *fmt) for unpack, layout in (("shift", "nk"), ("prmt", "kn"), ("prmt", "nk"))
    for fmt in ((4, 32, False), (4, None, True), (8, None, False), (8, 32, True))
    if unpack == "shift" or fmt[0] == 4])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_transposed_codes_and_prmt_unpack_match_exact_product(kernel, unpack, layout, bits,
                                                                  group, symmetric, dtype):
  # w_layout="nk": codes [N, K'] (K contiguous), tiles [bn, kk] contracted on their second axis; a
  # tile read along the wrong axis or a dot contracting N gives O(1) errors. unpack="prmt" (int4):
  # interpret mode runs the same bit operations as its PTX (which the emulator test below runs)
  k, n, m = 256, 64, 17
  q, s, z, w_hat = _quantize(k, n, bits, group, symmetric, seed=9)
  x = _x(m, k, dtype, seed=15)
  cfg = GpuConfig(block_m=16, block_n=32, block_k=64, split_k=2, kernel=kernel, unpack=unpack,
                  w_layout=layout)
  y = qgpu.quantized_matmul_gpu(x, q.T if layout == "nk" else q, s, z, bits=bits,
                                group_size=group, config=cfg, interpret=True)
  assert y.shape == (m, n) and y.dtype == dtype
  assert _rel_err(y, x, w_hat) < (8e-3 if dtype == jnp.bfloat16 else 1e-3)


def _run_ptx(asm: str, word_u32: np.ndarray) -> list:
  """Emulate the straight-line PTX of ``qgpu.prmt_unpack_asm`` on 32-bit words ($2): returns the
  output registers ($0, $1) as uint32 arrays. Implements only the instructions it uses, from the
  PTX ISA: mov, xor, shr.u32, prmt (default mode), lop3 and fma.rn.{bf16x2, f16x2}."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  regs = {"$2": word_u32.astype(np.uint64)}
  mask32 = np.uint64(0xFFFFFFFF)

  def val(tok):
    tok = tok.strip()
    return np.uint64(int(tok, 0)) if tok[0].isdigit() else regs[tok]

  def halves(v, kind):  # a .b32 register as two floats (low half first)
    lo, hi = (v & np.uint64(0xFFFF)).astype(np.uint16), (v >> np.uint64(16)).astype(np.uint16)
    if kind == "bf16x2":
      return [h.view(ml_dtypes.bfloat16).astype(np.float64) for h in (lo, hi)]
    return [h.view(np.float16).astype(np.float64) for h in (lo, hi)]

  def pack(lo, hi, kind):
    dt = ml_dtypes.bfloat16 if kind == "bf16x2" else np.float16
    bits = [np.asarray(h).astype(dt).view(np.uint16).astype(np.uint64) for h in (lo, hi)]
    return bits[0] | (bits[1] << np.uint64(16))

  for line in asm.splitlines():
    line = line.strip().rstrip(";")
    if line in ("{", "}") or line.startswith(".reg"):
      continue
    op, rest = line.split(None, 1)
    d, *src = [t.strip() for t in rest.split(",")]
    if op == "mov.b32":
      out = val(src[0]) * np.ones_like(word_u32, np.uint64)
    elif op == "xor.b32":
      out = val(src[0]) ^ val(src[1])
    elif op == "shr.u32":
      out = val(src[0]) >> val(src[1])
    elif op == "prmt.b32":
      both, sel, out = val(src[0]) | (val(src[1]) << np.uint64(32)), int(src[2], 0), 0
      for byte in range(4):
        nib = (sel >> (4 * byte)) & 0xF
        b = (both >> np.uint64(8 * (nib & 7))) & np.uint64(0xFF)
        if nib & 8:  # sign replicate
          b = np.where(b & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        out = out | (b << np.uint64(8 * byte))
    elif op == "lop3.b32":
      a, b, c, lut = val(src[0]), val(src[1]), val(src[2]), int(src[3], 0)
      out = np.zeros_like(a)
      for bit in range(32):
        sh = np.uint64(bit)
        idx = (((a >> sh) & np.uint64(1)) << np.uint64(2)) | (((b >> sh) & np.uint64(1)) <<
                                                             np.uint64(1)) | ((c >> sh) & np.uint64(1))
        out = out | (((np.uint64(lut) >> idx) & np.uint64(1)) << sh)
    elif op.startswith("fma.rn."):
      kind = op.split(".")[2]
      a, b, c = (halves(val(t), kind) for t in src)
      out = pack(a[0] * b[0] + c[0], a[1] * b[1] + c[1], kind)
    else:
      raise AssertionError(f"instruction the emulator does not know: {line}")
    regs[d] = out & mask32
  return [regs["$0"], regs["$1"]]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("high", [False, True])
def test_prmt_unpack_ptx_gives_the_signed_nibbles(dtype, high):
  """The inline PTX of unpack="prmt", run by an instruction-level emulator on every byte value in
  every byte position: $0 holds the codes of bytes 0 and 1 (byte 0 in the low half), $1 those of
  bytes 2 and 3, each the sign-extended low (high) nibble, exact in bf16 / f16. A wrong PRMT
  selector swaps neighbouring codes, a wrong magic constant or offset shifts every code, a
  missing XOR breaks the sign."""
  rng = np.random.default_rng(0)
  words = [np.arange(256, dtype=np.uint64) << np.uint64(8 * pos) for pos in range(4)]
  words.append(rng.integers(0, 2**32, 4096, dtype=np.uint64))
  w = np.concatenate(words)
  out = _run_ptx(qgpu.prmt_unpack_asm(dtype, high), w)
  np_dtype = np.dtype(jnp.dtype(dtype))
  got = np.stack([((r >> np.uint64(16 * h)) & np.uint64(0xFFFF)).astype(np.uint16).view(np_dtype)
                  .astype(np.float64) for r in out for h in (0, 1)], axis=1)  # [words, 4 bytes]
  nibble = np.stack([(w >> np.uint64(8 * b + (4 if high else 0))) & np.uint64(0xF)
                     for b in range(4)], axis=1).astype(np.int64)
  want = np.where(nibble >= 8, nibble - 16, nibble)
  np.testing.assert_array_equal(got, want)


def test_prmt_unpack_and_nk_layout_refuse_what_they_cannot_run():
  with pytest.raises(KernelShapeError, match="unpack='prmt' is for int4 codes"):
    qgpu.check_shape(16, 256, 64, bits=8, group_size=None, cfg=GpuConfig(unpack="prmt"))
  with pytest.raises(KernelShapeError, match="unpack='prmt' is for int4 codes"):
    qgpu.check_shape(1, 256, 64, bits=4, group_size=32,
                     cfg=GpuConfig(block_m=1, kernel="fma", unpack="prmt"))
  with pytest.raises(KernelShapeError, match="w_layout must be one of"):
    qgpu.check_shape(16, 256, 64, bits=4, group_size=32, cfg=GpuConfig(w_layout="kn8"))
  with pytest.raises(KernelShapeError, match="w_layout='nk' is for the 'dot' / 'dot_t'"):
    qgpu.check_shape(1, 256, 64, bits=4, group_size=32,
                     cfg=GpuConfig(block_m=1, kernel="fma", w_layout="nk"))
  q, s, _, _ = _quantize(256, 64, 4, 32, True)
  x = _x(3, 256)
  # the codes as stored, [K / 2, N], passed where the transposed layout is configured
  with pytest.raises(KernelShapeError, match=r"w_layout='nk' needs codes \[N, 128\]"):
    qgpu.quantized_matmul_gpu(x, q, s, bits=4, group_size=32, interpret=True,
                              config=GpuConfig(block_n=32, block_k=64, w_layout="nk"))
  with pytest.raises(KernelShapeError, match="unpack='prmt' needs bf16 or f16 activations"):
    qgpu.quantized_matmul_gpu(x.astype(jnp.float32), q, s, bits=4, group_size=32, interpret=True,
                              config=GpuConfig(block_n=32, block_k=64, unpack="prmt"))
  # the public entry point takes the codes as stored; the transposed layout is kernel-level
  with pytest.raises(ValueError, match="w_layout='nk'"):
    quantized_matmul(x, q, s, bits=4, group_size=32, impl="pallas_gpu", interpret=True,
                     config=GpuConfig(block_n=32, block_k=64, w_layout="nk"))


def test_kernel_variants_refuse_tilings_they_cannot_run():
  with pytest.raises(KernelShapeError, match="kernel must be one of"):
    qgpu.check_shape(1, 256, 64, bits=8, group_size=None, cfg=GpuConfig(kernel="wgmma"))
  with pytest.raises(KernelShapeError, match="fma kernel takes a power of two <= 8"):
    qgpu.check_shape(1, 256, 64, bits=8, group_size=None, cfg=GpuConfig(kernel="fma"))
  with pytest.raises(KernelShapeError, match="M=5 rows do not fit"):
    qgpu.check_shape(5, 256, 64, bits=8, group_size=None, cfg=GpuConfig(block_m=4, kernel="fma"))
  with pytest.raises(KernelShapeError, match="block_m=8: the Triton kernel needs powers of two"):
    qgpu.check_shape(5, 256, 64, bits=8, group_size=None, cfg=GpuConfig(block_m=8, kernel="dot_t"))
  with pytest.raises(KernelShapeError, match="x_load must be"):
    qgpu.check_shape(16, 256, 64, bits=4, group_size=32, cfg=GpuConfig(x_load="gather"))
  with pytest.raises(KernelShapeError, match="fma_reduce must be"):
    qgpu.check_shape(1, 256, 64, bits=8, group_size=None,
                     cfg=GpuConfig(block_m=1, kernel="fma", fma_reduce="tree"))
  fma = qgpu.default_config(3, 4096, 4096, bits=4, group_size=128, kernel="fma")
  assert fma.kernel == "fma" and fma.block_m == 4 and fma.split_k > 1
  assert (fma.fma_reduce, fma.unpack) == ("end", "shift")  # fastest on the H100 (int4, M = 1)
  assert qgpu.default_config(7, 4096, 4096, bits=4, group_size=128, kernel="fma").fma_reduce == (
      "step")  # 8 rows of tile-shaped accumulators do not fit the registers
  qgpu.check_shape(3, 4096, 4096, bits=4, group_size=128, cfg=fma)
  # the measured choice (H100, M = 1): int8 "dot", int4 "fma"; M > 1 "dot" (fma unmeasured there)
  assert qgpu.default_config(1, 4096, 4096, bits=8, group_size=None).kernel == "dot"
  int4 = qgpu.default_config(1, 4096, 4096, bits=4, group_size=128)
  assert (int4.kernel, int4.block_m, int4.unpack, int4.fma_reduce) == ("fma", 1, "shift", "end")
  assert qgpu.default_config(2, 4096, 4096, bits=4, group_size=128).kernel == "dot"


@pytest.mark.parametrize("kernel", ["dot", "dot_t", "fma"])
def test_every_kernel_lowers_to_triton_for_cuda(kernel):
  # Pallas -> Triton IR for CUDA, built on this CPU (compiling the IR to GPU code needs a GPU):
  # catches an op the Triton lowering does not support before device time is spent
  k, n = 4096, 14336
  for bits, group in ((8, None), (4, 128)):
    cfg = qgpu.default_config(1, k, n, bits=bits, group_size=group, kernel=kernel)
    for unpack, x_load in (("shift", "strided"), ("magic", "strided"), ("shift", "split")):
      c = dataclasses.replace(cfg, unpack=unpack, x_load=x_load)
      args = (jax.ShapeDtypeStruct((1, k), jnp.bfloat16),
              jax.ShapeDtypeStruct((k // 2, n) if bits == 4 else (k, n),
                                   jnp.uint8 if bits == 4 else jnp.int8),
              jax.ShapeDtypeStruct((1 if group is None else k // group, n), jnp.float32))
      text = cuda_lowering(functools.partial(qgpu.quantized_matmul_gpu, bits=bits,
                                             group_size=group, config=c), *args)
      assert "__gpu$xla.gpu.triton" in text and f"quantized_matmul_int{bits}_{kernel}" in text


def test_float16_activations_and_default_tiling():
  k, n = 256, 128
  q, s, z, w_hat = _quantize(k, n, 4, 128, False)
  x = _x(5, k, jnp.float16)
  y = quantized_matmul(x, q, s, bits=4, group_size=128, zeros=z, impl="pallas_gpu", interpret=True)
  assert y.dtype == jnp.float16
  assert _rel_err(y, x, w_hat) < 3e-3


def test_reference_is_dequantise_then_dot():
  q, s, z, w_hat = _quantize(96, 32, 4, 32, False)
  x = _x(4, 96, jnp.float32)
  y = quantized_matmul_reference(x, q, s, bits=4, group_size=32, zeros_GxN=z)
  np.testing.assert_allclose(y, x @ w_hat, rtol=1e-5, atol=1e-5)


def test_quantized_weight_dot_goes_through_quantized_matmul():
  w = jax.random.normal(jax.random.key(3), (64, 32))
  qw = formats.QuantizedWeight.quantize(w, "int4_g32_asym")
  x = _x(3, 64, jnp.float32)
  np.testing.assert_allclose(qw.dot(x), x @ qw.dequantize(), rtol=1e-5, atol=1e-5)
  nf4 = formats.QuantizedWeight.quantize(w, "nf4")
  np.testing.assert_allclose(nf4.dot(x), x @ nf4.dequantize(), rtol=1e-5, atol=1e-5)


def test_leading_dims_are_flattened():
  q, s, _, w_hat = _quantize(64, 32, 8, None, True)
  x = jax.random.normal(jax.random.key(4), (2, 3, 64)).astype(jnp.bfloat16)
  y = quantized_matmul(x, q, s, bits=8, impl="pallas_gpu", interpret=True,
                       config=GpuConfig(block_m=16, block_n=32, block_k=32))
  assert y.shape == (2, 3, 32)
  assert _rel_err(y.reshape(6, 32), x.reshape(6, 64), w_hat) < 8e-3


def test_custom_vjp_gives_the_gradients_of_the_reference():
  k, n = 128, 32
  q, s, z, _ = _quantize(k, n, 4, 32, False)
  x = _x(3, k, jnp.float32).astype(jnp.bfloat16)
  dy = jax.random.normal(jax.random.key(5), (3, n))

  def loss(impl, x_, s_, z_):
    y = quantized_matmul(x_, q, s_, bits=4, group_size=32, zeros=z_, impl=impl, interpret=True,
                         config=GpuConfig(block_m=16, block_n=32, block_k=32) if impl != "xla"
                         else None)
    return jnp.sum(y.astype(jnp.float32) * dy)

  g_kernel = jax.grad(functools.partial(loss, "pallas_gpu"), argnums=(0, 1, 2))(x, s, z)
  g_ref = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(x, s, z)
  for a, b in zip(g_kernel, g_ref):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6)
  w_hat = formats.dequantize_codes(formats.unpack_int4(q), s, z,
                                   formats.QuantSpec(bits=4, group_size=32, symmetric=False))
  expected_dx = np.asarray(dy) @ np.asarray(w_hat.astype(jnp.bfloat16), np.float32).T
  np.testing.assert_allclose(np.asarray(g_kernel[0], np.float32), expected_dx, rtol=2e-2, atol=2e-2)
  assert float(jnp.abs(g_kernel[1]).sum()) > 0  # scales do get their gradient


def test_auto_uses_xla_on_cpu_and_for_unsupported_shapes():
  assert choose_impl(1, 4096, 4096, bits=4, group_size=128, dtype=jnp.bfloat16) == "xla"  # CPU
  assert choose_impl(1, 4096, 4096, bits=4, group_size=128, dtype=jnp.bfloat16,
                     platform="gpu") in ("pallas_gpu", "xla")
  # float32 activations, N not a multiple of 16, or large M: XLA even on a GPU
  if jax.device_count() == 1:
    assert choose_impl(1, 4096, 4096, bits=8, group_size=None, dtype=jnp.bfloat16,
                       platform="gpu") == "pallas_gpu"
  assert choose_impl(1, 4096, 4096, bits=8, group_size=None, dtype=jnp.float32,
                     platform="gpu") == "xla"
  assert choose_impl(1, 4096, 4100, bits=8, group_size=None, dtype=jnp.bfloat16,
                     platform="gpu") == "xla"
  assert choose_impl(4096, 4096, 4096, bits=8, group_size=None, dtype=jnp.bfloat16,
                     platform="gpu") == "xla"
  assert choose_impl(1, 64, 64, bits=8, group_size=None, dtype=jnp.bfloat16, impl="pallas",
                     platform="tpu") == "pallas_tpu"


def test_auto_keeps_xla_on_a_tpu_until_the_kernel_is_measured(monkeypatch):
  import kernels.quantized_matmul as qmm  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  args = dict(bits=8, group_size=None, dtype=jnp.bfloat16, platform="tpu")
  assert not qmm.TPU_MEASURED
  assert choose_impl(1, 4096, 4096, **args) == "xla"
  monkeypatch.setattr(qmm, "TPU_MEASURED", True)
  assert choose_impl(1, 4096, 4096, **args) == "pallas_tpu"


def test_shapes_the_tiling_cannot_cover_raise_clear_errors():
  q, s, _, _ = _quantize(96, 48, 8, None, True)
  x = _x(2, 96)
  with pytest.raises(KernelShapeError, match="N=48 is not a multiple of block_n=32"):
    quantized_matmul(x, q, s, bits=8, impl="pallas_gpu", interpret=True,
                     config=GpuConfig(block_m=16, block_n=32, block_k=32))
  with pytest.raises(KernelShapeError, match="K=96 is not a multiple of block_k=64"):
    quantized_matmul(x, q, s, bits=8, impl="pallas_gpu", interpret=True,
                     config=GpuConfig(block_m=16, block_n=16, block_k=64))
  with pytest.raises(KernelShapeError, match="powers of two"):
    qgpu.check_shape(1, 96, 48, bits=8, group_size=None, cfg=GpuConfig(block_k=48))
  # the same call through auto falls back to XLA: the reference to float32 rounding (the XLA path
  # scales after the sum over K, the reference before)
  y = quantized_matmul(x.astype(jnp.float32), q, s, bits=8)
  ref = quantized_matmul_reference(x.astype(jnp.float32), q, s, bits=8)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6 * float(jnp.abs(ref).max()))


def test_bad_arguments_name_the_field():
  q, s, z, _ = _quantize(64, 32, 4, 32, False)
  x = _x(2, 64)
  with pytest.raises(ValueError, match="needs w_q of dtype uint8"):
    quantized_matmul(x, q.astype(jnp.int8), s, bits=4, group_size=32)
  with pytest.raises(ValueError, match=r"scales must be \[G, N\] = \[2, 32\]"):
    quantized_matmul(x, q, s[:1], bits=4, group_size=32)
  with pytest.raises(ValueError, match=r"zeros must be"):
    quantized_matmul(x, q, s, bits=4, group_size=32, zeros=z[:, :16])
  with pytest.raises(ValueError, match="x has K=66, so w_q needs 33 rows"):
    quantized_matmul(_x(2, 66), q, s, bits=4, group_size=32)
  with pytest.raises(ValueError, match="bits must be 8 or 4"):
    quantized_matmul(x, q, s, bits=2)
  with pytest.raises(ValueError, match="impl must be one of"):
    quantized_matmul(x, q, s, bits=4, group_size=32, impl="cuda")


def test_default_gpu_config_splits_k_for_decode_and_not_for_prefill():
  decode = qgpu.default_config(1, 4096, 4096, bits=4, group_size=128, kernel="dot")
  prefill = qgpu.default_config(2048, 4096, 4096, bits=4, group_size=128)
  assert decode.split_k > 1 and decode.block_m == 16
  assert prefill.split_k == 1 and prefill.block_m == 128
  qgpu.check_shape(1, 4096, 4096, bits=4, group_size=128, cfg=decode)


@pytest.mark.parametrize("bits,group,symmetric", FORMATS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_xla_path_matches_the_exact_product_and_the_reference(bits, group, symmetric, dtype):
  """``impl="xla"`` (``quantized_matmul_xla``): per-channel scales after the matmul of the codes,
  group-wise ones through the reference. Within x's rounding of the exact product; float32 x
  agrees with the reference to float32 rounding (a dropped zero-point term or a scale applied
  twice is O(1))."""
  from kernels.quantized_matmul import quantized_matmul_xla  # pylint: disable=import-outside-toplevel
  k, n = 96, 40
  q, s, z, w_hat = _quantize(k, n, bits, group, symmetric)
  x = _x(5, k, dtype) * 3.0
  y = quantized_matmul(x, q, s, bits=bits, group_size=group, zeros=z, impl="xla")
  assert y.shape == (5, n) and y.dtype == dtype
  assert _rel_err(y, x, w_hat) < (1e-5 if dtype == jnp.float32 else 8e-3)
  direct = quantized_matmul_xla(x, q, s, bits=bits, group_size=group, zeros_GxN=z)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(direct, np.float32))
  if dtype == jnp.float32:
    ref = quantized_matmul_reference(x, q, s, bits=bits, group_size=group, zeros_GxN=z)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def _dot_weight_operands(fn, *args):
  """For each dot_general in ``fn``'s jaxpr (nested jaxprs included) whose operand is a
  ``convert_element_type``: what the converted value is made by ("input" for a jaxpr input or a
  constant, else the primitive's name). The codes enter as constants of ``fn``."""
  found = []

  def walk(jx):
    made_by = {}
    for eqn in jx.eqns:
      if eqn.primitive.name == "dot_general":
        for v in eqn.invars:
          if made_by.get(v, ("input", None))[0] == "convert_element_type":
            found.append(made_by.get(made_by[v][1], ("input", None))[0])
      for out in eqn.outvars:
        made_by[out] = (eqn.primitive.name, eqn.invars[0] if eqn.invars else None)
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", param)
        if hasattr(inner, "eqns"):
          walk(inner)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_xla_path_multiplies_the_codes_and_scales_the_output():
  """Per-channel int8: the matmul's weight operand is the codes converted to x's dtype, not a
  scaled copy (what lets XLA's GPU GEMM read the int8 codes and write no dequantised [K, N]
  kernel), in the forward and in the custom VJP's d/dx; the reference converts the product s * q.
  """
  q, s, _, _ = _quantize(64, 32, 8, None, True)
  x = _x(16, 64)
  fwd = lambda x_: quantized_matmul(x_, q, s, bits=8, impl="xla")  # noqa: E731
  assert _dot_weight_operands(fwd, x) == ["input"]
  ref = lambda x_: quantized_matmul_reference(x_, q, s, bits=8)  # noqa: E731
  assert _dot_weight_operands(ref, x) == ["mul"]
  bwd = lambda x_: jax.grad(lambda a: jnp.sum(fwd(a).astype(jnp.float32)))(x_)  # noqa: E731
  assert set(_dot_weight_operands(bwd, x)) == {"input"}


def test_xla_path_gradients_match_the_reference():
  """The custom VJP through the XLA path: d/dx, d/ds and d/dz equal those of the reference (float32
  x, per-channel asymmetric int8 and group-wise int4)."""
  for bits, group in ((8, None), (4, 32)):
    q, s, z, _ = _quantize(64, 24, bits, group, False)
    x = _x(4, 64, jnp.float32)
    dy = jax.random.normal(jax.random.key(9), (4, 24))

    def loss(f, x_, s_, z_):
      return jnp.sum(f(x_, s_, z_) * dy)

    xla = lambda x_, s_, z_: quantized_matmul(x_, q, s_, bits=bits, group_size=group, zeros=z_,  # noqa: E731
                                              impl="xla")
    ref = lambda x_, s_, z_: quantized_matmul_reference(x_, q, s_, bits=bits, group_size=group,  # noqa: E731
                                                        zeros_GxN=z_)
    g = jax.grad(functools.partial(loss, xla), argnums=(0, 1, 2))(x, s, z)
    g_ref = jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2))(x, s, z)
    for a, b in zip(g, g_ref):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
