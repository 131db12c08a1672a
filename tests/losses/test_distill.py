"""Distillation divergences: golden values, symmetries, GKD's JSD limits, T^2, top-k == dense."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from postrl.losses._distill import (DIVERGENCES, distill, distill_per_token, distill_topk)

B, T, V = 2, 3, 5


def _inputs(seed=0, scale=2.0):
  rng = np.random.default_rng(seed)
  s = (rng.normal(size=(B, T, V)) * scale).astype(np.float32)
  t = (rng.normal(size=(B, T, V)) * scale).astype(np.float32)
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  return s, t, mask


# Random weights: the gradient of sum_d W_d L_d checks every divergence's gradient at once.
_W = np.array([1.0, -2.0, 3.0, 0.5, -1.5, 2.5], np.float32)


def _losses(s, t, mask, beta=0.3, skew=0.1, temperature=1.0, scale=True):
  """Every divergence's loss (DIVERGENCES order), their unscaled metrics, forward_kl's metrics."""
  out = [distill(s, t, mask, divergence=d, beta=beta, skew=skew, temperature=temperature,
                 scale_by_temperature_sq=scale) for d in DIVERGENCES]
  vals = jnp.stack([o[0] for o in out])
  mets = jnp.stack([o[1][f"distill/{d}"] for o, d in zip(out, DIVERGENCES)])
  return vals, mets, out[0][1]


_fwd = jax.jit(_losses, static_argnames=("beta", "skew", "temperature", "scale"))


@functools.partial(jax.jit, static_argnames=("beta", "skew", "temperature", "scale"))
def _all(s, t, mask, beta=0.3, skew=0.1, temperature=1.0, scale=True):
  """``_losses`` plus d(W . losses)/d(student logits), in one compilation.

  (Gradients into the teacher are checked by the x64 finite-difference test.)
  """

  def weighted(s):
    vals, mets, metrics = _losses(s, t, mask, beta, skew, temperature, scale)
    return jnp.dot(_W, vals), (vals, mets, metrics)

  (_, (vals, mets, metrics)), grad = jax.value_and_grad(weighted, has_aux=True)(s)
  return vals, mets, metrics, grad


@functools.partial(jax.jit, static_argnames=("temperature",))
def _topk(s, ids, logps, mask, temperature=1.0):
  fn = lambda x: distill_topk(x, ids, logps, mask, temperature=temperature)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(s)
  return loss, metrics, grad


def _np_divergences(p, q, beta=0.3, skew=0.1):
  """Reference values from probabilities in float64 (mixtures formed directly in prob space)."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  kl = lambda a, b: np.sum(a * np.log(a / b), -1)
  m = beta * p + (1 - beta) * q
  return {
      "forward_kl": kl(p, q),
      "reverse_kl": kl(q, p),
      "jsd": beta * kl(p, m) + (1 - beta) * kl(q, m),
      "tvd": 0.5 * np.abs(p - q).sum(-1),
      "skew_forward_kl": kl(p, skew * p + (1 - skew) * q),
      "skew_reverse_kl": kl(q, skew * q + (1 - skew) * p),
  }


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_three_way_hand_values():
  p = np.array([0.7, 0.2, 0.1])
  q = np.array([0.2, 0.5, 0.3])
  # The 3-way example at position (0, 0) of a [B, T, V] batch: V - 3 vocabulary entries at -inf
  # (vocabulary padding), every other position masked out.
  s_logits, t_logits, _ = _inputs(0)
  mask = np.zeros((B, T), np.float32)
  mask[0, 0] = 1
  t_logits[0, 0] = np.concatenate([np.log(p), np.full(V - 3, -np.inf)])
  s_logits[0, 0] = np.concatenate([np.log(q) + 3.0, np.full(V - 3, -np.inf)])   # shift-invariant
  losses, mets, _ = _fwd(s_logits, t_logits, mask)
  hand_fkl = 0.7 * np.log(0.7 / 0.2) + 0.2 * np.log(0.2 / 0.5) + 0.1 * np.log(0.1 / 0.3)
  np.testing.assert_allclose(losses[0], hand_fkl, rtol=1e-5)
  np.testing.assert_allclose(losses[DIVERGENCES.index("tvd")], 0.5 * (0.5 + 0.3 + 0.2), rtol=1e-6)
  ref = _np_divergences(p, q)
  for i, d in enumerate(DIVERGENCES):
    np.testing.assert_allclose(losses[i], ref[d], rtol=1e-5, err_msg=d)
  np.testing.assert_allclose(mets, losses, rtol=1e-6)      # T = 1: metric == loss


def test_matches_reference_on_random_batch_and_metrics():
  s, t, mask = _inputs(1)
  losses, mets, metrics = _fwd(s, t, mask)
  ref = _np_divergences(_softmax(t), _softmax(s))
  for i, d in enumerate(DIVERGENCES):
    np.testing.assert_allclose(losses[i], (ref[d] * mask).sum() / mask.sum(), rtol=1e-5, err_msg=d)
  np.testing.assert_allclose(mets, losses, rtol=1e-6)
  agree = (s.argmax(-1) == t.argmax(-1)) * mask
  np.testing.assert_allclose(metrics["distill/top1_agreement"], agree.sum() / mask.sum(), rtol=1e-6)
  assert metrics["loss_weight"] == mask.sum()
  assert set(metrics) == {"distill/forward_kl", "distill/top1_agreement", "loss_weight"}


def test_zero_when_student_equals_teacher():
  s, _, mask = _inputs(2)
  losses, _, _, gs = _all(s, s, mask)
  np.testing.assert_allclose(losses, 0.0, atol=1e-6)
  np.testing.assert_allclose(gs, 0.0, atol=1e-6)      # a minimum (tvd's kink: subgradient 0)
  np.testing.assert_allclose(_fwd(s, s, mask, temperature=2.0)[0], 0.0, atol=1e-6)
  # ... and strictly positive otherwise.
  assert np.all(np.asarray(_fwd(s, s + np.arange(V, dtype=np.float32), mask)[0]) > 1e-3)


def test_argument_swap_symmetries():
  s, t, mask = _inputs(3)
  ix = {d: i for i, d in enumerate(DIVERGENCES)}
  a, b = _fwd(s, t, mask)[0], _fwd(t, s, mask)[0]
  np.testing.assert_allclose(a[ix["forward_kl"]], b[ix["reverse_kl"]], rtol=1e-6)
  np.testing.assert_allclose(a[ix["tvd"]], b[ix["tvd"]], rtol=1e-6)
  np.testing.assert_allclose(a[ix["skew_forward_kl"]], b[ix["skew_reverse_kl"]], rtol=1e-5)
  assert not np.isclose(a[ix["forward_kl"]], a[ix["reverse_kl"]], rtol=1e-2)   # asymmetric example
  assert not np.isclose(a[ix["jsd"]], b[ix["jsd"]], rtol=1e-2)                 # beta = 0.3 != 1/2


@jax.jit
def _x64_quantities(s, t):
  """Per-token values for the limit checks (one compilation, run under x64)."""
  pt = lambda d, a=s, b=t, **kw: distill_per_token(a, b, divergence=d, **kw)
  out = {"fkl": pt("forward_kl"), "rkl": pt("reverse_kl"),
         "jsd_03": pt("jsd", beta=0.3), "jsd_07_swapped": pt("jsd", a=t, b=s, beta=0.7),
         "sfkl_0": pt("skew_forward_kl", skew=0.0), "srkl_0": pt("skew_reverse_kl", skew=0.0),
         "sfkl_1": pt("skew_forward_kl", skew=1 - 1e-9)}
  for eps in (1e-8, 1e-9):
    out[f"jsd_lo_{eps}"] = pt("jsd", beta=eps)
    out[f"jsd_hi_{eps}"] = pt("jsd", beta=1 - eps)
  return out


def test_jsd_limits_follow_gkd_convention_x64():
  """JSD(beta)/beta -> KL(teacher||student) as beta -> 0, JSD/(1-beta) -> KL(student||teacher)."""
  s, t, _ = _inputs(4)
  with jax.enable_x64(True):
    out = _x64_quantities(s.astype(np.float64), t.astype(np.float64))
    q = {k: np.asarray(v) for k, v in out.items()}
  assert q["fkl"].dtype == np.float64
  # The first-order error is O(beta * chi^2), so beta must be tiny for rtol 1e-6.
  for eps in (1e-8, 1e-9):
    np.testing.assert_allclose(q[f"jsd_lo_{eps}"] / eps, q["fkl"], rtol=1e-6)
    np.testing.assert_allclose(q[f"jsd_hi_{eps}"] / (1 - (1 - eps)), q["rkl"], rtol=1e-6)
    assert np.all(q[f"jsd_lo_{eps}"] < 1e-6)     # the value itself vanishes at the ends
  # JSD(beta)(p, q) = JSD(1 - beta)(q, p): beta weights the teacher's side.
  np.testing.assert_allclose(q["jsd_03"], q["jsd_07_swapped"], rtol=1e-12)
  # Skew KLs: skew = 0 gives the plain KLs; skew -> 1 vanishes.
  np.testing.assert_allclose(q["sfkl_0"], q["fkl"], rtol=1e-12)
  np.testing.assert_allclose(q["srkl_0"], q["rkl"], rtol=1e-12)
  assert np.all(q["sfkl_1"] < 1e-8)


def test_temperature_squared_flag():
  s, t, mask = _inputs(5)
  temp = 2.0
  scaled, mets, _ = _fwd(s, t, mask, temperature=temp, scale=True)
  plain, mets_plain, _ = _fwd(s, t, mask, temperature=temp, scale=False)
  np.testing.assert_allclose(scaled, temp ** 2 * plain, rtol=1e-6)
  np.testing.assert_allclose(mets, plain, rtol=1e-6)          # the metric has no T^2
  np.testing.assert_allclose(mets_plain, plain, rtol=1e-6)
  # Both sides are softened: D at T equals D of logits / T at T = 1.
  np.testing.assert_allclose(plain, _fwd(s / temp, t / temp, mask)[0], rtol=1e-5)
  assert not np.allclose(plain, _fwd(s, t, mask)[0], rtol=1e-2)


def test_topk_with_k_equal_v_matches_dense_forward_kl():
  s, t, mask = _inputs(6)
  rng = np.random.default_rng(0)
  ids = np.argsort(rng.random((B, T, V)), -1).astype(np.int32)        # all V ids, in any order
  t_logps = np.take_along_axis(np.log(_softmax(t)), ids, -1).astype(np.float32)
  for temperature in (1.0, 2.0):
    sparse, m, g_sparse = _topk(s, ids, t_logps, mask, temperature=temperature)
    dense, _, metrics = _fwd(s, t, mask, temperature=temperature)
    np.testing.assert_allclose(sparse, dense[0], rtol=1e-5)
    np.testing.assert_allclose(m["distill/forward_kl"], metrics["distill/forward_kl"], rtol=1e-5)
    np.testing.assert_allclose(m["distill/teacher_topk_mass"], 1.0, rtol=1e-6)
    assert m["loss_weight"] == mask.sum()
    # The dense student gradient of forward KL alone: d/ds of T^2 * token-mean KL = T (q - p) / n.
    p, q = _softmax(t / temperature), _softmax(s / temperature)
    g_dense = temperature * (q - p) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(g_sparse, g_dense, rtol=1e-5, atol=1e-7)


def test_topk_renormalises_teacher_and_ignores_unused_slots():
  q = np.array([0.2, 0.5, 0.3])
  s_logits = np.log(q).astype(np.float32)[None, None]
  ids = np.array([[[1, 0, 2]]], np.int32)
  logps = np.array([[[np.log(0.2), np.log(0.7), -np.inf]]], np.float32)   # top-2 + an unused slot
  loss, m, g = _topk(s_logits, ids, logps, np.ones((1, 1), np.float32))
  pt = np.array([2 / 9, 7 / 9, 0.0])      # p~ on ids (1, 0, 2): renormalised over the top-2
  np.testing.assert_allclose(loss, pt[0] * np.log(pt[0] / 0.5) + pt[1] * np.log(pt[1] / 0.2),
                             rtol=1e-5)
  np.testing.assert_allclose(m["distill/teacher_topk_mass"], 0.9, rtol=1e-6)
  # Gradient: q - p~ placed on the vocabulary (token 2 has p~ = 0 but still q = 0.3 of pull).
  np.testing.assert_allclose(g[0, 0], q - np.array([7 / 9, 2 / 9, 0.0]), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError):
    distill_topk(s_logits, ids, logps, np.ones((1, 1)), divergence="reverse_kl")


def test_masked_equals_sliced_with_garbage_and_vocab_padding():
  """Padding T with garbage positions (mask 0) and V with -inf logits in both changes nothing."""
  s, t, _ = _inputs(7)
  pad = 2
  s_p = np.full((B, T + pad, V + 2), np.nan, np.float32)
  t_p = np.full((B, T + pad, V + 2), np.nan, np.float32)
  s_p[:, T + 1], t_p[:, T + 1] = np.inf, -np.inf
  s_p[:, :T, :V], t_p[:, :T, :V] = s, t
  s_p[:, :T, V:], t_p[:, :T, V:] = -np.inf, -np.inf
  ones = np.ones((B, T), np.float32)
  mask_p = np.concatenate([ones, np.zeros((B, pad), np.float32)], 1)
  losses, mets, metrics, g = _all(s, t, ones)
  losses_p, mets_p, metrics_p, g_p = _all(s_p, t_p, mask_p)
  np.testing.assert_allclose(losses_p, losses, rtol=1e-6)
  np.testing.assert_allclose(mets_p, mets, rtol=1e-6)
  for k in metrics:
    np.testing.assert_allclose(metrics_p[k], metrics[k], rtol=1e-6)
  assert np.all(np.isfinite(g_p))
  np.testing.assert_allclose(g_p[:, :T, :V], g, rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(g_p[:, T:]) == 0) and np.all(np.asarray(g_p[:, :, V:]) == 0)
  # The teacher's gradient (both sides of the JSD depend on it) is clean too.
  g_teacher = jax.jit(jax.grad(lambda b, a, m: distill(a, b, m, divergence="jsd", beta=0.3)[0]))
  gt, gt_p = g_teacher(t, s, ones), g_teacher(t_p, s_p, mask_p)
  assert np.all(np.isfinite(gt_p)) and np.all(np.asarray(gt_p[:, T:]) == 0)
  np.testing.assert_allclose(gt_p[:, :T, :V], gt, rtol=1e-5, atol=1e-8)
  # Top-k too (padded positions hold invalid ids and nan log-probs).
  ids = np.broadcast_to(np.arange(V, dtype=np.int32), (B, T, V))
  logps = np.log(_softmax(t)).astype(np.float32)
  ids_p = np.concatenate([ids, np.full((B, pad, V), -7, np.int32)], 1)
  logps_p = np.concatenate([logps, np.full((B, pad, V), np.nan, np.float32)], 1)
  loss, m, g = _topk(s, ids, logps, ones)
  loss_p, m_p, g_p = _topk(s_p[..., :V], ids_p, logps_p, mask_p)
  np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
  np.testing.assert_allclose(g_p[:, :T], g, rtol=1e-6, atol=1e-9)
  assert np.all(np.asarray(g_p[:, T:]) == 0)
  g_logps = jax.jit(jax.grad(lambda lp: distill_topk(s_p[..., :V], ids_p, lp, mask_p)[0]))(logps_p)
  assert np.all(np.isfinite(g_logps)) and np.all(np.asarray(g_logps[:, T:]) == 0)


def test_fully_masked_rows():
  s, t, mask = _inputs(8)
  mask[0] = 0
  _, _, _, gs = _all(s, t, mask)
  assert np.all(np.isfinite(gs)) and np.all(np.asarray(gs[0]) == 0)
  losses0, _, metrics0, gs0 = _all(s, t, np.zeros_like(mask))
  assert np.all(np.asarray(losses0) == 0) and np.all(np.asarray(gs0) == 0)
  assert metrics0["loss_weight"] == 0


def test_bf16_extreme_logits_finite_grads():
  s, t, mask = _inputs(9)
  s = np.where(s > 0, 1e4, -1e4).astype(jnp.bfloat16)
  t = np.where(t > 0, 1e4, -1e4).astype(jnp.bfloat16)
  losses, mets, _, gs = _all(s, t, mask, temperature=2.0)
  assert np.all(np.isfinite(losses)) and np.all(np.isfinite(mets))
  assert gs.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(gs, np.float32)))
  ref = _fwd(s.astype(np.float32), t.astype(np.float32), mask, temperature=2.0)[0]
  np.testing.assert_allclose(losses, ref, rtol=1e-2)
  ids = np.broadcast_to(np.arange(V, dtype=np.int32), (B, T, V))
  loss, _, g = _topk(s, ids, t.astype(np.float32) - 1e4, mask)
  assert np.isfinite(loss) and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_jit_and_vmap():
  s, t, mask = _inputs(10)
  stack = lambda x: np.stack([x, x[::-1]])
  fn = functools.partial(distill, divergence="jsd", beta=0.3)
  batched = jax.jit(jax.vmap(fn))(stack(s), stack(t), stack(mask))
  for i in range(2):
    single = _fwd(stack(s)[i], stack(t)[i], stack(mask)[i])
    np.testing.assert_allclose(batched[0][i], single[0][DIVERGENCES.index("jsd")], rtol=1e-6)
    np.testing.assert_allclose(batched[1]["distill/jsd"][i], single[1][DIVERGENCES.index("jsd")],
                               rtol=1e-6)
    np.testing.assert_allclose(batched[1]["loss_weight"][i], stack(mask)[i].sum(), rtol=1e-6)
  ids = np.broadcast_to(np.arange(V, dtype=np.int32), (2, B, T, V))
  logps = np.log(_softmax(stack(t))).astype(np.float32)
  batched = jax.jit(jax.vmap(_topk))(stack(s), ids, logps, stack(mask))
  single = _topk(stack(s)[1], ids[1], logps[1], stack(mask)[1])
  for vb, vs in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
    np.testing.assert_allclose(vb[1], vs, rtol=1e-6, atol=1e-9)
    assert vs.dtype == jnp.float32


def test_gradient_matches_finite_differences_x64():
  """The two log-space mixtures (jsd, skew_reverse_kl), random weights, both arguments, T = 1.5."""
  s, t, mask = _inputs(11)
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    w = mask.astype(np.float64)

    def f(a, b):
      jsd = distill_per_token(a, b, divergence="jsd", beta=0.3, temperature=1.5)
      srkl = distill_per_token(a, b, divergence="skew_reverse_kl", skew=0.2, temperature=1.5)
      return jnp.sum((jsd - 2.0 * srkl) * w)

    f_jit, g_jit = jax.jit(f), jax.jit(jax.grad(f, argnums=(0, 1)))
    x = (s.astype(np.float64), t.astype(np.float64))
    g = [np.asarray(v) for v in g_jit(*x)]
    assert g[0].dtype == np.float64
    eps = 1e-6
    for _ in range(3):
      d = [rng.normal(size=s.shape) for _ in range(2)]
      fd = (float(f_jit(x[0] + eps * d[0], x[1] + eps * d[1]))
            - float(f_jit(x[0] - eps * d[0], x[1] - eps * d[1]))) / (2 * eps)
      np.testing.assert_allclose(np.vdot(g[0], d[0]) + np.vdot(g[1], d[1]), fd, rtol=1e-6)


def test_bad_arguments_raise():
  s, t, mask = _inputs(12)
  for kw in ({"divergence": "kl"}, {"divergence": "jsd", "beta": 0.0},
             {"divergence": "jsd", "beta": 1.0}, {"divergence": "skew_forward_kl", "skew": 1.0},
             {"temperature": 0.0}):
    with pytest.raises(ValueError):
      distill(s, t, mask, **kw)
