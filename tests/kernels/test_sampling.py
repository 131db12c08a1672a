"""kernels.sampling: the Triton rejection sampler (interpret mode on CPU) against the exact
truncated distribution (float64 numpy), its support and model log-prob against
``process_logits``, the rounds-cap fallback, the dispatcher, the argument checks and the lowering
for a GPU.

Distribution tests draw N tokens from N identical rows (each row has its own hash stream) and
compare the counts with the exact distribution by a chi-squared statistic at a fixed seed; the
threshold is the 1e-5 upper quantile, and ``test_chi_squared_rejects_the_wrong_rules`` shows that
the same counts are far above it for an off-by-one top-p boundary, top-k keeping k + 1, an ignored
temperature and min-p taken before the temperature.
"""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.sampling import (GpuConfig, KernelShapeError, choose_impl, kept_mask, sample,
                              sample_gpu, sample_reference, sort_sample)
from kernels.sampling import gpu as sgpu
from postrl.sampling.generate import sample_token
from tests.kernels.triton_ir import cuda_lowering

N = 4096  # draws per distribution test (interpret mode's cost grows faster than N beyond)
# 37 logits (three blocks of 16, a ragged tail of 5); rounded so that float32 is exact enough
ROW37 = np.round(np.random.default_rng(0).normal(size=37) * 1.5, 3)
SETTINGS = {
    "top_p": dict(temperature=0.7, top_p=0.8),
    "top_k": dict(top_k=5),
    "min_p": dict(temperature=0.8, min_p=0.1),
    "top_p_min_p": dict(temperature=1.3, top_p=0.9, min_p=0.05),
    "plain": dict(temperature=1.5),
}


def exact_probs(x, *, temperature=1.0, top_k=None, top_p=None, min_p=None, p_boundary=False,
                extra_k=0):
  """The truncated distribution in float64, written from the definitions (not process_logits).

  p_boundary / extra_k switch on wrong rules for the negative test: top-p keeping only tokens whose
  mass up to and including themselves is < p (drops the boundary token), top-k keeping k + extra_k.
  """
  z = np.asarray(x, np.float64) / temperature
  keep = np.isfinite(z)
  if top_k is not None:
    keep &= np.array([(z > zi).sum() for zi in z]) < top_k + extra_k
  if top_p is not None:
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    p /= p.sum()
    mass = np.array([p[z > zi].sum() + (p[i] if p_boundary else 0.0) for i, zi in enumerate(z)])
    keep &= mass < top_p
  if min_p is not None:
    keep &= z - z[keep].max() >= np.log(min_p)
  q = np.where(keep, np.exp(z - z[keep].max()), 0.0)
  return q / q.sum()


def chi2(counts, probs):
  """Pearson's statistic over the tokens of positive probability (inf if any other is drawn)."""
  if np.any(counts[probs == 0] > 0):
    return np.inf
  e = probs[probs > 0] * counts.sum()
  return float(np.sum((counts[probs > 0] - e) ** 2 / e))


def chi2_threshold(df, z=4.265):
  """Upper 1e-5 quantile of chi-squared(df) (Wilson-Hilferty; z = the normal 1e-5 quantile)."""
  return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def assert_matches(counts, probs):
  df = max(int((probs > 0).sum()) - 1, 1)
  stat = chi2(counts, probs)
  assert stat < chi2_threshold(df), (stat, chi2_threshold(df), counts, probs * counts.sum())


def kernel_draws(x_BxV, block, seed=1, fast_math=False, **settings):
  """The kernel alone (no fallback): tokens, model log-probs; every row must be accepted."""
  seeds = jax.random.bits(jax.random.key(seed), x_BxV.shape[:1], jnp.uint32)
  token, logp, _ = sample_gpu(x_BxV, seeds, config=GpuConfig(block=block, fast_math=fast_math),
                              interpret=True, **settings)
  token = np.asarray(token)
  assert np.all(token >= 0)
  return token, np.asarray(logp)


@functools.lru_cache(maxsize=None)
def draws(name, fast_math=False):
  """Counts of N kernel draws from ROW37 under SETTINGS[name] (cached: reused by two tests)."""
  x = jnp.tile(jnp.asarray(ROW37, jnp.float32), (N, 1))
  token, logp = kernel_draws(x, 16, fast_math=fast_math, **SETTINGS[name])
  np.testing.assert_allclose(np.asarray(logp), np.asarray(jax.nn.log_softmax(x[0]))[token],
                             rtol=1e-5, atol=1e-5)
  return np.bincount(token, minlength=ROW37.size)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_kernel_samples_the_exact_truncated_distribution(name):
  assert_matches(draws(name), exact_probs(ROW37, **SETTINGS[name]))


@pytest.mark.parametrize("name", ["top_p", "top_k", "top_p_min_p"])
def test_fast_math_samples_the_same_distribution(name):
  # GpuConfig(fast_math=True): the series / log2 / exp2 formulas of the PTX path (interpret mode
  # has no PTX, so jnp.exp2 / jnp.log2 stand in for ex2.approx / lg2.approx)
  assert_matches(draws(name, fast_math=True), exact_probs(ROW37, **SETTINGS[name]))


def _kernel_primitives(fn, *args):
  """Names of the primitives inside the pallas_call kernels of ``fn(*args)``."""
  names = []

  def walk(jaxpr, inside):
    for eqn in jaxpr.eqns:
      if inside:
        names.append(eqn.primitive.name)
      for p in eqn.params.values():
        for j in (p if isinstance(p, (tuple, list)) else (p,)):
          if hasattr(j, "jaxpr") or hasattr(j, "eqns"):
            walk(getattr(j, "jaxpr", j), inside or eqn.primitive.name == "pallas_call")
  walk(jax.make_jaxpr(fn)(*args).jaxpr, False)
  return names


def test_fast_math_reaches_the_kernels_and_draws_the_same_tokens():
  x = jnp.tile(jnp.asarray(ROW37, jnp.float32), (512, 1))
  seeds = jax.random.bits(jax.random.key(9), (512,), jnp.uint32)
  for split in (False, True):
    run = lambda fast, split=split: functools.partial(sample_gpu, top_p=0.8, interpret=True,
                                                      config=GpuConfig(block=16, chunk=16,
                                                                       split=split,
                                                                       fast_math=fast))
    exact, fast = (_kernel_primitives(run(f), x, seeds) for f in (False, True))
    assert "log1p" in exact and "exp2" not in exact
    assert "log1p" not in fast and "exp2" in fast  # the series, and exp as 2^(x log2 e)
    # the noise moves by < 1e-5: nearly every draw is the exact path's
    assert np.mean(np.asarray(run(True)(x, seeds)[0]) == np.asarray(run(False)(x, seeds)[0])) > 0.99


def test_fast_math_noise_is_the_exact_noise_to_1e5():
  """The fast formulas for -log(-log1p(-w)) and exp against the exact ones, including the
  smallest w (the largest Gumbel values) and the series / log switch at w = 1/16."""
  idx = jnp.arange(1 << 18, dtype=jnp.int32)
  key = sgpu.round_key(jnp.uint32(3), jnp.int32(0))
  exact, fast = sgpu.gumbel(key, idx), sgpu.gumbel(key, idx, "fast")
  assert np.abs(np.asarray(fast) - np.asarray(exact)).max() < 1e-5
  w = jnp.asarray(np.concatenate([2.0**-np.arange(25, 1, -1), np.linspace(1 / 16 - 1e-3, 1 / 16 +
                                  1e-3, 101), [0.5, 0.9, 1 - 2.0**-24]]), jnp.float32)
  e_exact, e_fast = sgpu._exponential(w), sgpu._exponential(w, "fast")
  np.testing.assert_allclose(np.asarray(e_fast), np.asarray(e_exact), rtol=1e-6)
  # exp as 2^(x log2 e): the rounding of x log2 e gives |x| log2(e) 2^-24 relative (7e-6 at -80)
  x = jnp.linspace(-80.0, 0.0, 4001)
  np.testing.assert_allclose(np.asarray(sgpu._exp(x, "fast")), np.exp(np.asarray(x, np.float64)),
                             rtol=1e-5, atol=1e-30)


def test_chi_squared_rejects_the_wrong_rules():
  """The statistic has the power to see an off-by-one rule: every wrong variant is far above the
  threshold on the same counts that pass against the right distribution."""
  wrong = {
      "top_p": [exact_probs(ROW37, temperature=0.7, top_p=0.8, p_boundary=True),  # boundary dropped
                exact_probs(ROW37, temperature=1.0, top_p=0.8),  # temperature ignored
                exact_probs(ROW37, temperature=0.7, top_p=0.85)],  # one more token kept
      "top_k": [exact_probs(ROW37, top_k=5, extra_k=1), exact_probs(ROW37, top_k=5, extra_k=-1)],
      "min_p": [exact_probs(ROW37, temperature=0.8, min_p=0.1 ** 1.25),  # min-p before temperature
                exact_probs(ROW37, temperature=1.0, min_p=0.1)],
      "plain": [exact_probs(ROW37, temperature=1.0)],
  }
  for name, probs_list in wrong.items():
    counts = draws(name)
    right = exact_probs(ROW37, **SETTINGS[name])
    for probs in probs_list:
      assert not np.allclose(probs, right)
      df = max(int((probs > 0).sum()) - 1, 1)
      assert chi2(counts, probs) > 3 * chi2_threshold(df), name


def test_rows_over_the_rounds_cap_fall_back_and_stay_exact():
  # a flat row and top-k 3: one round accepts with probability ~0.2, so most rows hit max_rounds=1
  x = ROW37 * 0.3
  seeds = jax.random.bits(jax.random.key(3), (1024,), jnp.uint32)
  xs = jnp.tile(jnp.asarray(x, jnp.float32), (1024, 1))
  token, _, rounds = sample_gpu(xs, seeds, top_k=3, config=GpuConfig(block=16, max_rounds=1),
                                interpret=True)
  failed = np.asarray(token) < 0
  assert 0.5 < failed.mean() < 0.95 and np.all(np.asarray(rounds) == 1)
  kept = np.asarray(kept_mask(xs[:1], top_k=3))[0]
  assert kept[np.asarray(token)[~failed]].all()
  # through sample(): failed rows are drawn again by the XLA reference; the mixture is still exact
  xs = jnp.tile(jnp.asarray(x, jnp.float32), (N, 1))
  token, logp = sample(jax.random.key(4), xs, top_k=3, impl="pallas", interpret=True,
                       config=GpuConfig(block=16, max_rounds=1))
  token = np.asarray(token)
  assert_matches(np.bincount(token, minlength=37), exact_probs(x, top_k=3))
  np.testing.assert_allclose(logp, np.asarray(jax.nn.log_softmax(xs[0]))[token], atol=1e-5)
  # with enough rounds the kernel itself accepts every row (about 1 + ln(1 / p(kept)) rounds)
  token, _, rounds = sample_gpu(xs[:1024], seeds, top_k=3, config=GpuConfig(block=16),
                                interpret=True)
  assert np.all(np.asarray(token) >= 0) and 1.5 < np.asarray(rounds).mean() < 4


def _ties_row():
  x = np.random.default_rng(5).normal(size=300) - 2.0
  x[200] = 5.0
  x[[10, 130, 299]] = 3.0  # a tie group in three blocks, one in the ragged tail (block 64)
  return x


@pytest.mark.parametrize("rule", ["top_k", "top_p"])
def test_ties_at_the_boundary_are_all_kept(rule):
  x = _ties_row()
  p_top = 1 / np.exp(x - x.max()).sum()
  # top-k 2: each tied token has one token above it; top-p just above the top token's mass: each
  # tied token has p_top above it. Both keep the whole tie group (4 tokens in all).
  settings = dict(top_k=2) if rule == "top_k" else dict(top_p=float(p_top) + 0.01)
  xs = jnp.tile(jnp.asarray(x, jnp.float32), (N // 2, 1))
  token, _ = kernel_draws(xs, 64, **settings)
  counts = np.bincount(token, minlength=300)
  probs = exact_probs(x, **settings)
  assert set(np.flatnonzero(probs)) == {10, 130, 200, 299}
  assert_matches(counts, probs)
  assert np.asarray(kept_mask(xs[:1], **settings))[0][[10, 130, 200, 299]].all()


def _random_rows(b, v, seed, dtype=jnp.float32):
  return (jax.random.normal(jax.random.key(seed), (b, v)) * 3.0).astype(dtype)


@pytest.mark.parametrize("v,block,settings", [
    (1000, 128, dict(temperature=0.8, top_p=0.9)),
    (1000, 128, dict(top_k=20, min_p=0.02)),
    (300, 64, dict(temperature=1.2, min_p=0.05)),
])
def test_every_token_is_in_the_kept_set_and_logp_is_the_models(v, block, settings):
  x = _random_rows(48, v, seed=v)
  token, logp = kernel_draws(x, block, **settings)
  keep = np.asarray(kept_mask(x, **settings))
  assert keep[np.arange(48), token].all()
  assert len(set(token.tolist())) > 24  # distinct rows draw different tokens
  ref = np.asarray(jax.nn.log_softmax(x, axis=-1))[np.arange(48), token]
  np.testing.assert_allclose(np.asarray(logp), ref, rtol=1e-5, atol=1e-5)


def test_minus_inf_logits_and_a_row_with_all_the_mass():
  x = np.array(_random_rows(3, 300, seed=8))
  x[0, :100] = -np.inf  # the first block and a half: online max / sum start from -inf
  x[1, :] = -np.inf
  x[1, 77] = 0.0  # the only finite logit: all the mass
  x[2, ::2] = -np.inf
  xs = jnp.asarray(np.repeat(x, 64, axis=0))
  for settings in (dict(top_p=0.9), dict(top_k=4, temperature=0.5)):
    token, logp = sample(jax.random.key(9), xs, impl="pallas", interpret=True,
                         config=GpuConfig(block=64), **settings)
    token, logp = np.asarray(token).reshape(3, 64), np.asarray(logp).reshape(3, 64)
    assert np.all(token[0] >= 100) and np.all(token[1] == 77) and np.all(token[2] % 2 == 1)
    np.testing.assert_allclose(logp[1], 0.0, atol=1e-6)
    assert np.all(np.isfinite(logp))
    assert np.asarray(kept_mask(xs, **settings))[np.arange(192), token.reshape(-1)].all()


def test_bfloat16_logits():
  x = _random_rows(32, 1000, seed=10, dtype=jnp.bfloat16)  # many exact ties in bf16
  token, logp = sample(jax.random.key(11), x, temperature=0.8, top_p=0.7, impl="pallas",
                       interpret=True, config=GpuConfig(block=128))
  token = np.asarray(token)
  assert np.asarray(kept_mask(x, temperature=0.8, top_p=0.7))[np.arange(32), token].all()
  ref = np.asarray(jax.nn.log_softmax(x.astype(jnp.float32), axis=-1))[np.arange(32), token]
  np.testing.assert_allclose(np.asarray(logp), ref, rtol=1e-5, atol=1e-5)


def test_xla_paths_greedy_and_the_sort_baseline():
  x = jnp.tile(jnp.asarray(ROW37, jnp.float32), (N, 1))
  key = jax.random.key(12)
  # impl="xla" is postrl's sampler, bit for bit
  token, logp = sample(key, x, top_p=0.8, temperature=0.7, impl="xla")
  ref_token, _, ref_logp = sample_token(key, x, temperature=0.7, top_k=None, top_p=0.8,
                                        min_p=None)
  np.testing.assert_array_equal(token, ref_token)
  np.testing.assert_array_equal(logp, ref_logp)
  assert_matches(np.bincount(np.asarray(token), minlength=37),
                 exact_probs(ROW37, **SETTINGS["top_p"]))
  # the sort-based baseline samples the same distribution (no ties here)
  for name in ("top_k", "top_p_min_p"):
    token, logp = jax.jit(functools.partial(sort_sample, **SETTINGS[name]))(key, x)
    assert_matches(np.bincount(np.asarray(token), minlength=37),
                   exact_probs(ROW37, **SETTINGS[name]))
  np.testing.assert_allclose(logp, np.asarray(jax.nn.log_softmax(x[0]))[np.asarray(token)],
                             atol=1e-6)
  # temperature 0 is argmax, whatever impl and truncation
  for impl in ("auto", "pallas"):
    token, logp = sample(key, x[:4], temperature=0.0, top_p=0.5, impl=impl, interpret=True)
    assert np.all(np.asarray(token) == np.argmax(ROW37))
  # top-k with top-p goes to XLA under auto (and through sample_reference, same key: same draw)
  t_auto, _ = sample(key, x[:64], top_k=5, top_p=0.8)
  t_ref, _ = sample_reference(key, x[:64], top_k=5, top_p=0.8)
  np.testing.assert_array_equal(t_auto, t_ref)


def test_hash_gives_independent_gumbel_variables():
  """The in-kernel noise: Gumbel(0, 1) moments and quantiles, no correlation between neighbouring
  indices, rounds or seeds (each of these would bias the Gumbel-max draw)."""
  idx = jnp.arange(1 << 18, dtype=jnp.int32)
  keys = [sgpu.round_key(jnp.uint32(s), jnp.int32(r)) for s, r in ((1, 0), (1, 1), (2, 0))]
  g = [np.asarray(sgpu.gumbel(k, idx), np.float64) for k in keys]
  for x in g:
    assert abs(x.mean() - np.euler_gamma) < 0.01 and abs(x.var() - np.pi**2 / 6) < 0.02
    u = np.exp(-np.exp(-x))  # the Gumbel CDF: uniform if x is Gumbel
    assert np.abs(np.quantile(u, [0.01, 0.25, 0.5, 0.75, 0.99]) - [0.01, 0.25, 0.5, 0.75, 0.99]
                  ).max() < 5e-3
    assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 0.01
    assert x.max() < 22.3 and x.min() > -2.82
  assert abs(np.corrcoef(g[0], g[1])[0, 1]) < 0.01 and abs(np.corrcoef(g[0], g[2])[0, 1]) < 0.01


def test_choose_impl(monkeypatch):
  kw = dict(temperature=1.0, top_p=0.9)
  assert choose_impl(1000, **kw) == "xla"  # CPU
  module = importlib.import_module("kernels.sampling")
  monkeypatch.setattr(module, "GPU_MEASURED", False)
  assert choose_impl(1000, platform="gpu", **kw) == "xla"  # not measured: XLA
  monkeypatch.setattr(module, "GPU_MEASURED", True)
  assert choose_impl(1000, impl="xla", platform="gpu", **kw) == "xla"
  assert choose_impl(1000, impl="pallas", **kw) == "pallas_gpu"
  # several devices (the test session has 8 CPU devices): XLA partitions, a kernel would not
  assert jax.device_count() > 1 and choose_impl(1000, platform="gpu", **kw) == "xla"
  with monkeypatch.context() as one_device:
    one_device.setattr(jax, "device_count", lambda: 1)
    assert choose_impl(1000, platform="gpu", **kw) == "pallas_gpu"
    assert choose_impl(1000, platform="gpu", batch=64, temperature=0.7, top_k=50) == "pallas_gpu"
    # the split + fast_math kernel was measured faster at every batch, and for min-p alone
    assert choose_impl(1000, platform="gpu", batch=1, **kw) == "pallas_gpu"
    assert choose_impl(1000, platform="gpu", batch=64, temperature=1.0, min_p=0.1) == "pallas_gpu"
    # no truncation at all (p = 1, min_p = 0, k >= V): XLA's one-pass Gumbel-max
    assert choose_impl(1000, platform="gpu", batch=64, temperature=1.0, top_p=1.0) == "xla"
    assert choose_impl(1000, platform="gpu", batch=64, temperature=1.0, min_p=0.0,
                       top_k=1000) == "xla"
    monkeypatch.setattr(module, "KERNEL_MIN_BATCH", 16)  # a batch floor still applies if set
    assert choose_impl(1000, platform="gpu", batch=15, **kw) == "xla"
    assert choose_impl(1000, platform="gpu", batch=16, **kw) == "pallas_gpu"
  assert choose_impl(1000, temperature=0.0, top_p=0.9, impl="pallas") == "xla"
  # top-k with top-p: XLA under auto, an error when the kernel is forced (unless k >= V)
  assert choose_impl(1000, temperature=1.0, top_k=5, top_p=0.9, platform="gpu") == "xla"
  with pytest.raises(KernelShapeError, match="top_k together with top_p"):
    choose_impl(1000, temperature=1.0, top_k=5, top_p=0.9, impl="pallas")
  assert choose_impl(1000, temperature=1.0, top_k=1000, top_p=0.9, impl="pallas") == "pallas_gpu"


def test_bad_arguments_name_the_argument():
  x = jnp.zeros((2, 10))
  key = jax.random.key(0)
  cases = [
      (dict(top_p=0.0), "top_p must be in"), (dict(top_p=1.5), "top_p must be in"),
      (dict(min_p=1.0), "min_p must be in"), (dict(min_p=-0.1), "min_p must be in"),
      (dict(top_k=0), "top_k must be an integer >= 1"), (dict(top_k=2.5), "top_k must be"),
      (dict(temperature=-1.0), "temperature must be"), (dict(impl="cuda"), "impl must be one of"),
      (dict(config=GpuConfig(block=48)), "block=48"),
      (dict(config=GpuConfig(max_rounds=0)), "max_rounds=0"),
  ]
  for kwargs, msg in cases:
    with pytest.raises(ValueError, match=msg):
      sample(key, x, **kwargs)
  with pytest.raises(ValueError, match=r"logits_BxV must be 2-D \[B, V\]"):
    sample(key, jnp.zeros((10,)))
  with pytest.raises(ValueError, match="floating point"):
    sample(key, jnp.zeros((2, 10), jnp.int32))


SPLIT_CASES = [dict(temperature=0.7, top_p=0.8), dict(top_k=5), dict(top_k=2),
               dict(temperature=0.8, min_p=0.1), dict(temperature=1.2),
               dict(top_p=0.5, min_p=0.05)]


@pytest.mark.parametrize("settings", SPLIT_CASES, ids=lambda d: "-".join(map(str, d.items())))
def test_split_path_draws_what_the_row_kernel_draws(settings):
  """The split path (each row over C programs, XLA combining per-chunk partials) draws the same
  token with the same round count and log-prob as one program per row: the noise depends only on
  (row seed, index, round), and both take the smallest index among equal scores. Chunk 64 over
  V = 300 gives 5 chunks, the last one ragged; split_rounds 1 sends every second-round row to
  the row kernel, resumed at round 1 from the rejected pivot."""
  x = jnp.asarray(_random_rows(24, 300, seed=21)) * 0.6  # flat rows: several rounds for top-k 2
  seeds = jax.random.bits(jax.random.key(22), (24,), jnp.uint32)
  want = [np.asarray(a) for a in sample_gpu(x, seeds, config=GpuConfig(block=16, split=False),
                                            interpret=True, **settings)]
  assert np.all(want[0] >= 0)
  for extra in (dict(), dict(split_rounds=1)):
    cfg = GpuConfig(block=16, chunk=64, split=True, **extra)
    assert sgpu.chunks_per_row(24, 300, cfg) == (64, 5)
    got = [np.asarray(a) for a in sample_gpu(x, seeds, config=cfg, interpret=True, **settings)]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)
  if "top_k" in settings and settings["top_k"] == 2:
    assert want[2].max() > 2  # the leftover kernel really ran


def test_split_path_draws_what_the_row_kernel_draws_with_fast_math():
  x = jnp.asarray(_random_rows(24, 300, seed=27)) * 0.6
  seeds = jax.random.bits(jax.random.key(28), (24,), jnp.uint32)
  settings = dict(temperature=0.7, top_p=0.8)
  want = sample_gpu(x, seeds, config=GpuConfig(block=16, split=False, fast_math=True),
                    interpret=True,
                    **settings)
  got = sample_gpu(x, seeds, config=GpuConfig(block=16, chunk=64, split=True, fast_math=True),
                   interpret=True, **settings)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))


def test_split_path_keeps_the_rounds_cap():
  x = jnp.asarray(_random_rows(16, 300, seed=23)) * 0.3
  seeds = jax.random.bits(jax.random.key(24), (16,), jnp.uint32)
  for cap, split_rounds in ((1, 3), (2, 1), (2, 3), (4, 2)):
    want = sample_gpu(x, seeds, top_k=2, config=GpuConfig(block=16, split=False, max_rounds=cap),
                      interpret=True)
    got = sample_gpu(x, seeds, top_k=2, interpret=True, config=GpuConfig(
        block=16, chunk=32, split=True, max_rounds=cap, split_rounds=split_rounds))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
    assert np.asarray(got[2]).max() <= cap and (np.asarray(got[0]) < 0).any()


def _assert_same_draws(got, want, cfg, settings, extra):
  """Two launch layouts' (token, log-prob, rounds): the same tokens and rounds, the same log-probs
  where a token was drawn; with top-k 2 (flat rows) and no cap, some row ran past the split
  rounds, so the continuation was compared too."""
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[2], want[2])
  ok = want[0] >= 0
  np.testing.assert_allclose(got[1][ok], want[1][ok], rtol=1e-6, atol=1e-6)
  if "top_k" in settings and "max_rounds" not in extra:
    assert want[2].max() > cfg.split_rounds * cfg.candidates  # the continuation ran


FINISH_CASES = [dict(top_k=2), dict(temperature=0.7, top_p=0.8), dict(top_p=0.5, min_p=0.05)]


@pytest.mark.parametrize("settings", FINISH_CASES, ids=lambda d: "-".join(map(str, d.items())))
@pytest.mark.parametrize("extra", [dict(), dict(split_rounds=1), dict(max_rounds=2),
                                   dict(draw="cdf"), dict(draw="cdf", candidates=2,
                                                          split_rounds=1),
                                   dict(draw="cdf", max_rounds=1, split_rounds=1)],
                         ids=lambda d: "-".join(map(str, d.items())) or "default")
def test_fused_finish_draws_what_xla_and_the_row_kernel_draw(settings, extra):
  """The finish launch (``fused_finish=True``, the default) decides the last candidates and
  continues the rejected rows in one program per row; it returns exactly the tokens, rounds and
  log-probs of XLA's decision followed by the leftover-row kernel (``fused_finish=False``),
  including rows that reach the rounds cap (token -1) and K candidates per round. Flat rows
  (x 0.3) and top-k 2 make most rows go past one round, so the continuation really runs."""
  x = jnp.asarray(_random_rows(16, 300, seed=41)) * 0.3
  seeds = jax.random.bits(jax.random.key(42), (16,), jnp.uint32)
  cfg = GpuConfig(block=16, chunk=64, split=True, **extra)
  got = [np.asarray(a) for a in sample_gpu(x, seeds, config=cfg, interpret=True, **settings)]
  want = [np.asarray(a) for a in sample_gpu(
      x, seeds, config=dataclasses.replace(cfg, fused_finish=False), interpret=True, **settings)]
  _assert_same_draws(got, want, cfg, settings, extra)


@pytest.mark.parametrize("settings", FINISH_CASES, ids=lambda d: "-".join(map(str, d.items())))
@pytest.mark.parametrize("extra", [dict(), dict(candidates=2, split_rounds=1), dict(max_rounds=2),
                                   dict(split_rounds=2)],
                         ids=lambda d: "-".join(map(str, d.items())) or "default")
def test_grid_combine_draws_what_the_separate_launches_draw(settings, extra):
  """``grid_combine=True``: the last program of each row in a mass launch decides the round and
  draws the next (or finishes) itself. In interpret mode (programs in grid order, the last in
  order the last to arrive) it returns exactly the tokens, rounds and log-probs of the separate
  locate / finish launches, with the rounds cap, K candidates and min-p."""
  x = jnp.asarray(_random_rows(16, 300, seed=41)) * 0.3
  seeds = jax.random.bits(jax.random.key(42), (16,), jnp.uint32)
  cfg = GpuConfig(block=16, chunk=64, split=True, draw="cdf", **extra)
  got = [np.asarray(a) for a in sample_gpu(
      x, seeds, config=dataclasses.replace(cfg, grid_combine=True), interpret=True, **settings)]
  want = [np.asarray(a) for a in sample_gpu(x, seeds, config=cfg, interpret=True, **settings)]
  _assert_same_draws(got, want, cfg, settings, extra)
  if "max_rounds" in extra and "top_k" in settings:
    assert (want[0] < 0).any()  # rows at the cap: token -1 from the combining program


def test_grid_combine_launches():
  """Statistics, the first locate (which zeroes the arrival counters), then one launch per round:
  5 kernels at B = 64, V = 152k with three rounds (8 without); the Gumbel draw refuses it."""
  x = jax.ShapeDtypeStruct((64, 151936), jnp.float32)
  seeds = jax.ShapeDtypeStruct((64,), jnp.uint32)
  f = functools.partial(sample_gpu, top_p=0.9, config=GpuConfig(
      draw="cdf", chunk=2048, num_warps=4, grid_combine=True))
  eqns = jax.make_jaxpr(f)(x, seeds).jaxpr.eqns[0].params["jaxpr"].jaxpr.eqns
  assert [e.params["name"] for e in eqns if e.primitive.name == "pallas_call"] == [
      "sample_split_s", "sample_cdf_locate_first", "sample_cdf_mass_combine",
      "sample_cdf_mass_combine", "sample_cdf_mass_combine_finish"]
  with pytest.raises(KernelShapeError, match="grid_combine"):
    sgpu.check_config(GpuConfig(grid_combine=True))
  with pytest.raises(KernelShapeError, match="fused_finish=False"):
    sgpu.check_config(GpuConfig(draw="cdf", grid_combine=True, fused_finish=False))


def test_split_path_samples_the_exact_truncated_distribution():
  x = jnp.tile(jnp.asarray(ROW37, jnp.float32), (2048, 1))
  seeds = jax.random.bits(jax.random.key(25), (2048,), jnp.uint32)
  for name in ("top_p", "top_k"):
    token, _, _ = sample_gpu(x, seeds, interpret=True, config=GpuConfig(
        block=16, chunk=16, split=True, split_rounds=2), **SETTINGS[name])
    token = np.asarray(token)
    assert np.all(token >= 0)
    assert_matches(np.bincount(token, minlength=37), exact_probs(ROW37, **SETTINGS[name]))


CDF = GpuConfig(block=16, chunk=32, split=True, draw="cdf", split_rounds=2)


def _exact_cdf_draws(config, seed, settings):
  """2048 draws from ROW37 with ``config``: every token drawn, the frequencies the exact
  truncated distribution, the log-prob the model's -> (x, seeds, rounds)."""
  x = jnp.tile(jnp.asarray(ROW37, jnp.float32), (2048, 1))
  seeds = jax.random.bits(jax.random.key(seed), (2048,), jnp.uint32)
  token, logp, rounds = sample_gpu(x, seeds, interpret=True, config=config, **settings)
  token, rounds = np.asarray(token), np.asarray(rounds)
  assert np.all(token >= 0) and np.all(rounds >= 1)
  assert_matches(np.bincount(token, minlength=37), exact_probs(ROW37, **settings))
  np.testing.assert_allclose(np.asarray(logp), np.asarray(jax.nn.log_softmax(x[0]))[token],
                             rtol=1e-5, atol=1e-5)
  return x, seeds, rounds


@pytest.mark.parametrize("name", list(SETTINGS))
def test_cdf_draw_samples_the_exact_truncated_distribution(name):
  """The "cdf" draw (inverse transform sampling: the chunk, then the token where the running mass
  crosses u times the round's mass) over 2 chunks of ROW37 (two blocks, then a ragged block of 5),
  two split rounds, then the row kernel
  for the rows still rejected (top-k 5 needs more rounds): the frequencies are the exact truncated
  distribution, and the log-prob is the model's."""
  assert sgpu.chunks_per_row(2048, 37, CDF) == (32, 2)
  x, seeds, rounds = _exact_cdf_draws(CDF, 25, SETTINGS[name])
  # the rounds follow the same law as the Gumbel draw's (each round's candidate has the same
  # distribution): the mean agrees to ~5 standard errors
  _, _, gumbel_rounds = sample_gpu(x, seeds, interpret=True, config=GpuConfig(block=16,
                                                                               split=False),
                                   **SETTINGS[name])
  assert abs(rounds.mean() - np.asarray(gumbel_rounds).mean()) < 0.12
  if name == "top_k":
    assert rounds.max() > 2  # rows handed to the row kernel after the two split rounds


CDF4 = dataclasses.replace(CDF, candidates=4)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_cdf_draw_with_several_candidates_samples_the_exact_truncated_distribution(name):
  """K = 4 candidates per round (accept the first that passes; all rejected: the next round's set
  is above the highest): the frequencies are the exact truncated distribution (top-k 5 needs
  several rounds and the hand-over to the row kernel), the log-prob is the model's, and rounds_B
  counts candidates (r K + k + 1)."""
  _, _, rounds = _exact_cdf_draws(CDF4, 26, SETTINGS[name])
  if name in ("plain", "min_p"):  # no check: the first candidate is taken
    assert np.all(rounds == 1)
  else:  # later candidates of round 0 are taken too, not only the first of each round
    assert np.any((rounds > 1) & (rounds <= 4))
  if name == "top_k":
    assert set(np.unique(rounds[rounds <= 4])) == {1, 2, 3, 4}


@pytest.mark.parametrize("settings", [dict(top_k=5), dict(temperature=0.7, top_p=0.8)])
def test_several_candidates_decide_more_rows_per_round(settings):
  """The point of K candidates: with top-k 5 on ROW37 (kept mass ~0.7), and with top-p 0.8, far
  fewer rows are still undecided after the first round (rounds > K) than with one candidate
  (rounds > 1), and the rounds needed in all shrink (the next pivot is the highest of K rejected
  candidates). The fractions quoted in kernels/README.md are the ones printed here (pytest -s)."""
  x = jnp.tile(jnp.asarray(ROW37, jnp.float32), (1024, 1))
  seeds = jax.random.bits(jax.random.key(27), (1024,), jnp.uint32)
  one = np.asarray(sample_gpu(x, seeds, interpret=True, config=CDF, **settings)[2])
  four = np.asarray(sample_gpu(x, seeds, interpret=True, config=CDF4, **settings)[2])
  undecided_one, undecided_four = np.mean(one > 1), np.mean(four > 4)
  print(f"{settings}: undecided after round 1: K = 1 {undecided_one:.1%}, K = 4 "
        f"{undecided_four:.1%}")
  assert undecided_four < 0.5 * undecided_one, (undecided_one, undecided_four)
  rounds_four = (four - 1) // 4 + 1  # the round (1-based) each row was decided in
  assert rounds_four.mean() < one.mean()


def test_candidates_setting_is_checked():
  for bad in (3, 0, 16):
    with pytest.raises(KernelShapeError, match="candidates="):
      sgpu.check_config(GpuConfig(draw="cdf", candidates=bad))
  with pytest.raises(KernelShapeError, match="draw='cdf' only"):
    sgpu.check_config(GpuConfig(candidates=4))


@pytest.mark.parametrize("candidates", [1, 4])
def test_cdf_draw_differs_from_gumbel_but_keeps_every_rule(candidates):
  """Larger rows over 5 chunks (the last ragged), a rejection-heavy top-k, -inf logits and a row
  whose only finite logit holds all the mass: every token in the kept set, logp the model's; and
  the draw is not the Gumbel-max one (different tokens for the same seeds)."""
  x = np.array(_random_rows(48, 300, seed=31)) * 0.6
  x[0, :100] = -np.inf
  x[1, :] = -np.inf
  x[1, 77] = 0.0
  xs = jnp.asarray(x)
  seeds = jax.random.bits(jax.random.key(32), (48,), jnp.uint32)
  cfg = GpuConfig(block=16, chunk=64, split=True, draw="cdf", split_rounds=1,
                  candidates=candidates)
  for settings in (dict(temperature=0.8, top_p=0.9), dict(top_k=2), dict(top_k=20, min_p=0.05)):
    token, logp, _ = sample_gpu(xs, seeds, config=cfg, interpret=True, **settings)
    token = np.asarray(token)
    assert np.all(token >= 0) and token[1] == 77 and token[0] >= 100
    assert np.asarray(kept_mask(xs, **settings))[np.arange(48), token].all()
    ref = np.asarray(jax.nn.log_softmax(xs, axis=-1))[np.arange(48), token]
    np.testing.assert_allclose(np.asarray(logp), ref, rtol=1e-5, atol=1e-5)
    gumbel = np.asarray(sample_gpu(xs, seeds, config=dataclasses.replace(
        cfg, draw="gumbel", candidates=1), interpret=True, **settings)[0])
    assert (gumbel != token).mean() > 0.2
  with pytest.raises(KernelShapeError, match="draw='sort'"):
    sgpu.check_config(GpuConfig(draw="sort"))


def test_cdf_launches():
  """The "cdf" draw's launches: statistics, then per round a locate launch (a program per row)
  and a mass launch (B x C), back to back; XLA only after the last, before the leftover rows'
  kernel."""
  x = jax.ShapeDtypeStruct((64, 151936), jnp.float32)
  seeds = jax.ShapeDtypeStruct((64,), jnp.uint32)
  f = functools.partial(sample_gpu, top_p=0.9, config=GpuConfig(draw="cdf"))
  eqns = jax.make_jaxpr(f)(x, seeds).jaxpr.eqns[0].params["jaxpr"].jaxpr.eqns
  calls = [(i, e.params["name"]) for i, e in enumerate(eqns) if e.primitive.name == "pallas_call"]
  names = [n for _, n in calls]
  assert names == ["sample_split_s", "sample_cdf_locate_first", "sample_cdf_mass",
                   "sample_cdf_locate", "sample_cdf_mass", "sample_cdf_locate",
                   "sample_cdf_mass", "sample_split_finish"]
  index = [i for i, _ in calls]
  assert index == list(range(index[0], index[0] + 8))  # no XLA step between any two
  # 4 candidates per round, 2 rounds: two launches fewer
  f = functools.partial(sample_gpu, top_p=0.9, config=GpuConfig(draw="cdf", candidates=4,
                                                                  split_rounds=2))
  eqns = jax.make_jaxpr(f)(x, seeds).jaxpr.eqns[0].params["jaxpr"].jaxpr.eqns
  assert [e.params["name"] for e in eqns if e.primitive.name == "pallas_call"] == [
      "sample_split_s", "sample_cdf_locate_first", "sample_cdf_mass", "sample_cdf_locate",
      "sample_cdf_mass", "sample_split_finish"]


def test_default_config_takes_the_cdf_draw_where_it_was_timed_faster():
  """``sample_gpu`` without a config: the cdf draw (one block per chunk, one candidate, 4 warps)
  for top-k / top-p from B x V = 16 x 49,152 logits and for min-p alone from 64 x 151,936, the
  Gumbel ``GpuConfig()`` below (where the H200 timed each faster); the settings are resolved
  after k >= V / p = 1 drop out."""
  v = 151936
  cdf = sgpu.default_config(64, v, top_p=0.9)
  assert (cdf.draw, cdf.candidates, cdf.chunk, cdf.block, cdf.num_warps) == ("cdf", 1, 2048,
                                                                             2048, 4)
  assert cdf.split and cdf.fast_math and cdf.max_rounds is None and cdf.fused_finish
  for batch, vocab, rules in ((256, v, dict(top_k=50)), (16, 49152, dict(top_p=0.9)),
                              (16, v, dict(top_k=50)), (64, 32000, dict(top_p=0.9)),
                              (64, v, dict(min_p=0.05))):
    assert sgpu.default_config(batch, vocab, **rules) == cdf, (batch, vocab, rules)
  for batch, vocab, rules in ((15, 49152, dict(top_p=0.9)), (16, 32000, dict(top_p=0.9)),
                              (1, v, dict(top_k=50)), (64, v, dict()), (256, v, dict()),
                              (16, v, dict(min_p=0.05))):
    assert sgpu.default_config(batch, vocab, **rules) == GpuConfig(), (batch, vocab, rules)
  def launches(batch=64, **settings):
    f = functools.partial(sample_gpu, **settings)
    eqns = jax.make_jaxpr(f)(jax.ShapeDtypeStruct((batch, 151936), jnp.float32),
                             jax.ShapeDtypeStruct((batch,), jnp.uint32)).jaxpr.eqns
    return [e.params["name"] for e in eqns[0].params["jaxpr"].jaxpr.eqns
            if e.primitive.name == "pallas_call"]
  assert "sample_cdf_mass" in launches(top_p=0.9) and "sample_cdf_mass" in launches(top_k=50)
  assert "sample_cdf_mass" in launches(16, top_p=0.9)
  for batch, settings in ((32, dict(min_p=0.05)), (32, dict(top_p=1.0, min_p=0.05)),
                          (5, dict(top_p=0.9))):  # p = 1 is not a top-p rule
    assert not any("cdf" in n for n in launches(batch, **settings)), (batch, settings)


def test_split_launches_follow_each_other_with_no_xla_step():
  """Each split launch combines the previous launch's per-chunk partials itself, and the finish
  launch the last one's: the launch 0 .. R kernels and the finish are consecutive operations (on
  a GPU no XLA kernel between them; with min-p XLA takes the row max before the first draw)."""
  x = jax.ShapeDtypeStruct((64, 151936), jnp.float32)
  seeds = jax.ShapeDtypeStruct((64,), jnp.uint32)
  for settings, launches in ((dict(top_p=0.9), 4), (dict(top_k=50, min_p=0.05), 5)):
    f = functools.partial(sample_gpu, config=GpuConfig(split=True), **settings)
    eqns = jax.make_jaxpr(f)(x, seeds).jaxpr.eqns[0].params["jaxpr"].jaxpr.eqns
    kernels = [i for i, e in enumerate(eqns) if e.primitive.name == "pallas_call"]
    assert len(kernels) == launches + 1  # and the finish launch
    assert eqns[kernels[-1]].params["name"] == "sample_split_finish"
    if "min_p" in settings:  # min-p: the row max is combined (XLA) before the first draw
      kernels = kernels[1:]
    between = {eqns[i].primitive.name for i in range(kernels[0], kernels[-1])} - {"pallas_call"}
    # [B] -> [B, 1] and [B, C] -> [B, C, 1] for the finish launch: bitcasts, no kernel on a GPU
    assert between <= {"broadcast_in_dim", "reshape"}, between


def test_chunks_per_row_aims_at_the_program_count():
  cfg = GpuConfig(split=True)  # block 2048, about 1024 programs
  assert sgpu.chunks_per_row(64, 151936, cfg) == (10240, 15)  # 75 blocks in 16 chunks of 5
  assert sgpu.chunks_per_row(1, 151936, cfg) == (2048, 75)  # one block per program
  assert sgpu.chunks_per_row(4096, 151936, cfg) == (153600, 1)  # large batch: the row kernel
  assert sgpu.chunks_per_row(64, 1000, cfg) == (2048, 1)
  assert sgpu.chunks_per_row(8, 300, GpuConfig(block=16, chunk=4096)) == (304, 1)
  for bad, msg in ((dict(chunk=100, block=64), "chunk=100"), (dict(programs=0), "programs=0"),
                   (dict(split_rounds=0), "split_rounds=0")):
    with pytest.raises(KernelShapeError, match=msg):
      sgpu.check_config(GpuConfig(**bad))


def test_no_rounds_cap_means_no_data_dependent_branch():
  """With ``max_rounds=None`` (the default) ``sample`` has no ``cond`` (on a GPU a host
  synchronisation per call); a row without a finite logit gets the reference's token 0."""
  x = jnp.asarray(_random_rows(4, 300, seed=26)).at[2].set(-jnp.inf)
  f = functools.partial(sample, top_p=0.9, impl="pallas", interpret=True)

  def conds(config):  # cond equations outside the kernels (a kernel's own branches stay on GPU)
    def walk(jaxpr):
      for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
          continue
        yield eqn.primitive.name
        for p in eqn.params.values():
          for j in (p if isinstance(p, (tuple, list)) else (p,)):
            if hasattr(j, "jaxpr") or hasattr(j, "eqns"):
              yield from walk(getattr(j, "jaxpr", j))
    closed = jax.make_jaxpr(lambda k, v: f(k, v, config=config))(jax.random.key(0), x)
    return sum(name == "cond" for name in walk(closed.jaxpr))

  assert conds(GpuConfig(block=64)) == 0 and conds(GpuConfig(block=64, split=True)) == 0
  assert conds(GpuConfig(block=64, max_rounds=8)) == 1
  for split in (False, True):
    token, logp = f(jax.random.key(0), x, config=GpuConfig(block=64, chunk=64, split=split))
    assert int(token[2]) == 0 and np.isnan(float(logp[2]))
    assert np.all(np.asarray(token)[[0, 1, 3]] > 0) and np.isfinite(np.asarray(logp)[[0, 1, 3]]).all()


def test_kernel_lowers_to_triton_for_a_gpu():
  """The kernel lowers for CUDA on this CPU-only machine (the Triton IR is built at lowering, and
  MLIR's verifier runs on every module: an ill-typed module fails here, not in the GPU compile)."""
  assert GpuConfig().split and GpuConfig().fast_math  # the defaults timed fastest on an H100
  exact = GpuConfig(fast_math=False)
  for settings in (dict(temperature=0.7, top_p=0.9), dict(top_k=50, min_p=0.05), dict()):
    f = functools.partial(sample_gpu, config=dataclasses.replace(exact, split=False), **settings)
    text = cuda_lowering(f, jax.ShapeDtypeStruct((64, 151936), jnp.bfloat16),
                         jax.ShapeDtypeStruct((64,), jnp.uint32))
    assert "__gpu$xla.gpu.triton" in text and "grid_x = 64" in text
    # the split path: launches over (row, chunk) grids, here 64 x 15
    split = functools.partial(sample_gpu, config=exact, **settings)
    text = cuda_lowering(split, jax.ShapeDtypeStruct((64, 151936), jnp.bfloat16),
                         jax.ShapeDtypeStruct((64,), jnp.uint32))
    assert "grid_x = 64" in text and "grid_y = 15" in text
    assert "approx" not in text and "__nv_log1pf" in text  # libdevice's accurate functions
    for candidates in (1, 4):
      cdf = functools.partial(sample_gpu, config=GpuConfig(draw="cdf", candidates=candidates),
                              **settings)
      text = cuda_lowering(cdf, jax.ShapeDtypeStruct((64, 151936), jnp.bfloat16),
                           jax.ShapeDtypeStruct((64,), jnp.uint32))
      assert "grid_x = 64" in text and "grid_y = 15" in text  # MLIR-verified, as above
  # fast_math: the per-element exp and logs become PTX special-function instructions (the Triton
  # IR in the custom call keeps the inline assembly's text); log1p is gone
  for split in (False, True):
    f = functools.partial(sample_gpu, top_p=0.9, config=GpuConfig(split=split, fast_math=True))
    text = cuda_lowering(f, jax.ShapeDtypeStruct((64, 151936), jnp.bfloat16),
                         jax.ShapeDtypeStruct((64,), jnp.uint32))
    assert "ex2.approx.ftz.f32" in text and "lg2.approx.ftz.f32" in text
    assert "__nv_log1pf" not in text  # (one logf per row remains: the log-prob's log S)


def test_the_kernel_without_a_gpu_is_a_clear_error():
  if jax.default_backend() in ("gpu", "cuda", "rocm"):
    pytest.skip("a GPU is present")
  with pytest.raises(ValueError, match="needs a GPU .* interpret=True"):
    sample(jax.random.key(0), jnp.zeros((2, 10)), top_p=0.9, impl="pallas")
