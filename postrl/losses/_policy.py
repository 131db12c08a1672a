"""Policy-gradient losses and advantage estimators: PPO-clip, the PPO value loss, GAE, group
advantages (GRPO / Dr. GRPO / RLOO / REINFORCE++) and the GRPO family (GRPO, Dr. GRPO, DAPO,
GSPO, CISPO) with optional truncated importance sampling against the rollout engine.

Conventions shared by every function here:

* Arrays are positional, hyper-parameters keyword-only; masks are explicit (1 = the token counts).
* All arithmetic is float32 whatever the input dtype (bfloat16 log-probs are upcast first).
* Positions with mask 0 are replaced by 0 *before* any arithmetic (``jnp.where``), so garbage
  there (nan, inf) changes neither the loss nor the gradient, and their gradient is exactly 0.
* Log importance ratios are clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]`` (= ±20, as verl
  does) before ``exp``: this changes nothing for any sane policy (a ratio of e^20 ≈ 5e8) but keeps
  the loss and its gradient finite for extreme (±1e4) log-probs; beyond the clamp the ratio's
  gradient is 0.
* Losses return ``(loss, metrics)``: a float32 scalar and a flat dict of float32 scalars. Token
  losses also have a ``*_per_token`` form returning the unreduced ``values_BxT`` (0 where masked),
  which ``aggregate`` reduces; the ``(loss, metrics)`` form is exactly
  ``aggregate(per_token(...), mask, mode=agg)``.
* Advantage estimators return arrays, wrapped in ``jax.lax.stop_gradient``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from postrl.losses._common import aggregate, kl_penalty, valid_mask

LOG_RATIO_CLAMP = 20.0

GRPO_VARIANTS = ("grpo", "dr_grpo", "dapo", "gspo", "cispo")
# The aggregation each variant's paper uses (overridable with ``agg=``).
GRPO_AGGREGATION = {
    "grpo": "seq_mean_token_mean",       # 1/G sum_i 1/|o_i| sum_t   (Shao et al. 2024)
    "dr_grpo": "seq_mean_token_sum_norm",  # 1/G sum_i sum_t / const  (Liu et al. 2025)
    "dapo": "token_mean",                # 1/sum_i|o_i| sum_i sum_t   (Yu et al. 2025)
    "gspo": "seq_mean_token_mean",       # 1/G sum_i (sequence loss)  (Zheng et al. 2025)
    "cispo": "token_mean",               # 1/sum_i|o_i| sum_i sum_t   (MiniMax 2025)
}
GROUP_SCALES = ("group", "none", "batch")


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _clean(x, valid):
  """float32 copy of ``x`` with masked positions set to 0 (nan/inf there never reach arithmetic)."""
  return jnp.where(valid, _f32(x), 0.0)


def _masked_mean(x, mask_BxT):
  """Token mean over valid positions, as a stop-gradient float32 metric (0 if nothing is valid)."""
  return jax.lax.stop_gradient(aggregate(x, mask_BxT, mode="token_mean"))


def _log_ratio(logps, old_logps):
  return jnp.clip(logps - old_logps, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _clipped_surrogate(ratio, adv, eps_low, eps_high, dual_clip):
  """Per-token PPO-clip loss -min(r A, clip(r, 1-eps_low, 1+eps_high) A), optionally dual-clipped.

  Returns (loss, clipped, dual_clipped): ``clipped`` marks tokens where the clipped term is the one
  selected and strictly differs from the unclipped one (so its gradient is 0).
  """
  unclipped = -ratio * adv
  clipped_loss = -jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
  loss = jnp.maximum(unclipped, clipped_loss)
  clipped = clipped_loss > unclipped
  if dual_clip is None:
    return loss, clipped, None
  cap = -dual_clip * adv
  dual = (adv < 0) & (loss > cap)
  return jnp.where(dual, cap, loss), clipped, dual


def _check_dual_clip(dual_clip):
  if dual_clip is not None and not dual_clip > 1.0:
    raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020), got {dual_clip}")


# ------------------------------------------------------------------------------------------------
# PPO


def ppo_clip_per_token(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, *,
                       clip_eps_low: float = 0.2, clip_eps_high: float = 0.2,
                       dual_clip: float | None = None):
  """Per-token PPO-clip loss (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"):

      r_t    = exp(logp_t - old_logp_t)
      loss_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)

  With ``clip_eps_high > clip_eps_low`` this is DAPO's "clip-higher" (Yu et al. 2025, "DAPO: An
  Open-Source LLM Reinforcement Learning System at Scale"). With ``dual_clip = c > 1`` the loss of
  tokens with A_t < 0 is further capped, loss_t = min(loss_t, -c A_t) (Ye et al. 2020, "Mastering
  Complex Control in MOBA Games with Deep Reinforcement Learning"), so a huge ratio on a bad token
  cannot produce an unbounded update.

  Args:
    logps_BxT: log π_θ(y_t) of the sampled tokens (differentiated).
    old_logps_BxT: log π_θold(y_t), the policy that sampled / the start of this update (data,
      stop-gradient: the current log-probs may be passed for a single on-policy update).
    advantages_BxT: A_t (data; e.g. from ``gae``).
    mask_BxT: 1 on response tokens that count, 0 elsewhere.
    clip_eps_low, clip_eps_high: the clip range [1 - eps_low, 1 + eps_high].
    dual_clip: the dual-clip constant c > 1, or None.
  Returns:
    values_BxT, float32, 0 where the mask is 0.
  """
  _check_dual_clip(dual_clip)
  valid = valid_mask(mask_BxT)
  logps = _clean(logps_BxT, valid)
  old = _clean(jax.lax.stop_gradient(old_logps_BxT), valid)
  adv = _clean(jax.lax.stop_gradient(advantages_BxT), valid)
  ratio = jnp.exp(_log_ratio(logps, old))
  loss, _, _ = _clipped_surrogate(ratio, adv, clip_eps_low, clip_eps_high, dual_clip)
  return jnp.where(valid, loss, 0.0)


def ppo_clip(logps_BxT, old_logps_BxT, advantages_BxT, mask_BxT, *,
             clip_eps_low: float = 0.2, clip_eps_high: float = 0.2,
             dual_clip: float | None = None, agg: str = "token_mean",
             norm_len: float | None = None):
  """PPO-clip policy loss (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"),
  with DAPO's asymmetric clip-higher bounds (Yu et al. 2025) and dual clip (Ye et al. 2020):

      r_t  = π_θ(y_t) / π_θold(y_t) = exp(logp_t - old_logp_t)
      l_t  = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)
      l_t  = min(l_t, -c A_t)  where A_t < 0        (only with dual_clip = c)
      loss = aggregate(l, mask, mode=agg)

  Args:
    logps_BxT: log π_θ(y_t) [B, T] (differentiated).
    old_logps_BxT: log π_θold(y_t) [B, T] (data, stop-gradient: passing the current log-probs
      gives ratio 1 and the plain policy gradient).
    advantages_BxT: A_t [B, T] (data).
    mask_BxT: [B, T], 1 on tokens that count.
    clip_eps_low, clip_eps_high: clip range [1 - eps_low, 1 + eps_high].
    dual_clip: c > 1 or None.
    agg: an ``aggregate`` mode (default "token_mean").
    norm_len: the constant of ``agg="seq_mean_token_sum_norm"``.
  Returns:
    (loss, metrics) with metrics
      pg/clipfrac     fraction of valid tokens where the clipped term is selected and differs,
      pg/ratio_mean   mean r over valid tokens,
      pg/approx_kl    mean k3 estimate of KL(π_old ‖ π_θ) = (r - 1) - log r over valid tokens,
      pg/dualclip_frac  (with dual_clip) fraction of valid tokens capped by the dual clip.
  """
  _check_dual_clip(dual_clip)
  valid = valid_mask(mask_BxT)
  logps = _clean(logps_BxT, valid)
  old = _clean(jax.lax.stop_gradient(old_logps_BxT), valid)
  adv = _clean(jax.lax.stop_gradient(advantages_BxT), valid)
  log_ratio = _log_ratio(logps, old)
  ratio = jnp.exp(log_ratio)
  per_token, clipped, dual = _clipped_surrogate(ratio, adv, clip_eps_low, clip_eps_high,
                                                dual_clip)
  loss = aggregate(jnp.where(valid, per_token, 0.0), mask_BxT, mode=agg, norm_len=norm_len)
  metrics = {
      "pg/clipfrac": _masked_mean(clipped, mask_BxT),
      "pg/ratio_mean": _masked_mean(ratio, mask_BxT),
      "pg/approx_kl": _masked_mean(jnp.expm1(log_ratio) - log_ratio, mask_BxT),
  }
  if dual is not None:
    metrics["pg/dualclip_frac"] = _masked_mean(dual, mask_BxT)
  return loss, metrics


def value_loss_per_token(values_BxT, old_values_BxT, returns_BxT, mask_BxT, *,
                         clip_eps: float | None = None):
  """Per-token value loss: 0.5 (V - R)^2, or with ``clip_eps`` the clipped form of PPO2
  (OpenAI baselines, used by Schulman et al. 2017's released code):

      0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)

  Args:
    values_BxT: V_φ(s_t) (differentiated).
    old_values_BxT: V at rollout time (data; ignored without clip_eps).
    returns_BxT: the regression target R_t (data; e.g. from ``gae``).
    mask_BxT: 1 on tokens that count.
    clip_eps: the value clip range, or None.
  Returns:
    values_BxT, float32, 0 where the mask is 0.
  """
  return _value_terms(values_BxT, old_values_BxT, returns_BxT, mask_BxT, clip_eps)[0]


def _value_terms(values_BxT, old_values_BxT, returns_BxT, mask_BxT, clip_eps):
  valid = valid_mask(mask_BxT)
  v = _clean(values_BxT, valid)
  ret = _clean(jax.lax.stop_gradient(returns_BxT), valid)
  unclipped = (v - ret) ** 2
  if clip_eps is None:
    return jnp.where(valid, 0.5 * unclipped, 0.0), None, v, ret
  old = _clean(jax.lax.stop_gradient(old_values_BxT), valid)
  v_clipped = old + jnp.clip(v - old, -clip_eps, clip_eps)
  clipped = (v_clipped - ret) ** 2
  return (jnp.where(valid, 0.5 * jnp.maximum(unclipped, clipped), 0.0), clipped > unclipped,
          v, ret)


def value_loss(values_BxT, old_values_BxT, returns_BxT, mask_BxT, *,
               clip_eps: float | None = None, agg: str = "token_mean",
               norm_len: float | None = None):
  """PPO value-function loss (Schulman et al. 2017; clipped form from OpenAI baselines PPO2):

      l_t  = 0.5 (V_t - R_t)^2
      l_t  = 0.5 max((V_t - R_t)^2, (clip(V_t, V_old_t - eps, V_old_t + eps) - R_t)^2)  (clip_eps)
      loss = aggregate(l, mask, mode=agg)

  Args:
    values_BxT: V_φ(s_t) [B, T] (differentiated).
    old_values_BxT: V at rollout time [B, T] (data; may be None when clip_eps is None).
    returns_BxT: targets R_t [B, T] (data).
    mask_BxT: [B, T], 1 on tokens that count.
    clip_eps: value clip range or None.
    agg, norm_len: see ``aggregate``.
  Returns:
    (loss, metrics) with metrics
      vf/clipfrac            fraction of valid tokens where the clipped term is larger (0 without
                             clip_eps),
      vf/explained_variance  1 - Var(R - V) / Var(R) over valid tokens (population variances; 0
                             when Var(R) = 0),
      vf/value_mean          mean V over valid tokens.
  """
  per_token, clipped, v, ret = _value_terms(values_BxT, old_values_BxT, returns_BxT, mask_BxT,
                                            clip_eps)
  loss = aggregate(per_token, mask_BxT, mode=agg, norm_len=norm_len)
  v, ret = jax.lax.stop_gradient(v), jax.lax.stop_gradient(ret)
  ret_mean = _masked_mean(ret, mask_BxT)
  var_ret = _masked_mean((ret - ret_mean) ** 2, mask_BxT)
  res = ret - v
  var_res = _masked_mean((res - _masked_mean(res, mask_BxT)) ** 2, mask_BxT)
  ev = jnp.where(var_ret > 0, 1.0 - var_res / jnp.where(var_ret > 0, var_ret, 1.0), 0.0)
  metrics = {
      "vf/clipfrac": (_masked_mean(clipped, mask_BxT) if clipped is not None
                      else jnp.zeros((), jnp.float32)),
      "vf/explained_variance": ev,
      "vf/value_mean": _masked_mean(v, mask_BxT),
  }
  return loss, metrics


def gae(rewards_BxT, values_BxT, mask_BxT, *, gamma: float = 1.0, lam: float = 0.95):
  """Generalized advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
  Using Generalized Advantage Estimation"), as a reverse ``jax.lax.scan`` over T:

      delta_t = r_t + gamma V_{t'} - V_t
      A_t     = delta_t + gamma lam A_{t'}         (= sum_l (gamma lam)^l delta_{t+l})
      R_t     = A_t + V_t                           (the value-loss target)

  where t' is the next position with mask 1; after the last valid token V = A = 0 (the episode
  terminates). Positions with mask 0 (right padding, left padding, or holes such as tool output
  inside a multi-turn response) neither contribute nor propagate: they are skipped, their reward
  and value are ignored, and their advantage and return are 0. So put the sequence reward (and any
  per-token -β KL shaping) on valid tokens, typically the last one.

  Args:
    rewards_BxT: per-token rewards r_t [..., T].
    values_BxT: V(s_t) [..., T].
    mask_BxT: [..., T], 1 on response tokens.
    gamma: discount γ.
    lam: GAE λ (λ=1: Monte-Carlo return minus V; λ=0: one-step TD error).
  Returns:
    (advantages_BxT, returns_BxT), float32, stop-gradient, 0 where the mask is 0.
  """
  valid = valid_mask(mask_BxT)
  r = _clean(rewards_BxT, valid)
  v = _clean(values_BxT, valid)

  def step(carry, x):
    next_v, next_a = carry
    r_t, v_t, m_t = x
    a_t = r_t + gamma * next_v - v_t + gamma * lam * next_a
    a_t = jnp.where(m_t, a_t, 0.0)
    return (jnp.where(m_t, v_t, next_v), jnp.where(m_t, a_t, next_a)), a_t

  xs = tuple(jnp.moveaxis(x, -1, 0) for x in (r, v, valid))
  init = (jnp.zeros(r.shape[:-1], jnp.float32), jnp.zeros(r.shape[:-1], jnp.float32))
  _, adv_TxB = jax.lax.scan(step, init, xs, reverse=True)
  adv = jnp.moveaxis(adv_TxB, 0, -1)
  ret = jnp.where(valid, adv + v, 0.0)
  return jax.lax.stop_gradient(adv), jax.lax.stop_gradient(ret)


# ------------------------------------------------------------------------------------------------
# Group advantages


def _groups(rewards_B, group_size):
  rewards_B = _f32(rewards_B)
  if rewards_B.ndim != 1:
    raise ValueError(f"expected rewards of shape [B], got {rewards_B.shape}")
  if group_size < 1 or rewards_B.shape[0] % group_size:
    raise ValueError(f"batch {rewards_B.shape[0]} is not a multiple of group_size {group_size}")
  return rewards_B.reshape(-1, group_size)


def _centered(r_NxG):
  """r - group mean, exactly 0 in groups whose rewards are all equal (float rounding of the mean
  would otherwise leave ~1e-8 residues that a division by std + eps blows up)."""
  tie = r_NxG.max(-1, keepdims=True) == r_NxG.min(-1, keepdims=True)
  return jnp.where(tie, 0.0, r_NxG - r_NxG.mean(-1, keepdims=True))


def group_advantages(rewards_B, *, group_size: int, scale: str = "group", eps: float = 1e-6):
  """Group-relative outcome advantages; rewards come as consecutive groups of ``group_size``
  completions of the same prompt (B = num_groups * group_size):

      "group"  (r_i - mean_g) / (std_g + eps)   GRPO (Shao et al. 2024, "DeepSeekMath: Pushing the
                                                 Limits of Mathematical Reasoning in Open LMs")
      "none"   r_i - mean_g                      Dr. GRPO (Liu et al. 2025, "Understanding
                                                 R1-Zero-Like Training: A Critical Perspective")
      "batch"  (r_i - mean_g) / (std_B + eps)   group mean, std of all B rewards (as TRL's
                                                 scale_rewards="batch", Liu et al. 2025 "Tricks or
                                                 Traps? A Deep Dive into RL for LLM Reasoning")

  std is the POPULATION std (ddof=0). TRL and verl use torch.std (ddof=1), which is larger by
  sqrt(G/(G-1)), so their advantages are smaller by that factor. A group whose rewards are all
  equal gets advantage exactly 0 (the std = 0 case). Every token of completion i then gets A_i.

  Args:
    rewards_B: [B] sequence rewards.
    group_size: G, completions per prompt.
    scale: "group", "none" or "batch".
    eps: added to the std.
  Returns:
    advantages_B, float32, stop-gradient.
  """
  if scale not in GROUP_SCALES:
    raise ValueError(f"group_advantages: unknown scale {scale!r}; expected one of {GROUP_SCALES}")
  r = _groups(rewards_B, group_size)
  c = _centered(r)
  if scale == "group":
    c = c / (r.std(-1, keepdims=True) + eps)
  elif scale == "batch":
    c = c / (r.std() + eps)
  return jax.lax.stop_gradient(c.reshape(-1))


def group_step_advantages(step_rewards_BxS, step_mask_BxS, *, group_size: int,
                          eps: float = 1e-6):
  """GRPO with process supervision (Shao et al. 2024, DeepSeekMath §4.1.3): every valid step
  reward of the group's G completions is normalised with the mean and (population) std of all
  the group's valid step rewards, and the advantage of step j is the sum of the normalised
  rewards of steps j' >= j of the same completion:

      r~_{i,j} = (r_{i,j} - mean_group) / (std_group + eps)
      A_{i,j}  = sum_{j' >= j, valid} r~_{i,j'}

  A token gets the advantage of the step it belongs to (steps end at index(j); token t gets
  A_{i,j} for the first step with index(j) >= t), e.g.
  ``jnp.take_along_axis(adv_BxS, step_id_BxT, axis=1)``, then ``grpo`` with per-token advantages.

  Args:
    step_rewards_BxS: [B, S] per-step rewards (e.g. PRM scores), B = num_groups * group_size.
    step_mask_BxS: [B, S], 1 on real steps.
    group_size: G.
    eps: added to the std. A group whose valid step rewards are all equal gets 0.
  Returns:
    advantages_BxS, float32, stop-gradient, 0 on masked steps.
  """
  valid = valid_mask(step_mask_BxS)
  r = _clean(step_rewards_BxS, valid)
  B, S = r.shape
  if group_size < 1 or B % group_size:
    raise ValueError(f"batch {B} is not a multiple of group_size {group_size}")
  rg, vg = r.reshape(-1, group_size * S), valid.reshape(-1, group_size * S)
  n = jnp.maximum(vg.sum(-1, keepdims=True), 1)
  mean = rg.sum(-1, keepdims=True) / n
  std = jnp.sqrt(jnp.where(vg, (rg - mean) ** 2, 0.0).sum(-1, keepdims=True) / n)
  tie = (jnp.where(vg, rg, -jnp.inf).max(-1, keepdims=True)
         == jnp.where(vg, rg, jnp.inf).min(-1, keepdims=True))
  norm = jnp.where(vg & ~tie, (rg - mean) / (std + eps), 0.0).reshape(B, S)
  adv = jnp.flip(jnp.cumsum(jnp.flip(norm, -1), -1), -1)
  return jax.lax.stop_gradient(jnp.where(valid, adv, 0.0))


def rloo_advantages(rewards_B, *, group_size: int):
  """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics: Revisiting
  REINFORCE Style Optimization for Learning from Human Feedback in LLMs"; Kool et al. 2019):

      A_i = r_i - 1/(G-1) sum_{j != i} r_j  =  G/(G-1) (r_i - mean_g)

  Args:
    rewards_B: [B] rewards in consecutive groups of G >= 2.
    group_size: G.
  Returns:
    advantages_B, float32, stop-gradient.
  """
  if group_size < 2:
    raise ValueError("rloo_advantages needs group_size >= 2")
  r = _groups(rewards_B, group_size)
  baseline = (r.sum(-1, keepdims=True) - r) / (group_size - 1)
  return jax.lax.stop_gradient(jnp.where(_centered(r) == 0, 0.0, r - baseline).reshape(-1))


def reinforce_pp_advantages(rewards_B, *, group_size: int | None = None, eps: float = 1e-6):
  """REINFORCE++ advantages (Hu 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness to
  Both Prompt and Reward Models"): global batch normalisation of the (optionally group-baselined)
  sequence reward,

      x_i = r_i - mean_g   ("REINFORCE++-baseline", with group_size)   or   x_i = r_i   (without)
      A_i = (x_i - mean_B(x)) / (std_B(x) + eps)            population std over the whole batch

  This is the outcome-reward, sequence-level form: the paper's per-token -β KL reward shaping
  belongs in the rewards before this call, and implementations that whiten per *token* weight
  each sequence by its length (this one weights sequences equally).

  Args:
    rewards_B: [B] rewards (consecutive groups of ``group_size`` when given).
    group_size: G for the group-mean baseline, or None.
    eps: added to the std.
  Returns:
    advantages_B, float32, stop-gradient.
  """
  if group_size is None:
    x = _f32(rewards_B)
  else:
    x = _centered(_groups(rewards_B, group_size)).reshape(-1)
  tie = x.max() == x.min()
  a = jnp.where(tie, 0.0, (x - x.mean()) / (x.std() + eps))
  return jax.lax.stop_gradient(a)


# ------------------------------------------------------------------------------------------------
# GRPO family


def _grpo_terms(logps_BxT, old_logps_BxT, ref_logps_BxT, advantages_B, mask_BxT, *, variant,
                clip_eps_low, clip_eps_high, kl_coef, kl_estimator, kl_clamp,
                rollout_logps_BxT, tis_cap):
  if variant not in GRPO_VARIANTS:
    raise ValueError(f"grpo: unknown variant {variant!r}; expected one of {GRPO_VARIANTS}")
  if ref_logps_BxT is None and kl_coef != 0:
    raise ValueError("grpo: ref_logps_BxT is None but kl_coef != 0")
  valid = valid_mask(mask_BxT)
  logps = _clean(logps_BxT, valid)
  old = (jax.lax.stop_gradient(logps) if old_logps_BxT is None
         else _clean(jax.lax.stop_gradient(old_logps_BxT), valid))
  adv = jax.lax.stop_gradient(_f32(advantages_B))
  if adv.ndim == logps.ndim - 1:
    adv = adv[..., None]
  adv = jnp.where(valid, jnp.broadcast_to(adv, logps.shape), 0.0)

  if variant == "gspo":
    # GSPO-token (same paper): every token carries the value of the sequence ratio
    # s_i = exp(mean_t log r_t) and the gradient of its own log-prob, s_i * grad logp_t; averaged
    # over the sequence's tokens with one advantage per sequence this is exactly the gradient of
    # sequence-level GSPO, grad s_i = s_i * mean_t grad logp_t.
    n = jnp.maximum(valid.sum(-1, keepdims=True), 1)
    seq_log_ratio = jnp.clip((logps - old).sum(-1, keepdims=True) / n,
                             -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    log_ratio = jax.lax.stop_gradient(seq_log_ratio) + logps - jax.lax.stop_gradient(logps)
  else:
    log_ratio = _log_ratio(logps, old)
  ratio = jnp.exp(log_ratio)

  if variant == "cispo":
    weight = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high))
    pg = -weight * adv * logps
    clipped = weight != jax.lax.stop_gradient(ratio)
  else:
    pg, clipped, _ = _clipped_surrogate(ratio, adv, clip_eps_low, clip_eps_high, None)

  tis_w = None
  if rollout_logps_BxT is not None:
    rollout = _clean(jax.lax.stop_gradient(rollout_logps_BxT), valid)
    tis_w = jnp.exp(_log_ratio(old, rollout))
    if tis_cap is not None:
      tis_w = jnp.minimum(tis_w, tis_cap)
    tis_w = jax.lax.stop_gradient(tis_w)
    pg = pg * tis_w

  kl = None
  if ref_logps_BxT is not None:
    ref = _clean(jax.lax.stop_gradient(ref_logps_BxT), valid)
    kl = kl_penalty(logps, ref, estimator=kl_estimator, clamp=kl_clamp)
    kl3 = kl_penalty(logps, ref, estimator="k3", clamp=kl_clamp)
  per_token = pg if kl is None or kl_coef == 0 else pg + kl_coef * kl
  terms = dict(per_token=jnp.where(valid, per_token, 0.0), pg=jnp.where(valid, pg, 0.0),
               ratio=ratio, clipped=clipped, tis_w=tis_w,
               kl3=None if kl is None else kl3, old_log_ratio=_log_ratio(logps, old))
  return terms


def grpo_per_token(logps_BxT, old_logps_BxT, ref_logps_BxT, advantages_B, mask_BxT, *,
                   variant: str = "grpo", clip_eps_low: float = 0.2,
                   clip_eps_high: float = 0.2, kl_coef: float = 0.04, kl_estimator: str = "k3",
                   kl_clamp: float | None = LOG_RATIO_CLAMP, rollout_logps_BxT=None,
                   tis_cap: float | None = None):
  """The unreduced per-token loss of ``grpo`` (same arguments, no ``agg``/``norm_len``):
  ``grpo(...)[0] == aggregate(grpo_per_token(...), mask_BxT, mode=GRPO_AGGREGATION[variant])``.
  Use it to aggregate across micro-batches yourself (e.g. exact gradient accumulation with a
  global token count). For "gspo" each token carries its sequence's loss.

  Returns:
    values_BxT, float32, 0 where the mask is 0.
  """
  return _grpo_terms(logps_BxT, old_logps_BxT, ref_logps_BxT, advantages_B, mask_BxT,
                     variant=variant, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
                     kl_coef=kl_coef, kl_estimator=kl_estimator, kl_clamp=kl_clamp,
                     rollout_logps_BxT=rollout_logps_BxT, tis_cap=tis_cap)["per_token"]


def grpo(logps_BxT, old_logps_BxT, ref_logps_BxT, advantages_B, mask_BxT, *,
         variant: str = "grpo", clip_eps_low: float = 0.2, clip_eps_high: float = 0.2,
         kl_coef: float = 0.04, kl_estimator: str = "k3",
         kl_clamp: float | None = LOG_RATIO_CLAMP, rollout_logps_BxT=None,
         tis_cap: float | None = None, agg: str | None = None, norm_len: float | None = None):
  """The GRPO family of critic-free policy losses. With r_t = exp(logp_t - old_logp_t), the
  sequence advantage A_i broadcast over its tokens (or per-token advantages, e.g. from
  ``group_step_advantages``) and KL_t = kl_penalty(logp_t, ref_logp_t, estimator=kl_estimator):

  "grpo" (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models"; the original paper's eq. 3, with the β KL inside the per-token average and
  the unbiased "k3" estimator π_ref/π - log(π_ref/π) - 1):
      l_t  = -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + β KL_t
      loss = 1/G sum_i 1/|o_i| sum_t l_t                        (seq_mean_token_mean)
  "dr_grpo" (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"):
      the same l_t, loss = 1/G sum_i sum_t l_t / L with a constant L, not |o_i|
      (seq_mean_token_sum_norm; pass ``norm_len`` = the generation budget, otherwise L is the
      padded T and the loss depends on padding). Dropping the std scaling is the advantages' job:
      ``group_advantages(..., scale="none")``.
  "dapo" (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"):
      the same l_t, loss = sum_{i,t} l_t / sum_i |o_i| (token_mean). DAPO uses clip-higher
      (eps_low=0.2, eps_high=0.28) and kl_coef=0: pass them, no default changes with the variant.
  "gspo" (Zheng et al. 2025, "Group Sequence Policy Optimization"): one ratio per sequence,
      s_i = exp(1/|o_i| sum_t (logp_t - old_logp_t)),
      l_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) (+ β mean_t KL_t),
      loss = 1/G sum_i l_i. Implemented as GSPO-token (each token: value s_i, gradient of its own
      log-prob), identical to GSPO for sequence advantages and also accepting per-token ones. The
      paper's clip range is tiny (eps_low=3e-4, eps_high=4e-4): pass it.
  "cispo" (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
      Attention"): clip the importance weight, not the update, so every token keeps a gradient:
      l_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A_i logp_t (+ β KL_t), loss = token_mean.
      The paper imposes no lower bound (a large eps_low, e.g. 1.0) and tunes eps_high only.

  Truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
  Off-Policy RL Training"): with ``rollout_logps_BxT`` (the rollout engine's log-probs) the
  per-token policy term (not the KL) is multiplied by w_t = sg(min(exp(old_logp_t -
  rollout_logp_t), tis_cap)) (no cap when ``tis_cap`` is None).

  Args:
    logps_BxT: log π_θ(o_t) [B, T] (differentiated).
    old_logps_BxT: log π_θold(o_t) [B, T] (data), or None for a single on-policy update
      (old = stop_gradient(logps), r = 1).
    ref_logps_BxT: log π_ref(o_t) [B, T] (data), or None when kl_coef == 0.
    advantages_B: [B] sequence advantages (e.g. ``group_advantages``), or [B, T] per-token ones.
    mask_BxT: [B, T], 1 on response tokens.
    variant: one of ``GRPO_VARIANTS``.
    clip_eps_low, clip_eps_high: clip range [1 - eps_low, 1 + eps_high].
    kl_coef: β (a Python float).
    kl_estimator: "k1", "k2" or "k3" (see ``kl_penalty``).
    kl_clamp: clamp of log(π_ref/π) inside the KL estimator (keeps k3 finite), or None.
    rollout_logps_BxT: log-probs from the rollout engine [B, T], or None.
    tis_cap: the truncation C of the TIS weight, or None.
    agg: override the variant's aggregation (``GRPO_AGGREGATION[variant]``).
    norm_len: the constant of "seq_mean_token_sum_norm" (dr_grpo).
  Returns:
    (loss, metrics) with metrics
      pg/loss         the aggregated policy term (without the KL term),
      pg/clipfrac     fraction of valid tokens whose clipped term is selected (cispo: whose weight
                      is clipped; gspo: tokens of clipped sequences),
      pg/ratio_mean   mean ratio over valid tokens (gspo: s_i, weighted by length),
      pg/approx_kl    mean k3 estimate of KL(π_old ‖ π_θ) over valid tokens,
      kl/ref          mean k3 estimate of KL(π_θ ‖ π_ref) over valid tokens (when ref given),
      tis/weight_mean mean TIS weight over valid tokens (when rollout_logps_BxT given).
  """
  t = _grpo_terms(logps_BxT, old_logps_BxT, ref_logps_BxT, advantages_B, mask_BxT,
                  variant=variant, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
                  kl_coef=kl_coef, kl_estimator=kl_estimator, kl_clamp=kl_clamp,
                  rollout_logps_BxT=rollout_logps_BxT, tis_cap=tis_cap)
  mode = GRPO_AGGREGATION[variant] if agg is None else agg
  loss = aggregate(t["per_token"], mask_BxT, mode=mode, norm_len=norm_len)
  lr = t["old_log_ratio"]
  metrics = {
      "pg/loss": jax.lax.stop_gradient(aggregate(t["pg"], mask_BxT, mode=mode,
                                                 norm_len=norm_len)),
      "pg/clipfrac": _masked_mean(t["clipped"], mask_BxT),
      "pg/ratio_mean": _masked_mean(t["ratio"], mask_BxT),
      "pg/approx_kl": _masked_mean(jnp.expm1(lr) - lr, mask_BxT),
  }
  if t["kl3"] is not None:
    metrics["kl/ref"] = _masked_mean(t["kl3"], mask_BxT)
  if t["tis_w"] is not None:
    metrics["tis/weight_mean"] = _masked_mean(t["tis_w"], mask_BxT)
  return loss, metrics
