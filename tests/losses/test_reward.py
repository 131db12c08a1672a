"""Reward-model losses: Bradley-Terry, Plackett-Luce (K=2 == BT, masks, shifts), PRM BCE."""

import jax
import jax.numpy as jnp
import numpy as np

from postrl.losses._reward import bradley_terry, plackett_luce, process_reward


@jax.jit
def _bt(chosen, rejected, margin):
  """(loss, metrics, (d/d chosen, d/d rejected)) in one compilation."""
  fn = lambda c, r: bradley_terry(c, r, margin_B=margin)
  (loss, metrics), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(chosen, rejected)
  return loss, metrics, grads


@jax.jit
def _pl(scores, mask):
  fn = lambda s: plackett_luce(s, mask_BxK=mask)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(scores)
  return loss, metrics, grad


@jax.jit
def _prm(logits, labels, mask):
  (loss, metrics), grad = jax.value_and_grad(process_reward, has_aux=True)(logits, labels, mask)
  return loss, metrics, grad


def _softplus(x):
  return np.logaddexp(0.0, np.asarray(x, np.float64))


def _np_pl_nll(s):
  """-log P(ranking s_0 > s_1 > ...), written out directly."""
  s = np.asarray(s, np.float64)
  return -sum(s[k] - np.log(np.exp(s[k:]).sum()) for k in range(len(s)))


# ---------------------------------------------------------------- Bradley-Terry

def test_bradley_terry_hand_values_and_metrics():
  chosen = np.array([2.0, 0.0, 1.0], np.float32)
  rejected = np.array([1.0, 1.0, 1.0], np.float32)
  loss, m, (gc, gr) = _bt(chosen, rejected, np.zeros(3, np.float32))
  np.testing.assert_allclose(loss, np.mean(_softplus([-1.0, 1.0, 0.0])), rtol=1e-6)
  loss, m, _ = _bt(chosen, rejected, np.array([0.5, 0.0, 0.0], np.float32))
  np.testing.assert_allclose(loss, np.mean(_softplus([-0.5, 1.0, 0.0])), rtol=1e-6)
  np.testing.assert_allclose(m["rm/accuracy"], 1 / 3, rtol=1e-6)   # a tie is not a win
  np.testing.assert_allclose(m["rm/margin"], 0.0, atol=1e-7)
  np.testing.assert_allclose(m["rm/chosen"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(m["rm/rejected"], 1.0, rtol=1e-6)
  assert m["loss_weight"] == 3
  # d/d r_c = -sigma(r_r - r_c) / B: the chosen reward is pushed up, the rejected one down.
  np.testing.assert_allclose(gc, -1 / (1 + np.exp([1.0, -1.0, 0.0])) / 3, rtol=1e-6)
  np.testing.assert_allclose(gr, -np.asarray(gc), rtol=1e-6)
  # margin_B=None is margin 0.
  loss_none, _ = jax.jit(bradley_terry)(chosen, rejected)
  np.testing.assert_allclose(loss_none, np.mean(_softplus([-1.0, 1.0, 0.0])), rtol=1e-6)


# ---------------------------------------------------------------- Plackett-Luce

def test_plackett_luce_k2_equals_bradley_terry():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(6, 2)).astype(np.float32) * 3
  pl, pm, g_pl = _pl(s, np.ones_like(s))
  bt, bm, (gc, gr) = _bt(s[:, 0], s[:, 1], np.zeros(6, np.float32))
  np.testing.assert_allclose(pl, bt, rtol=1e-6)
  np.testing.assert_allclose(pm["rm/top1_accuracy"], bm["rm/accuracy"], rtol=1e-6)
  np.testing.assert_allclose(g_pl, np.stack([gc, gr], -1), rtol=1e-5, atol=1e-8)
  # mask_BxK=None is all valid.
  np.testing.assert_allclose(jax.jit(plackett_luce)(s)[0], pl, rtol=1e-6)


def test_plackett_luce_k3_hand_values_and_top1():
  s = np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0]], np.float32)
  e = np.e
  # Row 0: -[1 - log(e + e^2 + 1)] - [2 - log(e^2 + 1)] - [0 - 0].
  row0 = -(1.0 - np.log(e + e ** 2 + 1.0)) - (2.0 - np.log(e ** 2 + 1.0))
  row1 = -(2.0 - np.log(e ** 2 + e + 1.0)) - (1.0 - np.log(e + 1.0))
  loss, m, _ = _pl(s, np.ones_like(s))
  np.testing.assert_allclose(loss, (row0 + row1) / 2, rtol=1e-6)
  np.testing.assert_allclose(row0, _np_pl_nll(s[0]), rtol=1e-12)
  np.testing.assert_allclose(m["rm/top1_accuracy"], 0.5, rtol=1e-6)   # row 1's best is first
  assert m["loss_weight"] == 2
  # Uniform scores: every ranking has probability 1/3!.
  np.testing.assert_allclose(_pl(np.zeros_like(s), np.ones_like(s))[0], np.log(6.0), rtol=1e-6)


def test_plackett_luce_masked_padding_equals_shorter_lists():
  rng = np.random.default_rng(1)
  short = rng.normal(size=(2, 3)).astype(np.float32)
  layouts = [[0, 2, 5], [1, 3, 4]]     # valid entries anywhere, their order kept
  padded = np.full((2, 6), np.nan, np.float32)
  padded[0, 1] = np.inf
  padded[1, 0] = -np.inf
  mask = np.zeros((2, 6), np.float32)
  for b, pos in enumerate(layouts):
    padded[b, pos] = short[b]
    mask[b, pos] = 1
  loss_s, m_s, g_s = _pl(short, np.ones_like(short))
  loss_p, m_p, g_p = _pl(padded, mask)
  np.testing.assert_allclose(loss_p, loss_s, rtol=1e-6)
  np.testing.assert_allclose(loss_s, np.mean([_np_pl_nll(r) for r in short]), rtol=1e-6)
  for k in m_s:
    np.testing.assert_allclose(m_p[k], m_s[k], rtol=1e-6)
  for b, pos in enumerate(layouts):
    np.testing.assert_allclose(g_p[b, pos], g_s[b], rtol=1e-6)
  assert np.all(np.asarray(g_p)[mask == 0] == 0)


def test_plackett_luce_rows_without_a_ranking():
  s = np.array([[0.3, -1.0, 2.0], [5.0, 7.0, 1.0]], np.float32)
  loss, m, g = _pl(s, np.array([[1, 1, 1], [0, 1, 0]], np.float32))   # row 1: a single response
  np.testing.assert_allclose(loss, _np_pl_nll(s[0]), rtol=1e-6)
  assert m["loss_weight"] == 1 and np.all(np.asarray(g[1]) == 0)
  loss, m, g = _pl(s, np.zeros_like(s))
  assert loss == 0 and m["loss_weight"] == 0 and m["rm/top1_accuracy"] == 0
  assert np.all(np.asarray(g) == 0)


def test_plackett_luce_shift_invariance():
  rng = np.random.default_rng(2)
  s = rng.normal(size=(2, 6)).astype(np.float32)
  mask = np.array([[1, 1, 0, 1, 1, 0], [1, 0, 1, 1, 1, 1]], np.float32)
  shift = np.array([[30.0], [-7.0]], np.float32)    # a constant per row
  loss, _, g = _pl(s, mask)
  loss_shift, _, g_shift = _pl(s + shift, mask)
  np.testing.assert_allclose(loss_shift, loss, rtol=1e-5)
  np.testing.assert_allclose(g_shift, g, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.sum(g, -1), 0.0, atol=1e-6)     # zero gradient along the shift


def test_plackett_luce_gradient_matches_finite_differences_x64():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    s = rng.normal(size=(3, 4))
    mask = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 0]], np.float64)
    f = jax.jit(lambda x: plackett_luce(x, mask_BxK=mask)[0])
    g = np.asarray(jax.jit(jax.grad(lambda x: plackett_luce(x, mask_BxK=mask)[0]))(s))
    assert g.dtype == np.float64
    eps = 1e-6
    for _ in range(3):
      d = rng.normal(size=s.shape)
      fd = (float(f(s + eps * d)) - float(f(s - eps * d))) / (2 * eps)
      np.testing.assert_allclose(np.vdot(g, d), fd, rtol=1e-6)


# ---------------------------------------------------------------- process reward

def test_process_reward_hard_and_soft_labels_by_hand():
  z = np.array([[0.0, 2.0, -1.0], [1.0, -0.5, 9.0]], np.float32)
  y = np.array([[1.0, 0.0, 1.0], [0.3, 0.75, 0.0]], np.float32)
  hard = np.array([[1, 1, 1], [0, 0, 0]], np.float32)
  soft = np.array([[0, 0, 0], [1, 1, 0]], np.float32)
  loss, m, _ = _prm(z, y, hard)
  # -log sigma(0) = ln 2; -log(1 - sigma(2)) = softplus(2); -log sigma(-1) = softplus(1).
  expected = (np.log(2.0) + _softplus(2.0) + _softplus(1.0)) / 3
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(m["prm/loss"], expected, rtol=1e-6)
  # sigma(0) = 0.5 is not > 0.5 (wrong for label 1); 2 vs 0 wrong; -1 vs 1 wrong.
  assert m["prm/accuracy"] == 0 and m["loss_weight"] == 3
  # Soft labels (Math-Shepherd): y = 0.3 at z = 1, y = 0.75 at z = -0.5.
  loss, m, _ = _prm(z, y, soft)
  sig = lambda v: 1 / (1 + np.exp(-v))
  bce = lambda zz, yy: -(yy * np.log(sig(zz)) + (1 - yy) * np.log(1 - sig(zz)))
  np.testing.assert_allclose(loss, (bce(1.0, 0.3) + bce(-0.5, 0.75)) / 2, rtol=1e-6)
  assert m["prm/accuracy"] == 0     # 1 vs round(0.3) = 0, -0.5 vs round(0.75) = 1
  np.testing.assert_allclose(m["prm/label_mean"], (0.3 + 0.75) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["prm/pred_mean"], (sig(1.0) + sig(-0.5)) / 2, rtol=1e-6)
  # Both kinds together, and the accuracy on a correct prediction.
  loss, m, _ = _prm(z, y, np.array([[1, 1, 1], [1, 1, 1]], np.float32))
  np.testing.assert_allclose(loss, (3 * expected + bce(1.0, 0.3) + bce(-0.5, 0.75)
                                    + _softplus(9.0)) / 6, rtol=1e-6)
  np.testing.assert_allclose(m["prm/accuracy"], 0.0, atol=0)
  _, m, _ = _prm(-z, y, hard)
  np.testing.assert_allclose(m["prm/accuracy"], 2 / 3, rtol=1e-6)   # -2 vs 0 and 1 vs 1 right
  # The soft-label optimum is sigma(z) = y: zero gradient there.
  z_opt = np.log(np.where(soft > 0, y, 0.5) / (1 - np.where(soft > 0, y, 0.5)))
  _, _, g = _prm(z_opt.astype(np.float32), y, soft)
  np.testing.assert_allclose(g, 0.0, atol=1e-7)



def test_process_reward_accuracy_rounds_a_half_label_down():
  # The documented rule compares z > 0 with y > 0.5: a soft label of exactly 0.5 counts as 0, so
  # z = -1 and z = -2 are right (a y >= 0.5 rule would count both wrong: 1/3).
  z = np.array([[-1.0, -2.0, 3.0]], np.float32)
  y = np.array([[0.5, 0.5, 0.51]], np.float32)
  _, m, _ = _prm(z, y, np.ones_like(z))
  np.testing.assert_allclose(m["prm/accuracy"], 1.0, rtol=1e-6)

def test_process_reward_masked_equals_sliced():
  rng = np.random.default_rng(4)
  z = rng.normal(size=(2, 3)).astype(np.float32)
  y = rng.random((2, 3)).astype(np.float32)
  z_p = np.concatenate([z, np.array([[np.nan, np.inf, 0.0], [-np.inf, 3.0, 0.0]], np.float32)], 1)
  y_p = np.concatenate([y, np.array([[np.nan, -5.0, 0.0], [7.0, np.nan, 0.0]], np.float32)], 1)
  mask_p = np.concatenate([np.ones((2, 3)), np.zeros((2, 3))], 1).astype(np.float32)
  loss_s, m_s, g_s = _prm(np.concatenate([z, z], 1), np.concatenate([y, y], 1),
                          np.concatenate([np.ones((2, 3)), np.zeros((2, 3))], 1).astype(np.float32))
  loss_p, m_p, g_p = _prm(z_p, y_p, mask_p)
  np.testing.assert_allclose(loss_p, loss_s, rtol=1e-6)
  for k in m_s:
    np.testing.assert_allclose(m_p[k], m_s[k], rtol=1e-6)
  np.testing.assert_allclose(g_p[:, :3], g_s[:, :3], rtol=1e-6)
  assert np.all(np.asarray(g_p[:, 3:]) == 0)
  # Against the truly sliced arrays, by hand.
  sig = 1 / (1 + np.exp(-z.astype(np.float64)))
  np.testing.assert_allclose(loss_p, np.mean(-(y * np.log(sig) + (1 - y) * np.log(1 - sig))),
                             rtol=1e-6)
  mask_p[1] = 0     # a fully masked row: finite
  assert np.all(np.isfinite(_prm(z_p, y_p, mask_p)[2]))


# ---------------------------------------------------------------- all: bf16 extremes, jit/vmap

def test_bf16_extreme_scores_finite_grads():
  big = np.array([[1e4, -1e4, 1e4], [-1e4, 1e4, -1e4]], np.float32).astype(jnp.bfloat16)
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  labels = np.array([[0, 1, 0.5], [1, 0, 1]], np.float32)
  results = [_bt(big[:, 0], big[:, 1], np.ones(2, np.float32)), _pl(big, mask),
             _prm(big, labels, mask)]
  for loss, metrics, grads in results:
    assert np.isfinite(loss) and all(np.isfinite(v) for v in metrics.values())
    for g in jax.tree.leaves(grads):
      assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
  # BT row 0: -log sigma(1e4 + 1e4 - 1) = 0; row 1: 2e4 + 1.
  np.testing.assert_allclose(results[0][0], (0.0 + 2e4 + 1.0) / 2, rtol=1e-2)


def test_jit_and_vmap():
  rng = np.random.default_rng(5)
  s = rng.normal(size=(2, 2, 3)).astype(np.float32)
  mask = np.array([[[1, 1, 1], [1, 0, 1]], [[0, 1, 1], [1, 1, 1]]], np.float32)
  labels = rng.random((2, 2, 3)).astype(np.float32)

  def everything(x, m, y):
    return (bradley_terry(x[:, 0], x[:, 1], margin_B=jnp.zeros(2)), plackett_luce(x, mask_BxK=m),
            process_reward(x, y, m))

  batched = jax.jit(jax.vmap(everything))(s, mask, labels)
  for i in range(2):
    single = (_bt(s[i, :, 0], s[i, :, 1], np.zeros(2, np.float32)), _pl(s[i], mask[i]),
              _prm(s[i], labels[i], mask[i]))
    for (vl, vm), (l, m, _) in zip(batched, single):
      np.testing.assert_allclose(vl[i], l, rtol=1e-6)
      assert set(vm) == set(m)
      for k in m:
        np.testing.assert_allclose(vm[k][i], m[k], rtol=1e-6)
        assert m[k].dtype == jnp.float32 and m[k].shape == ()
