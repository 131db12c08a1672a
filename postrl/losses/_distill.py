"""Knowledge-distillation losses: token-level divergences between teacher and student distributions.

Notation: p = teacher, q = student, both next-token distributions over the vocabulary at one
position (softened by a temperature T when given). All divergences are computed from log-softmax
log-probabilities in (at least) float32; mixtures are formed in log space,
log(a P + (1 - a) Q) = logaddexp(log a + log P, log(1 - a) + log Q), so nothing underflows to log 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from postrl.losses._common import aggregate, valid_mask
from postrl.losses._supervised import _at_least_f32

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
TOPK_DIVERGENCES = ("forward_kl",)


def _log_probs(logits, temperature):
  """log softmax(logits / T), floored at the dtype's most negative finite value.

  The floor turns the -inf of a masked vocabulary entry (logit -inf, e.g. vocabulary padding) into
  a finite number whose probability is still exactly 0, so 0 * (log p - log q) and the log-space
  mixtures stay finite (-inf - -inf would be nan) in the value and in the gradients.
  """
  logps = jax.nn.log_softmax(_at_least_f32(logits) / temperature, axis=-1)
  return jnp.maximum(logps, jnp.finfo(logps.dtype).min)


def _kl(logp, logq):
  """KL(P || Q) = sum_v P (log P - log Q) over the last axis."""
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def _log_mix(weight, logp, logq):
  """log(weight P + (1 - weight) Q) for a Python float weight in (0, 1)."""
  return jnp.logaddexp(math.log(weight) + logp, math.log1p(-weight) + logq)


def _check(divergence, beta, skew, temperature):
  if divergence not in DIVERGENCES:
    raise ValueError(f"distill: unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
  if divergence == "jsd" and not 0.0 < beta < 1.0:
    raise ValueError(f"distill: jsd needs 0 < beta < 1 (got {beta}); JSD(0) = JSD(1) = 0 "
                     "identically: use 'forward_kl' / 'reverse_kl' for the end points")
  if divergence.startswith("skew_") and not 0.0 <= skew < 1.0:
    raise ValueError(f"distill: skew must be in [0, 1) (got {skew})")
  if not temperature > 0:
    raise ValueError(f"distill: temperature must be > 0 (got {temperature})")


def _divergence(logp, logq, divergence, beta, skew):
  if divergence == "forward_kl":
    return _kl(logp, logq)
  if divergence == "reverse_kl":
    return _kl(logq, logp)
  if divergence == "jsd":
    logm = _log_mix(beta, logp, logq)
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)
  if divergence == "tvd":
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(logp) - jnp.exp(logq)), axis=-1)
  if divergence == "skew_forward_kl":
    return _kl(logp, logq if skew == 0 else _log_mix(skew, logp, logq))
  if divergence == "skew_reverse_kl":
    return _kl(logq, logp if skew == 0 else _log_mix(skew, logq, logp))
  raise AssertionError(divergence)


def distill_per_token(student_logits_BxTxV, teacher_logits_BxTxV, *, divergence: str = "forward_kl",
                      beta: float = 0.5, skew: float = 0.1, temperature: float = 1.0):
  """Per-token divergence D(p_t, q_t) between teacher p and student q (no masking, no T^2).

  See ``distill`` for the divergences and their sources.

  Args:
    student_logits_BxTxV: student logits (any float dtype; computed in at least float32).
    teacher_logits_BxTxV: teacher logits over the same vocabulary and positions.
    divergence: one of ``DIVERGENCES``.
    beta: GKD's beta of ``jsd``, in (0, 1).
    skew: DistiLLM's alpha of ``skew_forward_kl`` / ``skew_reverse_kl``, in [0, 1).
    temperature: T > 0; both distributions are softmax(logits / T).
  Returns:
    [B, T] per-token divergences (float32; float64 for float64 logits).
  """
  _check(divergence, beta, skew, temperature)
  logq = _log_probs(student_logits_BxTxV, temperature)
  logp = _log_probs(teacher_logits_BxTxV, temperature)
  return _divergence(logp, logq, divergence, beta, skew)


def distill(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT, *,
            divergence: str = "forward_kl", beta: float = 0.5, skew: float = 0.1,
            temperature: float = 1.0, scale_by_temperature_sq: bool = True):
  """Token-mean divergence between the teacher's (p) and the student's (q) next-token distributions.

      L = c * sum_{b,t} m_bt D(p_bt, q_bt) / sum_{b,t} m_bt,   p = softmax(z_teacher / T),
      q = softmax(z_student / T),   c = T^2 if scale_by_temperature_sq else 1

  divergence:
    forward_kl       KL(p || q) = sum_v p (log p - log q). Hinton, Vinyals & Dean 2015, "Distilling
                     the Knowledge in a Neural Network": both sides softened by T; the T^2 factor
                     keeps the gradient scale independent of T (``scale_by_temperature_sq``; it
                     applies to every divergence here).
    reverse_kl       KL(q || p). Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language
                     Models" (mode-seeking). This is the exact per-token reverse KL over the
                     vocabulary at each given position; MiniLLM's sequence-level policy gradient
                     over student samples is a trainer matter.
    jsd              Generalised JSD of GKD, Agarwal et al. 2024, "On-Policy Distillation of
                     Language Models: Learning from Self-Generated Mistakes", with the paper's
                     convention, P = teacher, Q = student, beta weighting the teacher side:
                       JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m),
                       m = beta p + (1 - beta) q.
                     beta = 0.5 is the usual JSD. JSD(beta) -> 0 at both ends; to first order
                     JSD(beta) / beta -> KL(p || q) (forward) as beta -> 0 and
                     JSD(beta) / (1 - beta) -> KL(q || p) (reverse) as beta -> 1, which is the sense
                     in which the paper says it interpolates between forward and reverse KL (the
                     scale vanishes; beta in (0, 1) only, use forward_kl / reverse_kl for the ends).
    tvd              total variation 1/2 sum_v |p - q| (symmetric, bounded by 1); Wen et al. 2023,
                     "f-Divergence Minimization for Sequence-Level Knowledge Distillation".
    skew_forward_kl  KL(p || a p + (1 - a) q), a = ``skew``   (Ko et al. 2024, "DistiLLM: Towards
    skew_reverse_kl  KL(q || a q + (1 - a) p)                   Streamlined Distillation for Large
                     Language Models", alpha-skew KL and alpha-skew reverse KL; the paper's default
                     a = 0.1; a = 0 gives plain forward / reverse KL). ``skew`` is its own keyword,
                     separate from the JSD's ``beta``.

  Gradients flow into both arguments; pass a stop-gradient'ed (or frozen) teacher. Positions with
  mask 0 are replaced by zeros before any arithmetic, so they may hold nan/inf. Vocabulary entries
  with logit -inf in both models (padding) are handled exactly.

  Args:
    student_logits_BxTxV: student logits (any float dtype; computed in float32).
    teacher_logits_BxTxV: teacher logits, same shape.
    mask_BxT: 1 on positions that count, 0 elsewhere.
    divergence: one of ``DIVERGENCES``.
    beta: GKD's beta of ``jsd``, in (0, 1).
    skew: DistiLLM's alpha of the skew KLs, in [0, 1).
    temperature: T > 0.
    scale_by_temperature_sq: multiply the loss by T^2 (Hinton et al. 2015).
  Returns:
    ``(loss, metrics)``: the float32 loss and ``distill/<divergence>`` (token-mean divergence at
    temperature T, without the T^2 factor), ``distill/top1_agreement`` (argmax of student ==
    argmax of teacher) and ``loss_weight`` (number of valid tokens).
  """
  _check(divergence, beta, skew, temperature)
  valid = valid_mask(mask_BxT)[..., None]
  student = jnp.where(valid, student_logits_BxTxV, 0)
  teacher = jnp.where(valid, teacher_logits_BxTxV, 0)
  div_BxT = distill_per_token(student, teacher, divergence=divergence, beta=beta, skew=skew,
                              temperature=temperature)
  mean_div = aggregate(div_BxT, mask_BxT)
  scale = temperature ** 2 if scale_by_temperature_sq else 1.0
  agree = (jnp.argmax(student, -1) == jnp.argmax(teacher, -1)).astype(jnp.float32)
  metrics = {
      f"distill/{divergence}": jax.lax.stop_gradient(mean_div),
      "distill/top1_agreement": aggregate(agree, mask_BxT),
      "loss_weight": jnp.sum(jnp.asarray(mask_BxT, jnp.float32)),
  }
  return scale * mean_div, metrics


def distill_topk_per_token(student_logits_BxTxV, teacher_topk_ids_BxTxK, teacher_topk_logps_BxTxK,
                           *, temperature: float = 1.0):
  """Per-token forward KL from the teacher's renormalised top-k to the student (no mask, no T^2).

      p~_k = softmax_k(log p_k / T)   (over the K stored entries),   q = softmax(z_student / T)
      D = sum_k p~_k (log p~_k - log q[id_k])

  Args:
    student_logits_BxTxV: student logits over the full vocabulary.
    teacher_topk_ids_BxTxK: int ids in [0, V) of the teacher's top-k tokens.
    teacher_topk_logps_BxTxK: the teacher's log-probs of those tokens (at temperature 1, as stored);
      -inf marks an unused slot.
    temperature: T > 0.
  Returns:
    [B, T] per-token divergences.
  """
  _check("forward_kl", 0.5, 0.0, temperature)
  logq = _log_probs(student_logits_BxTxV, temperature)
  logq_k = jnp.take_along_axis(logq, teacher_topk_ids_BxTxK.astype(jnp.int32), axis=-1)
  logp_k = _log_probs(teacher_topk_logps_BxTxK, temperature)
  return _kl(logp_k, logq_k)


def distill_topk(student_logits_BxTxV, teacher_topk_ids_BxTxK, teacher_topk_logps_BxTxK, mask_BxT,
                 *, divergence: str = "forward_kl", temperature: float = 1.0,
                 scale_by_temperature_sq: bool = True):
  """Sparse forward-KL distillation when only the teacher's top-k ids and log-probs are stored.

      L = c * token-mean_{valid} sum_k p~_k (log p~_k - log q(id_k)),
      p~_k = p_k^(1/T) / sum_j p_j^(1/T)  (j over the stored top-k),   q = softmax(z_student / T)

  The teacher's top-k probabilities are RENORMALISED over the stored support (no residual bucket):
  p~ is a proper distribution on the top-k ids, so D = KL(p~ || q) >= 0 exactly, temperature
  applies consistently (p^(1/T) renormalised, which a residual bucket could not be), and the
  student's full-vocabulary normaliser in log q still pushes its mass off non-top-k tokens. With
  K = V (every id stored) this is the dense ``distill(..., divergence="forward_kl")``. Forward KL
  as in Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (T^2 factor optional).
  Only ``forward_kl`` is defined on a teacher top-k support; the reverse and mixed divergences need
  the teacher's probability of every token the student puts mass on.

  Args:
    student_logits_BxTxV: student logits over the full vocabulary.
    teacher_topk_ids_BxTxK: int ids in [0, V) of the teacher's top-k tokens (any order).
    teacher_topk_logps_BxTxK: the teacher's log-probs of those ids (temperature 1, as stored by
      a sampler); -inf marks an unused slot.
    mask_BxT: 1 on positions that count, 0 elsewhere (masked positions may hold anything).
    divergence: must be "forward_kl".
    temperature: T > 0.
    scale_by_temperature_sq: multiply the loss by T^2.
  Returns:
    ``(loss, metrics)``: the float32 loss and ``distill/forward_kl`` (token-mean KL without T^2),
    ``distill/teacher_topk_mass`` (token-mean of sum_k p_k: how much of the teacher the stored
    top-k covers) and ``loss_weight`` (number of valid tokens).
  """
  if divergence not in TOPK_DIVERGENCES:
    raise ValueError(f"distill_topk: divergence {divergence!r} is not defined on a top-k teacher "
                     f"support; expected one of {TOPK_DIVERGENCES}")
  valid = valid_mask(mask_BxT)[..., None]
  student = jnp.where(valid, student_logits_BxTxV, 0)
  ids = jnp.where(valid, teacher_topk_ids_BxTxK, 0)
  logps = jnp.where(valid, teacher_topk_logps_BxTxK, 0)
  div_BxT = distill_topk_per_token(student, ids, logps, temperature=temperature)
  mean_div = aggregate(div_BxT, mask_BxT)
  scale = temperature ** 2 if scale_by_temperature_sq else 1.0
  mass_BxT = jnp.sum(jnp.exp(_at_least_f32(logps)), axis=-1)
  metrics = {
      "distill/forward_kl": jax.lax.stop_gradient(mean_div),
      "distill/teacher_topk_mass": jax.lax.stop_gradient(aggregate(mass_BxT, mask_BxT)),
      "loss_weight": jnp.sum(jnp.asarray(mask_BxT, jnp.float32)),
  }
  return scale * mean_div, metrics
