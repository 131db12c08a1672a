"""Bad input to the public kernel entry points (kernels.sampling.sample / sample_gpu,
kernels.beam_step, kernels.decode_attention): a clear error naming the argument, or one documented
result shared by the XLA path and the kernel (interpret mode), never a silently wrong one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.beam_step import beam_step, beam_step_reference, log_softmax_topk
from kernels.decode_attention import decode_attention
from kernels.sampling import sample, sample_gpu

KEY = jax.random.key(0)
KERNEL = dict(impl="pallas", interpret=True)


def test_sample_refuses_seeds_batches_of_keys_and_infinite_temperatures():
  x = jax.random.normal(KEY, (2, 16))
  cases = [((0, x), {}, "key must be one jax.random key"),  # failed inside jax.random
           ((jax.random.split(KEY, 2), x), {}, "key must be one jax.random key"),
           ((KEY, x), dict(temperature=float("inf")), "temperature must be a finite number"),
           ((KEY, x), dict(temperature=True), "temperature must be a finite number")]
  for args, kwargs, msg in cases:
    with pytest.raises(ValueError, match="sample: " + msg):
      sample(*args, **kwargs)
  # greedy needs no key; no rows give no tokens on the kernel path too (a ZeroDivisionError)
  assert int(sample(None, x[:1], temperature=0.0)[0][0]) == int(jnp.argmax(x[0]))
  token, logp = sample(KEY, jnp.zeros((0, 16)), top_p=0.5, **KERNEL)
  assert token.shape == logp.shape == (0,) and token.dtype == jnp.int32


def test_sample_gpu_refuses_settings_it_answered_with_minus_one_tokens():
  x = jax.random.normal(KEY, (2, 16))
  seeds = jnp.arange(2, dtype=jnp.uint32)
  cases = [
      ((x, seeds), dict(temperature=0.0), "temperature must be > 0"),  # token -1, no error
      ((x, seeds), dict(top_k=0), "top_k must be an integer >= 1"),  # token -1
      ((x, seeds), dict(top_p=0.0), r"top_p must be in \(0, 1\]"),  # token -1
      ((x, seeds[:1]), {}, r"seeds_B must be \[B\] = \[2\] integers"),  # read past the seeds
      ((x, seeds[:, None]), {}, r"seeds_B must be \[B\] = \[2\] integers"),  # a Pallas error
      ((x, seeds + 0.5), {}, r"seeds_B must be \[B\] = \[2\] integers"),  # truncated
      ((x[0], seeds), {}, r"logits_BxV must be 2-D"),  # "not enough values to unpack"
      ((x.astype(jnp.int32), seeds), {}, "logits_BxV must be floating point"),  # Overflow
  ]
  for args, kwargs, msg in cases:
    with pytest.raises(ValueError, match="sample_gpu: " + msg):
      sample_gpu(*args, interpret=True, **kwargs)
  token, logp, rounds = sample_gpu(jnp.zeros((0, 16)), jnp.zeros((0,), jnp.uint32), top_p=0.5,
                                   interpret=True)
  assert token.shape == logp.shape == rounds.shape == (0,)


def test_beam_step_makes_a_nan_row_nan_in_both_implementations():
  # the kernel's merge dropped a NaN beam and returned the other beams' candidates as if nothing
  # happened, where lax.top_k ranks the NaNs first; a +inf logit was dropped by both
  logits = jax.random.normal(KEY, (2, 2, 16))
  scores = jnp.zeros((2, 2))
  cases = [(logits, scores.at[0, 0].set(jnp.nan)), (logits.at[0, 1, 3].set(jnp.nan), scores),
           (logits.at[0, 0, 3].set(jnp.inf), scores)]
  clean = beam_step_reference(logits, scores, 3).values_BxK[1]
  for lg, sc in cases:
    for impl in (dict(impl="xla"), KERNEL):
      out = beam_step(lg, sc, 3, **impl)
      assert np.isnan(np.asarray(out.values_BxK[0])).all(), (impl, out)
      np.testing.assert_allclose(out.values_BxK[1], clean, rtol=1e-5)  # other rows untouched
      assert ((0 <= np.asarray(out.token_BxK)) & (np.asarray(out.token_BxK) < 16)).all()


def want_rows(x, k):
  return jax.lax.top_k(jax.nn.log_softmax(x, axis=-1), k)[0]


def test_tiny_vocabularies_run_on_the_kernel():
  # V < 9: the default tiling chose block_v = next_pow2(V) < 16 and refused it ("block_v=4"),
  # and impl="auto" takes the kernel on a GPU whatever V
  x = jax.random.normal(KEY, (3, 3))
  logp = np.asarray(x, np.float64) - np.log(np.exp(np.asarray(x, np.float64)).sum(-1,
                                                                                   keepdims=True))
  got = log_softmax_topk(x, 2, **KERNEL)
  np.testing.assert_allclose(got.values_RxK, -np.sort(-logp, axis=-1)[:, :2], rtol=1e-5)
  np.testing.assert_array_equal(got.index_RxK, np.argsort(-logp, axis=-1, kind="stable")[:, :2])
  got, want = (f(x[None], jnp.zeros((1, 3)), 4) for f in (
      lambda *a: beam_step(*a, **KERNEL), beam_step_reference))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5)

def test_log_softmax_topk_nan_rows_are_nan_in_both_implementations():
  # a NaN logit: the kernel gave -inf values and the index 2^31 - 1, past V
  x = jax.random.normal(KEY, (3, 3))
  bad = x.at[1, 1].set(jnp.nan)
  for impl in (dict(impl="xla"), KERNEL):
    out = log_softmax_topk(bad, 2, **impl)
    assert np.isnan(np.asarray(out.values_RxK[1])).all()
    np.testing.assert_array_equal(out.index_RxK[1], [0, 1])
    np.testing.assert_allclose(np.asarray(out.values_RxK)[[0, 2]],
                               np.asarray(want_rows(x, 2))[[0, 2]], rtol=1e-5)


def test_beam_step_argument_types():
  logits = jax.random.normal(KEY, (1, 2, 16))
  with pytest.raises(ValueError, match="beam_step: config must be a kernels.beam_step.GpuConfig"):
    beam_step(logits, jnp.zeros((1, 2)), 2, config="x", **KERNEL)  # AttributeError
  with pytest.raises(ValueError, match="log_softmax_topk: logits must be an array"):
    log_softmax_topk(object(), 2)
  # nested lists are arrays (an AttributeError on .dtype / .shape); no rows, no kernel grid
  out = beam_step(np.asarray(logits).tolist(), [[0.0, 0.0]], 2, impl="xla")
  np.testing.assert_allclose(out.values_BxK, beam_step(logits, jnp.zeros((1, 2)), 2).values_BxK)
  empty = beam_step(jnp.zeros((0, 2, 16)), jnp.zeros((0, 2)), 2, **KERNEL)
  assert empty.values_BxK.shape == (0, 2)


def _cache(b=1, h=4, k=2, d=16, s=8):
  keys = jax.random.split(KEY, 3)
  return (jax.random.normal(keys[0], (b, h, d)), jax.random.normal(keys[1], (b, s, k, d)),
          jax.random.normal(keys[2], (b, s, k, d)))


def test_decode_attention_refuses_shapes_and_dtypes_it_got_wrong():
  q, kc, vc = _cache()
  L = jnp.array([3])
  cases = [
      # a reshape error in XLA
      ((q[:, :3], kc, vc, L), "the 3 query heads of q_BxHxD must be a multiple of the 2"),
      ((q, kc, vc, jnp.array([2.7])), "lengths_B must be integers"),  # 3 slots by XLA, 2 kernel
      ((q, kc.astype(jnp.int32), vc.astype(jnp.int32), L), "k_BxSxKxD must be floating"),  # 0s
      ((q, kc[:, :0], vc[:, :0], L), r"the cache has no slots \(S = 0\)"),  # ZeroDivisionError
  ]
  for args, msg in cases:
    for impl in (dict(impl="xla"), KERNEL):
      with pytest.raises(ValueError, match="decode_attention: " + msg):
        decode_attention(*args, **impl)
  with pytest.raises(ValueError, match="config must be a kernels.decode_attention.GpuConfig"):
    decode_attention(q, kc, vc, L, config="x", **KERNEL)  # AttributeError
  out = decode_attention(q[:0], kc[:0], vc[:0], L[:0], **KERNEL)  # no rows: ZeroDivisionError
  assert out.shape == (0, 4, 16)


def test_decode_attention_lengths_outside_the_cache_give_nan_in_both():
  # XLA attended every slot for L > S and averaged all slots for L < 1; the kernel read past the
  # cache (another row's memory on a GPU) for L > S and divided 0 by 0 for L < 1
  q, kc, vc = _cache(b=4)
  lengths = jnp.array([3, 9, 0, -1])
  xla, kernel = (np.asarray(decode_attention(q, kc, vc, lengths, **impl))
                 for impl in (dict(impl="xla"), KERNEL))
  for out in (xla, kernel):
    assert np.isfinite(out[0]).all() and np.isnan(out[1:]).all()
  np.testing.assert_allclose(kernel[0], xla[0], rtol=1e-5)
