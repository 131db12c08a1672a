"""Supervised fine-tuning loss: token-level cross-entropy with label smoothing and z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from postrl.losses._common import aggregate, valid_mask


def _at_least_f32(x):
  """Upcasts bf16/f16 (and ints) to float32; float64 stays float64 (for x64 gradient checks)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _ce_terms(logits_BxTxV, targets_BxT):
  """float32 (or wider) logits, log Z, target log-prob and mean_v log-prob per token."""
  logits = _at_least_f32(logits_BxTxV)
  lse_BxT = jax.nn.logsumexp(logits, axis=-1)
  ids_BxTx1 = targets_BxT[..., None].astype(jnp.int32)
  picked_BxT = jnp.take_along_axis(logits, ids_BxTx1, axis=-1)[..., 0]
  nll_BxT = lse_BxT - picked_BxT
  uniform_nll_BxT = lse_BxT - jnp.mean(logits, axis=-1)     # mean_v(-log p_v)
  return logits, lse_BxT, nll_BxT, uniform_nll_BxT


def _combine(nll_BxT, uniform_nll_BxT, lse_BxT, label_smoothing, z_loss):
  loss_BxT = nll_BxT
  if label_smoothing:
    loss_BxT = (1.0 - label_smoothing) * nll_BxT + label_smoothing * uniform_nll_BxT
  if z_loss:
    loss_BxT = loss_BxT + z_loss * jnp.square(lse_BxT)
  return loss_BxT


def cross_entropy_per_token(logits_BxTxV, targets_BxT, *, label_smoothing: float = 0.0,
                            z_loss: float = 0.0):
  """Per-token smoothed cross-entropy plus z-loss (no masking, no reduction).

      l_t = (1 - eps) * (-log p_t[y_t]) + eps * mean_v(-log p_t[v]) + z_loss * (log Z_t)^2

  with p_t = softmax(logits_t), Z_t = sum_v exp(logits_t[v]). Label smoothing: Szegedy et al. 2016,
  "Rethinking the Inception Architecture for Computer Vision" (the target is mixed with the uniform
  distribution over V); z-loss: Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with
  Pathways" (keeps log Z near 0).

  Args:
    logits_BxTxV: logits, ALIGNED with the targets: ``logits_BxTxV[b, t]`` predicts
      ``targets_BxT[b, t]`` (any float dtype; computed in at least float32).
    targets_BxT: int target ids in [0, V). Positions you will mask may hold anything only if you go
      through ``cross_entropy``, which sanitises them; here they must be valid ids.
    label_smoothing: eps in [0, 1].
    z_loss: coefficient of (log Z)^2 (PaLM uses 1e-4).
  Returns:
    [B, T] per-token losses (float32; float64 for float64 logits, for x64 gradient checks).
  """
  _, lse_BxT, nll_BxT, uniform_nll_BxT = _ce_terms(logits_BxTxV, targets_BxT)
  return _combine(nll_BxT, uniform_nll_BxT, lse_BxT, label_smoothing, z_loss)


def cross_entropy(logits_BxTxV, targets_BxT, mask_BxT, *, label_smoothing: float = 0.0,
                  z_loss: float = 0.0):
  """Token-mean cross-entropy (negative log-likelihood) over the valid tokens, for SFT.

      L = sum_{b,t} m_bt l_bt / sum_{b,t} m_bt,
      l_bt = (1 - eps) * (-log p_bt[y_bt]) + eps * mean_v(-log p_bt[v]) + z_loss * (log Z_bt)^2

  Label smoothing as Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer
  Vision": cross-entropy against the target (1 - eps) onehot(y) + eps / V, which is the formula
  above. z-loss as Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways":
  z_loss * log^2 Z per token, with Z the softmax normaliser.

  Targets are ALIGNED with the logits (``logits[b, t]`` predicts ``targets[b, t]``). For a causal
  model's outputs, logits at position t predict token t+1: shift first
  (``logits[:, :-1], tokens[:, 1:], mask[:, 1:]``) or use ``postrl.logprobs.token_logps``, the one
  place where model outputs are shifted and turned into per-token log-probs (then
  ``-aggregate(logps, mask)`` is this loss without smoothing or z-loss).

  Positions with mask 0 are replaced by zeros before any arithmetic, so they may hold anything
  (nan/inf logits, -100 targets) without reaching the loss or the gradients. A fully masked batch
  gives loss 0 and zero gradients.

  Args:
    logits_BxTxV: logits of any float dtype (upcast to float32).
    targets_BxT: int target ids in [0, V) on valid positions.
    mask_BxT: 1 on tokens that count, 0 elsewhere (bool or float; float values act as weights).
    label_smoothing: eps in [0, 1].
    z_loss: coefficient of (log Z)^2; 0 disables it.
  Returns:
    ``(loss, metrics)``: the float32 token-mean loss and ``ce/nll`` (token-mean NLL without
    smoothing or z-loss), ``ce/accuracy`` (argmax == target), ``ce/z`` (token-mean log Z; only
    when z_loss > 0) and ``loss_weight`` (sum of the mask: the number of valid tokens, which
    ``postrl.trainers.step`` uses for exact gradient accumulation).
  """
  valid_BxT = valid_mask(mask_BxT)
  logits_BxTxV = jnp.where(valid_BxT[..., None], logits_BxTxV, 0)
  targets_BxT = jnp.where(valid_BxT, targets_BxT, 0)
  logits, lse_BxT, nll_BxT, uniform_nll_BxT = _ce_terms(logits_BxTxV, targets_BxT)
  loss_BxT = _combine(nll_BxT, uniform_nll_BxT, lse_BxT, label_smoothing, z_loss)
  correct_BxT = (jnp.argmax(logits, axis=-1) == targets_BxT).astype(jnp.float32)
  metrics = {
      "ce/nll": jax.lax.stop_gradient(aggregate(nll_BxT, mask_BxT)),
      "ce/accuracy": aggregate(correct_BxT, mask_BxT),
      "loss_weight": jnp.sum(jnp.asarray(mask_BxT, jnp.float32)),
  }
  if z_loss:
    metrics["ce/z"] = jax.lax.stop_gradient(aggregate(lse_BxT, mask_BxT))
  return aggregate(loss_BxT, mask_BxT), metrics
