"""Reward-model losses: Bradley-Terry (pairs, or all pairs of rankings), Plackett-Luce (rankings),
process reward (steps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from postrl.losses._common import aggregate, valid_mask
from postrl.losses._supervised import _at_least_f32


def bradley_terry(chosen_rewards_B, rejected_rewards_B, *, margin_B=None):
  """Pairwise reward-model loss under the Bradley-Terry preference model.

      P(y_c > y_r) = sigma(r_c - r_r),    L = 1/B sum_b -log sigma(r_c,b - r_r,b - m_b)

  Bradley & Terry 1952, "Rank Analysis of Incomplete Block Designs: I. The Method of Paired
  Comparisons"; the reward-model loss of Ouyang et al. 2022, "Training language models to follow
  instructions with human feedback" (InstructGPT; with K responses per prompt pass all C(K,2) pairs
  as rows); the margin m as in Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat
  Models" (a larger margin for pairs rated more distinct).

  Args:
    chosen_rewards_B: r(x, y_c), the reward-model scores of the preferred responses.
    rejected_rewards_B: r(x, y_r), same shape.
    margin_B: optional m >= 0 per pair (default 0).
  Returns:
    ``(loss, metrics)``: the float32 mean loss and ``rm/accuracy`` (fraction with r_c > r_r),
    ``rm/margin`` (mean r_c - r_r), ``rm/chosen``, ``rm/rejected`` (mean rewards) and
    ``loss_weight`` (B).
  """
  chosen = _at_least_f32(chosen_rewards_B)
  rejected = _at_least_f32(rejected_rewards_B)
  diff_B = chosen - rejected
  logit_B = diff_B if margin_B is None else diff_B - _at_least_f32(margin_B)
  loss = jnp.mean(-jax.nn.log_sigmoid(logit_B))
  sg = jax.lax.stop_gradient
  metrics = {
      "rm/accuracy": jnp.mean((diff_B > 0).astype(jnp.float32)),
      "rm/margin": sg(jnp.mean(diff_B)),
      "rm/chosen": sg(jnp.mean(chosen)),
      "rm/rejected": sg(jnp.mean(rejected)),
      "loss_weight": jnp.asarray(diff_B.size, jnp.float32),
  }
  return loss, metrics


def bradley_terry_rankings(scores_BxK, *, mask_BxK=None):
  """Bradley-Terry on rankings: every ordered pair of a ranking, one ranking per batch element.

      P_b = {(i, j): i < j, both valid}        (i is ranked above j: lists are best first)
      L_b = 1/|P_b| sum_{(i,j) in P_b} -log sigma(s_i - s_j)
      L   = mean of L_b over the ranked rows (|P_b| >= 1, i.e. >= 2 valid responses)

  Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
  (InstructGPT, Sec. 3.5): labellers rank K responses and all C(K,2) comparisons of a prompt are
  one batch element, loss(theta) = -1/C(K,2) E[log sigma(r(x, y_w) - r(x, y_l))], so a prompt
  weighs the same whatever its K and its pairs are not treated as independent samples (which
  over-fits). The pairwise model is Bradley & Terry 1952. With K = 2 this is ``bradley_terry``
  (and ``plackett_luce``).

  Masking as ``plackett_luce``: ``mask_BxK`` marks the responses in the ranking; masked entries
  may sit anywhere, are left out of every pair (so a row equals the shorter list of its valid
  scores in their given order) and their values are never read (nan/inf allowed). Rows with
  fewer than 2 valid responses contribute 0 and are not counted in the mean (``loss_weight``);
  a batch with none gives loss 0.

  Args:
    scores_BxK: r(x, y_k), listed best-first (position 0 is the most preferred response).
    mask_BxK: optional 1 for responses in the ranking, 0 for padding (default: all valid).
  Returns:
    ``(loss, metrics)``: the float32 loss and, each a mean over the ranked rows,
    ``rm/accuracy`` (the row's fraction of pairs with s_i > s_j; a tie is not a win),
    ``rm/margin`` (the row's mean s_i - s_j over its pairs), ``rm/top1_accuracy`` (the best-ranked
    response has the highest score, ties resolved to the lower index, as ``plackett_luce``) and
    ``loss_weight`` (the number of ranked rows).
  """
  scores = _at_least_f32(scores_BxK)
  valid_BxK = jnp.ones(scores.shape, bool) if mask_BxK is None else valid_mask(mask_BxK)
  s_BxK = jnp.where(valid_BxK, scores, 0.0)
  K = s_BxK.shape[-1]
  above_KxK = jnp.triu(jnp.ones((K, K), bool), 1)
  pair_BxKxK = above_KxK & valid_BxK[..., :, None] & valid_BxK[..., None, :]
  diff_BxKxK = jnp.where(pair_BxKxK, s_BxK[..., :, None] - s_BxK[..., None, :], 0.0)
  n_pairs_B = jnp.sum(pair_BxKxK, axis=(-2, -1)).astype(jnp.float32)
  ranked_B = n_pairs_B > 0
  per_pair = lambda v_BxKxK: (jnp.sum(jnp.where(pair_BxKxK, v_BxKxK, 0.0), axis=(-2, -1))
                              / jnp.maximum(n_pairs_B, 1.0))
  n_ranked = jnp.sum(ranked_B.astype(jnp.float32))
  over_rows = lambda v_B: jnp.sum(jnp.where(ranked_B, v_B, 0.0)) / jnp.maximum(n_ranked, 1.0)
  loss = over_rows(per_pair(-jax.nn.log_sigmoid(diff_BxKxK)))
  first_B = jnp.argmax(valid_BxK, axis=-1)
  best_B = jnp.argmax(jnp.where(valid_BxK, s_BxK, -jnp.inf), axis=-1)
  sg = jax.lax.stop_gradient
  metrics = {
      "rm/accuracy": over_rows(per_pair((diff_BxKxK > 0).astype(jnp.float32))),
      "rm/margin": sg(over_rows(per_pair(diff_BxKxK))),
      "rm/top1_accuracy": over_rows((first_B == best_B).astype(jnp.float32)),
      "loss_weight": n_ranked,
  }
  return loss, metrics


def ranking_nll(scores_BxK, valid_BxK):
  """Per-row Plackett-Luce NLL -sum_{k valid} [s_k - logsumexp_{j >= k, j valid} s_j] [B].

  Shared by ``plackett_luce`` (scores from a reward model) and ``listwise_dpo`` (implicit
  rewards). Masked entries may sit anywhere and are dropped from every term and log-sum-exp;
  their values must already be finite (callers zero them). Rows with < 2 valid entries give 0.
  """
  K = scores_BxK.shape[-1]
  idx = jnp.arange(K)
  # include[b, k, j]: j is still unplaced at step k. The diagonal is always included so every
  # log-sum-exp has a finite term (terms of masked k are dropped below).
  suffix_KxK = idx[None, :] >= idx[:, None]
  include_BxKxK = (valid_BxK[..., None, :] & suffix_KxK) | jnp.eye(K, dtype=bool)
  lse_BxK = jax.nn.logsumexp(jnp.where(include_BxKxK, scores_BxK[..., None, :], -jnp.inf),
                             axis=-1)
  return -jnp.sum(jnp.where(valid_BxK, scores_BxK - lse_BxK, 0.0), axis=-1)


def plackett_luce(scores_BxK, *, mask_BxK=None):
  """Listwise reward-model loss: negative log-likelihood of the observed ranking (Plackett-Luce).

      P(y_1 > y_2 > ... > y_K) = prod_k exp(s_k) / sum_{j >= k} exp(s_j)
      L_b = -sum_{k valid} [ s_k - logsumexp_{j >= k, j valid} s_j ]
      L   = mean of L_b over the ranked rows (>= 2 valid responses)

  Plackett 1975, "The Analysis of Permutations"; Luce 1959, "Individual Choice Behavior". The
  denominator runs over the suffix j >= k (the responses not yet placed), as in the DPO paper's
  appendix (Rafailov et al. 2023) and PRO (Song et al. 2024), and as in the seed001 survey's
  Eq. for L_PL (sum over k = l..m). With K = 2 this is exactly ``bradley_terry``.

  Masking: ``mask_BxK`` marks the responses that are part of the ranking; masked entries may sit
  anywhere (not only at the end) and are dropped from every term and every log-sum-exp, so a row
  equals the shorter list of its valid scores in their given order. Their values are never read
  (nan/inf allowed). Rows with fewer than 2 valid responses carry no ranking: they contribute 0
  and are not counted in the mean (the mean is over rows with >= 2 valid responses, reported as
  ``loss_weight``; a batch with none gives loss 0).

  Args:
    scores_BxK: r(x, y_k), listed best-first (position 0 is the most preferred response).
    mask_BxK: optional 1 for responses in the ranking, 0 for padding (default: all valid).
  Returns:
    ``(loss, metrics)``: the float32 loss and ``rm/top1_accuracy`` (fraction of ranked rows where
    the best-ranked response has the highest score; ties resolved to the lower index) and
    ``loss_weight`` (the number of ranked rows).
  """
  scores = _at_least_f32(scores_BxK)
  valid_BxK = jnp.ones(scores.shape, bool) if mask_BxK is None else valid_mask(mask_BxK)
  s_BxK = jnp.where(valid_BxK, scores, 0.0)
  nll_B = ranking_nll(s_BxK, valid_BxK)
  ranked_B = jnp.sum(valid_BxK, axis=-1) >= 2
  n_ranked = jnp.sum(ranked_B.astype(jnp.float32))
  loss = jnp.sum(jnp.where(ranked_B, nll_B, 0.0)) / jnp.maximum(n_ranked, 1.0)
  first_B = jnp.argmax(valid_BxK, axis=-1)
  best_B = jnp.argmax(jnp.where(valid_BxK, s_BxK, -jnp.inf), axis=-1)
  top1 = jnp.where(ranked_B, (first_B == best_B).astype(jnp.float32), 0.0)
  metrics = {
      "rm/top1_accuracy": jnp.sum(top1) / jnp.maximum(n_ranked, 1.0),
      "loss_weight": n_ranked,
  }
  return loss, metrics


def process_reward_per_step(step_logits_BxS, step_labels_BxS):
  """Per-step binary cross-entropy of a process reward model (no masking, no reduction).

      l = -[ y log sigma(z) + (1 - y) log sigma(-z) ]      (y in [0, 1], computed with log_sigmoid)

  Args:
    step_logits_BxS: the PRM's logit z that step s is correct.
    step_labels_BxS: y in [0, 1] (hard 0/1, or a soft estimate).
  Returns:
    float32 [B, S] per-step losses.
  """
  z = _at_least_f32(step_logits_BxS)
  y = _at_least_f32(step_labels_BxS)
  return -(y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))


def process_reward(step_logits_BxS, step_labels_BxS, step_mask_BxS):
  """Process reward model (PRM) loss: binary cross-entropy on every reasoning step.

      L = sum_{b,s} m_bs l_bs / sum_{b,s} m_bs,   l = -[ y log sigma(z) + (1 - y) log sigma(-z) ]

  Lightman et al. 2023, "Let's Verify Step by Step" (PRM800K: each step labelled by humans; hard
  labels, with "neutral" mapped to 0 or 1 by the caller); Wang et al. 2024, "Math-Shepherd: Verify
  and Reinforce LLMs Step-by-step without Human Annotations" (soft labels y in [0, 1]: the fraction
  of completions from that step that reach the correct answer; hard labels = any completion does).
  The score z_bs is the PRM head's logit at the token that ends step s (gather it before calling).

  Args:
    step_logits_BxS: PRM logits, one per step (padded to S).
    step_labels_BxS: labels y in [0, 1]; padded steps may hold anything.
    step_mask_BxS: 1 on real steps, 0 on padding.
  Returns:
    ``(loss, metrics)``: the float32 step-mean loss and ``prm/loss`` (the same), ``prm/accuracy``
    (sigma(z) > 0.5 against the rounded label y > 0.5), ``prm/pred_mean`` (mean sigma(z)),
    ``prm/label_mean`` and ``loss_weight`` (number of valid steps).
  """
  valid_BxS = valid_mask(step_mask_BxS)
  z = jnp.where(valid_BxS, _at_least_f32(step_logits_BxS), 0.0)
  y = jnp.where(valid_BxS, _at_least_f32(step_labels_BxS), 0.0)
  loss = aggregate(process_reward_per_step(z, y), step_mask_BxS)
  correct = ((z > 0) == (y > 0.5)).astype(jnp.float32)
  sg = jax.lax.stop_gradient
  metrics = {
      "prm/loss": sg(loss),
      "prm/accuracy": aggregate(correct, step_mask_BxS),
      "prm/pred_mean": sg(aggregate(jax.nn.sigmoid(z), step_mask_BxS)),
      "prm/label_mean": aggregate(y, step_mask_BxS),
      "loss_weight": jnp.sum(jnp.asarray(step_mask_BxS, jnp.float32)),
  }
  return loss, metrics
