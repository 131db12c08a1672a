"""The shared step: exact gradient accumulation, NaN guard, donation, the schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from postrl.trainers.step import (OptimizerConfig, init_train_state, learning_rate_schedule,
                                  loss_and_grads, make_optimizer, make_train_step,
                                  split_microbatches)


def _params():
  rng = np.random.RandomState(0)
  return {"w": jnp.asarray(rng.randn(5, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}


def _token_mean_loss(params, batch):
  """A token-mean regression loss: rows have different numbers of valid 'tokens'."""
  pred = jnp.einsum("btd,dk->btk", batch["x"], params["w"]) + params["b"]
  err = ((pred - batch["y"]) ** 2).sum(-1) * batch["mask"]
  n = batch["mask"].sum()
  return err.sum() / n, {"loss_weight": n, "err/first_dim": (err * batch["x"][..., 0]).sum() / n}


def _batch(B=8, T=6, seed=1):
  rng = np.random.RandomState(seed)
  mask = (np.arange(T)[None] < rng.randint(1, T + 1, (B, 1))).astype(np.float32)
  return {"x": jnp.asarray(rng.randn(B, T, 5), jnp.float32),
          "y": jnp.asarray(rng.randn(B, T, 3), jnp.float32), "mask": jnp.asarray(mask)}


@pytest.mark.parametrize("k", [2, 4, 8])
def test_accumulation_equals_one_batch(k):
  params, batch = _params(), _batch()
  key = jax.random.key(0)
  loss1, m1, g1, w1 = loss_and_grads(_token_mean_loss, params, batch, key)
  lossk, mk, gk, wk = jax.jit(lambda p, b: loss_and_grads(_token_mean_loss, p, b, key,
                                                          accum_steps=k))(params, batch)
  np.testing.assert_allclose(lossk, loss1, rtol=1e-6)
  np.testing.assert_allclose(mk["err/first_dim"], m1["err/first_dim"], rtol=1e-5)
  assert float(wk) == float(w1) == float(batch["mask"].sum())
  for a, b in zip(jax.tree.leaves(gk), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_unweighted_mean_of_microbatches_would_differ():
  """Guards the test above: with unequal token counts a plain mean of micro-batch means differs."""
  params, batch = _params(), _batch()
  full = _token_mean_loss(params, batch)[0]
  micro = split_microbatches(batch, 4)
  plain = np.mean([_token_mean_loss(params, jax.tree.map(lambda x: x[i], micro))[0]
                   for i in range(4)])
  assert abs(float(plain) - float(full)) > 1e-3


def test_split_microbatches_interleaves_rows():
  micro = split_microbatches({"a": jnp.arange(8)}, 4)["a"]
  np.testing.assert_array_equal(micro, [[0, 4], [1, 5], [2, 6], [3, 7]])
  with pytest.raises(ValueError, match="not divisible by accum_steps=3"):
    split_microbatches({"a": jnp.arange(8)}, 3)


def test_step_with_accumulation_equals_step_without():
  tx = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.1))
  batch = _batch()
  results = []
  for k in (1, 4):
    state = init_train_state(_params(), tx, jax.random.key(0))
    step = make_train_step(_token_mean_loss, tx, accum_steps=k)
    for _ in range(3):
      state, metrics = step(state, batch)
    results.append((jax.device_get(state.params), float(metrics["loss"]), int(state.step)))
  assert results[0][2] == results[1][2] == 3
  np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[1][0]), jax.tree.leaves(results[0][0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nonfinite_step_is_not_applied():
  tx = make_optimizer(OptimizerConfig(lr=1e-2, total_steps=10))
  step = make_train_step(_token_mean_loss, tx)
  state = init_train_state(_params(), tx, jax.random.key(0))
  state, m = step(state, _batch())
  assert float(m["step/finite"]) == 1.0 and int(state.step) == 1
  before = jax.device_get(state)
  bad = dict(_batch(), x=_batch()["x"].at[0, 0, 0].set(jnp.nan))
  state, m = step(state, bad)
  assert float(m["step/finite"]) == 0.0 and not np.isfinite(float(m["loss"]))
  after = jax.device_get(state)
  assert int(after.step) == 1
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)


def test_state_is_donated():
  tx = make_optimizer(OptimizerConfig(lr=1e-2, total_steps=10))
  step = make_train_step(_token_mean_loss, tx)
  state = init_train_state(_params(), tx, jax.random.key(0))
  state, _ = step(state, _batch())  # warm up (first call may copy)
  old_w = state.params["w"]
  state, _ = step(state, _batch())
  assert old_w.is_deleted()


def test_schedule_warmup_then_cosine():
  cfg = OptimizerConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
  lr = learning_rate_schedule(cfg)
  np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(lr(60), 0.1 + 0.9 * 0.5, atol=1e-5)  # half-way down the cosine
  np.testing.assert_allclose(lr(110), 0.1, atol=1e-6)


def test_clipping_scales_the_gradient_adam_sees():
  """Adam's first moment after one step is (1 - b1) * clipped gradient: its norm is (1 - b1) * c.
  The reported grad_norm is the unclipped one."""
  cfg = OptimizerConfig(lr=1e-2, total_steps=10, clip_norm=1e-3, b1=0.9)
  tx = make_optimizer(cfg)
  step = make_train_step(_token_mean_loss, tx)
  state = init_train_state(_params(), tx, jax.random.key(0))
  state, m = step(state, _batch())
  assert float(m["optim/grad_norm"]) > 1e-2
  mu = state.opt_state[1][0].mu
  norm = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(mu))))
  np.testing.assert_allclose(norm, (1 - cfg.b1) * cfg.clip_norm, rtol=1e-5)


def test_rng_differs_per_step_and_microbatch():
  """batch["rng"] is a fresh key per step and per micro-batch, derived from the state."""
  def loss_fn(params, batch):
    noise = jax.random.uniform(batch["rng"])
    return (params["w"] ** 2).sum() * 0 + noise, {"noise": noise}

  tx = make_optimizer(OptimizerConfig(lr=1e-2, total_steps=10))
  step = make_train_step(loss_fn, tx, accum_steps=2)
  state = init_train_state(_params(), tx, jax.random.key(0))
  seen = []
  for _ in range(3):
    state, m = step(state, {"x": jnp.zeros((4, 1))})
    seen.append(float(m["noise"]))
  assert len(set(seen)) == 3
  # the same state gives the same key: a resumed run replays the same noise
  again = init_train_state(_params(), tx, jax.random.key(0))
  _, m = step(again, {"x": jnp.zeros((4, 1))})
  assert float(m["noise"]) == seen[0]
  # the two micro-batches of a step see different keys: their mean differs from either one's noise
  keys = jax.random.split(jax.random.fold_in(jax.random.key(0), 0), 2)
  per_micro = [float(jax.random.uniform(k)) for k in keys]
  assert per_micro[0] != per_micro[1]
  np.testing.assert_allclose(seen[0], np.mean(per_micro), rtol=1e-6)
