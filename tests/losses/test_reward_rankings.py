"""Bradley-Terry on rankings (InstructGPT): all ordered pairs of a ranking, a mean per ranking, then
a mean over rankings; K = 2 is Bradley-Terry and Plackett-Luce; masks anywhere; nan never leaks."""

import jax
import numpy as np
import pytest

import postrl.losses as L
from postrl.losses._reward import bradley_terry, bradley_terry_rankings, plackett_luce


@jax.jit
def _btr(scores, mask):
  """(loss, metrics, d loss / d scores) in one compilation."""
  fn = lambda s: bradley_terry_rankings(s, mask_BxK=mask)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(scores)
  return loss, metrics, grad


def _softplus(x):
  return np.logaddexp(0.0, np.asarray(x, np.float64))


def _np_row(s):
  """-1/C(K,2) sum_{i<j} log sigma(s_i - s_j) of one list, written out directly."""
  s = np.asarray(s, np.float64)
  terms = [_softplus(-(s[i] - s[j])) for i in range(len(s)) for j in range(i + 1, len(s))]
  return float(np.mean(terms))


def test_hand_values_direction_and_per_ranking_normalisation():
  # Row 0: K = 3, pairs (0,1) d=1, (0,2) d=2, (1,2) d=1. Row 1: K = 2 (last masked), d = -1.
  s = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 5.0]], np.float32)
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  loss, m, g = _btr(s, mask)
  row0 = (_softplus(-1.0) + _softplus(-2.0) + _softplus(-1.0)) / 3
  row1 = _softplus(1.0)
  np.testing.assert_allclose(loss, (row0 + row1) / 2, rtol=1e-6)
  # a wrong pair direction (-log sigma(s_j - s_i)) or the pairs pooled over the batch (each pair
  # weighted 1/4 instead of each ranking 1/2) would give other values
  flipped = ((_softplus(1.0) + _softplus(2.0) + _softplus(1.0)) / 3 + _softplus(-1.0)) / 2
  pooled = (_softplus(-1.0) + _softplus(-2.0) + _softplus(-1.0) + _softplus(1.0)) / 4
  assert abs(float(loss) - flipped) > 0.1 and abs(float(loss) - pooled) > 0.05
  # metrics are means over the rankings: row 0 orders 3/3 pairs, row 1 0/1
  np.testing.assert_allclose(m["rm/accuracy"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(m["rm/margin"], ((1 + 2 + 1) / 3 - 1.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["rm/top1_accuracy"], 0.5, rtol=1e-6)
  assert m["loss_weight"] == 2
  # d/ds_k = 1/B 1/|P_b| [sum_{j below k} -sigma(s_j - s_k) + sum_{i above k} sigma(s_k - s_i)]
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))
  want0 = np.array([-sig(-1.0) - sig(-2.0), sig(-1.0) - sig(-1.0), sig(-2.0) + sig(-1.0)]) / 3
  want1 = np.array([-sig(1.0), sig(1.0), 0.0])
  np.testing.assert_allclose(g, np.stack([want0, want1]) / 2, rtol=1e-5, atol=1e-7)
  # the right order is pushed further apart: the best goes up, the worst down
  assert g[0, 0] < 0 < g[0, 2]
  # a uniform score makes every pair a coin flip: loss log 2
  np.testing.assert_allclose(_btr(np.zeros_like(s), mask)[0], np.log(2.0), rtol=1e-6)



def test_tied_scores_are_not_a_win():
  # Row [1, 1, 0]: the tied pair (0, 1) is not ordered, (0, 2) and (1, 2) are: accuracy 2/3.
  # The best-ranked response shares the top score; ties resolve to the lower index: top1 = 1.
  s = np.array([[1.0, 1.0, 0.0]], np.float32)
  loss, m, _ = _btr(s, np.ones_like(s))
  np.testing.assert_allclose(m["rm/accuracy"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(m["rm/top1_accuracy"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(loss, (np.log(2.0) + 2 * _softplus(-1.0)) / 3, rtol=1e-6)

def test_k2_equals_bradley_terry_and_plackett_luce():
  rng = np.random.default_rng(0)
  s = (rng.normal(size=(6, 2)) * 3).astype(np.float32)
  loss, m, g = _btr(s, np.ones_like(s))
  (bt, bm), (gc, gr) = jax.value_and_grad(
      lambda c, r: bradley_terry(c, r), argnums=(0, 1), has_aux=True)(s[:, 0], s[:, 1])
  (pl, pm), g_pl = jax.value_and_grad(lambda x: plackett_luce(x), has_aux=True)(s)
  np.testing.assert_allclose(loss, bt, rtol=1e-6)
  np.testing.assert_allclose(loss, pl, rtol=1e-6)
  np.testing.assert_allclose(g, np.stack([gc, gr], -1), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(g, g_pl, rtol=1e-5, atol=1e-8)
  for key in ("rm/accuracy", "rm/margin"):
    np.testing.assert_allclose(m[key], bm[key], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(m["rm/top1_accuracy"], pm["rm/top1_accuracy"], rtol=1e-6)
  assert m["loss_weight"] == bm["loss_weight"] == 6
  # mask_BxK=None is all valid
  np.testing.assert_allclose(jax.jit(bradley_terry_rankings)(s)[0], loss, rtol=1e-6)


def test_k3_differs_from_plackett_luce():
  s = np.array([[0.5, -1.0, 2.0]], np.float32)
  loss, _, _ = _btr(s, np.ones_like(s))
  np.testing.assert_allclose(loss, _np_row(s[0]), rtol=1e-6)
  assert abs(float(loss) - float(plackett_luce(s)[0])) > 0.1


def test_masked_entries_anywhere_equal_the_shorter_lists_and_nan_does_not_leak():
  rng = np.random.default_rng(1)
  short = rng.normal(size=(3, 3)).astype(np.float32)
  layouts = [[0, 2, 5], [1, 3, 4], [3, 4, 5]]     # valid entries anywhere, their order kept
  padded = np.full((3, 6), np.nan, np.float32)
  padded[0, 1] = np.inf
  padded[1, 0] = -np.inf
  mask = np.zeros((3, 6), np.float32)
  for b, pos in enumerate(layouts):
    padded[b, pos] = short[b]
    mask[b, pos] = 1
  loss_s, m_s, g_s = _btr(short, np.ones_like(short))
  loss_p, m_p, g_p = _btr(padded, mask)
  np.testing.assert_allclose(loss_s, np.mean([_np_row(r) for r in short]), rtol=1e-6)
  np.testing.assert_allclose(loss_p, loss_s, rtol=1e-6)
  for key in m_s:
    np.testing.assert_allclose(m_p[key], m_s[key], rtol=1e-6)
  for b, pos in enumerate(layouts):
    np.testing.assert_allclose(g_p[b, pos], g_s[b], rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(g_p))) and np.all(np.asarray(g_p)[mask == 0] == 0)


def test_rows_without_a_ranking_are_left_out():
  s = np.array([[0.3, -1.0, 2.0], [5.0, 7.0, 1.0], [np.nan, 1.0, np.nan]], np.float32)
  loss, m, g = _btr(s, np.array([[1, 1, 1], [0, 1, 0], [0, 1, 0]], np.float32))  # rows 1, 2: one
  np.testing.assert_allclose(loss, _np_row(s[0]), rtol=1e-6)
  assert m["loss_weight"] == 1 and np.all(np.asarray(g[1:]) == 0)
  loss, m, g = _btr(s, np.zeros_like(s))
  assert loss == 0 and m["loss_weight"] == 0 and m["rm/accuracy"] == 0
  assert np.all(np.asarray(g) == 0)


def test_gradient_matches_finite_differences_x64():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    s = rng.normal(size=(3, 5))
    mask = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 1, 1, 0, 0]], np.float64)
    f = jax.jit(lambda x: bradley_terry_rankings(x, mask_BxK=mask)[0])
    g = np.asarray(jax.jit(jax.grad(lambda x: bradley_terry_rankings(x, mask_BxK=mask)[0]))(s))
    assert g.dtype == np.float64
    np.testing.assert_allclose(np.sum(g, -1), 0.0, atol=1e-12)   # shift-invariant per row
    eps = 1e-6
    for _ in range(3):
      d = rng.normal(size=s.shape)
      fd = (float(f(s + eps * d)) - float(f(s - eps * d))) / (2 * eps)
      np.testing.assert_allclose(np.vdot(g, d), fd, rtol=1e-6)


def test_exported_with_metadata():
  assert L.bradley_terry_rankings is bradley_terry_rankings
  assert L.LOSSES["bradley_terry_rankings"] is bradley_terry_rankings
  assert L.METADATA["bradley_terry_rankings"]["data"] == "listwise"
  with pytest.raises(TypeError):
    bradley_terry_rankings(np.zeros((1, 2)), np.ones((1, 2)))    # the mask is keyword-only
