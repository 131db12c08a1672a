"""aggregate (four modes, hand values); kl_penalty (k1/k3 unbiased, k2 biased, k3 >= 0, clamp)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from postrl.losses._common import AGGREGATIONS, aggregate, kl_penalty

# Row 0: 2 valid tokens, row 1: 3, row 2: fully masked (with garbage values).
VALUES = np.array([[1.0, 2.0, 9.0, 9.0],
                   [3.0, 4.0, 5.0, 9.0],
                   [np.nan, np.inf, -np.inf, 7.0]], np.float32)
MASK = np.array([[1, 1, 0, 0],
                 [1, 1, 1, 0],
                 [0, 0, 0, 0]], np.float32)


@jax.jit
def _agg_all(values, mask):
  """{mode: (value, d value / d values)} for every mode (and norm_len=10), one compilation."""
  out = {}
  cases = [(m, {}) for m in AGGREGATIONS] + [("seq_mean_token_sum_norm", {"norm_len": 10.0})]
  for mode, kw in cases:
    key = mode + ("/10" if kw else "")
    out[key] = jax.value_and_grad(lambda v: aggregate(v, mask, mode=mode, **kw))(values)
  return out


@pytest.mark.parametrize("mode,expected", [
    ("token_mean", (1 + 2 + 3 + 4 + 5) / 5),                       # 15 / 5 tokens
    ("seq_mean_token_mean", (1.5 + 4.0 + 0.0) / 3),                 # empty row counts as 0, in B
    ("seq_mean_token_sum", (3.0 + 12.0 + 0.0) / 3),
    ("seq_mean_token_sum_norm", (3.0 + 12.0 + 0.0) / 3 / 4),        # default norm_len = T = 4
    ("seq_mean_token_sum_norm/10", (3.0 + 12.0 + 0.0) / 3 / 10),
])
def test_aggregate_hand_values_with_fully_masked_row(mode, expected):
  out, g = _agg_all(VALUES, MASK)[mode]
  assert out.dtype == jnp.float32 and out.shape == ()
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[MASK == 0] == 0)
  # A bool mask means the same.
  np.testing.assert_allclose(_agg_all(VALUES, MASK.astype(bool))[mode][0], expected, rtol=1e-6)


def test_aggregate_gradient_weights_by_hand():
  res = _agg_all(VALUES, MASK)
  row_len = MASK.sum(-1, keepdims=True)
  np.testing.assert_allclose(res["token_mean"][1], MASK / 5, rtol=1e-6)
  np.testing.assert_allclose(res["seq_mean_token_mean"][1], MASK / np.maximum(row_len, 1) / 3,
                             rtol=1e-6)
  np.testing.assert_allclose(res["seq_mean_token_sum"][1], MASK / 3, rtol=1e-6)
  np.testing.assert_allclose(res["seq_mean_token_sum_norm"][1], MASK / 3 / 4, rtol=1e-6)


def test_aggregate_empty_batch_and_unknown_mode():
  for mode, (value, g) in _agg_all(VALUES, np.zeros_like(MASK)).items():
    assert value == 0 and np.all(np.asarray(g) == 0), mode
  with pytest.raises(ValueError):
    aggregate(VALUES, MASK, mode="token_sum")


def test_aggregate_token_mean_weights_every_token_equally():
  # token_mean differs from seq_mean_token_mean exactly when rows have different lengths.
  v = np.array([[1.0, 1.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  m = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
  res = _agg_all(v, m)
  np.testing.assert_allclose(res["token_mean"][0], 7 / 4, rtol=1e-6)
  np.testing.assert_allclose(res["seq_mean_token_mean"][0], (1 + 4 + 0) / 3, rtol=1e-6)



def test_aggregate_fractional_mask_is_a_weight():
  # A float mask weights each token (cross_entropy documents "float values act as weights"):
  # sum m v / sum m, not an unweighted mean over the tokens where m > 0.
  v = np.array([[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]], np.float32)
  m = np.array([[0.5, 1.0, 0.0], [0.25, 0.0, 0.0]], np.float32)
  res = _agg_all(v, m)
  np.testing.assert_allclose(res["token_mean"][0], (0.5 + 3.0 + 0.5) / 1.75, rtol=1e-6)
  np.testing.assert_allclose(res["seq_mean_token_mean"][0], (3.5 / 1.5 + 0.5 / 0.25) / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(res["seq_mean_token_sum"][0], (3.5 + 0.5) / 2, rtol=1e-6)
  np.testing.assert_allclose(res["token_mean"][1], m / 1.75, rtol=1e-6)
  # weights summing to < 1 are not rescaled (only an empty row or batch is guarded)
  light = np.array([[0.25, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
  np.testing.assert_allclose(_agg_all(v, light)["token_mean"][0], 1.0, rtol=1e-6)
  np.testing.assert_allclose(_agg_all(v, light)["seq_mean_token_mean"][0], (1.0 + 0.0) / 2,
                             rtol=1e-6)

# ---------------------------------------------------------------- kl_penalty

PI_LOGITS = np.array([1.0, 0.2, -0.5, 0.7], np.float32)
REF_LOGITS = np.array([-0.3, 0.9, 0.4, 0.1], np.float32)
N = 200_000


@jax.jit
def _sampled_estimates(key):
  logpi = jax.nn.log_softmax(PI_LOGITS)
  logref = jax.nn.log_softmax(REF_LOGITS)
  y = jax.random.categorical(key, PI_LOGITS, shape=(N,))     # y ~ pi
  lp, lr = logpi[y], logref[y]
  return {k: kl_penalty(lp, lr, estimator=k) for k in ("k1", "k2", "k3")}


def _exact():
  pi = np.exp(PI_LOGITS - np.logaddexp.reduce(PI_LOGITS.astype(np.float64)))
  ref = np.exp(REF_LOGITS - np.logaddexp.reduce(REF_LOGITS.astype(np.float64)))
  log_r = np.log(ref) - np.log(pi)
  return float(np.sum(pi * -log_r)), float(np.sum(pi * 0.5 * log_r ** 2))


def test_k1_k3_unbiased_k2_biased_sampled():
  kl, e_k2 = _exact()
  est = {k: np.asarray(v, np.float64) for k, v in _sampled_estimates(jax.random.key(0)).items()}
  se = {k: v.std() / np.sqrt(N) for k, v in est.items()}
  assert kl > 100 * se["k1"]                          # the check can tell KL from -KL or 0
  for k in ("k1", "k3"):
    assert abs(est[k].mean() - kl) < 4 * se[k], (k, est[k].mean(), kl, se[k])
  # k2 estimates E[(log r)^2 / 2], not the KL: its sample mean sits there, many SEs from KL.
  assert abs(est["k2"].mean() - e_k2) < 4 * se["k2"]
  assert abs(est["k2"].mean() - kl) > 10 * se["k2"]
  assert se["k3"] < se["k1"]                          # k3's point: lower variance here
  assert np.all(est["k3"] >= 0) and np.all(est["k2"] >= 0)


@jax.jit
def _kl_cases(logps, ref, a, b):
  big0, big = jnp.float32(0.0), jnp.float32(100.0)
  return {
      "k1": kl_penalty(logps, ref, estimator="k1"),
      "k2": kl_penalty(logps, ref, estimator="k2"),
      "k3": kl_penalty(logps, ref, estimator="k3"),
      "k3_random": kl_penalty(a, b, estimator="k3"),
      "k3_overflow": kl_penalty(big0, big, estimator="k3"),
      "k3_clamped": kl_penalty(big0, big, estimator="k3", clamp=10.0),
      "k1_clamped": kl_penalty(big0, -big, estimator="k1", clamp=10.0),
      "k3_clamped_grad": jax.grad(lambda x: kl_penalty(x, -big, estimator="k3", clamp=10.0))(big0),
  }


def test_estimator_hand_values_k3_nonnegative_and_clamp():
  logps = np.array([-1.0, -2.0, -0.5], np.float32)
  ref = np.array([-2.0, -1.0, -0.5], np.float32)
  log_r = (ref - logps).astype(np.float64)            # (-1, 1, 0)
  rng = np.random.default_rng(0)
  a = rng.normal(size=1000).astype(np.float32) * 5
  b = rng.normal(size=1000).astype(np.float32) * 5
  out = _kl_cases(logps, ref, a, b)
  np.testing.assert_allclose(out["k1"], -log_r, rtol=1e-6)
  np.testing.assert_allclose(out["k2"], 0.5 * log_r ** 2, rtol=1e-6)
  np.testing.assert_allclose(out["k3"], np.exp(log_r) - 1 - log_r, rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(out["k3_random"]) >= 0)
  # Clamp: log r = 100 overflows k3 in float32; clamped to 10 it is finite and exact.
  assert not np.isfinite(out["k3_overflow"])
  np.testing.assert_allclose(out["k3_clamped"], np.expm1(10.0) - 10.0, rtol=1e-6)
  np.testing.assert_allclose(out["k1_clamped"], 10.0, rtol=1e-6)
  assert out["k3_clamped_grad"] == 0          # clipped: no gradient, and finite
  with pytest.raises(ValueError):
    kl_penalty(logps, ref, estimator="k4")
