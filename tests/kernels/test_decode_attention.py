"""kernels.decode_attention: the flash-decoding Triton kernel (interpret mode on CPU) against the
masked-einsum reference, its chunked combination, the slots it must not read, the model's cached
decode with it, and bad input."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels.decode_attention import (GpuConfig, KernelShapeError, choose_impl, decode_attention,
                                      decode_attention_reference)
from kernels.decode_attention import gpu as dgpu
from postrl.models import ConfigError, Transformer
from postrl.sampling import generate, pad_prompts
from tests.conftest import tiny_config
from tests.kernels.triton_ir import cuda_lowering


def _inputs(b, h, k, d, s, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (b, h, d), jnp.float32)
  kc = jax.random.normal(keys[1], (b, s, k, d), jnp.float32).astype(dtype)
  vc = jax.random.normal(keys[2], (b, s, k, d), jnp.float32).astype(dtype)
  return q, kc, vc


def _naive(q, kc, vc, lengths):
  """float64 numpy: out[b, h] = softmax(q k^T / sqrt(d)) v over the first L_b slots."""
  q, kc, vc = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, kc, vc))
  b, h, d = q.shape
  g = h // kc.shape[2]
  out = np.zeros((b, h, d))
  for i in range(b):
    n = int(lengths[i])
    for j in range(h):
      s = kc[i, :n, j // g] @ q[i, j] / np.sqrt(d)
      p = np.exp(s - s.max())
      out[i, j] = (p / p.sum()) @ vc[i, :n, j // g]
  return out


@pytest.mark.parametrize("h,k,d,cfg", [
    (6, 2, 64, GpuConfig(block_s=16, chunks=1)),   # 3 query heads per kv head, one chunk
    (6, 2, 64, GpuConfig(block_s=16, chunks=3)),   # chunks combined in XLA, a ragged last one
    (4, 4, 16, GpuConfig(block_s=32)),             # multi-head (G = 1), default chunks
    (16, 1, 32, GpuConfig(block_s=16, chunks=4)),  # multi-query, G = 16 (no padding)
])
def test_kernel_equals_the_definition_in_float32(h, k, d, cfg):
  q, kc, vc = _inputs(3, h, k, d, 100, jnp.float32)
  lengths = jnp.array([1, 37, 100])  # one slot, a ragged block, the full cache
  got = decode_attention(q, kc, vc, lengths, impl="pallas", interpret=True, config=cfg)
  want = _naive(q, kc, vc, lengths)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
  ref = decode_attention_reference(q, kc, vc, lengths)
  np.testing.assert_allclose(np.asarray(ref), want, rtol=2e-5, atol=2e-5)


def test_slots_past_the_length_are_never_read_and_bfloat16():
  q, kc, vc = _inputs(2, 4, 2, 64, 80, jnp.bfloat16, seed=1)
  lengths = jnp.array([5, 64])
  poisoned = [a.at[0, 5:].set(jnp.nan).at[1, 64:].set(jnp.inf) for a in (kc, vc)]
  for chunks in (1, 2):
    got = decode_attention(q, *poisoned, lengths, impl="pallas", interpret=True,
                           config=GpuConfig(block_s=16, chunks=chunks))
    assert got.dtype == jnp.bfloat16 and np.isfinite(np.asarray(got, np.float32)).all()
    ref = decode_attention_reference(q, kc, vc, lengths)  # clean cache, masked einsum
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                               atol=2e-2)  # bf16 output rounding


def test_combine_weights_chunks_by_their_maxima():
  """Two chunks with very different maxima: the combination is the softmax over both."""
  acc = jnp.array([[[[[1.0]], [[2.0]]]]])  # [B=1, K=1, C=2, G=1, D=1]
  m = jnp.array([[[[0.0], [50.0]]]])
  l = jnp.array([[[[1.0], [1.0]]]])
  out = dgpu.combine_chunks(acc, m, l)
  np.testing.assert_allclose(np.asarray(out).ravel(), [2.0], rtol=1e-6)  # e^-50 weight on chunk 0
  m_empty = jnp.array([[[[0.0], [-jnp.inf]]]])  # an empty chunk weighs nothing
  out = dgpu.combine_chunks(acc, m_empty, jnp.array([[[[1.0], [0.0]]]]))
  np.testing.assert_allclose(np.asarray(out).ravel(), [1.0])


def test_default_chunks_and_bad_shapes():
  assert dgpu.default_chunks(1, 3, 320, 64) == 2  # few programs: split, but >= 2 blocks a chunk
  assert dgpu.default_chunks(1, 8, 8192, 64) == 33  # long context: ~2 programs per SM
  assert dgpu.default_chunks(256, 8, 320, 64) == 1  # large batch: one chunk per (row, head)
  q, kc, vc = _inputs(1, 6, 2, 64, 32, jnp.float32)
  cases = [(dict(config=GpuConfig(block_s=48)), KernelShapeError, "block_s=48"),
           (dict(config=GpuConfig(chunks=0)), KernelShapeError, "chunks=0"),
           (dict(impl="cuda"), ValueError, "impl must be one of")]
  for kwargs, err, msg in cases:
    with pytest.raises(err, match=msg):
      decode_attention(q, kc, vc, jnp.array([3]), **dict(dict(impl="pallas", interpret=True),
                                                         **kwargs))
  with pytest.raises(KernelShapeError, match="head_dim=24"):
    dgpu.check_shapes(6, 2, 24, GpuConfig())
  with pytest.raises(KernelShapeError, match="at most 16"):
    dgpu.check_shapes(64, 2, 64, GpuConfig())
  with pytest.raises(ValueError, match=r"lengths_B has shape \(2,\)"):
    decode_attention(q, kc, vc, jnp.array([3, 4]))
  with pytest.raises(ValueError, match="do not agree"):
    decode_attention(q, kc, vc[..., :32], jnp.array([3]))
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="needs a GPU .* interpret=True"):
      decode_attention(q, kc, vc, jnp.array([3]), impl="pallas")


def test_auto_is_the_kernel_on_one_gpu(monkeypatch):
  assert choose_impl("auto") == "xla" and choose_impl("pallas") == "pallas"  # CPU
  # several devices (the test session has 8 CPU devices): XLA partitions, the kernel would not
  assert jax.device_count() > 1 and choose_impl("auto", platform="gpu") == "xla"
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert choose_impl("auto", platform="gpu") == "pallas"  # measured faster on an H100
  monkeypatch.setattr(importlib.import_module("kernels.decode_attention"), "GPU_MEASURED", False)
  assert choose_impl("auto", platform="gpu") == "xla"


def test_kernel_lowers_to_triton_for_a_gpu():
  shapes = (jax.ShapeDtypeStruct((1, 9, 64), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 320, 3, 64), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 320, 3, 64), jnp.bfloat16),
            jax.ShapeDtypeStruct((1,), jnp.int32))
  text = cuda_lowering(dgpu.decode_attention_gpu, *shapes)  # MLIR-verified Triton modules
  assert "__gpu$xla.gpu.triton" in text and "grid_x = 1" in text and "grid_y = 3" in text
  assert f"grid_z = {dgpu.default_chunks(1, 3, 320, 64)}" in text  # 2 chunks of the 320 slots


def test_model_decode_with_the_kernel_generates_the_same_tokens(monkeypatch):
  """generate with decode_attention_impl='pallas' (interpret mode on CPU) against 'xla': the same
  greedy tokens and plain-model log-probs up to float rounding, for prompts of different lengths
  (the kernel reads each row's own valid prefix)."""
  cfg = tiny_config()
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  kernel_cfg = dataclasses.replace(cfg, decode_attention_impl="pallas")
  kernel_model = nnx.merge(nnx.graphdef(Transformer(kernel_cfg, rngs=nnx.Rngs(0))), state)
  tokens, lengths = pad_prompts([[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]])
  kw = dict(max_new_tokens=6, temperature=0.0, eos_ids=())
  want = generate(model, tokens, lengths, **kw)
  module = importlib.import_module("kernels.decode_attention")
  calls = []
  kernel = module.decode_attention_gpu
  monkeypatch.setattr(module, "decode_attention_gpu",
                      lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
  got = generate(kernel_model, tokens, lengths, **kw)
  assert calls == [(3, 4, 16)] * cfg.num_hidden_layers  # traced once per layer: the decode step
  np.testing.assert_array_equal(np.asarray(got.tokens_BxN), np.asarray(want.tokens_BxN))
  np.testing.assert_allclose(np.asarray(got.model_logps_BxN), np.asarray(want.model_logps_BxN),
                             atol=1e-4)
  assert (kernel_model.config.decode_attention_impl, model.config.decode_attention_impl) == (
      "pallas", "auto")  # "auto" is XLA on this CPU


def test_model_config_refuses_an_unknown_decode_attention():
  with pytest.raises(ConfigError, match="decode_attention_impl='cuda'"):
    tiny_config(decode_attention_impl="cuda")


def test_generate_refuses_the_kernel_on_several_devices():
  cfg = tiny_config(decode_attention_impl="pallas")
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  tokens, lengths = pad_prompts([[5, 6, 7]])
  with pytest.raises(ValueError, match="decode-attention kernel runs on one device; the "
                                       "parameters span 2"):
    generate((graphdef, params), tokens, lengths, max_new_tokens=2, temperature=0.0)


def test_auto_in_the_model_keeps_xla_for_head_layouts_the_kernel_cannot_take(monkeypatch):
  """The model's "auto" takes the kernel on one GPU only for head layouts it accepts (head_dim a
  power of two >= 16, at most 16 query heads per key/value head); "pallas" always (an unsupported
  layout is then the kernel's clear error); "xla" never."""
  from postrl.models.transformer import _decode_kernel  # pylint: disable=import-outside-toplevel
  module = importlib.import_module("kernels.decode_attention")
  monkeypatch.setattr(module, "choose_impl", lambda impl="auto", platform=None: "pallas")
  assert _decode_kernel("auto", 32, 8, 64) and _decode_kernel("auto", 9, 3, 64)
  assert not _decode_kernel("auto", 16, 2, 96)  # head_dim 96
  assert not _decode_kernel("auto", 64, 2, 128)  # 32 query heads per kv head
  assert _decode_kernel("pallas", 16, 2, 96) and not _decode_kernel("xla", 32, 8, 64)
  monkeypatch.setattr(module, "choose_impl", lambda impl="auto", platform=None: "xla")
  assert not _decode_kernel("auto", 32, 8, 64)  # a CPU, or several devices
