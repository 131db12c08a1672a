"""PPO trainer: per-token rewards, whitening, actor-critic alignment, the loss, and the job through
launch.py on a (data=2, fsdp=2, tensor=2) mesh (shared trunk and separate critic) with resume."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from postrl.logprobs import model_apply_fn, token_logps
from postrl.metrics import read_metrics
from postrl.models import ConfigError, Transformer
from postrl.trainers import ppo
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_token_rewards_put_the_score_on_the_last_token_and_kl_on_every_token():
  mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], np.float32)
  old = np.array([[0, -1., -2., -3., 0], [0, 0, -1., 0, 0]])
  ref = np.array([[0, -1.5, -2., -2., 0], [0, 0, -3., 0, 0]])
  r = ppo.token_rewards(np.array([1.0, -1.0]), old, ref, mask, kl_coef=0.1)
  np.testing.assert_allclose(r, [[0, -0.05, 0, 0.1 + 1.0, 0], [0, 0, -0.2 - 1.0, 0, 0]],
                             atol=1e-6)
  r = ppo.token_rewards(np.array([2.0, 0.0]), old, None, mask, kl_coef=0.1)
  np.testing.assert_allclose(r, [[0, 0, 0, 2.0, 0], [0, 0, 0, 0, 0]])


def test_whiten_uses_only_masked_entries():
  x = np.array([[9., 1., 3.], [9., 5., 9.]])
  m = np.array([[0, 1, 1], [0, 1, 0]], np.float32)
  w = ppo.whiten(x, m)
  vals = w[m > 0]
  assert abs(vals.mean()) < 1e-6 and abs(vals.std() - 1) < 1e-5
  np.testing.assert_array_equal(w[m == 0], 0.0)


@pytest.mark.parametrize("shared", [True, False])
def test_actor_critic_logps_match_token_logps_and_values_align(shared):
  cfg = tiny_config()
  critic = None if shared else Transformer(cfg, rngs=nnx.Rngs(1))
  policy = Transformer(cfg, rngs=nnx.Rngs(0))
  model = ppo.ActorCritic(policy, critic=critic, rngs=nnx.Rngs(2))
  tokens = jnp.array([[1, 5, 6, 7, 8, 0], [1, 9, 10, 0, 0, 0]])
  seg = (tokens > 0).astype(jnp.int32)
  mask = jnp.array([[0, 0, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0]], jnp.float32)
  logps, values = model.logps_and_values(tokens, seg, mask)
  g, p = nnx.split(policy)
  np.testing.assert_allclose(logps, token_logps(model_apply_fn(g), p, tokens, mask,
                                                segment_ids_BxT=seg), atol=1e-5)
  scores = (model.value_head(policy.hidden_states(tokens, segment_ids_BxT=seg)) if shared
            else model.critic.token_scores(tokens, seg))
  np.testing.assert_allclose(values[:, 1:], scores[:, :-1] * mask[:, 1:], atol=1e-5)
  np.testing.assert_array_equal(values[mask == 0], 0.0)


def _loss_cfg(**kw):
  base = dict(clip_eps_low=0.2, clip_eps_high=0.2, vf_coef=0.5, vf_clip=0.2, kl_coef=0.0,
              kl_in_reward=True, gamma=1.0, lam=0.95, whiten_advantages=True)
  return ml_collections.ConfigDict(dict(base, **kw))


def test_settings_validate():
  assert ppo.settings(_loss_cfg()).vf_clip == 0.2
  with pytest.raises(ConfigError, match="gamma and lam"):
    ppo.settings(_loss_cfg(lam=1.5))


def test_loss_moves_policy_by_advantage_and_value_to_returns():
  cfg = tiny_config()
  model = ppo.ActorCritic(Transformer(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(2))
  graphdef, params = nnx.split(model)
  tokens = jnp.array([[1, 5, 6, 7, 8, 0], [1, 9, 10, 11, 0, 0]])
  seg = (tokens > 0).astype(jnp.int32)
  mask = jnp.array([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], jnp.float32)
  logps, values = model.logps_and_values(tokens, seg, mask)
  batch = dict(tokens=tokens, segment_ids=seg, loss_mask=mask, sampler_logps=logps,
               old_logps=logps, old_values=values, advantages=mask * jnp.array([[1.], [-1.]]),
               returns=mask * 3.0)
  def updated(batch, **loss_kw):  # one small gradient step on the loss
    loss_fn = ppo.ppo_loss_fn(graphdef, ppo.settings(_loss_cfg(vf_clip=None, **loss_kw)))
    (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    new = jax.tree.map(lambda p, g: p - 0.002 * g, params, grads)
    return m, nnx.merge(graphdef, new).logps_and_values(tokens, seg, mask)

  # the policy term alone: positive-advantage tokens up, negative down
  m, (new_logps, _) = updated(batch, vf_coef=0.0)
  assert float(m["loss_weight"]) == 5.0 and float(m["rollout/logp_mismatch"]) < 1e-6
  d = np.asarray((new_logps - logps).sum(1))
  assert d[0] > 0 > d[1], d
  # the value term alone (zero advantages): values move towards the returns
  _, (_, new_values) = updated(dict(batch, advantages=0 * mask))
  err = lambda v: float((((v - 3.0) * mask) ** 2).sum())
  assert err(new_values) < err(values)


def _launch(model_dir, workdir, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  args = [sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/ppo_arith.py",
          "--workdir", str(workdir), f"--config.model={model_dir}", "--cpu_devices=8",
          "--config.mesh=(('data', -1), ('fsdp', 2), ('tensor', 2))",
          "--config.rollout.prompts=4", "--config.rollout.group_size=2",
          "--config.rollout.max_new_tokens=8", "--config.rollout.batch_size=8",
          "--config.eval.num_problems=4", "--config.eval.batch_size=4",
          "--config.eval.max_new_tokens=4", "--config.data.num_train=50", "--config.optim.lr=1e-3",
          "--config.checkpoint.every=2", "--config.accum_steps=1", *extra]
  return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.parametrize("shared", ["True", "False"])
def test_ppo_job_sharded_then_resumes(tiny_model_dir, tmp_path, shared):
  extra = [f"--config.shared_trunk={shared}", "--config.loss.kl_coef=0.05",
           f"--config.loss.kl_in_reward={shared}", "--config.save_model=True"]
  proc = _launch(tiny_model_dir, tmp_path, "--config.steps=2", *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "loss" in m]
  assert [m["step"] for m in metrics] == [1, 2]
  first = metrics[0]
  assert first["rollout/logp_mismatch"] < 1e-4 and "vf/explained_variance" in first
  assert first["pg/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
  assert ("kl/ref" in first) == (shared == "False")
  assert (tmp_path / "model" / "model.safetensors").exists()  # the policy alone, HF layout
  proc = _launch(tiny_model_dir, tmp_path, "--config.steps=4", *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from" in proc.stdout
  assert json.loads((tmp_path / "results.json").read_text())["steps"] == 4
