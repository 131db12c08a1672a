"""Shared pieces of the losses: masks, masked aggregation, per-token KL estimators."""

from __future__ import annotations

import jax.numpy as jnp

def valid_mask(mask):
  """A 0/1 (or bool) mask as bool: True where the entry counts."""
  return jnp.asarray(mask) > 0


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                "seq_mean_token_sum_norm")


def aggregate(values_BxT, mask_BxT, *, mode: str = "token_mean", norm_len: float | None = None):
  """Reduces per-token values to a scalar over the tokens where ``mask_BxT`` is 1.

      token_mean               sum_{b,t} m v / sum_{b,t} m                 (DAPO; one weight per token)
      seq_mean_token_mean      1/B sum_b [sum_t m v / sum_t m]             (GRPO, Shao et al. 2024)
      seq_mean_token_sum       1/B sum_b sum_t m v                          (sequence-level sum)
      seq_mean_token_sum_norm  1/B sum_b sum_t m v / norm_len               (Dr. GRPO, Liu et al. 2025:
                                                                             a constant, not the length)

  Rows with no valid token count as zero in the ``seq_mean_*`` modes (and still count in B), and
  the token mean of a fully masked batch is 0, so gradients stay finite. A fractional mask is a
  weight, exactly as in the formulas (also when a row's or the batch's weights sum to less than 1).

  Args:
    values_BxT: per-token values (e.g. -ratio * advantage).
    mask_BxT: 1 on tokens that count, 0 elsewhere (bool or float).
    mode: one of ``AGGREGATIONS``.
    norm_len: the constant of ``seq_mean_token_sum_norm`` (default: T, the padded length).
  Returns:
    A float32 scalar.
  """
  mask = mask_BxT.astype(jnp.float32)
  v = jnp.where(mask > 0, values_BxT.astype(jnp.float32), 0.0) * mask
  # Guard only the empty case: max(sum m, 1) would also rescale fractional weights summing to < 1.
  nonzero = lambda den: jnp.where(den > 0, den, 1.0)
  if mode == "token_mean":
    return v.sum() / nonzero(mask.sum())
  if mode == "seq_mean_token_mean":
    return jnp.mean(v.sum(-1) / nonzero(mask.sum(-1)))
  if mode == "seq_mean_token_sum":
    return jnp.mean(v.sum(-1))
  if mode == "seq_mean_token_sum_norm":
    return jnp.mean(v.sum(-1)) / (values_BxT.shape[-1] if norm_len is None else norm_len)
  raise ValueError(f"aggregate: unknown mode {mode!r}; expected one of {AGGREGATIONS}")


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logps, ref_logps, *, estimator: str = "k3", clamp: float | None = None):
  """Per-token estimate of KL(π ‖ π_ref) from samples y ~ π (Schulman 2020, "Approximating KL
  divergence"), with log r = log π_ref(y) - log π(y):

      k1 = -log r                    unbiased, high variance, can be negative
      k2 = (log r)^2 / 2             biased, low variance, >= 0
      k3 = (r - 1) - log r           unbiased, low variance, >= 0 (GRPO, Shao et al. 2024)

  Args:
    logps: log π(y_t) of the sampled tokens (any shape).
    ref_logps: log π_ref(y_t), same shape.
    estimator: "k1", "k2" or "k3".
    clamp: if set, log r is clipped to [-clamp, clamp] first (k3's exp can overflow otherwise).
  Returns:
    An array of the same shape (not reduced: mask and aggregate it).
  """
  log_ratio = ref_logps.astype(jnp.float32) - logps.astype(jnp.float32)
  if clamp is not None:
    log_ratio = jnp.clip(log_ratio, -clamp, clamp)
  if estimator == "k1":
    return -log_ratio
  if estimator == "k2":
    return 0.5 * log_ratio ** 2
  if estimator == "k3":
    return jnp.expm1(log_ratio) - log_ratio
  raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
