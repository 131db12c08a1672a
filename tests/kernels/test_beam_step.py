"""kernels.beam_step: the Triton kernel (interpret mode on CPU) + its XLA merge against the pure-jnp
reference (log_softmax + add + lax.top_k over W x V), ties, -inf tokens / beams / rows, bf16,
hand-computed steps, the argument checks, and the kernel's lowering for a CUDA GPU."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.beam_step import (MAX_K, GpuConfig, beam_step, beam_step_gpu, beam_step_reference,
                               choose_impl, log_softmax_topk)
from kernels.beam_step import gpu as bgpu
from tests.kernels.triton_ir import cuda_lowering

beam_step_module = importlib.import_module("kernels.beam_step")

NEG = -np.inf


def _inputs(b, w, v, seed=0, dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(seed))
  logits = (3.0 * jax.random.normal(k1, (b, w, v))).astype(dtype)
  scores = jax.random.normal(k2, (b, w)) - 3.0
  return logits, scores


def _check_equal(out, ref):
  """Indices exactly, values and lse to float rounding (the lse is summed in another order)."""
  np.testing.assert_array_equal(out.beam_BxK, ref.beam_BxK)
  np.testing.assert_array_equal(out.token_BxK, ref.token_BxK)
  np.testing.assert_allclose(out.values_BxK, ref.values_BxK, rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(out.lse_BxW, ref.lse_BxW, rtol=2e-6, atol=2e-6)
  assert out.values_BxK.dtype == jnp.float32 and out.beam_BxK.dtype == jnp.int32
  assert out.token_BxK.dtype == jnp.int32


def _kernel(logits, scores, k, **cfg):
  return beam_step(logits, scores, k, impl="pallas", interpret=True,
                   config=GpuConfig(**cfg) if cfg else None)


# (B, W, V, K, block_v, splits): one block with a ragged tail, several blocks, blocks over splits
# (uneven, one per split), the default tiling (config None)
CASES = [(2, 1, 37, 1, 64, 1), (2, 3, 37, 6, 16, 1), (1, 4, 300, 8, 64, 2), (2, 3, 300, 1, 128, 3),
         (1, 4, 1000, 8, 256, 1), (2, 3, 1000, 6, 128, 4), (2, 3, 300, 6, None, None)]


@pytest.mark.parametrize("b,w,v,k,block,splits", CASES)
def test_kernel_matches_reference(b, w, v, k, block, splits):
  logits, scores = _inputs(b, w, v, seed=v + k)
  cfg = {} if block is None else dict(block_v=block, splits=splits)
  out = _kernel(logits, scores, k, **cfg)
  assert out.values_BxK.shape == (b, k) and out.lse_BxW.shape == (b, w)
  _check_equal(out, beam_step_reference(logits, scores, k))
  assert np.all(np.diff(np.asarray(out.values_BxK), axis=1) <= 0)


def test_rounds_insertion_matches_while_insertion():
  logits, scores = _inputs(2, 3, 300, seed=5)
  ref = beam_step_reference(logits, scores, 6)
  _check_equal(_kernel(logits, scores, 6, block_v=64, splits=2, insert="rounds"), ref)


def test_ties_go_to_the_smaller_flat_index():
  # hand-built: both beams hold [1, 3, 3, 0, 3] with equal scores: the three 3s of beam 0 in token
  # order, then beam 1's first 3 (lax.top_k on the flattened array)
  row = jnp.asarray([1.0, 3.0, 3.0, 0.0, 3.0])
  logits, scores = jnp.stack([row, row])[None], jnp.zeros((1, 2))
  for out in (beam_step(logits, scores, 4, impl="xla"), _kernel(logits, scores, 4, block_v=16)):
    assert np.asarray(out.beam_BxK).tolist() == [[0, 0, 0, 1]]
    assert np.asarray(out.token_BxK).tolist() == [[1, 2, 4, 1]]
  # many ties within blocks, across blocks, across splits and across beams (beam 1 copies beam 0)
  x = jax.random.randint(jax.random.key(1), (2, 3, 37), 0, 3).astype(jnp.float32)
  x = x.at[:, 1].set(x[:, 0])
  scores = jnp.asarray([[0.0, 0.0, 0.0], [-1.0, -1.0, 0.0]])
  ref = beam_step_reference(x, scores, 6)
  for splits in (1, 2):
    _check_equal(_kernel(x, scores, 6, block_v=16, splits=splits), ref)


def test_masked_tokens_dead_beams_and_rows_of_minus_inf():
  v = 37
  x = np.array(_inputs(3, 4, v, seed=3)[0])
  s = np.zeros((3, 4), np.float32)
  # batch 0: beam 0 has 3 finite tokens, beam 1 is dead, beam 2 is all -inf, beam 3 has 2 finite
  x[0, 0, 3:] = NEG
  s[0, 1] = NEG
  x[0, 2] = NEG
  x[0, 3, :20] = NEG
  x[0, 3, 22:] = NEG
  # batch 1: one finite candidate; batch 2: nothing finite at all (tokens 0..7 of beam 0)
  x[1, 0] = NEG
  s[1, [1, 3]] = NEG
  x[1, 2, 1:] = NEG
  s[2] = NEG
  x, s = jnp.asarray(x), jnp.asarray(s)
  ref = beam_step_reference(x, s, 8)
  assert np.isfinite(np.asarray(ref.values_BxK)).sum(axis=1).tolist() == [5, 1, 0]
  assert np.asarray(ref.token_BxK[2]).tolist() == list(range(8))
  assert np.asarray(ref.lse_BxW[0, 2]) == NEG and not np.any(np.isnan(ref.values_BxK))
  _check_equal(_kernel(x, s, 8, block_v=16, splits=2), ref)


def test_bf16_logits():
  logits, scores = _inputs(2, 3, 300, seed=7, dtype=jnp.bfloat16)  # rounding makes many ties
  out = _kernel(logits, scores, 6, block_v=128, splits=1)
  _check_equal(out, beam_step_reference(logits, scores, 6))
  expected = beam_step_reference(logits.astype(jnp.float32), scores, 6)
  np.testing.assert_array_equal(out.token_BxK, expected.token_BxK)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_candidates_are_score_plus_log_prob(impl):
  # beam 0 is flat (p = 1/37, large logits), beam 1 peaks at token 5 (small logits). Batch 0 needs
  # the log-sum-exp (raw logits would put beam 0 first), batch 1 the beam score (log-probs alone
  # would put beam 1 first).
  v = 37
  flat = np.full(v, 5.0, np.float32)
  peak = np.full(v, -5.0, np.float32)
  peak[5] = 0.0
  logits = jnp.asarray(np.stack([np.stack([flat, peak])] * 2))
  scores = jnp.asarray([[0.0, -2.0], [0.0, -4.0]])
  kw = dict(interpret=True, config=GpuConfig(block_v=16)) if impl == "pallas" else {}
  out = beam_step(logits, scores, 2, impl=impl, **kw)
  log_p_peak = -math.log(1 + 36 * math.exp(-5.0))
  assert np.asarray(out.beam_BxK).tolist() == [[1, 0], [0, 0]]
  assert np.asarray(out.token_BxK).tolist() == [[5, 0], [0, 1]]
  np.testing.assert_allclose(out.values_BxK, [[-2 + log_p_peak, -math.log(v)],
                                              [-math.log(v), -math.log(v)]], rtol=1e-6)
  np.testing.assert_allclose(out.lse_BxW[0], [5 + math.log(v), -5 + math.log(math.exp(5) + 36)],
                             rtol=1e-6)


def test_log_softmax_topk_rows():
  x = 3.0 * jax.random.normal(jax.random.key(9), (2, 3, 300))
  x = x.at[0, 1].set(-jnp.inf)
  got = log_softmax_topk(x, 5, impl="pallas", interpret=True,
                         config=GpuConfig(block_v=64, splits=2))
  ref = log_softmax_topk(x, 5, impl="xla")
  assert got.values_RxK.shape == (2, 3, 5) and got.lse_R.shape == (2, 3)
  np.testing.assert_array_equal(got.index_RxK, ref.index_RxK)
  np.testing.assert_allclose(got.values_RxK, ref.values_RxK, rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(got.lse_R, ref.lse_R, rtol=2e-6)
  np.testing.assert_allclose(ref.values_RxK[1],
                             jax.lax.top_k(jax.nn.log_softmax(x[1], axis=-1), 5)[0], rtol=1e-6)
  assert np.asarray(got.index_RxK[0, 1]).tolist() == [0, 1, 2, 3, 4]  # an all -inf row


def test_argument_errors():
  logits, scores = _inputs(1, 2, 10)
  with pytest.raises(ValueError, match="impl must be one of"):
    beam_step(logits, scores, 2, impl="triton")
  with pytest.raises(ValueError, match=r"k must be in \[1, W x V\] = \[1, 20\]"):
    beam_step(logits, scores, 21, impl="xla")
  with pytest.raises(ValueError, match="k must be in"):
    beam_step(logits, scores, 0)
  with pytest.raises(ValueError, match="k must be an int"):
    beam_step(logits, scores, 2.0)
  with pytest.raises(ValueError, match=f"k=33 > {MAX_K}"):
    beam_step(jnp.zeros((1, 4, 40)), jnp.zeros((1, 4)), 33, impl="pallas", interpret=True)
  with pytest.raises(ValueError, match=r"scores_BxW must be \[B, W\] = \[1, 2\]"):
    beam_step(logits, scores[:, :1], 2)
  with pytest.raises(ValueError, match="logits_BxWxV must be 3-D"):
    beam_step(logits[0], scores, 2)
  with pytest.raises(ValueError, match="logits must be a float array"):
    beam_step(logits.astype(jnp.int32), scores, 2)
  with pytest.raises(ValueError, match="needs a GPU"):
    beam_step(logits, scores, 2, impl="pallas")
  with pytest.raises(ValueError, match=r"k must be in \[1, V\] = \[1, 10\]"):
    log_softmax_topk(logits, 11)
  for cfg, msg in ((GpuConfig(block_v=48), "block_v=48"), (GpuConfig(block_v=16, splits=2),
                                                           "splits=2"),
                   (GpuConfig(insert="sort"), "insert must be")):
    with pytest.raises(ValueError, match=msg):
      beam_step(logits, scores, 2, impl="pallas", interpret=True, config=cfg)
  # k up to W x V works (a row gives at most V candidates)
  out = beam_step(logits, scores, 20, impl="pallas", interpret=True)
  _check_equal(out, beam_step_reference(logits, scores, 20))


def test_choose_impl_and_default_tiling(monkeypatch):
  assert choose_impl(8) == "xla"  # CPU
  monkeypatch.setattr(beam_step_module, "GPU_MEASURED", False)
  assert choose_impl(8, platform="gpu") == "xla"  # not measured on a GPU: XLA
  monkeypatch.setattr(beam_step_module, "GPU_MEASURED", True)
  assert choose_impl(8, platform="gpu") == ("pallas" if jax.device_count() == 1 else "xla")
  assert choose_impl(64, platform="gpu") == "xla" and choose_impl(8, impl="pallas") == "pallas"
  assert choose_impl(8, platform="gpu", interpret=True) == "xla"
  # a few long rows are split to fill the SMs (>= 2 blocks per program); many rows are not
  for rows in (1, 4, 16, 64):
    cfg = bgpu.default_config(rows, 151936)
    per = -(-(-(-151936 // cfg.block_v)) // cfg.splits)  # blocks per program
    assert cfg.block_v == 1024 and cfg.splits > 1 and per >= 2
    assert rows * cfg.splits >= bgpu.NUM_SMS or per == 2
  assert bgpu.default_config(512, 151936).splits == 1
  assert bgpu.default_config(4, 37) == GpuConfig(block_v=64, splits=1)


@pytest.mark.parametrize("insert", ["while", "rounds"])
def test_kernel_lowers_to_triton_for_cuda(insert):
  """The Pallas -> Triton IR lowering runs on this CPU-only machine (Triton's own compilation to
  PTX happens in XLA on the GPU and is checked by benchmarks/beam_step.py)."""
  x = jax.ShapeDtypeStruct((1, 3, 151936), jnp.bfloat16)
  s = jax.ShapeDtypeStruct((1, 3), jnp.float32)
  f = lambda x, s: beam_step_gpu(x, s, 8, config=GpuConfig(insert=insert, splits=8))
  text = cuda_lowering(f, x, s)  # MLIR-verified Triton modules
  assert "__gpu$xla.gpu.triton" in text and "log_softmax_topk" in text
  assert "grid_x = 3" in text and "grid_y = 8" in text  # beam rows x vocabulary splits
