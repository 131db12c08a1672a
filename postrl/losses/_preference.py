"""Preference-optimisation losses: DPO and its variants, listwise (Plackett-Luce) DPO, KTO, ORPO,
SimPO and CPO.

Every function takes *sequence* log-probs: ``*_logps_B`` is the sum of the per-token log-probs over
the response tokens (prompt masked), ``*_avg_logps_B`` the same sum divided by the response length.
Both come from ``postrl.logprobs``. All losses compute in float32 whatever the input dtype, and
return ``(loss, metrics)``: a float32 scalar (mean over the batch) and a flat dict of float32
scalars. Metrics are computed from stopped gradients.

Notation: ``h_w = log π(y_w) - log π_ref(y_w)`` and ``h_l = log π(y_l) - log π_ref(y_l)`` are the
log-ratios of the chosen (winning) and rejected (losing) responses, ``h = h_w - h_l`` the DPO
log-ratio margin, and ``β h_w``, ``β h_l`` the DPO implicit rewards.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from postrl.losses._common import valid_mask
from postrl.losses._reward import ranking_nll

_f32 = lambda x: jnp.asarray(x).astype(jnp.float32)  # noqa: E731
_sg = jax.lax.stop_gradient
_log_sigmoid = jax.nn.log_sigmoid


def _is_number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


class _LogRatios(NamedTuple):
  """The log-ratio quantities every DPO variant is a function of (all shaped [B], float32)."""
  chosen: jax.Array      # h_w = log π(y_w) - log π_ref(y_w)
  rejected: jax.Array    # h_l = log π(y_l) - log π_ref(y_l)
  policy: jax.Array      # log π(y_w) - log π(y_l)
  reference: jax.Array   # log π_ref(y_w) - log π_ref(y_l)

  @property
  def margin(self):      # h = h_w - h_l
    return self.policy - self.reference


# ----------------------------------------------------------------------------------------------
# DPO variants: each maps the log-ratios to a per-pair loss [B]. Keyword-only parameters other than
# ``beta`` are the variant's own hyper-parameters; ``dpo`` checks user kwargs against them.
# ----------------------------------------------------------------------------------------------


def _sigmoid(q: _LogRatios, *, beta, label_smoothing=0.0):
  # DPO; with ε > 0 the conservative DPO of Mitchell (2023).
  z = beta * q.margin
  return -(1.0 - label_smoothing) * _log_sigmoid(z) - label_smoothing * _log_sigmoid(-z)


def _robust(q: _LogRatios, *, beta, label_smoothing=0.0):
  # rDPO: an unbiased estimate of the clean loss under a label-flip rate ε.
  z = beta * q.margin
  return (-(1.0 - label_smoothing) * _log_sigmoid(z)
          + label_smoothing * _log_sigmoid(-z)) / (1.0 - 2.0 * label_smoothing)


def _hinge(q: _LogRatios, *, beta):
  return jax.nn.relu(1.0 - beta * q.margin)


def _ipo(q: _LogRatios, *, beta):
  return (q.margin - 1.0 / (2.0 * beta)) ** 2


def _exo_pair(q: _LogRatios, *, beta, label_smoothing=0.0):
  # KL(p_θ || p_label) over {y_w, y_l}: p_θ = softmax(β h_w, β h_l), p_label = (1 - ε, ε).
  z = beta * q.margin
  log_qw, log_ql = _log_sigmoid(z), _log_sigmoid(-z)
  return (jnp.exp(log_qw) * (log_qw - jnp.log1p(-label_smoothing))
          + jnp.exp(log_ql) * (log_ql - jnp.log(label_smoothing)))


def _nca_pair(q: _LogRatios, *, beta):
  rw, rl = beta * q.chosen, beta * q.rejected
  return -_log_sigmoid(rw) - 0.5 * _log_sigmoid(-rw) - 0.5 * _log_sigmoid(-rl)


def _bco_pair(q: _LogRatios, *, beta, running_mean=0.0):
  delta = _sg(_f32(running_mean))
  return -_log_sigmoid(beta * q.chosen - delta) - _log_sigmoid(-(beta * q.rejected - delta))


def _sppo_hard(q: _LogRatios, *, beta):
  return (q.chosen - 0.5 / beta) ** 2 + (q.rejected + 0.5 / beta) ** 2


def _aot_logistic(delta, beta, label_smoothing):
  return (-(1.0 - label_smoothing) * _log_sigmoid(beta * delta)
          - label_smoothing * _log_sigmoid(-beta * delta))


def _aot(q: _LogRatios, *, beta, label_smoothing=0.0):
  # Paired AOT: the quantiles of the policy's chosen-vs-rejected log-ratio dominate the reference's.
  delta = jnp.sort(q.policy, axis=0) - jnp.sort(q.reference, axis=0)
  return _aot_logistic(delta, beta, label_smoothing)


def _aot_pair(q: _LogRatios, *, beta, label_smoothing=0.0):
  # Unpaired AOT: the quantiles of the chosen rewards dominate those of the rejected rewards.
  delta = jnp.sort(q.chosen, axis=0) - jnp.sort(q.rejected, axis=0)
  return _aot_logistic(delta, beta, label_smoothing)


def _apo_zero(q: _LogRatios, *, beta):
  return (1.0 - jax.nn.sigmoid(beta * q.chosen)) + jax.nn.sigmoid(beta * q.rejected)


def _apo_down(q: _LogRatios, *, beta):
  return jax.nn.sigmoid(beta * q.chosen) + (1.0 - jax.nn.sigmoid(beta * q.margin))


def _discopop(q: _LogRatios, *, beta, tau=0.05):
  rho = beta * q.margin
  mix = jax.nn.sigmoid(rho / tau)
  # σ(ρ/τ)·exp(-ρ) in log space: exp(-ρ) overflows exactly where σ(ρ/τ) underflows (ρ << 0).
  exp_part = jnp.exp(_log_sigmoid(rho / tau) - rho)
  return (1.0 - mix) * -_log_sigmoid(rho) + exp_part


DPO_VARIANTS: dict[str, Callable[..., jax.Array]] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_pair": _aot_pair,
    "aot_unpaired": _aot_pair,  # TRL's name for aot_pair since 2026 (same loss)
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
}


def _variant_params(fn) -> set[str]:
  return {name for name, p in inspect.signature(fn).parameters.items()
          if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "beta"}


def _check_label_smoothing(variant: str, eps) -> None:
  if not _is_number(eps):
    return  # a traced value: the caller is responsible for its range
  if variant == "robust" and not 0.0 <= eps < 0.5:
    raise ValueError(f"dpo: variant 'robust' needs 0 <= label_smoothing < 0.5, got {eps}")
  if variant == "exo_pair" and not 0.0 < eps < 1.0:
    raise ValueError(f"dpo: variant 'exo_pair' needs 0 < label_smoothing < 1 (the EXO paper uses "
                     f"1e-3), got {eps}")
  if not 0.0 <= eps <= 1.0:
    raise ValueError(f"dpo: label_smoothing must lie in [0, 1], got {eps}")


def _pair_metrics(chosen_rewards_B, rejected_rewards_B, chosen_logps_B, rejected_logps_B):
  rc, rr = _sg(chosen_rewards_B), _sg(rejected_rewards_B)
  return {
      "rewards/chosen": jnp.mean(rc),
      "rewards/rejected": jnp.mean(rr),
      "rewards/margin": jnp.mean(rc - rr),
      "rewards/accuracy": jnp.mean((rc > rr).astype(jnp.float32)),
      "logps/chosen": jnp.mean(_sg(chosen_logps_B)),
      "logps/rejected": jnp.mean(_sg(rejected_logps_B)),
  }


def dpo(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, *,
        beta: float = 0.1, variant: str = "sigmoid", label_smoothing: float = 0.0,
        **variant_kwargs):
  """Direct Preference Optimization and its pairwise variants (a ``variant=`` switch).

  Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
  Model". With ``h_w = log π(y_w) - log π_ref(y_w)``, ``h_l`` likewise, ``h = h_w - h_l``, the loss
  is the batch mean of a per-pair loss ℓ:

    sigmoid    -(1-ε) log σ(βh) - ε log σ(-βh)                 DPO (ε = 0, the canonical sign:
               the seed-001 survey prints it without -log); ε > 0 is conservative DPO (cDPO),
               Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO".
    robust     [-(1-ε) log σ(βh) + ε log σ(-βh)] / (1-2ε)      rDPO, Chowdhury et al. 2024,
               "Provably Robust DPO: Aligning Language Models with Noisy Feedback" (0 <= ε < 0.5).
    hinge      max(0, 1 - βh)                                    SLiC, Zhao et al. 2023, "SLiC-HF:
               Sequence Likelihood Calibration with Human Feedback": SLiC's calibration hinge
               max(0, δ - log π(y_w) + log π(y_l)) with δ = 1/β, scaled by β, on reference-adjusted
               log-ratios as in TRL/RSO (pass zero reference log-probs for the reference-free form).
    ipo        (h - 1/(2β))²                                     IPO, Azar et al. 2023, "A General
               Theoretical Paradigm to Understand Learning from Human Preferences", Eq. 17 (β = τ).
               We follow the paper: h is built from whatever log-probs are passed in (sums). TRL
               instead normalises each log-ratio by its response length (a choice confirmed with the
               IPO authors); to reproduce that, pass length-averaged log-probs for all four inputs.
    exo_pair   Σ_{i∈{w,l}} p_i (log p_i - log q_i), p = softmax(βh_w, βh_l) = (σ(βh), σ(-βh)),
               q = (1-ε, ε)                                      EXO-pref for K = 2, Ji et al. 2024,
               "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 16; needs
               0 < ε < 1 via ``label_smoothing`` (the paper uses 1e-3).
    nca_pair   -log σ(βh_w) - ½ log σ(-βh_w) - ½ log σ(-βh_l)   NCA, Chen et al. 2024, "Noise
               Contrastive Alignment of Language Models with Explicit Rewards".
    bco_pair   -log σ(βh_w - δ) - log σ(-(βh_l - δ))            BCO, Jung et al. 2024, "Binary
               Classifier Optimization for Large Language Model Alignment". δ = ``running_mean=``
               (default 0), the running mean over past steps of the batch-mean reward
               (mean of βh_w and βh_l, i.e. (rewards/chosen + rewards/rejected)/2 from the metrics);
               the caller keeps it (no hidden state here); it is a constant (stop_gradient).
    sppo_hard  (h_w - 1/(2β))² + (h_l + 1/(2β))²                SPPO with hard win probabilities
               (P = 1 for y_w, 0 for y_l; η = 1/β), Wu et al. 2024, "Self-Play Preference
               Optimization for Language Model Alignment", Eq. 4.7.
    aot        -(1-ε) log σ(βd_(i)) - ε log σ(-βd_(i)),  d_(i) = sort_B(log π(y_w) - log π(y_l))_i
               - sort_B(log π_ref(y_w) - log π_ref(y_l))_i     paired AOT, Melnyk et al. 2024,
               "Distributional Preference Alignment of LLMs via Optimal Transport" (logistic
               relaxation of first-order stochastic dominance; quantiles by sorting over the batch,
               so the loss couples the rows of a batch).
    aot_pair   as aot with d_(i) = sort_B(h_w)_i - sort_B(h_l)_i  unpaired AOT (chosen rewards
               dominate rejected rewards). TRL's historic name; ``aot_unpaired`` is an alias.
    apo_zero   (1 - σ(βh_w)) + σ(βh_l)                           APO, D'Oosterlinck et al. 2024,
               "Anchored Preference Optimization and Contrastive Revisions", Eq. 7.
    apo_down   σ(βh_w) + (1 - σ(βh))                             same paper, Eq. 8 (lowers both).
    discopop   (1 - σ(ρ/τ))(-log σ(ρ)) + σ(ρ/τ) e^{-ρ},  ρ = βh   DiscoPOP / log-ratio modulated
               loss, Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and
               for Large Language Models", Eq. 5; ``tau=`` (default 0.05). Non-convex: near ρ = 0
               its gradient can push the margin down.

  Args:
    chosen_logps_B: log π_θ(y_w|x), summed over response tokens, [B].
    rejected_logps_B: log π_θ(y_l|x), [B].
    ref_chosen_logps_B: log π_ref(y_w|x), [B] (treated as data; stop its gradient upstream).
    ref_rejected_logps_B: log π_ref(y_l|x), [B].
    beta: the KL-regularisation strength β (τ for IPO/EXO).
    variant: a key of ``DPO_VARIANTS``.
    label_smoothing: ε for sigmoid (cDPO), robust, exo_pair, aot, aot_pair; must be 0 otherwise.
    **variant_kwargs: the variant's own hyper-parameters (``running_mean`` for bco_pair, ``tau`` for
      discopop); anything else raises ValueError.
  Returns:
    ``(loss, metrics)``: loss a float32 scalar; metrics ``rewards/chosen`` = mean βh_w,
    ``rewards/rejected`` = mean βh_l, ``rewards/margin``, ``rewards/accuracy`` (fraction with
    βh_w > βh_l), ``logps/chosen``, ``logps/rejected`` (mean policy sequence log-probs).
  """
  if variant not in DPO_VARIANTS:
    raise ValueError(f"dpo: unknown variant {variant!r}; expected one of {sorted(DPO_VARIANTS)}")
  fn = DPO_VARIANTS[variant]
  params = _variant_params(fn)
  unknown = sorted(set(variant_kwargs) - params)
  if unknown:
    raise ValueError(f"dpo: variant {variant!r} got unknown keyword argument(s) {unknown}; it "
                     f"accepts {sorted(params | {'beta'})}")
  if "label_smoothing" in params:
    _check_label_smoothing(variant, label_smoothing)
    variant_kwargs = dict(variant_kwargs, label_smoothing=label_smoothing)
  elif not _is_number(label_smoothing) or label_smoothing != 0:
    raise ValueError(f"dpo: variant {variant!r} does not use label_smoothing (got "
                     f"{label_smoothing!r}); it applies to sigmoid, robust, exo_pair, aot, "
                     "aot_pair")

  pc, pr = _f32(chosen_logps_B), _f32(rejected_logps_B)
  rc, rr = _f32(ref_chosen_logps_B), _f32(ref_rejected_logps_B)
  q = _LogRatios(chosen=pc - rc, rejected=pr - rr, policy=pc - pr, reference=rc - rr)
  loss = jnp.mean(fn(q, beta=beta, **variant_kwargs))
  return loss, _pair_metrics(beta * q.chosen, beta * q.rejected, pc, pr)


def listwise_dpo(logps_BxK, ref_logps_BxK, *, beta: float = 0.1, mask_BxK=None):
  """DPO under a Plackett-Luce ranking model over K responses, ranked best first.

  Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
  Model", §5.2 and Appendix A.3. With implicit rewards r_k = β (log π(y_k) - log π_ref(y_k))
  and the valid responses in ranked order y_1 ≻ y_2 ≻ ... ≻ y_K':

      ℓ = -Σ_{k=1}^{K'} [ r_k - log Σ_{j=k}^{K'} exp(r_j) ]       loss = 1/B Σ_b ℓ_b

  (the denominator runs over the suffix j ≥ k, as Plackett-Luce requires; the seed-001 survey's
  multi-sample comparison, §3.2.9, prints an unqualified Σ_j, which we do not follow). For K = 2
  this is -log σ(r_1 - r_2), i.e. ``dpo(variant="sigmoid")``. Masked responses are absent from the
  ranking: a row's ranking is its valid responses in column order, whatever their positions, and
  their values (even nan/inf) never reach the loss or its gradient. A row with fewer than two
  valid responses contributes 0 and still counts in B (so accumulating micro-batches is exact).

  Args:
    logps_BxK: log π_θ(y_k|x) summed over response tokens, column 0 the best, [B, K].
    ref_logps_BxK: log π_ref(y_k|x), [B, K].
    beta: β.
    mask_BxK: 1 for responses present, 0 for padding (default: all present).
  Returns:
    ``(loss, metrics)``; metrics ``rewards/chosen`` (mean reward of each row's best response),
    ``rewards/rejected`` (of its worst), ``rewards/margin`` (best - worst), ``rewards/accuracy``
    (fraction of valid pairs i ranked above j with r_i > r_j), over rows with >= 2 valid responses.
    For K = 2 these equal ``dpo``'s.
  """
  logps, ref = _f32(logps_BxK), _f32(ref_logps_BxK)
  k = logps.shape[-1]
  mask = jnp.ones(logps.shape, bool) if mask_BxK is None else valid_mask(mask_BxK)
  r = jnp.where(mask, beta * (logps - ref), 0.0)                       # [B, K]
  loss = jnp.mean(ranking_nll(r, mask))  # mean over all B rows (see above)

  rs = _sg(r)
  n_valid = mask.sum(-1)
  has_pair = (n_valid >= 2).astype(jnp.float32)
  n_rows = jnp.maximum(has_pair.sum(), 1.0)
  idx = jnp.arange(k)
  first = jnp.argmax(mask, axis=-1)
  last = k - 1 - jnp.argmax(mask[..., ::-1], axis=-1)
  best = jnp.take_along_axis(rs, first[..., None], -1)[..., 0]
  worst = jnp.take_along_axis(rs, last[..., None], -1)[..., 0]
  pairs = (idx[:, None] < idx[None, :]) & mask[..., :, None] & mask[..., None, :]
  concord = pairs & (rs[..., :, None] > rs[..., None, :])
  metrics = {
      "rewards/chosen": jnp.sum(best * has_pair) / n_rows,
      "rewards/rejected": jnp.sum(worst * has_pair) / n_rows,
      "rewards/margin": jnp.sum((best - worst) * has_pair) / n_rows,
      "rewards/accuracy": concord.sum().astype(jnp.float32) / jnp.maximum(pairs.sum(), 1),
  }
  return loss, metrics


def kto(logps_B, ref_logps_B, desirable_B, ref_kl, *, beta: float = 0.1,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
  """Kahneman-Tversky Optimization on unpaired (pointwise) feedback.

  Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization". With
  r = log π(y|x) - log π_ref(y|x) and the reference point z = max(0, ref_kl) held constant
  (stop_gradient; the paper estimates it from mismatched batch pairs and does not back-propagate):

      ℓ = λ_D (1 - σ(β (r - z)))    if y is desirable
      ℓ = λ_U (1 - σ(β (z - r)))    if y is undesirable
      loss = 1/B Σ_b ℓ_b           (the paper's E[λ_y - v(x, y)], as in TRL)

  Args:
    logps_B: log π_θ(y|x) summed over response tokens, [B].
    ref_logps_B: log π_ref(y|x), [B].
    desirable_B: True (or 1) where y is desirable, [B].
    ref_kl: z_ref, the batch estimate of KL(π_θ ‖ π_ref) (a scalar or broadcastable to [B]).
    beta: β.
    desirable_weight: λ_D.
    undesirable_weight: λ_U (the paper keeps λ_D n_D / (λ_U n_U) in [1, 4/3]).
  Returns:
    ``(loss, metrics)``; metrics ``rewards/chosen`` / ``rewards/rejected`` (mean βr over desirable /
    undesirable examples, 0 if none), ``rewards/margin``, ``logps/chosen``, ``logps/rejected``,
    ``kto/ref_kl`` (z after clamping), ``kto/desirable_frac``.
  """
  logps, ref = _f32(logps_B), _f32(ref_logps_B)
  desirable = valid_mask(desirable_B)
  z = _sg(jnp.maximum(_f32(ref_kl), 0.0))
  r = logps - ref
  per_ex = jnp.where(
      desirable,
      desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r - z))),
      undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z - r))))
  loss = jnp.mean(per_ex)

  d = desirable.astype(jnp.float32)
  u = 1.0 - d
  mean_over = lambda x, w: jnp.sum(x * w) / jnp.maximum(w.sum(), 1.0)  # noqa: E731
  rew = _sg(beta * r)
  lp = _sg(logps)
  rc, rr = mean_over(rew, d), mean_over(rew, u)
  metrics = {
      "rewards/chosen": rc,
      "rewards/rejected": rr,
      "rewards/margin": rc - rr,
      "logps/chosen": mean_over(lp, d),
      "logps/rejected": mean_over(lp, u),
      "kto/ref_kl": jnp.mean(z),
      "kto/desirable_frac": jnp.mean(d),
  }
  return loss, metrics


# exp(avg logp) = 1 makes the odds infinite; cap the length-averaged log-prob just below 0.
_ORPO_MAX_AVG_LOGP = -1e-6


def _log_odds(avg_logps):
  x = jnp.minimum(avg_logps, _ORPO_MAX_AVG_LOGP)
  return x - jnp.log(-jnp.expm1(x))  # log(P / (1 - P)), P = exp(x); stable for x -> 0 and x << 0


def orpo(chosen_avg_logps_B, rejected_avg_logps_B, chosen_nll_B, *, lam: float = 0.1):
  """Odds Ratio Preference Optimization (reference-free, with an SFT term).

  Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model".
  With P(y) = exp(mean token log π(y|x)) and odds(y) = P / (1 - P):

      loss = 1/B Σ_b [ NLL(y_w) + λ · (-log σ(log odds(y_w) - log odds(y_l))) ]
      log odds(y) = a - log(1 - e^a) = a - log(-expm1(a)),   a = average log-prob

  This is the original paper's loss. The seed-001 survey prints a different formula (a Bradley-Terry
  on raw sequence probabilities, no odds and no SFT term); we do not follow it. ``a`` is capped at
  -1e-6 so that P = 1 gives finite odds (and gradients).

  Args:
    chosen_avg_logps_B: length-averaged log π_θ(y_w|x), [B].
    rejected_avg_logps_B: length-averaged log π_θ(y_l|x), [B].
    chosen_nll_B: the SFT loss on y_w (per-sequence NLL, normally the token mean), [B].
    lam: λ, the weight of the odds-ratio term.
  Returns:
    ``(loss, metrics)``; metrics ``orpo/nll``, ``orpo/or_loss`` (the unweighted odds-ratio term),
    ``orpo/log_odds_ratio``, ``rewards/accuracy`` (fraction with log odds ratio > 0),
    ``logps/chosen``, ``logps/rejected`` (mean average log-probs).
  """
  ac, ar = _f32(chosen_avg_logps_B), _f32(rejected_avg_logps_B)
  nll = _f32(chosen_nll_B)
  lor = _log_odds(ac) - _log_odds(ar)
  or_loss = -_log_sigmoid(lor)
  loss = jnp.mean(nll) + lam * jnp.mean(or_loss)
  metrics = {
      "orpo/nll": jnp.mean(_sg(nll)),
      "orpo/or_loss": jnp.mean(_sg(or_loss)),
      "orpo/log_odds_ratio": jnp.mean(_sg(lor)),
      "rewards/accuracy": jnp.mean((_sg(lor) > 0).astype(jnp.float32)),
      "logps/chosen": jnp.mean(_sg(ac)),
      "logps/rejected": jnp.mean(_sg(ar)),
  }
  return loss, metrics


def simpo(chosen_avg_logps_B, rejected_avg_logps_B, *, beta: float = 2.0, gamma: float = 0.5):
  """Simple Preference Optimization (reference-free, length-normalised rewards, target margin).

  Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward":

      loss = -1/B Σ_b log σ( β a_w - β a_l - γ ),   a = (1/|y|) log π_θ(y|x)

  γ is the absolute margin, the same number as TRL's CPOTrainer ``simpo_gamma`` (which TRL
  divides by β internally); the SimPO authors' code takes γ/β instead (``gamma_beta_ratio``).

  Args:
    chosen_avg_logps_B: length-averaged log π_θ(y_w|x), [B].
    rejected_avg_logps_B: length-averaged log π_θ(y_l|x), [B].
    beta: β, the reward scale.
    gamma: γ, the target reward margin.
  Returns:
    ``(loss, metrics)`` with ``rewards/*`` (rewards β a) and ``logps/*`` (average log-probs).
  """
  ac, ar = _f32(chosen_avg_logps_B), _f32(rejected_avg_logps_B)
  loss = -jnp.mean(_log_sigmoid(beta * ac - beta * ar - gamma))
  return loss, _pair_metrics(beta * ac, beta * ar, ac, ar)


def cpo(chosen_logps_B, rejected_logps_B, chosen_nll_B, *, beta: float = 0.1, alpha: float = 1.0):
  """Contrastive Preference Optimization (reference-free DPO plus NLL on the chosen response).

  Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
  Machine Translation" (the DPO loss with a uniform reference model, plus a BC regulariser):

      loss = 1/B Σ_b [ -log σ( β log π_θ(y_w|x) - β log π_θ(y_l|x) ) + α · NLL(y_w) ]

  The paper uses α = 1; α is TRL's ``cpo_alpha``.

  Args:
    chosen_logps_B: log π_θ(y_w|x) summed over response tokens, [B].
    rejected_logps_B: log π_θ(y_l|x), [B].
    chosen_nll_B: the NLL term on y_w (per-sequence, normally the token mean), [B].
    beta: β.
    alpha: α, the weight of the NLL term.
  Returns:
    ``(loss, metrics)`` with ``rewards/*`` (β log π), ``logps/*``, ``cpo/nll``, ``cpo/pref_loss``.
  """
  pc, pr, nll = _f32(chosen_logps_B), _f32(rejected_logps_B), _f32(chosen_nll_B)
  pref = -_log_sigmoid(beta * (pc - pr))
  loss = jnp.mean(pref) + alpha * jnp.mean(nll)
  metrics = _pair_metrics(beta * pc, beta * pr, pc, pr)
  metrics["cpo/nll"] = jnp.mean(_sg(nll))
  metrics["cpo/pref_loss"] = jnp.mean(_sg(pref))
  return loss, metrics
