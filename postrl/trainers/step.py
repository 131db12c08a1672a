"""The one training step every trainer shares: loss_fn -> gradients -> optax update -> metrics.

A trainer supplies only ``loss_fn(params, batch) -> (loss, metrics)``. This module adds:

* the optimizer: AdamW with linear warmup + cosine decay and global-norm clipping (``make_optimizer``);
* exact gradient accumulation over ``accum_steps`` micro-batches inside one jitted step;
* a NaN/Inf guard: a step whose loss, gradient or optimizer update is not finite is *not applied*
  (the state is returned unchanged) and is flagged in the metrics (``step/finite`` = 0), so the
  loop can stop with an error naming the step before anything of it reaches a checkpoint;
* donated state (the old parameters and optimizer state are updated in place in device memory).

Exact accumulation. ``loss_fn`` returns the *mean* loss over its micro-batch and may report in
``metrics["loss_weight"]`` how many units that mean was over (e.g. the number of loss tokens for a
token-mean loss; default: the number of rows). The step combines micro-batches as

    loss = sum_i w_i loss_i / sum_i w_i,    grad = sum_i w_i grad_i / sum_i w_i

which is exactly the loss and gradient of the whole batch for any weighted-mean loss (token mean,
sequence mean, ...), so k micro-batches of B/k rows equal one batch of B rows. Every other metric
is combined with the same weights, so a loss_fn reports metrics as means over the same units as
its loss (a token-mean KL, a sequence-mean reward); ``loss_weight`` itself comes out summed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from postrl.models.config import ConfigError

LossFn = Callable[[Any, dict], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW + warmup/cosine + clipping hyper-parameters (plain values, from a config's ``optim``)."""
  lr: float = 1e-5
  warmup_steps: int = 0
  total_steps: int = 1000
  min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio at total_steps
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0    # global gradient norm; None = no clipping

  def __post_init__(self):
    # each of these would train silently wrong rather than fail: lr <= 0 takes no or reversed
    # steps, a negative min_lr_ratio turns the end of the schedule into gradient ascent, eps = 0
    # makes Adam's update 0/0 = NaN wherever a gradient is 0 (e.g. unused embedding rows), and
    # b1, b2 outside [0, 1) make its bias correction divide by zero
    number = lambda x: isinstance(x, numbers.Real) and math.isfinite(x)  # noqa: E731
    bad = [f"{k}={getattr(self, k)!r} (need a finite number > 0)" for k in ("lr", "eps")
           if not (number(getattr(self, k)) and getattr(self, k) > 0)]
    bad += [f"{k}={getattr(self, k)!r} (need a finite number >= 0)"
            for k in ("min_lr_ratio", "weight_decay", "warmup_steps")
            if not (number(getattr(self, k)) and getattr(self, k) >= 0)]
    bad += [f"{k}={getattr(self, k)!r} (need 0 <= {k} < 1)" for k in ("b1", "b2")
            if not (number(getattr(self, k)) and 0 <= getattr(self, k) < 1)]
    if self.clip_norm is not None and not (number(self.clip_norm) and self.clip_norm > 0):
      bad.append(f"clip_norm={self.clip_norm!r} (need a number > 0, or None: no clipping)")
    if bad:
      raise ConfigError(f"config.optim: {'; '.join(bad)}")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """lr(t) = lr * t / warmup for t < warmup, then cosine from lr to lr * min_lr_ratio.

  Cosine decay: Loshchilov & Hutter 2017 (SGDR); warmup as in Goyal et al. 2017.
  """
  decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if cfg.warmup_steps else cfg.lr, peak_value=cfg.lr,
      warmup_steps=cfg.warmup_steps, decay_steps=cfg.warmup_steps + decay_steps,
      end_value=cfg.lr * cfg.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices only (not on norms, biases): the usual AdamW practice."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW (Loshchilov & Hutter 2019) with the warmup-cosine schedule."""
  parts = []
  if cfg.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position: a pytree of arrays."""
  step: jax.Array          # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array           # uint32 raw key data (jax.random.key_data), checkpointable as is


def init_train_state(params, tx: optax.GradientTransformation, rng_key) -> TrainState:
  """A fresh TrainState (call under ``jit`` with output shardings to create it sharded)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(rng_key))


def split_microbatches(batch: dict, accum_steps: int) -> dict:
  """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, j+2k, ...

  Interleaved rather than contiguous: with rows sharded over devices, every micro-batch then has
  the same number of rows on every device (no resharding, no idle devices).
  """
  def one(x):
    B = x.shape[0]
    if B % accum_steps:
      raise ValueError(f"batch of {B} rows is not divisible by accum_steps={accum_steps}")
    return x.reshape(B // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(one, batch)


def _weighted_loss_and_grads(loss_fn: LossFn, params, batch: dict, rng):
  """(w * loss, w * metrics, w * grads, w) for one micro-batch."""

  def weighted(p):
    loss, metrics = loss_fn(p, dict(batch, rng=rng))
    metrics = dict(metrics)
    rows = jax.tree.leaves(batch)[0].shape[0]
    w = jnp.asarray(metrics.pop("loss_weight", rows), jnp.float32)
    w = jax.lax.stop_gradient(w)
    return loss * w, (jax.tree.map(lambda m: jnp.asarray(m, jnp.float32) * w, metrics), w)

  (wloss, (wmetrics, w)), wgrads = jax.value_and_grad(weighted, has_aux=True)(params)
  return wloss, wmetrics, wgrads, w


def loss_and_grads(loss_fn: LossFn, params, batch: dict, rng, *, accum_steps: int = 1,
                   micro_sharding=None):
  """Exact (weighted-mean) loss, metrics and gradients over ``accum_steps`` micro-batches.

  Gradients are accumulated in float32 in a ``lax.scan`` so only one micro-batch's activations
  are alive at a time.
  """
  if accum_steps == 1:
    wloss, wmetrics, wgrads, w = _weighted_loss_and_grads(loss_fn, params, batch, rng)
  else:
    micro = split_microbatches(batch, accum_steps)
    if micro_sharding is not None:
      micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, micro_sharding(x)), micro)
    rngs = jax.random.split(rng, accum_steps)

    def body(carry, xs):
      mb, key = xs
      out = _weighted_loss_and_grads(loss_fn, params, mb, key)
      out = (out[0], out[1], jax.tree.map(lambda g: g.astype(jnp.float32), out[2]), out[3])
      return jax.tree.map(jnp.add, carry, out), None

    zero = jax.eval_shape(lambda: _weighted_loss_and_grads(
        loss_fn, params, jax.tree.map(lambda x: x[0], micro), rngs[0]))
    zero = (zero[0], zero[1], jax.tree.map(lambda g: jax.ShapeDtypeStruct(g.shape, jnp.float32),
                                           zero[2]), zero[3])
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
    (wloss, wmetrics, wgrads, w), _ = jax.lax.scan(body, init, (micro, rngs))
  inv = 1.0 / jnp.maximum(w, 1e-9)
  grads = jax.tree.map(lambda g, p: (g * inv).astype(p.dtype), wgrads, params)
  metrics = jax.tree.map(lambda m: m * inv, wmetrics)
  return wloss * inv, metrics, grads, w


def train_step(loss_fn: LossFn, tx: optax.GradientTransformation, state: TrainState, batch: dict,
               *, accum_steps: int = 1, micro_sharding=None, frozen=None,
               combine: Callable | None = None) -> tuple[TrainState, dict]:
  """One optimizer update from one (global) batch. Pure; ``make_train_step`` jits it.

  ``loss_fn`` receives the batch dict plus ``batch["rng"]``: a PRNG key distinct per step and
  micro-batch (for dropout or sampling inside a loss).

  PEFT: with ``frozen`` (the non-trainable part of the parameters) ``state.params`` holds only the
  trainable arrays; ``loss_fn`` gets ``combine(params, frozen, rng)`` (the full parameters, e.g.
  ``postrl.peft.combine``) and only ``state.params`` is differentiated and updated.

  Returns the new state (or the old one, untouched, when the loss, gradients or update are not
  finite) and metrics: the loss_fn's (weighted) metrics plus ``loss``, ``loss_weight`` (summed over
  micro-batches), ``optim/grad_norm`` (before clipping), ``optim/param_norm`` and ``step/finite``.
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  if frozen is not None:
    inner = loss_fn
    loss_fn = lambda p, b: inner(combine(p, frozen, b["rng"]), b)
  loss, metrics, grads, w = loss_and_grads(loss_fn, state.params, batch, rng,
                                           accum_steps=accum_steps, micro_sharding=micro_sharding)
  grad_norm = optax.global_norm(grads)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  # a finite gradient can still give a NaN update (a NaN or inf learning rate, 0/0 in Adam with
  # eps=0): that must not reach the parameters (and a checkpoint) either
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(step=state.step + finite.astype(jnp.int32),
                         params=keep(new_params, state.params),
                         opt_state=keep(new_opt_state, state.opt_state), rng=state.rng)
  metrics = dict(metrics, loss=loss, loss_weight=w, **{
      "optim/grad_norm": grad_norm, "optim/param_norm": optax.global_norm(state.params),
      "step/finite": finite.astype(jnp.float32)})
  return new_state, metrics


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, state_shardings=None,
                    batch_sharding=None, accum_steps: int = 1, mesh=None,
                    combine: Callable | None = None, frozen_shardings=None):
  """``jit(train_step)`` with the state donated and, when given, explicit in/out shardings.

  With ``combine`` (PEFT) the step is ``step(state, batch, frozen)``: the frozen parameters are a
  third, sharded (``frozen_shardings``), non-donated argument (never a closed-over constant).

  Args:
    loss_fn: ``(params, batch) -> (loss, metrics)``.
    tx: the optax optimizer.
    state_shardings: TrainState of shardings (from ``postrl.sharding``); None = let jit decide.
    batch_sharding: sharding of [B, ...] batch arrays (rows over the data axes).
    accum_steps: micro-batches per step (exact accumulation, see the module docstring).
    mesh: the mesh, needed to keep micro-batch rows sharded like the batch.
  """
  micro_sharding = None
  if mesh is not None and batch_sharding is not None:
    rows = batch_sharding.spec[0] if batch_sharding.spec else None
    micro_sharding = lambda x: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, rows))

  def step(state, batch):
    return train_step(loss_fn, tx, state, batch, accum_steps=accum_steps,
                      micro_sharding=micro_sharding)

  def peft_step(state, batch, frozen):
    return train_step(loss_fn, tx, state, batch, accum_steps=accum_steps,
                      micro_sharding=micro_sharding, frozen=frozen, combine=combine)

  kwargs = {}
  if state_shardings is not None:
    kwargs["in_shardings"] = ((state_shardings, batch_sharding) if combine is None
                              else (state_shardings, batch_sharding, frozen_shardings))
    kwargs["out_shardings"] = (state_shardings, None)
  return jax.jit(step if combine is None else peft_step, donate_argnums=(0,), **kwargs)
