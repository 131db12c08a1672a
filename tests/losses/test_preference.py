"""Tests for postrl.losses._preference: DPO variants, listwise DPO, KTO, ORPO, SimPO, CPO.

Expected values are computed here in float64 numpy from the papers' formulas, independently of the
implementation's code path.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from postrl.losses._preference import DPO_VARIANTS, cpo, dpo, kto, listwise_dpo, orpo, simpo

F32 = dict(rtol=1e-6, atol=1e-7)   # float32 simple ops
COMP = dict(rtol=1e-5, atol=1e-6)  # composite


def logsig(x):
  return -np.logaddexp(0.0, -x)


def sig(x):
  return 1.0 / (1.0 + np.exp(-x))


# Three pairs chosen so that sorting by the policy margin and by the reference margin disagree
# (AOT's sorted forms then differ from the unsorted ones).
C = np.array([-5.0, -7.0, -2.5], np.float32)
R = np.array([-6.0, -5.0, -4.0], np.float32)
RC = np.array([-4.5, -6.0, -3.2], np.float32)
RR = np.array([-5.8, -5.5, -3.5], np.float32)
ARGS = tuple(jnp.asarray(a) for a in (C, R, RC, RR))


def _np_h(c, r, rc, rr):
  c, r, rc, rr = (np.asarray(a, np.float64) for a in (c, r, rc, rr))
  hw, hl = c - rc, r - rr
  return hw, hl, hw - hl, c - r, rc - rr


def np_dpo(variant, c, r, rc, rr, beta, **kw):
  """Per-variant losses straight from the papers (float64)."""
  hw, hl, h, pol, ref = _np_h(c, r, rc, rr)
  eps = kw.get("label_smoothing", 0.0)
  b = beta
  if variant == "sigmoid":
    per = -(1 - eps) * logsig(b * h) - eps * logsig(-b * h)
  elif variant == "robust":
    per = ((1 - eps) * -logsig(b * h) - eps * -logsig(-b * h)) / (1 - 2 * eps)
  elif variant == "hinge":
    per = np.maximum(0.0, 1.0 - b * h)
  elif variant == "ipo":
    per = (h - 1.0 / (2 * b)) ** 2
  elif variant == "exo_pair":
    pw = sig(b * h)
    pl = 1 - pw
    per = pw * np.log(pw / (1 - eps)) + pl * np.log(pl / eps)
  elif variant == "nca_pair":
    per = -logsig(b * hw) - 0.5 * logsig(-b * hw) - 0.5 * logsig(-b * hl)
  elif variant == "bco_pair":
    d = kw.get("running_mean", 0.0)
    per = -logsig(b * hw - d) - logsig(d - b * hl)
  elif variant == "sppo_hard":
    per = (hw - 1 / (2 * b)) ** 2 + (hl + 1 / (2 * b)) ** 2
  elif variant in ("aot", "aot_pair", "aot_unpaired"):
    d = np.sort(pol) - np.sort(ref) if variant == "aot" else np.sort(hw) - np.sort(hl)
    per = -(1 - eps) * logsig(b * d) - eps * logsig(-b * d)
  elif variant == "apo_zero":
    per = (1 - sig(b * hw)) + sig(b * hl)
  elif variant == "apo_down":
    per = sig(b * hw) + (1 - sig(b * h))
  elif variant == "discopop":
    tau = kw.get("tau", 0.05)
    rho = b * h
    m = sig(rho / tau)
    per = (1 - m) * -logsig(rho) + m * np.exp(-rho)
  else:
    raise AssertionError(variant)
  return per.mean()


# (variant, beta, kwargs): every registered variant, some twice with their hyper-parameters.
CASES = [
    ("sigmoid", 0.5, {}),
    ("sigmoid", 0.5, {"label_smoothing": 0.1}),     # cDPO
    ("robust", 0.5, {"label_smoothing": 0.1}),
    ("hinge", 0.5, {}),
    ("hinge", 2.0, {}),                              # some pairs past the hinge
    ("ipo", 0.5, {}),
    ("exo_pair", 0.5, {"label_smoothing": 1e-3}),
    ("nca_pair", 0.5, {}),
    ("bco_pair", 0.5, {}),
    ("bco_pair", 0.5, {"running_mean": 0.3}),
    ("sppo_hard", 0.5, {}),
    ("aot", 0.5, {}),
    ("aot", 0.5, {"label_smoothing": 0.1}),
    ("aot_pair", 0.5, {}),
    ("aot_unpaired", 0.5, {"label_smoothing": 0.2}),
    ("apo_zero", 0.5, {}),
    ("apo_down", 0.5, {}),
    ("discopop", 0.5, {}),
    ("discopop", 0.5, {"tau": 1.0}),
]
CASE_IDS = [f"{v}-{b}-{'-'.join(f'{k}={x}' for k, x in kw.items())}" for v, b, kw in CASES]


def test_registry_has_every_named_variant():
  expected = {"sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
              "aot", "aot_pair", "apo_zero", "apo_down", "discopop"}
  assert expected <= set(DPO_VARIANTS)
  assert {v for v, _, _ in CASES} == set(DPO_VARIANTS)


@pytest.mark.parametrize("variant,beta,kw", CASES, ids=CASE_IDS)
def test_dpo_variant_hand_values(variant, beta, kw):
  loss, metrics = dpo(*ARGS, beta=beta, variant=variant, **kw)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(loss, np_dpo(variant, C, R, RC, RR, beta, **kw), **F32)
  hw, hl, _, _, _ = _np_h(C, R, RC, RR)
  np.testing.assert_allclose(metrics["rewards/chosen"], np.mean(beta * hw), **F32)
  np.testing.assert_allclose(metrics["rewards/rejected"], np.mean(beta * hl), **F32)
  np.testing.assert_allclose(metrics["rewards/margin"], np.mean(beta * (hw - hl)), **F32)
  np.testing.assert_allclose(metrics["rewards/accuracy"], np.mean(hw > hl), **F32)
  np.testing.assert_allclose(metrics["logps/chosen"], C.mean(), **F32)
  np.testing.assert_allclose(metrics["logps/rejected"], R.mean(), **F32)
  for v in metrics.values():
    assert v.shape == () and v.dtype == jnp.float32


def test_dpo_sigmoid_literal_numbers():
  # One pair worked by hand: h = (-1 - -2) - (-1.5 - -1.5) = 1, β = 1 -> -log σ(1) = log(1 + e^-1).
  one = lambda x: jnp.array([x])  # noqa: E731
  loss, m = dpo(one(-1.0), one(-2.0), one(-1.5), one(-1.5), beta=1.0)
  np.testing.assert_allclose(loss, 0.31326168751822286, **F32)
  np.testing.assert_allclose(m["rewards/chosen"], 0.5, **F32)
  np.testing.assert_allclose(m["rewards/rejected"], -0.5, **F32)
  np.testing.assert_allclose(m["rewards/accuracy"], 1.0, **F32)


def test_cdpo_label_smoothing_by_hand():
  # h = (-3 - -4) - (-4 - -3) = 2, β = 0.5, ε = 0.25: 0.75·log(1 + e^-1) + 0.25·log(1 + e^1).
  args = (jnp.array([-3.0]), jnp.array([-4.0]), jnp.array([-4.0]), jnp.array([-3.0]))
  loss, _ = dpo(*args, beta=0.5, label_smoothing=0.25)
  expected = 0.75 * np.log1p(np.exp(-1.0)) + 0.25 * np.log1p(np.exp(1.0))
  np.testing.assert_allclose(loss, expected, **F32)
  # ε = 0.5 makes the loss symmetric in chosen/rejected.
  a, _ = dpo(*args, beta=0.5, label_smoothing=0.5)
  b, _ = dpo(args[1], args[0], args[3], args[2], beta=0.5, label_smoothing=0.5)
  np.testing.assert_allclose(a, b, **F32)


def test_dpo_policy_equals_reference():
  c, r = jnp.asarray(C), jnp.asarray(R)
  loss, m = dpo(c, r, c, r, beta=0.3)
  np.testing.assert_allclose(loss, np.log(2.0), **F32)
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
    assert float(m[key]) == 0.0, key
  # cDPO and rDPO are log 2 there too, whatever ε.
  np.testing.assert_allclose(dpo(c, r, c, r, label_smoothing=0.2)[0], np.log(2.0), **F32)
  np.testing.assert_allclose(dpo(c, r, c, r, variant="robust", label_smoothing=0.2)[0],
                             np.log(2.0), **F32)
  # IPO there is (1/(2β))².
  np.testing.assert_allclose(dpo(c, r, c, r, beta=0.3, variant="ipo")[0], (1 / 0.6) ** 2, **F32)


def test_ipo_uses_the_inputs_as_given_and_length_normalises_when_given_averages():
  # TRL's length-normalised IPO = ours on averaged log-probs.
  lc, lr = np.array([4.0, 10.0, 5.0]), np.array([8.0, 2.0, 5.0])
  avg = [jnp.asarray(x) for x in (C / lc, R / lr, RC / lc, RR / lr)]
  loss, _ = dpo(*avg, beta=0.5, variant="ipo")
  delta = (C - RC) / lc - (R - RR) / lr
  np.testing.assert_allclose(loss, np.mean((delta.astype(np.float64) - 1.0) ** 2), **F32)


def _grads(variant, beta, kw, args=ARGS):
  f = lambda c, r: dpo(c, r, args[2], args[3], beta=beta, variant=variant, **kw)[0]
  return jax.grad(f, argnums=(0, 1))(args[0], args[1])


@pytest.mark.parametrize("variant,beta,kw", CASES, ids=CASE_IDS)
def test_dpo_gradient_matches_float64_finite_differences(variant, beta, kw):
  gc, gr = _grads(variant, beta, kw)
  base = [np.asarray(a, np.float64) for a in (C, R, RC, RR)]
  eps = 1e-6
  for which, g in ((0, gc), (1, gr)):
    fd = np.zeros(3)
    for i in range(3):
      up = [a.copy() for a in base]
      dn = [a.copy() for a in base]
      up[which][i] += eps
      dn[which][i] -= eps
      fd[i] = (np_dpo(variant, *up, beta, **kw) - np_dpo(variant, *dn, beta, **kw)) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant,beta,kw", CASES, ids=CASE_IDS)
def test_dpo_sign_more_chosen_less_loss(variant, beta, kw):
  """At policy == reference, raising log π(y_w) lowers the loss, raising log π(y_l) raises it."""
  c, r = jnp.asarray(C), jnp.asarray(R)
  args = (c, r, c, r)
  if variant == "discopop":
    # DiscoPOP is non-convex: with τ = 0.05 its slope at ρ = 0 is (1-log 2)/(4τ) - 3/4 > 0; check
    # the sign where the policy still prefers y_l (ρ = -2).
    args = (c, r, c + 4.0, r)
  if variant != "apo_down":
    gc, gr = _grads(variant, beta, kw, args)
  if variant == "apo_down":
    # APO-down lowers the likelihood of both responses. Its chosen slope β[σ'(βh_w) - σ'(βh)] is 0
    # at policy == reference, and positive once the rejected response is below the reference.
    gc, gr = _grads(variant, beta, kw, args)
    assert np.all(np.asarray(gc) == 0) and np.all(np.asarray(gr) > 0)
    args = (c, r, c, r + 1.0)
    gc, gr = _grads(variant, beta, kw, args)
    assert np.all(np.asarray(gc) > 0) and np.all(np.asarray(gr) > 0)
    worse, _ = dpo(args[0], args[1] + 0.1, args[2], args[3], beta=beta, variant=variant, **kw)
    base, _ = dpo(*args, beta=beta, variant=variant, **kw)
    assert worse > base
    return
  assert np.all(np.asarray(gc) < 0), gc
  assert np.all(np.asarray(gr) > 0), gr
  base, _ = dpo(*args, beta=beta, variant=variant, **kw)
  better, _ = dpo(args[0] + 0.1, args[1], args[2], args[3], beta=beta, variant=variant, **kw)
  worse, _ = dpo(args[0], args[1] + 0.1, args[2], args[3], beta=beta, variant=variant, **kw)
  assert better < base < worse


def test_bco_running_mean_is_a_constant():
  g = jax.grad(lambda m: dpo(*ARGS, beta=0.5, variant="bco_pair", running_mean=m)[0])(0.3)
  assert float(g) == 0.0
  # but it does shift the loss
  a = dpo(*ARGS, beta=0.5, variant="bco_pair", running_mean=0.0)[0]
  b = dpo(*ARGS, beta=0.5, variant="bco_pair", running_mean=0.3)[0]
  assert abs(float(a) - float(b)) > 1e-3


def test_aot_sorts_over_the_batch():
  # AOT depends on the batch only through the sorted margins: permuting the rows of the reference
  # margins alone does not change it, whereas it changes plain DPO.
  perm = jnp.array([2, 0, 1])
  c, r, rc, rr = ARGS
  base = dpo(c, r, rc, rr, beta=0.5, variant="aot")[0]
  permuted = dpo(c, r, rc[perm], rr[perm], beta=0.5, variant="aot")[0]
  np.testing.assert_allclose(base, permuted, **F32)
  assert abs(float(dpo(c, r, rc[perm], rr[perm], beta=0.5)[0])
             - float(dpo(c, r, rc, rr, beta=0.5)[0])) > 1e-3


def test_dpo_errors_name_the_offender():
  with pytest.raises(ValueError, match="'sigmod'"):
    dpo(*ARGS, variant="sigmod")
  with pytest.raises(ValueError, match="tau"):
    dpo(*ARGS, variant="sigmoid", tau=0.1)
  with pytest.raises(ValueError, match="running_man"):
    dpo(*ARGS, variant="bco_pair", running_man=0.1)
  with pytest.raises(ValueError, match="label_smoothing"):
    dpo(*ARGS, variant="ipo", label_smoothing=0.1)
  with pytest.raises(ValueError, match="robust"):
    dpo(*ARGS, variant="robust", label_smoothing=0.5)
  with pytest.raises(ValueError, match="exo_pair"):
    dpo(*ARGS, variant="exo_pair")


# ------------------------------------------------------------------------------------------------
# jit / vmap / bf16 extremes for every DPO variant
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,beta,kw", CASES, ids=CASE_IDS)
def test_dpo_jit_and_vmap(variant, beta, kw):
  # One compilation covers both: jit(vmap(dpo)) over a leading axis == eager dpo on each slice.
  fn = jax.jit(jax.vmap(functools.partial(dpo, beta=beta, variant=variant, **kw)))
  stacked = [jnp.stack([a, a[::-1] - 0.5]) for a in ARGS]   # [2, B]; slice 0 is ARGS
  vl, vm = fn(*stacked)
  assert vl.shape == (2,) and all(v.shape == (2,) for v in vm.values())
  for i in range(2):
    li, mi = dpo(*(s[i] for s in stacked), beta=beta, variant=variant, **kw)
    np.testing.assert_allclose(vl[i], li, **F32)
    for k in mi:
      np.testing.assert_allclose(vm[k][i], mi[k], **F32, err_msg=k)


@pytest.mark.parametrize("variant,beta,kw", CASES, ids=CASE_IDS)
def test_dpo_bf16_extremes_finite(variant, beta, kw):
  big = jnp.array([1e4, -1e4, 0.0, -1e4], jnp.bfloat16)
  args = (big, -big, -big, big[::-1])
  def f(c, r):
    return dpo(c, r, args[2], args[3], beta=beta, variant=variant, **kw)[0]
  loss, (gc, gr) = jax.value_and_grad(f, argnums=(0, 1))(args[0], args[1])
  assert np.isfinite(float(loss))
  assert gc.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(gc, np.float32)))
  assert np.all(np.isfinite(np.asarray(gr, np.float32)))


def test_dpo_bf16_matches_float32():
  args16 = [a.astype(jnp.bfloat16) for a in ARGS]
  args32 = [a.astype(jnp.float32) for a in args16]
  np.testing.assert_allclose(dpo(*args16, beta=0.5)[0], dpo(*args32, beta=0.5)[0], rtol=1e-2)


# ------------------------------------------------------------------------------------------------
# listwise DPO
# ------------------------------------------------------------------------------------------------


def np_plackett_luce(logps, ref, beta, mask=None):
  logps, ref = np.asarray(logps, np.float64), np.asarray(ref, np.float64)
  mask = np.ones(logps.shape, bool) if mask is None else np.asarray(mask, bool)
  total = 0.0
  for b in range(logps.shape[0]):
    rew = beta * (logps[b] - ref[b])[mask[b]]
    for k in range(len(rew)):
      total -= rew[k] - np.log(np.sum(np.exp(rew[k:])))
  return total / logps.shape[0]


_listwise = jax.jit(functools.partial(listwise_dpo, beta=0.5))


def test_listwise_k2_equals_dpo_sigmoid():
  logps = jnp.stack([ARGS[0], ARGS[1]], -1)
  ref = jnp.stack([ARGS[2], ARGS[3]], -1)
  lw_loss, lw_m = _listwise(logps, ref)
  dpo_loss, dpo_m = dpo(*ARGS, beta=0.5)
  np.testing.assert_allclose(lw_loss, dpo_loss, **F32)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
    np.testing.assert_allclose(lw_m[k], dpo_m[k], **F32, err_msg=k)
  g_lw = jax.grad(lambda x: _listwise(x, ref)[0])(logps)
  gc, gr = jax.grad(lambda c, r: dpo(c, r, ARGS[2], ARGS[3], beta=0.5)[0], (0, 1))(ARGS[0], ARGS[1])
  np.testing.assert_allclose(g_lw, jnp.stack([gc, gr], -1), **F32)


LOGPS3 = np.array([[-3.0, -4.0, -2.5], [-6.0, -5.0, -9.0]], np.float32)
REF3 = np.array([[-3.5, -3.0, -3.0], [-6.5, -5.5, -7.0]], np.float32)


def test_listwise_hand_value_k3():
  loss, m = _listwise(jnp.asarray(LOGPS3), jnp.asarray(REF3))
  np.testing.assert_allclose(loss, np_plackett_luce(LOGPS3, REF3, 0.5), **F32)
  rew = 0.5 * (LOGPS3.astype(np.float64) - REF3)
  np.testing.assert_allclose(m["rewards/chosen"], rew[:, 0].mean(), **F32)
  np.testing.assert_allclose(m["rewards/rejected"], rew[:, -1].mean(), **F32)
  pairs = [rew[b, i] > rew[b, j] for b in range(2) for i in range(3) for j in range(i + 1, 3)]
  np.testing.assert_allclose(m["rewards/accuracy"], np.mean(pairs), **F32)


def test_listwise_order_matters():
  swapped = LOGPS3[:, [1, 0, 2]], REF3[:, [1, 0, 2]]
  a = _listwise(jnp.asarray(LOGPS3), jnp.asarray(REF3))[0]
  b = _listwise(*map(jnp.asarray, swapped))[0]
  assert abs(float(a) - float(b)) > 1e-3


@pytest.mark.parametrize("pad_at", [3, 1, 0])
def test_listwise_masked_equals_sliced(pad_at):
  # A 4th (padded) response with garbage, masked out, anywhere in the list == the 3-response list.
  garbage_l = np.array([np.nan, np.inf], np.float32)[:, None]
  garbage_r = np.array([-np.inf, 7.0], np.float32)[:, None]
  logps4 = np.insert(LOGPS3, pad_at, garbage_l[:, 0], axis=1)
  ref4 = np.insert(REF3, pad_at, garbage_r[:, 0], axis=1)
  mask4 = np.insert(np.ones((2, 3), bool), pad_at, False, axis=1)
  sliced = _listwise(jnp.asarray(LOGPS3), jnp.asarray(REF3))
  masked = _listwise(jnp.asarray(logps4), jnp.asarray(ref4), mask_BxK=jnp.asarray(mask4))
  np.testing.assert_allclose(masked[0], sliced[0], **F32)
  for k in sliced[1]:
    np.testing.assert_allclose(masked[1][k], sliced[1][k], **F32, err_msg=k)
  g_sliced = jax.grad(lambda x: _listwise(x, jnp.asarray(REF3))[0])(jnp.asarray(LOGPS3))
  g_masked = jax.grad(lambda x: _listwise(x, jnp.asarray(ref4), mask_BxK=jnp.asarray(mask4))[0])(
      jnp.asarray(logps4))
  assert np.all(np.isfinite(np.asarray(g_masked)))
  np.testing.assert_allclose(np.delete(np.asarray(g_masked), pad_at, axis=1), g_sliced, **F32)
  assert np.all(np.asarray(g_masked)[:, pad_at] == 0)


def test_listwise_variable_k_and_fully_masked_rows():
  logps = np.array([[-3.0, -4.0, -2.5, -1.0],
                    [-6.0, -5.0, 0.0, 0.0],
                    [1.0, 2.0, 3.0, 4.0],       # fully masked
                    [-2.0, 0.0, 0.0, 0.0]],     # one response: no preference information
                   np.float32)
  ref = np.full_like(logps, -3.0)
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], bool)
  loss, m = _listwise(jnp.asarray(logps), jnp.asarray(ref), mask_BxK=jnp.asarray(mask))
  np.testing.assert_allclose(loss, np_plackett_luce(logps, ref, 0.5, mask), **F32)
  rew = 0.5 * (logps.astype(np.float64) - ref)
  np.testing.assert_allclose(m["rewards/chosen"], (rew[0, 0] + rew[1, 0]) / 2, **F32)
  np.testing.assert_allclose(m["rewards/rejected"], (rew[0, 3] + rew[1, 1]) / 2, **F32)
  g = jax.grad(lambda x: _listwise(x, jnp.asarray(ref), mask_BxK=jnp.asarray(mask))[0])(
      jnp.asarray(logps))
  assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(g)[2:] == 0)
  # all rows masked: zero loss, zero (finite) gradient
  g0 = jax.grad(lambda x: _listwise(x, jnp.asarray(ref), mask_BxK=jnp.zeros((4, 4), bool))[0])(
      jnp.asarray(logps))
  assert np.all(np.asarray(g0) == 0)


def test_listwise_gradient_matches_finite_differences():
  g = jax.grad(lambda x: _listwise(x, jnp.asarray(REF3))[0])(jnp.asarray(LOGPS3))
  base = LOGPS3.astype(np.float64)
  fd = np.zeros_like(base)
  eps = 1e-6
  for idx in np.ndindex(*base.shape):
    up, dn = base.copy(), base.copy()
    up[idx] += eps
    dn[idx] -= eps
    fd[idx] = (np_plackett_luce(up, REF3, 0.5) - np_plackett_luce(dn, REF3, 0.5)) / (2 * eps)
  np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-6)
  # best response pushed up, worst pushed down
  assert np.all(np.asarray(g)[:, 0] < 0) and np.all(np.asarray(g)[:, -1] > 0)


def test_listwise_vmap_and_bf16_extremes():
  stacked = jnp.stack([jnp.asarray(LOGPS3), jnp.asarray(LOGPS3)[::-1]])
  refs = jnp.stack([jnp.asarray(REF3)] * 2)
  vl, _ = jax.vmap(_listwise)(stacked, refs)
  for i in range(2):
    np.testing.assert_allclose(vl[i], _listwise(stacked[i], refs[i])[0], **F32)
  big = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4]], jnp.bfloat16)
  mask = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
  loss, g = jax.value_and_grad(lambda x: _listwise(x, -x[:, ::-1], mask_BxK=mask)[0])(big)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g, np.float32)))


# ------------------------------------------------------------------------------------------------
# KTO
# ------------------------------------------------------------------------------------------------

KTO_L = np.array([-4.0, -6.0, -3.0, -8.0], np.float32)
KTO_REF = np.array([-5.0, -5.5, -3.5, -6.0], np.float32)
KTO_D = np.array([True, False, True, False])


def np_kto(logps, ref, d, ref_kl, beta, wd=1.0, wu=1.0):
  r = np.asarray(logps, np.float64) - ref
  z = max(ref_kl, 0.0)
  per = np.where(d, wd * (1 - sig(beta * (r - z))), wu * (1 - sig(beta * (z - r))))
  return per.mean()


_kto = jax.jit(functools.partial(kto, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5))


def test_kto_hand_values():
  args = (jnp.asarray(KTO_L), jnp.asarray(KTO_REF), jnp.asarray(KTO_D))
  loss, m = _kto(*args, 0.2)
  np.testing.assert_allclose(loss, np_kto(KTO_L, KTO_REF, KTO_D, 0.2, 0.5, 1.0, 1.5), **F32)
  r = 0.5 * (KTO_L.astype(np.float64) - KTO_REF)
  np.testing.assert_allclose(m["rewards/chosen"], r[KTO_D].mean(), **F32)
  np.testing.assert_allclose(m["rewards/rejected"], r[~KTO_D].mean(), **F32)
  np.testing.assert_allclose(m["kto/ref_kl"], 0.2, **F32)
  # the undesirable weight matters
  other = kto(*args, 0.2, beta=0.5)[0]
  np.testing.assert_allclose(other, np_kto(KTO_L, KTO_REF, KTO_D, 0.2, 0.5), **F32)
  assert abs(float(other) - float(loss)) > 1e-3
  # one example by hand: desirable, r = 1, z = 0.2, β = 0.5 -> 1 - σ(0.4)
  one = kto(jnp.array([-4.0]), jnp.array([-5.0]), jnp.array([True]), 0.2, beta=0.5)[0]
  np.testing.assert_allclose(one, 1 - 1 / (1 + np.exp(-0.4)), **F32)



def test_kto_weights_scale_the_whole_term():
  # ℓ = λ_y (1 - σ(·)) (the paper's λ_y - v with v = λ_y σ(·)), not λ_y - σ(·): with λ_D = 2,
  # λ_U = 3, r = 1, z = 0.2, β = 0.5 the two examples give 2 (1 - σ(0.4)) and 3 (1 - σ(-0.4)).
  loss, _ = kto(jnp.array([-4.0, -4.0]), jnp.array([-5.0, -5.0]), jnp.array([True, False]), 0.2,
                beta=0.5, desirable_weight=2.0, undesirable_weight=3.0)
  np.testing.assert_allclose(loss, (2 * (1 - sig(0.4)) + 3 * (1 - sig(-0.4))) / 2, **F32)

def test_kto_ref_kl_clamped_and_stop_gradient():
  args = (jnp.asarray(KTO_L), jnp.asarray(KTO_REF), jnp.asarray(KTO_D))
  np.testing.assert_allclose(_kto(*args, -3.0)[0], _kto(*args, 0.0)[0], **F32)
  g = jax.grad(lambda z: _kto(*args, z)[0])(0.7)
  assert float(g) == 0.0
  gl = jax.grad(lambda x: _kto(x, *args[1:], 0.7)[0])(args[0])
  gl = np.asarray(gl)
  # desirable examples are pushed up, undesirable down
  assert np.all(gl[KTO_D] < 0) and np.all(gl[~KTO_D] > 0)
  # against float64 finite differences of the formula
  eps = 1e-6
  fd = []
  for i in range(4):
    up, dn = KTO_L.astype(np.float64), KTO_L.astype(np.float64)
    up[i] += eps
    dn[i] -= eps
    fd.append((np_kto(up, KTO_REF, KTO_D, 0.7, 0.5, 1.0, 1.5)
               - np_kto(dn, KTO_REF, KTO_D, 0.7, 0.5, 1.0, 1.5)) / (2 * eps))
  np.testing.assert_allclose(gl, fd, rtol=1e-5, atol=1e-6)


def test_kto_vmap_and_bf16_extremes():
  stacked = [jnp.stack([jnp.asarray(a), jnp.asarray(a)[::-1]]) for a in (KTO_L, KTO_REF, KTO_D)]
  vl, _ = jax.vmap(_kto, in_axes=(0, 0, 0, None))(*stacked, 0.2)
  for i in range(2):
    np.testing.assert_allclose(vl[i], _kto(*(s[i] for s in stacked), 0.2)[0], **F32)
  big = jnp.array([1e4, -1e4, 1e4, -1e4], jnp.bfloat16)
  loss, g = jax.value_and_grad(lambda x: _kto(x, -x, jnp.asarray(KTO_D), 1e4)[0])(big)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g, np.float32)))


# ------------------------------------------------------------------------------------------------
# ORPO, SimPO, CPO
# ------------------------------------------------------------------------------------------------

AC = np.array([-0.5, -1.2, -0.05], np.float32)
AR = np.array([-0.9, -0.7, -2.0], np.float32)
NLL = np.array([0.5, 1.2, 0.05], np.float32)


def np_orpo(ac, ar, nll, lam):
  ac, ar = np.asarray(ac, np.float64), np.asarray(ar, np.float64)
  pc, pr = np.exp(ac), np.exp(ar)
  lor = np.log(pc / (1 - pc)) - np.log(pr / (1 - pr))
  return np.mean(nll) + lam * np.mean(-logsig(lor))


_orpo = jax.jit(functools.partial(orpo, lam=0.25))
_simpo = jax.jit(functools.partial(simpo, beta=2.0, gamma=0.5))
_cpo = jax.jit(functools.partial(cpo, beta=0.5, alpha=0.7))


def test_orpo_hand_values():
  loss, m = _orpo(jnp.asarray(AC), jnp.asarray(AR), jnp.asarray(NLL))
  np.testing.assert_allclose(loss, np_orpo(AC, AR, NLL, 0.25), **F32)
  np.testing.assert_allclose(m["orpo/nll"], NLL.mean(), **F32)
  # one pair by hand: P_w = 1/2 (odds 1), P_l = 1/4 (odds 1/3) -> log odds ratio = log 3.
  one, m1 = orpo(jnp.array([np.log(0.5)]), jnp.array([np.log(0.25)]), jnp.array([0.0]), lam=1.0)
  np.testing.assert_allclose(m1["orpo/log_odds_ratio"], np.log(3.0), **F32)
  np.testing.assert_allclose(one, np.log1p(1 / 3), **F32)


def test_orpo_gradient_and_extremes():
  g = jax.grad(lambda a, b: _orpo(a, b, jnp.asarray(NLL))[0], (0, 1))(jnp.asarray(AC),
                                                                       jnp.asarray(AR))
  assert np.all(np.asarray(g[0]) < 0) and np.all(np.asarray(g[1]) > 0)
  eps = 1e-6
  for which in range(2):
    fd = []
    for i in range(3):
      up = [AC.astype(np.float64), AR.astype(np.float64)]
      dn = [AC.astype(np.float64), AR.astype(np.float64)]
      up[which][i] += eps
      dn[which][i] -= eps
      fd.append((np_orpo(*up, NLL, 0.25) - np_orpo(*dn, NLL, 0.25)) / (2 * eps))
    np.testing.assert_allclose(g[which], fd, rtol=1e-5, atol=1e-6)
  # P -> 1 (avg logp 0 or even a bogus positive value) and P -> 0 stay finite, also in bf16.
  big = jnp.array([0.0, -1e4, 1e4, -1e-30], jnp.bfloat16)
  loss, gs = jax.value_and_grad(lambda a, b: _orpo(a, b, -a)[0], (0, 1))(big, big[::-1])
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in gs)


def test_simpo_hand_values():
  loss, m = _simpo(jnp.asarray(AC), jnp.asarray(AR))
  expected = np.mean(-logsig(2.0 * AC.astype(np.float64) - 2.0 * AR - 0.5))
  np.testing.assert_allclose(loss, expected, **F32)
  np.testing.assert_allclose(m["rewards/margin"], np.mean(2.0 * (AC.astype(np.float64) - AR)),
                             **F32)
  # one by hand: a_w = -1, a_l = -1.5, β = 2, γ = 0.5 -> -log σ(0.5)
  one, _ = simpo(jnp.array([-1.0]), jnp.array([-1.5]), beta=2.0, gamma=0.5)
  np.testing.assert_allclose(one, np.log1p(np.exp(-0.5)), **F32)
  # γ is a margin: equal rewards still cost -log σ(-γ)
  eq, _ = simpo(jnp.array([-1.0]), jnp.array([-1.0]), beta=2.0, gamma=0.5)
  np.testing.assert_allclose(eq, np.log1p(np.exp(0.5)), **F32)
  gc, gr = jax.grad(lambda a, b: _simpo(a, b)[0], (0, 1))(jnp.asarray(AC), jnp.asarray(AR))
  assert np.all(np.asarray(gc) < 0) and np.all(np.asarray(gr) > 0)


def test_cpo_hand_values():
  loss, m = _cpo(jnp.asarray(C), jnp.asarray(R), jnp.asarray(NLL))
  expected = (np.mean(-logsig(0.5 * (C.astype(np.float64) - R)))
              + 0.7 * NLL.astype(np.float64).mean())
  np.testing.assert_allclose(loss, expected, **F32)
  np.testing.assert_allclose(m["cpo/nll"], NLL.mean(), **F32)
  gc, gr = jax.grad(lambda a, b: _cpo(a, b, jnp.asarray(NLL))[0], (0, 1))(ARGS[0], ARGS[1])
  np.testing.assert_allclose(gc, -0.5 * sig(-0.5 * (C.astype(np.float64) - R)) / 3, **F32)
  np.testing.assert_allclose(gr, 0.5 * sig(-0.5 * (C.astype(np.float64) - R)) / 3, **F32)


@pytest.mark.parametrize("name", ["orpo", "simpo", "cpo"])
def test_reference_free_vmap_and_bf16(name):
  fn = {"orpo": lambda a, b: _orpo(a, b, -a), "simpo": _simpo,
        "cpo": lambda a, b: _cpo(a, b, -a)}[name]
  stacked = [jnp.stack([jnp.asarray(x), jnp.asarray(x)[::-1]]) for x in (AC, AR)]
  vl, _ = jax.vmap(fn)(*stacked)
  for i in range(2):
    np.testing.assert_allclose(vl[i], fn(stacked[0][i], stacked[1][i])[0], **F32)
  big = jnp.array([1e4, -1e4, 0.0], jnp.bfloat16)
  loss, gs = jax.value_and_grad(lambda a, b: fn(a, b)[0], (0, 1))(big, big[::-1])
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in gs)
