"""Tests of postrl/losses/_policy.py: PPO-clip, value loss, GAE, group advantages, GRPO family."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from postrl.losses._common import aggregate
from postrl.losses._policy import (GRPO_AGGREGATION, GRPO_VARIANTS, gae, group_advantages,
                                   group_step_advantages, grpo, grpo_per_token, ppo_clip,
                                   ppo_clip_per_token, reinforce_pp_advantages, rloo_advantages,
                                   value_loss, value_loss_per_token)

F32 = dict(rtol=1e-6, atol=1e-7)      # simple float32 ops
COMP = dict(rtol=1e-5, atol=1e-6)     # composite float32 expressions
# float32 central differences with step h=1e-3 on O(1) losses: rounding error ~ ulp(loss)/h ~ 1e-4,
# truncation ~ h^2 f'''/6 ~ 1e-7; compared with gradients of size ~0.1.
FD = dict(rtol=2e-3, atol=2e-4)


def _rand(shape, seed, scale=1.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


# A [2, 4] batch with one padded position in row 1; shared by several tests.
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
LP = np.array([[-1.0, -0.5, -2.0, -0.3], [-0.7, -1.2, -0.4, -9.0]], np.float32)
OLD = np.array([[-1.1, -0.45, -1.6, -0.3], [-0.75, -1.0, -0.5, -3.0]], np.float32)
REF = np.array([[-0.9, -0.6, -1.8, -0.5], [-0.6, -1.1, -0.45, -2.0]], np.float32)
ROLL = np.array([[-1.2, -0.4, -1.5, -0.35], [-0.7, -1.05, -0.6, -1.0]], np.float32)
ADV_B = np.array([1.0, -0.5], np.float32)


# ----------------------------------------------------------------------------------------------
# numpy references (independent of the implementation)


def np_ppo_tokens(lp, old, adv, el, eh, dual=None):
  r = np.exp(lp.astype(np.float64) - old)
  loss = -np.minimum(r * adv, np.clip(r, 1 - el, 1 + eh) * adv)
  if dual is not None:
    loss = np.where(adv < 0, np.minimum(loss, -dual * adv), loss)
  return loss


def np_k3(lp, ref):
  x = ref.astype(np.float64) - lp
  return np.exp(x) - x - 1


def np_agg(v, m, mode, norm_len=None):
  v = np.where(m > 0, v, 0.0) * m
  if mode == "token_mean":
    return v.sum() / m.sum()
  if mode == "seq_mean_token_mean":
    return np.mean(v.sum(-1) / np.maximum(m.sum(-1), 1))
  if mode == "seq_mean_token_sum":
    return np.mean(v.sum(-1))
  return np.mean(v.sum(-1)) / (v.shape[-1] if norm_len is None else norm_len)


# each paper's aggregation, written independently of GRPO_AGGREGATION
NP_AGGREGATION = {"grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm",
                  "dapo": "token_mean", "gspo": "seq_mean_token_mean", "cispo": "token_mean"}


def np_grpo(lp, old, ref, adv_b, m, variant, el, eh, beta, roll=None, cap=None, norm_len=None):
  adv = np.broadcast_to(adv_b[:, None], lp.shape)
  if variant == "gspo":
    s = np.exp(((lp - old.astype(np.float64)) * m).sum(-1) / m.sum(-1))[:, None]
    pg = np.broadcast_to(-np.minimum(s * adv, np.clip(s, 1 - el, 1 + eh) * adv), lp.shape)
  elif variant == "cispo":
    r = np.exp(lp.astype(np.float64) - old)
    pg = -np.clip(r, 1 - el, 1 + eh) * adv * lp
  else:
    pg = np_ppo_tokens(lp, old, adv, el, eh)
  if roll is not None:
    w = np.exp(old.astype(np.float64) - roll)
    pg = pg * (w if cap is None else np.minimum(w, cap))
  per = pg + beta * np_k3(lp, ref)
  return np_agg(per, m, NP_AGGREGATION[variant], norm_len)


# ----------------------------------------------------------------------------------------------
# PPO-clip


def test_ppo_ratio_one_is_minus_mean_advantage_and_gradient():
  adv = _rand((2, 4), 1)
  loss_fn = lambda lp: ppo_clip(lp, LP, adv, MASK)[0]
  loss, g = jax.value_and_grad(loss_fn)(jnp.asarray(LP))
  n = MASK.sum()
  np.testing.assert_allclose(loss, -(adv * MASK).sum() / n, **F32)
  np.testing.assert_allclose(g, -adv * MASK / n, **F32)
  _, m = ppo_clip(LP, LP, adv, MASK)
  np.testing.assert_allclose(m["pg/ratio_mean"], 1.0, **F32)
  assert m["pg/clipfrac"] == 0 and m["pg/approx_kl"] == 0


# (advantage, ratio, eps_low, eps_high, loss, d loss / d logp, clipped)
CLIP_CASES = [
    (2.0, 1.5, 0.2, 0.2, -2.4, 0.0, True),      # A>0 above 1+eps: clipped
    (2.0, 0.5, 0.2, 0.2, -1.0, -1.0, False),    # A>0 below 1-eps: not clipped (-A r)
    (-1.0, 0.5, 0.2, 0.2, 0.8, 0.0, True),      # A<0 below 1-eps: clipped
    (-1.0, 1.5, 0.2, 0.2, 1.5, 1.5, False),     # A<0 above 1+eps: not clipped
    (1.0, 1.25, 0.1, 0.3, -1.25, -1.25, False),  # clip-higher: 1.25 inside [0.9, 1.3]
    (1.0, 1.4, 0.1, 0.3, -1.3, 0.0, True),
    (-1.0, 0.95, 0.1, 0.3, 0.95, 0.95, False),
    (-1.0, 0.8, 0.1, 0.3, 0.9, 0.0, True),
    (0.0, 3.0, 0.2, 0.2, 0.0, 0.0, False),      # A=0: nothing, not counted as clipped
]


@pytest.mark.parametrize("el,eh", [(0.2, 0.2), (0.1, 0.3)])
def test_ppo_clip_hand_values(el, eh):
  cases = [c for c in CLIP_CASES if (c[2], c[3]) == (el, eh) or c[0] == 0.0]
  adv = np.array([[c[0] for c in cases]], np.float32)
  lp = np.log(np.array([[c[1] for c in cases]], np.float32))
  old = np.zeros_like(lp)
  mask = np.ones_like(lp)
  fn = lambda x: ppo_clip_per_token(x, old, adv, mask, clip_eps_low=el, clip_eps_high=eh)
  vals = fn(jnp.asarray(lp))
  g = jax.grad(lambda x: fn(x).sum())(jnp.asarray(lp))
  np.testing.assert_allclose(vals[0], [c[4] for c in cases], **F32)
  np.testing.assert_allclose(g[0], [c[5] for c in cases], **F32)
  loss, m = ppo_clip(lp, old, adv, mask, clip_eps_low=el, clip_eps_high=eh)
  np.testing.assert_allclose(loss, np.mean([c[4] for c in cases]), **F32)
  np.testing.assert_allclose(m["pg/clipfrac"], np.mean([c[6] for c in cases]), **F32)


def test_ppo_dual_clip():
  adv = np.array([[-1.0, -1.0, 1.0, -2.0]], np.float32)
  lp = np.log(np.array([[5.0, 2.0, 5.0, 0.5]], np.float32))
  old, mask = np.zeros_like(lp), np.ones_like(lp)
  fn = lambda x: ppo_clip_per_token(x, old, adv, mask, dual_clip=3.0)
  vals = fn(jnp.asarray(lp))
  g = jax.grad(lambda x: fn(x).sum())(jnp.asarray(lp))
  # r=5, A=-1: -rA = 5 capped at -cA = 3; r=2: 2 < 3 stays; A>0 untouched (-1.2);
  # r=0.5, A=-2: clipped to 0.8 -> 1.6 < 6 stays.
  np.testing.assert_allclose(vals[0], [3.0, 2.0, -1.2, 1.6], **F32)
  np.testing.assert_allclose(g[0], [0.0, 2.0, 0.0, 0.0], **F32)
  _, m = ppo_clip(lp, old, adv, mask, dual_clip=3.0)
  np.testing.assert_allclose(m["pg/dualclip_frac"], 0.25, **F32)
  without = ppo_clip_per_token(lp, old, adv, mask)
  np.testing.assert_allclose(without[0], [5.0, 2.0, -1.2, 1.6], **F32)
  with pytest.raises(ValueError):
    ppo_clip(lp, old, adv, mask, dual_clip=1.0)


def test_ppo_matches_numpy_and_metrics():
  adv = _rand((2, 4), 2)
  loss, m = ppo_clip(LP, OLD, adv, MASK, clip_eps_low=0.1, clip_eps_high=0.28)
  np.testing.assert_allclose(loss, np_agg(np_ppo_tokens(LP, OLD, adv, 0.1, 0.28), MASK,
                                          "token_mean"), **COMP)
  r = np.exp(LP.astype(np.float64) - OLD)
  np.testing.assert_allclose(m["pg/ratio_mean"], (r * MASK).sum() / MASK.sum(), **COMP)
  k3 = (r - 1) - np.log(r)
  np.testing.assert_allclose(m["pg/approx_kl"], (k3 * MASK).sum() / MASK.sum(), **COMP)
  for k, v in m.items():
    assert v.shape == () and v.dtype == jnp.float32, k


# ----------------------------------------------------------------------------------------------
# Value loss


def test_value_loss_hand_values():
  v = np.array([[1.5, 1.5, 0.5, 3.0]], np.float32)
  old = np.array([[1.0, 1.0, 1.0, 3.0]], np.float32)
  ret = np.array([[2.0, 1.0, 0.0, 2.0]], np.float32)
  mask = np.ones_like(v)
  # unclipped 0.5 (V-R)^2 = [0.125, 0.125, 0.125, 0.5]
  np.testing.assert_allclose(value_loss_per_token(v, old, ret, mask)[0],
                             [0.125, 0.125, 0.125, 0.5], **F32)
  # clip V to [V_old-0.2, V_old+0.2]: [1.2, 1.2, 0.8, 3.0]; (Vc-R)^2 = [0.64, 0.04, 0.64, 1.0]
  vals = value_loss_per_token(v, old, ret, mask, clip_eps=0.2)
  np.testing.assert_allclose(vals[0], [0.32, 0.125, 0.32, 0.5], **F32)
  loss, m = value_loss(v, old, ret, mask, clip_eps=0.2)
  np.testing.assert_allclose(loss, np.mean([0.32, 0.125, 0.32, 0.5]), **F32)
  np.testing.assert_allclose(m["vf/clipfrac"], 0.5, **F32)
  # gradient: clipped branch selected -> 0; otherwise V - R
  g = jax.grad(lambda x: value_loss_per_token(x, old, ret, mask, clip_eps=0.2).sum())(
      jnp.asarray(v))
  np.testing.assert_allclose(g[0], [0.0, 0.5, 0.0, 1.0], **F32)
  # explained variance 1 - Var(R-V)/Var(R), population variances over valid tokens
  r64, res = np.array([2.0, 1.0, 0.0, 2.0]), np.array([0.5, -0.5, -0.5, -1.0])
  np.testing.assert_allclose(m["vf/explained_variance"], 1 - res.var() / r64.var(), **COMP)
  np.testing.assert_allclose(m["vf/value_mean"], 1.625, **F32)
  _, m0 = value_loss(v, old, np.ones_like(v), mask)
  assert m0["vf/explained_variance"] == 0 and m0["vf/clipfrac"] == 0
  # agg / norm_len reach the aggregation: token sums over a constant 8
  loss8, _ = value_loss(v, old, ret, mask, clip_eps=0.2, agg="seq_mean_token_sum_norm",
                        norm_len=8.0)
  np.testing.assert_allclose(loss8, (0.32 + 0.125 + 0.32 + 0.5) / 8, **F32)


# ----------------------------------------------------------------------------------------------
# GAE


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
  r, v = _rand((2, 4), 3), _rand((2, 4), 4)
  mask = np.ones_like(r)
  adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
  rtg = np.flip(np.cumsum(np.flip(r, -1), -1), -1)
  np.testing.assert_allclose(adv, rtg - v, **COMP)
  np.testing.assert_allclose(ret, rtg, **COMP)


def test_gae_hand_values():
  r = np.array([[0.0, 0.0, 1.0]], np.float32)
  v = np.array([[0.5, 0.6, 0.8]], np.float32)
  adv, ret = gae(r, v, np.ones_like(r), gamma=0.9, lam=0.5)
  # delta = [0.9*0.6-0.5, 0.9*0.8-0.6, 1-0.8] = [0.04, 0.12, 0.2]; gamma*lam = 0.45
  # A2 = 0.2; A1 = 0.12 + 0.45*0.2 = 0.21; A0 = 0.04 + 0.45*0.21 = 0.1345
  np.testing.assert_allclose(adv[0], [0.1345, 0.21, 0.2], **COMP)
  np.testing.assert_allclose(ret[0], [0.6345, 0.81, 1.0], **COMP)


def test_gae_masked_equals_sliced():
  r, v = _rand((2, 3), 5), _rand((2, 3), 6)
  a_ref, ret_ref = gae(r, v, np.ones_like(r), gamma=0.9, lam=0.7)
  garbage = np.array([[np.nan, np.inf], [-np.inf, 7.0]], np.float32)
  ones, zeros = np.ones((2, 3), np.float32), np.zeros((2, 2), np.float32)
  # right padding
  a, ret = gae(np.concatenate([r, garbage], 1), np.concatenate([v, garbage], 1),
               np.concatenate([ones, zeros], 1), gamma=0.9, lam=0.7)
  np.testing.assert_allclose(a[:, :3], a_ref, **F32)
  np.testing.assert_allclose(ret[:, :3], ret_ref, **F32)
  assert np.all(np.asarray(a[:, 3:]) == 0) and np.all(np.asarray(ret[:, 3:]) == 0)
  # left padding
  a, ret = gae(np.concatenate([garbage, r], 1), np.concatenate([garbage, v], 1),
               np.concatenate([zeros, ones], 1), gamma=0.9, lam=0.7)
  np.testing.assert_allclose(a[:, 2:], a_ref, **F32)
  np.testing.assert_allclose(ret[:, 2:], ret_ref, **F32)
  assert np.all(np.asarray(a[:, :2]) == 0)
  # a hole (e.g. tool output) is skipped: equals the sequence with the hole removed
  a, ret = gae(np.insert(r, 1, np.nan, axis=1), np.insert(v, 1, np.inf, axis=1),
               np.insert(ones, 1, 0.0, axis=1), gamma=0.9, lam=0.7)
  np.testing.assert_allclose(np.delete(np.asarray(a), 1, axis=1), a_ref, **F32)
  # terminal: a shorter valid length is not the same as a longer one
  a2, _ = gae(r, v, np.array([[1, 1, 0], [1, 1, 1]], np.float32), gamma=0.9, lam=0.7)
  a_short, _ = gae(r[:1, :2], v[:1, :2], np.ones((1, 2), np.float32), gamma=0.9, lam=0.7)
  np.testing.assert_allclose(a2[0, :2], a_short[0], **F32)


def test_gae_stop_gradient_jit_vmap_bf16():
  r, v = _rand((2, 4), 7), _rand((2, 4), 8)
  g = jax.grad(lambda v_: gae(r, v_, MASK)[0].sum() + gae(r, v_, MASK)[1].sum())(jnp.asarray(v))
  assert np.all(np.asarray(g) == 0)
  f = jax.jit(functools.partial(gae, gamma=0.99, lam=0.95))
  a1, r1 = f(r, v, MASK)
  a0, r0 = gae(r, v, MASK, gamma=0.99, lam=0.95)
  np.testing.assert_allclose(a1, a0, **F32)
  av, _ = jax.vmap(f)(np.stack([r, v]), np.stack([v, r]), np.stack([MASK, MASK]))
  np.testing.assert_allclose(av[1], f(v, r, MASK)[0], **F32)
  big = jnp.asarray(np.array([[1e4, -1e4, 1e4, 0.0]]), jnp.bfloat16)
  a, ret = gae(big, big, jnp.ones((1, 4)))
  assert np.all(np.isfinite(np.asarray(a))) and a.dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# Group advantages


def test_group_advantages_group_zero_mean_unit_population_std():
  r = _rand((12,), 9)
  a = np.asarray(group_advantages(r, group_size=4, eps=0.0)).reshape(3, 4)
  np.testing.assert_allclose(a.mean(-1), 0.0, atol=1e-6)
  np.testing.assert_allclose(a.std(-1), 1.0, **COMP)   # ddof=0
  # hand values: [1, 0, 1, 0] has mean 0.5, population std 0.5
  a = group_advantages(np.array([1.0, 0.0, 1.0, 0.0]), group_size=4)
  np.testing.assert_allclose(a, np.array([1, -1, 1, -1]) * 0.5 / (0.5 + 1e-6), **F32)


def test_group_advantages_scales():
  r = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 2.0, 4.0], np.float32)
  none = group_advantages(r, group_size=4, scale="none")
  np.testing.assert_allclose(none, [0.75, -0.25, -0.25, -0.25, -1, 1, -1, 1], **F32)
  batch = group_advantages(r, group_size=4, scale="batch", eps=0.0)
  np.testing.assert_allclose(batch, np.asarray(none) / r.std(), **F32)
  with pytest.raises(ValueError):
    group_advantages(r, group_size=3)
  with pytest.raises(ValueError):
    group_advantages(r, group_size=4, scale="bogus")



def test_group_advantages_eps_is_added_to_the_std():
  # (r - mean) / (std + eps): [1, 0, 1, 0] has std 0.5, so eps = 0.5 gives ±0.5 / 1.0 exactly
  # (eps inside the square root, (r - mean) / sqrt(var + eps), would give ±0.5 / sqrt(0.75)).
  a = group_advantages(np.array([1.0, 0.0, 1.0, 0.0], np.float32), group_size=4, eps=0.5)
  np.testing.assert_allclose(a, [0.5, -0.5, 0.5, -0.5], **F32)

def test_group_advantages_ties_are_zero():
  # float32 mean([2.2] * 3) != 2.2 (off by 2.4e-7), and std = 2.4e-7: without exact tie handling
  # (r - mean) / (std + eps) would give -0.19 instead of 0.
  r = np.array([2.2] * 3 + [0.3, 0.7, 0.3], np.float32)
  for scale in ("group", "none", "batch"):
    a = np.asarray(group_advantages(r, group_size=3, scale=scale))
    assert np.all(a[:3] == 0) and np.all(a[3:] != 0), scale
  assert np.all(np.asarray(rloo_advantages(r, group_size=3))[:3] == 0)
  assert np.all(np.asarray(reinforce_pp_advantages(np.full(3, 2.2, np.float32))) == 0)
  step = group_step_advantages(np.full((2, 3), 2.2, np.float32),
                               np.array([[1, 1, 0], [1, 0, 0]], np.float32), group_size=2)
  assert np.all(np.asarray(step) == 0)


def test_rloo_hand_values():
  r = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 0.0], np.float32)
  a = rloo_advantages(r, group_size=4)
  np.testing.assert_allclose(a, [2 / 3, -2 / 3, -2 / 3, 2 / 3, 2 - 10 / 3, 4 - 8 / 3, 4, -4],
                             **F32)
  with pytest.raises(ValueError):
    rloo_advantages(r, group_size=1)


def test_reinforce_pp_advantages():
  r = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 2.0, 4.0], np.float32)
  a = np.asarray(reinforce_pp_advantages(r, group_size=4, eps=0.0))
  x = np.array([0.75, -0.25, -0.25, -0.25, -1, 1, -1, 1])
  np.testing.assert_allclose(a, (x - x.mean()) / x.std(), **COMP)
  a = np.asarray(reinforce_pp_advantages(r, eps=0.0))
  np.testing.assert_allclose(a, (r - r.mean()) / r.std(), **COMP)
  np.testing.assert_allclose([a.mean(), a.std()], [0.0, 1.0], atol=1e-6)


def test_group_step_advantages_hand_values():
  # group of 2 completions, up to 3 steps; valid step rewards {1, 0, 0} and {1}
  rew = np.array([[1.0, 0.0, 0.0], [1.0, np.nan, 5.0]], np.float32)
  mask = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
  a = group_step_advantages(rew, mask, group_size=2, eps=0.0)
  # mean 0.5, population std 0.5 -> normalised [1, -1, -1] and [1]; suffix sums
  np.testing.assert_allclose(a, [[-1.0, -2.0, -1.0], [1.0, 0.0, 0.0]], **F32)
  # per-group normalisation: a second group shifted by +10 gives the same advantages
  a2 = group_step_advantages(np.concatenate([rew, rew + 10]), np.concatenate([mask, mask]),
                             group_size=2, eps=0.0)
  np.testing.assert_allclose(a2[2:], a, **F32)


def test_advantages_jit_vmap():
  r = _rand((3, 8), 10)
  for fn in (functools.partial(group_advantages, group_size=4),
             functools.partial(group_advantages, group_size=4, scale="batch"),
             functools.partial(rloo_advantages, group_size=4),
             functools.partial(reinforce_pp_advantages, group_size=4)):
    out = jax.vmap(jax.jit(fn))(r)
    for i in range(3):
      np.testing.assert_allclose(out[i], fn(r[i]), **F32)


# ----------------------------------------------------------------------------------------------
# GRPO family

HYPER = {
    "grpo": dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.04),
    "dr_grpo": dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.04, norm_len=6.0),
    "dapo": dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.0),
    "gspo": dict(clip_eps_low=0.03, clip_eps_high=0.04, kl_coef=0.04),
    "cispo": dict(clip_eps_low=1.0, clip_eps_high=0.1, kl_coef=0.04),
}


@pytest.mark.parametrize("variant", GRPO_VARIANTS)
@pytest.mark.parametrize("tis", [False, True])
def test_grpo_variants_match_numpy(variant, tis):
  h = HYPER[variant]
  extra = dict(rollout_logps_BxT=ROLL, tis_cap=1.1) if tis else {}
  loss, m = grpo(LP, OLD, REF, ADV_B, MASK, variant=variant, **h, **extra)
  want = np_grpo(LP, OLD, REF, ADV_B, MASK, variant, h["clip_eps_low"], h["clip_eps_high"],
                 h["kl_coef"], roll=ROLL if tis else None, cap=1.1,
                 norm_len=h.get("norm_len"))
  np.testing.assert_allclose(loss, want, **COMP)
  np.testing.assert_allclose(m["pg/loss"], np_grpo(
      LP, OLD, REF, ADV_B, MASK, variant, h["clip_eps_low"], h["clip_eps_high"], 0.0,
      roll=ROLL if tis else None, cap=1.1, norm_len=h.get("norm_len")), **COMP)
  np.testing.assert_allclose(m["kl/ref"], (np_k3(LP, REF) * MASK).sum() / MASK.sum(), **COMP)
  if tis:
    w = np.minimum(np.exp(OLD.astype(np.float64) - ROLL), 1.1)
    np.testing.assert_allclose(m["tis/weight_mean"], (w * MASK).sum() / MASK.sum(), **COMP)
  else:
    assert "tis/weight_mean" not in m
  per = grpo_per_token(LP, OLD, REF, ADV_B, MASK, variant=variant,
                       **{k: v for k, v in h.items() if k != "norm_len"}, **extra)
  np.testing.assert_allclose(aggregate(per, MASK, mode=GRPO_AGGREGATION[variant],
                                       norm_len=h.get("norm_len")), loss, **F32)
  for k, v in m.items():
    assert v.shape == () and v.dtype == jnp.float32, k


def test_grpo_literal_hand_values():
  # one sequence of 2 tokens, r = [1.5, 0.5], A = 1, eps 0.2, beta 0.1, ref = logp (KL 0) but
  # for token 2 ref - logp = log 2: k3 = 2 - 1 - log 2.
  lp = np.log(np.array([[1.5, 0.5]], np.float32))
  old = np.zeros_like(lp)
  ref = lp + np.array([[0.0, np.log(2.0)]], np.float32)
  mask, adv = np.ones_like(lp), np.array([1.0], np.float32)
  k3 = 1.0 - np.log(2.0)
  loss, _ = grpo(lp, old, ref, adv, mask, kl_coef=0.1)
  np.testing.assert_allclose(loss, ((-1.2) + (-0.5) + 0.1 * k3) / 2, **F32)
  loss, _ = grpo(lp, old, ref, adv, mask, variant="dr_grpo", kl_coef=0.1, norm_len=4.0)
  np.testing.assert_allclose(loss, ((-1.2) + (-0.5) + 0.1 * k3) / 4, **F32)
  # gspo: s = exp(mean(log 1.5, log 0.5)) = sqrt(0.75) = 0.866 < 1 - 0.1 -> min(sA, 0.9A) = sA
  loss, m = grpo(lp, old, None, adv, mask, variant="gspo", kl_coef=0.0, clip_eps_low=0.1,
                 clip_eps_high=0.1)
  np.testing.assert_allclose(loss, -np.sqrt(0.75), **F32)
  np.testing.assert_allclose(m["pg/ratio_mean"], np.sqrt(0.75), **F32)
  assert m["pg/clipfrac"] == 0
  # cispo: w = clip([1.5, 0.5], 0, 1.2) = [1.2, 0.5]; loss = -mean(w A logp)
  loss, m = grpo(lp, old, None, adv, mask, variant="cispo", kl_coef=0.0, clip_eps_low=1.0)
  np.testing.assert_allclose(loss, -(1.2 * np.log(1.5) + 0.5 * np.log(0.5)) / 2, **F32)
  np.testing.assert_allclose(m["pg/clipfrac"], 0.5, **F32)


def test_grpo_aggregations_literal():
  # ratio 1, no KL, A = [1, -1], lengths 1 and 3: per-token losses [-1] and [1, 1, 1]
  lp = np.array([[-1.0, 0.0, 0.0], [-0.5, -0.5, -0.5]], np.float32)
  mask = np.array([[1, 0, 0], [1, 1, 1]], np.float32)
  adv = np.array([1.0, -1.0], np.float32)
  want = {"grpo": (-1 + 1) / 2,           # mean over sequences of token means
          "gspo": (-1 + 1) / 2,           # mean over sequences of the sequence loss
          "dapo": (-1 + 3) / 4,           # mean over all tokens
          "dr_grpo": (-1 + 3) / 2 / 3,    # token sums / constant 3, mean over sequences
          "cispo": (1 - 1.5) / 4}         # -A logp, mean over all tokens
  for variant, w in want.items():
    loss, _ = grpo(lp, lp, None, adv, mask, variant=variant, kl_coef=0.0, norm_len=3.0)
    np.testing.assert_allclose(loss, w, err_msg=variant, **F32)


def test_gspo_sequence_ratio_and_gradient():
  # row 0: log ratios [0.3, -0.1, 0.1] -> s = exp(0.1); row 1: [0.01, -0.01] -> s = 1
  lp = np.array([[0.3, -0.1, 0.1], [0.01, -0.01, 0.0]], np.float32) - 1.0
  old = np.full_like(lp, -1.0)
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  adv = np.array([2.0, -1.0], np.float32)
  fn = lambda x: grpo(x, old, None, adv, mask, variant="gspo", kl_coef=0.0,
                      clip_eps_low=3e-4, clip_eps_high=4e-4)
  (loss, m), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(lp))
  s0 = np.exp(0.1)
  # row 0 is clipped at the sequence level (s > 1+4e-4, A > 0): loss -(1+4e-4)*2, no gradient,
  # although token 2 alone has ratio exp(-0.1) < 1. Row 1: s = 1 inside: loss -s*A = 1.
  np.testing.assert_allclose(loss, (-(1 + 4e-4) * 2 + 1.0) / 2, **COMP)
  np.testing.assert_allclose(m["pg/ratio_mean"], (3 * s0 + 2 * 1.0) / 5, **COMP)
  np.testing.assert_allclose(m["pg/clipfrac"], 3 / 5, **F32)
  # d/dlogp_t of -s A / B with s = exp(mean log r): -A s / (|o| B) on row 1
  np.testing.assert_allclose(g, [[0, 0, 0], [0.25, 0.25, 0]], **COMP)


def test_cispo_gradient_only_through_logp():
  adv = np.array([1.0, -0.5], np.float32)
  h = dict(variant="cispo", kl_coef=0.0, clip_eps_low=0.1, clip_eps_high=0.05)
  fn = lambda lp, old, roll: grpo(lp, old, None, adv, MASK, rollout_logps_BxT=roll, tis_cap=2.0,
                                  **h)[0]
  g_lp, g_old, g_roll = jax.grad(fn, argnums=(0, 1, 2))(jnp.asarray(LP), jnp.asarray(OLD),
                                                        jnp.asarray(ROLL))
  assert np.all(np.asarray(g_old) == 0) and np.all(np.asarray(g_roll) == 0)
  r = np.exp(LP.astype(np.float64) - OLD)
  w = np.clip(r, 0.9, 1.05) * np.minimum(np.exp(OLD.astype(np.float64) - ROLL), 2.0)
  want = -w * adv[:, None] * MASK / MASK.sum()
  np.testing.assert_allclose(g_lp, want, **COMP)
  # tokens whose weight is clipped still get a gradient (PPO would give 0 for some of them)
  clipped = (np.abs(r - np.clip(r, 0.9, 1.05)) > 0) & (MASK > 0)
  assert clipped.any() and np.all(np.asarray(g_lp)[clipped] != 0)


def test_grpo_on_policy_none_old_and_ref_none():
  loss_none, _ = grpo(LP, None, REF, ADV_B, MASK)
  loss_same, _ = grpo(LP, LP, REF, ADV_B, MASK)
  np.testing.assert_allclose(loss_none, loss_same, **F32)
  g_none = jax.grad(lambda x: grpo(x, None, REF, ADV_B, MASK)[0])(jnp.asarray(LP))
  g_same = jax.grad(lambda x: grpo(x, LP, REF, ADV_B, MASK)[0])(jnp.asarray(LP))
  np.testing.assert_allclose(g_none, g_same, **F32)
  loss, m = grpo(LP, OLD, None, ADV_B, MASK, kl_coef=0.0)
  assert "kl/ref" not in m
  np.testing.assert_allclose(loss, m["pg/loss"], **F32)
  with pytest.raises(ValueError):
    grpo(LP, OLD, None, ADV_B, MASK, kl_coef=0.04)
  with pytest.raises(ValueError):
    grpo(LP, OLD, REF, ADV_B, MASK, variant="bogus")


def test_grpo_per_token_advantages_equal_broadcast():
  for variant in GRPO_VARIANTS:
    a, _ = grpo(LP, OLD, REF, ADV_B, MASK, variant=variant)
    b, _ = grpo(LP, OLD, REF, np.broadcast_to(ADV_B[:, None], LP.shape), MASK, variant=variant)
    np.testing.assert_allclose(a, b, **F32)



def test_gspo_token_gradient_with_per_token_advantages():
  # GSPO-token (Zheng et al. 2025): token t carries the value of the sequence ratio s_i and the
  # gradient of its own log-prob, so d loss / d logp_{i,t} = -s_i A_{i,t} / (|o_i| B) when s_i is
  # inside the clip range. Differentiating s_i itself (sequence-level GSPO) would give every
  # token -s_i mean_t(A_{i,t}) / (|o_i| B): the same only when A is constant along the sequence.
  old = np.full((2, 3), -1.0, np.float32)
  lp = old + np.array([[0.05, -0.02, 0.03], [0.01, 0.03, 5.0]], np.float32)   # both s = e^0.02
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  adv = np.array([[1.0, -2.0, 3.0], [-1.0, 2.0, 7.0]], np.float32)
  fn = lambda x: grpo(x, old, None, adv, mask, variant="gspo", kl_coef=0.0)[0]
  loss, g = jax.value_and_grad(fn)(jnp.asarray(lp))
  s = np.exp(0.02)
  np.testing.assert_allclose(loss, -s * (2.0 / 3 + 1.0 / 2) / 2, **COMP)
  want = -s * adv * mask / (mask.sum(-1, keepdims=True) * 2)
  np.testing.assert_allclose(g, want, **COMP)


def test_tis_weights_the_policy_term_not_the_kl():
  # One token: ratio 1, A = 1, old - rollout = 1 (w = e), log(π_ref / π) = log 2, β = 1:
  # l = -w A + β k3 = -e + (1 - log 2); weighting the KL too would give -e + e (1 - log 2).
  lp = np.array([[-1.0]], np.float32)
  ref = lp + np.float32(np.log(2.0))
  roll = lp - 1.0
  loss, m = grpo(lp, lp, ref, np.array([1.0], np.float32), np.ones_like(lp), kl_coef=1.0,
                 rollout_logps_BxT=roll)
  np.testing.assert_allclose(loss, -np.e + (1.0 - np.log(2.0)), **COMP)
  np.testing.assert_allclose(m["pg/loss"], -np.e, **COMP)
  np.testing.assert_allclose(m["tis/weight_mean"], np.e, **COMP)


def test_grpo_clipfrac_and_approx_kl_metrics():
  # ratios [1.5, 0.5, 1.1] with eps 0.2, A = 1: CISPO clips the weight of the first two (2/3);
  # PPO-style GRPO selects the clipped term only for r = 1.5 (A > 0: r = 0.5 stays unclipped).
  # approx_kl is the k3 estimate of KL(π_old ‖ π_θ), (r - 1) - log r, averaged over tokens
  # (mean r != 1 here, so it differs from the k1 mean of -log r).
  r = np.array([[1.5, 0.5, 1.1]])
  lp = np.log(r).astype(np.float32)
  old, mask, adv = np.zeros_like(lp), np.ones_like(lp), np.array([1.0], np.float32)
  k3 = np.mean((r - 1) - np.log(r))
  _, m = grpo(lp, old, None, adv, mask, variant="cispo", kl_coef=0.0)
  np.testing.assert_allclose(m["pg/clipfrac"], 2 / 3, **F32)
  np.testing.assert_allclose(m["pg/approx_kl"], k3, **COMP)
  _, m = grpo(lp, old, None, adv, mask, kl_coef=0.0)
  np.testing.assert_allclose(m["pg/clipfrac"], 1 / 3, **F32)
  np.testing.assert_allclose(m["pg/approx_kl"], k3, **COMP)


def test_data_inputs_get_no_gradient():
  # Old log-probs, advantages, reference / rollout log-probs, returns and old values are data:
  # a loss built on them (e.g. advantages from a critic in the same graph) must not send
  # gradients into them. Every case below has clipping active and a non-zero KL.
  adv_t = np.broadcast_to(ADV_B[:, None] * 2.0, LP.shape).astype(np.float32)

  def check(fn, *args):
    grads = jax.grad(fn, argnums=tuple(range(1, len(args))))(*map(jnp.asarray, args))
    for i, g in enumerate(grads):
      assert np.all(np.asarray(g) == 0), (fn, i + 1)

  check(lambda lp, old, adv: ppo_clip(lp, old, adv, MASK, clip_eps_low=0.05,
                                      clip_eps_high=0.05)[0], LP, OLD, adv_t)
  check(lambda lp, old, adv: ppo_clip_per_token(lp, old, adv, MASK, clip_eps_low=0.05,
                                                clip_eps_high=0.05).sum(), LP, OLD, adv_t)
  # so a single on-policy update may pass the same traced log-probs as old (ratio 1) and still
  # get the policy gradient -A / n (without the stop-gradient it would be exactly 0)
  for fn in (lambda x: ppo_clip(x, x, adv_t, MASK)[0],
             lambda x: ppo_clip_per_token(x, x, adv_t, MASK).sum() / MASK.sum()):
    np.testing.assert_allclose(jax.grad(fn)(jnp.asarray(LP)), -adv_t * MASK / MASK.sum(), **F32)
  v = np.array([[1.5, 1.5, 0.5, 3.0]], np.float32)
  old_v = np.array([[1.0, 1.0, 1.0, 3.0]], np.float32)
  ret = np.array([[2.0, 1.0, 0.0, 2.0]], np.float32)
  one = np.ones_like(v)
  check(lambda x, o, r: value_loss(x, o, r, one, clip_eps=0.2)[0], v, old_v, ret)
  check(lambda x, o, r: value_loss_per_token(x, o, r, one, clip_eps=0.2).sum(), v, old_v, ret)
  for variant in GRPO_VARIANTS:
    check(lambda lp, old, ref, adv, roll: grpo(
        lp, old, ref, adv, MASK, variant=variant, kl_coef=0.1, rollout_logps_BxT=roll,
        clip_eps_low=0.05, clip_eps_high=0.05)[0], LP, OLD, REF, ADV_B, ROLL)

# ----------------------------------------------------------------------------------------------
# Invariances shared by every token loss: masked == sliced, jit, vmap, finite gradients


def _token_losses():
  """name -> f(logps, old, ref, rollout, adv_B, mask) -> (loss, metrics), differentiated in the
  first argument (for "value": values, old values, returns)."""
  out = {
      f"ppo_{agg}": functools.partial(
          lambda lp, old, ref, roll, adv, m, agg: ppo_clip(
              lp, old, jnp.broadcast_to(adv[:, None], lp.shape), m, agg=agg, norm_len=5.0,
              dual_clip=3.0), agg=agg)
      # the other modes are aggregate's own tests; sum_norm is the one where padding could leak
      for agg in ("token_mean", "seq_mean_token_sum_norm")}
  out["value"] = lambda lp, old, ref, roll, adv, m: value_loss(lp, old, ref, m, clip_eps=0.2)
  for v in GRPO_VARIANTS:
    out[v] = functools.partial(
        lambda lp, old, ref, roll, adv, m, v: grpo(
            lp, old, ref, adv, m, variant=v, kl_coef=0.1, rollout_logps_BxT=roll, tis_cap=1.5,
            norm_len=5.0), v=v)
  return out


TOKEN_LOSSES = _token_losses()
TOKEN_VG = {k: jax.value_and_grad(f, has_aux=True) for k, f in TOKEN_LOSSES.items()}


def _pad(x, garbage):
  return np.concatenate([x, np.broadcast_to(garbage, (x.shape[0], 2))], axis=1)


@pytest.mark.parametrize("name", list(TOKEN_LOSSES))
def test_masked_equals_sliced(name):
  vg = TOKEN_VG[name]
  args = (LP, OLD, REF, ROLL)
  (l0, m0), g0 = vg(*args, ADV_B, MASK)
  garbage = np.array([np.nan, np.inf], np.float32) if name != "value" else np.array(
      [np.nan, -np.inf], np.float32)
  padded = tuple(_pad(a, garbage) for a in args)
  (l1, m1), g1 = vg(*padded, ADV_B, _pad(MASK, np.zeros(2, np.float32)))
  np.testing.assert_allclose(l1, l0, **F32)
  for k in m0:
    np.testing.assert_allclose(m1[k], m0[k], err_msg=k, **F32)
  np.testing.assert_allclose(g1[:, :4], g0, **F32)
  assert np.all(np.asarray(g1[:, 4:]) == 0)


def test_masked_garbage_inside_the_mask_width_is_ignored():
  # garbage at the already-masked position [1, 3] of MASK: same loss as with a clean value there
  for name, vg in TOKEN_VG.items():
    dirty = [a.copy() for a in (LP, OLD, REF, ROLL)]
    for a in dirty:
      a[1, 3] = np.nan
    (l0, _), g0 = vg(LP, OLD, REF, ROLL, ADV_B, MASK)
    (l1, _), g1 = vg(*dirty, ADV_B, MASK)
    np.testing.assert_allclose(l1, l0, err_msg=name, **F32)
    np.testing.assert_allclose(g1, g0, err_msg=name, **F32)


@pytest.mark.parametrize("name", list(TOKEN_LOSSES))
def test_fully_masked_rows_and_extreme_bf16_logps_have_finite_grads(name):
  vg = TOKEN_VG[name]
  mask = MASK.copy()
  mask[1] = 0
  _, g = vg(LP, OLD, REF, ROLL, ADV_B, mask)
  assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g[1]) == 0)
  _, g = vg(LP, OLD, REF, ROLL, ADV_B, np.zeros_like(MASK))
  assert np.all(np.asarray(g) == 0)
  ext = np.array([[1e4, -1e4, 0.0, -1e4], [-1e4, 1e4, -1e4, 0.0]], np.float32)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  (l, m), g = vg(bf(ext), bf(-ext), bf(ext[::-1]), bf(ext), ADV_B, MASK)
  assert np.isfinite(float(l)) and all(np.isfinite(float(v)) for v in m.values())
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("name", list(TOKEN_LOSSES))
def test_jit_and_vmap(name):
  # one compilation of jit(vmap(loss)) over a leading axis of 2 batches, against eager calls
  fn = TOKEN_LOSSES[name]
  args = (LP, OLD, REF, ROLL, ADV_B, MASK)
  other = (OLD, LP, ROLL, REF, -ADV_B, MASK[::-1].copy())
  stacked = tuple(np.stack([a, b]) for a, b in zip(args, other))
  lv, mv = jax.jit(jax.vmap(fn))(*stacked)
  for i, a in enumerate((args, other)):
    l0, m0 = fn(*a)
    np.testing.assert_allclose(lv[i], l0, **COMP)
    for k in m0:
      np.testing.assert_allclose(mv[k][i], m0[k], err_msg=k, **COMP)


# ----------------------------------------------------------------------------------------------
# Finite-difference gradient checks


def _fd_grad(f, x, h=1e-3):
  x = np.asarray(x, np.float32)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[idx] = h
    g[idx] = (float(f(x + e)) - float(f(x - e))) / (2 * h)
  return g


@pytest.mark.parametrize("case", ["ppo", "ppo_dual", "grpo", "dr_grpo", "gspo", "dapo_tis"])
def test_finite_difference_gradients(case):
  # ratios exp(LP - OLD) lie in [0.67, 1.5]: away from the clip kinks below for every token, so
  # the loss is smooth in a 1e-3 neighbourhood and both clipped and unclipped tokens are checked.
  adv = np.array([[0.7, -1.3, 0.4, 2.0], [-0.6, 1.1, -0.9, 0.3]], np.float32)
  if case == "ppo":
    f = lambda x: ppo_clip(x, OLD, adv, MASK, clip_eps_low=0.25, clip_eps_high=0.3)[0]
  elif case == "ppo_dual":
    f = lambda x: ppo_clip(x, OLD - 0.5, adv, MASK, dual_clip=1.7, agg="seq_mean_token_mean")[0]
  elif case == "gspo":
    f = lambda x: grpo(x, OLD, REF, ADV_B, MASK, variant="gspo", clip_eps_low=0.05,
                       clip_eps_high=0.05, kl_coef=0.1)[0]
  elif case == "dapo_tis":
    f = lambda x: grpo(x, OLD, REF, ADV_B, MASK, variant="dapo", clip_eps_low=0.25,
                       clip_eps_high=0.3, kl_coef=0.1, rollout_logps_BxT=ROLL, tis_cap=1.2)[0]
  else:
    f = lambda x: grpo(x, OLD, REF, adv, MASK, variant=case, clip_eps_low=0.25,
                       clip_eps_high=0.3, kl_coef=0.1, norm_len=5.0)[0]
  jf = jax.jit(f)
  g = jax.grad(f)(jnp.asarray(LP))
  assert np.abs(np.asarray(g)).max() > 0.01
  np.testing.assert_allclose(g, _fd_grad(jf, LP), **FD)
