"""cross_entropy: golden values, masked == sliced, exact accumulation, jit/vmap, bf16, FD grads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from postrl.losses._supervised import cross_entropy, cross_entropy_per_token

B, T, V = 3, 5, 7


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2.0
  targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
  mask = np.ones((B, T), np.float32)
  mask[0, 3:] = 0
  mask[2, :1] = 0
  return logits, targets, mask


@functools.partial(jax.jit, static_argnames=("label_smoothing", "z_loss"))
def _ce(logits, targets, mask, label_smoothing=0.0, z_loss=0.0):
  """(loss, metrics, d loss / d logits) in one compilation."""
  fn = functools.partial(cross_entropy, label_smoothing=label_smoothing, z_loss=z_loss)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(logits, targets, mask)
  return loss, metrics, grad


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_matches_manual_log_softmax_nll_and_accuracy():
  logits, targets, mask = _inputs()
  loss, metrics, _ = _ce(logits, targets, mask)
  logp = _np_log_softmax(logits)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  expected = (nll * mask).sum() / mask.sum()
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["ce/nll"], expected, rtol=1e-6)
  acc = ((logits.argmax(-1) == targets) * mask).sum() / mask.sum()
  np.testing.assert_allclose(metrics["ce/accuracy"], acc, rtol=1e-6)
  assert metrics["loss_weight"] == mask.sum()
  assert "ce/z" not in metrics
  assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())


def test_label_smoothing_and_z_loss_hand_values():
  # p = (1/2, 1/4, 1/4) shifted by log Z = 2: -log p = (ln 2, 2 ln 2, 2 ln 2). Row 1 targets id 2.
  logits = np.tile((np.log(np.array([0.5, 0.25, 0.25])) + 2.0).astype(np.float32), (2, 1, 1))
  targets = np.array([[0], [2]], np.int32)
  row0 = np.array([[1.0], [0.0]], np.float32)
  row1 = row0[::-1].copy()
  ln2 = np.log(2.0)
  np.testing.assert_allclose(_ce(logits, targets, row0)[0], ln2, rtol=1e-6)
  np.testing.assert_allclose(_ce(logits, targets, row1)[0], 2 * ln2, rtol=1e-6)
  eps = 0.1
  smooth = 5 * ln2 / 3                                   # mean_v(-log p_v)
  loss, metrics, _ = _ce(logits, targets, row0, label_smoothing=eps, z_loss=1e-2)
  np.testing.assert_allclose(loss, (1 - eps) * ln2 + eps * smooth + 1e-2 * 2.0 ** 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["ce/z"], 2.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["ce/nll"], ln2, rtol=1e-6)
  loss, _, _ = _ce(logits, targets, row1, label_smoothing=eps, z_loss=1e-2)
  np.testing.assert_allclose(loss, (1 - eps) * 2 * ln2 + eps * smooth + 4e-2, rtol=1e-6)
  # Both rows: the smoothing term is the same for any target, the NLL term is not.
  loss, _, _ = _ce(logits, targets, np.ones((2, 1), np.float32), label_smoothing=eps, z_loss=1e-2)
  np.testing.assert_allclose(loss, (1 - eps) * 1.5 * ln2 + eps * smooth + 4e-2, rtol=1e-6)



def test_accuracy_by_hand():
  # argmax of every token is id 1; the targets hit it on 2 of the 3 valid tokens (the masked
  # token also hits it and must not count). Random targets would rarely tell argmax from argmin.
  logits = np.tile(np.array([0.0, 3.0, -1.0, 0.5], np.float32), (1, 4, 1))
  targets = np.array([[1, 2, 1, 1]], np.int32)
  mask = np.array([[1, 1, 1, 0]], np.float32)
  _, metrics, _ = _ce(logits, targets, mask)
  np.testing.assert_allclose(metrics["ce/accuracy"], 2 / 3, rtol=1e-6)

def test_per_token_form_matches_loss():
  logits, targets, mask = _inputs(1)
  per_tok = np.asarray(jax.jit(functools.partial(
      cross_entropy_per_token, label_smoothing=0.1, z_loss=1e-2))(logits, targets))
  assert per_tok.shape == (B, T)
  loss, _, _ = _ce(logits, targets, mask, label_smoothing=0.1, z_loss=1e-2)
  np.testing.assert_allclose(loss, (per_tok * mask).sum() / mask.sum(), rtol=1e-6)
  # ... and the per-token value by hand for one token.
  logp = _np_log_softmax(logits[1, 2])
  lse = np.logaddexp.reduce(logits[1, 2].astype(np.float64))
  np.testing.assert_allclose(per_tok[1, 2], 0.9 * -logp[targets[1, 2]] + 0.1 * -logp.mean()
                             + 1e-2 * lse ** 2, rtol=1e-6)


def test_masked_equals_sliced_with_garbage_padding():
  logits, targets, _ = _inputs(2)
  pad = 3
  garbage = np.full((B, pad, V), np.nan, np.float32)
  garbage[:, 0] = np.inf
  garbage[:, 1] = -np.inf
  logits_p = np.concatenate([logits, garbage], 1)
  targets_p = np.concatenate([targets, np.full((B, pad), -100, np.int32)], 1)
  mask_p = np.concatenate([np.ones((B, T)), np.zeros((B, pad))], 1).astype(np.float32)
  kw = {"label_smoothing": 0.1, "z_loss": 1e-2}     # every term on
  loss_s, m_s, g_s = _ce(logits, targets, np.ones((B, T), np.float32), **kw)
  loss_p, m_p, g_p = _ce(logits_p, targets_p, mask_p, **kw)
  np.testing.assert_allclose(loss_p, loss_s, rtol=1e-6)
  for k in m_s:
    np.testing.assert_allclose(m_p[k], m_s[k], rtol=1e-6)
  np.testing.assert_allclose(g_p[:, :T], g_s, rtol=1e-6, atol=1e-9)
  assert np.all(np.asarray(g_p[:, T:]) == 0)


def test_fully_masked_rows_and_batch_finite():
  logits, targets, mask = _inputs(3)
  mask[1] = 0
  _, _, g = _ce(logits, targets, mask)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g[1]) == 0)
  loss, metrics, g = _ce(logits, targets, np.zeros_like(mask))
  assert loss == 0 and metrics["loss_weight"] == 0 and np.all(np.asarray(g) == 0)


def test_loss_weight_gives_exact_accumulation():
  logits, targets, mask = _inputs(4)
  full, _, g_full = _ce(logits, targets, mask)
  # Two micro-batches of the same shape (the other rows masked out), combined by loss_weight.
  parts = []
  for rows in ([0], [1, 2]):
    m = np.zeros_like(mask)
    m[rows] = mask[rows]
    parts.append(_ce(logits, targets, m))
  w = [p[1]["loss_weight"] for p in parts]
  np.testing.assert_allclose(sum(p[0] * wi for p, wi in zip(parts, w)) / sum(w), full, rtol=1e-6)
  np.testing.assert_allclose(sum(np.asarray(p[2]) * wi for p, wi in zip(parts, w)) / sum(w), g_full,
                             rtol=1e-5, atol=1e-9)


def test_jit_and_vmap():
  logits, targets, mask = _inputs(5)
  stack = lambda x: np.stack([x, x[::-1]])
  vl, vm = jax.jit(jax.vmap(functools.partial(cross_entropy, z_loss=1e-2)))(
      stack(logits), stack(targets), stack(mask))
  for i in range(2):
    l, m, _ = _ce(stack(logits)[i], stack(targets)[i], stack(mask)[i], z_loss=1e-2)
    np.testing.assert_allclose(vl[i], l, rtol=1e-6)
    assert set(vm) == set(m) == {"ce/nll", "ce/accuracy", "ce/z", "loss_weight"}
    for k in m:
      np.testing.assert_allclose(vm[k][i], m[k], rtol=1e-6)


def test_bf16_extreme_logits_finite_grads():
  logits, targets, mask = _inputs(6)
  logits = np.where(logits > 0, 1e4, -1e4).astype(jnp.bfloat16)
  loss, metrics, g = _ce(logits, targets, mask, label_smoothing=0.1, z_loss=1e-2)
  assert g.dtype == jnp.bfloat16 and loss.dtype == jnp.float32
  assert np.isfinite(loss) and np.all(np.isfinite(np.asarray(g, np.float32)))
  assert all(np.isfinite(v) for v in metrics.values())
  # The upcast comes first: the bf16 loss is the float32 loss of the same values.
  ref = _ce(logits.astype(np.float32), targets, mask, label_smoothing=0.1, z_loss=1e-2)[0]
  np.testing.assert_allclose(loss, ref, rtol=1e-2)


def test_gradient_matches_finite_differences_x64():
  logits, targets, mask = _inputs(7)
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    w = mask.astype(np.float64)

    def f(l):
      per_tok = cross_entropy_per_token(l, targets, label_smoothing=0.1, z_loss=1e-2)
      return jnp.sum(per_tok * w) / jnp.sum(w)

    f_jit, g_jit = jax.jit(f), jax.jit(jax.grad(f))
    x = logits.astype(np.float64)
    g = np.asarray(g_jit(x))
    assert g.dtype == np.float64
    eps = 1e-6
    for _ in range(3):
      d = rng.normal(size=x.shape)
      fd = (float(f_jit(x + eps * d)) - float(f_jit(x - eps * d))) / (2 * eps)
      np.testing.assert_allclose(np.vdot(g, d), fd, rtol=1e-6)
