"""GRPO-family trainer: rollout rows, the on-policy source, the loss function, presets, dynamic
sampling, and the whole job through launch.py on a (data=2, fsdp=2, tensor=2) mesh with resume."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from postrl.logprobs import model_apply_fn, token_logps
from postrl.metrics import read_metrics
from postrl.models import ConfigError, Transformer
from postrl.trainers import grpo as grpo_mod
from postrl.trainers.rollout import RolloutSource, assemble_rows, sample, trim_rows
from postrl.trainers.step import train_step, init_train_state
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_assemble_rows_layout():
  rows = assemble_rows([[5, 6], [7, 8, 9]], np.array([[11, 12, 2], [13, 0, 0]]), [3, 1],
                       np.array([[-1., -2., -3.], [-4., 0., 0.]]), prompt_len=4, pad_id=0)
  np.testing.assert_array_equal(rows["tokens"], [[5, 6, 11, 12, 2, 0, 0],
                                                 [7, 8, 9, 13, 0, 0, 0]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1, 1, 0, 0],
                                                      [1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(rows["loss_mask"], [[0, 0, 1, 1, 1, 0, 0],
                                                    [0, 0, 0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(rows["sampler_logps"], [[0, 0, -1, -2, -3, 0, 0],
                                                        [0, 0, 0, -4, 0, 0, 0]])
  with pytest.raises(ValueError, match="prompt_len"):
    assemble_rows([[1] * 5], np.zeros((1, 2)), [1], np.zeros((1, 2)), prompt_len=4, pad_id=0)


def test_trim_rows_keeps_bucketed_width():
  rows = assemble_rows([[5, 6]], np.array([[11, 12, 2, 0, 0, 0, 0, 0]]), [3],
                       np.zeros((1, 8)), prompt_len=4, pad_id=0)
  rows["advantages"] = np.ones(1)
  out = trim_rows(rows, prompt_len=4, bucket=2)  # used = 5 tokens -> 4 + 2 = 6 columns
  assert out["tokens"].shape == (1, 6) and out["advantages"].shape == (1,)
  np.testing.assert_array_equal(out["loss_mask"], rows["loss_mask"][:, :6])
  assert trim_rows(rows, prompt_len=4, bucket=16)["tokens"].shape == (1, 12)  # capped at T


@pytest.mark.parametrize("continuous", [False, True])
def test_sampler_and_trainer_logps_agree(continuous):
  cfg = tiny_config()
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  ids = [[1, 5, 6, 7], [1, 8, 9], [1, 3, 4, 5, 6, 7]]
  out = sample(graphdef, params, ids, key=jax.random.key(0), prompt_len=16, max_new_tokens=8,
               temperature=1.0, top_p=None, eos_ids=(2,), pad_id=0, batch_size=2,
               continuous=continuous)
  assert {k: v.shape[0] for k, v in out.items()} == dict.fromkeys(out, 3)
  rows = assemble_rows(ids, out["completions"], out["lengths"], out["sampler_logps"],
                       prompt_len=16, pad_id=0)
  lp = token_logps(model_apply_fn(graphdef), params, rows["tokens"], rows["loss_mask"],
                   segment_ids_BxT=rows["segment_ids"])
  assert rows["loss_mask"].sum() == out["lengths"].sum() > 3
  np.testing.assert_allclose(np.asarray(lp), rows["sampler_logps"], atol=2e-5)


def _fake_rollout(calls):
  def make(params, index):
    calls.append((params, index))
    rows = {"x": np.arange(8)[:, None] + 100 * index, "adv": np.arange(8.0)}
    return rows, {"rollout/index": float(index)}
  return make


def test_rollout_source_epochs_minibatches_and_resume_position():
  calls = []
  src = RolloutSource(_fake_rollout(calls), rows_per_rollout=8, minibatches=2, epochs=2, seed=3)
  batches = [src.next_batch(f"params{s}", s) for s in range(4)]
  assert [c[1] for c in calls] == [0] and calls[0][0] == "params0"  # one rollout, 4 steps
  assert src.pop_metrics()["rollout/index"] == 0.0 and src.pop_metrics() == {}
  for epoch in (batches[:2], batches[2:]):  # each epoch: every row exactly once
    assert sorted(np.concatenate([b["x"][:, 0] for b in epoch])) == list(range(8))
  assert [b["x"].shape[0] for b in batches] == [4] * 4
  assert src.get_state() == {"rollout_index": 1, "position": 0}
  src.next_batch("params4", 4)
  assert calls[-1] == ("params4", 1)
  state = src.get_state()
  again = RolloutSource(_fake_rollout([]), rows_per_rollout=8, minibatches=2, epochs=2, seed=3)
  again.set_state(state)
  np.testing.assert_array_equal(again.next_batch("p", 5)["x"], src.next_batch("p", 5)["x"])
  with pytest.raises(ValueError, match="mini-batches"):
    RolloutSource(_fake_rollout([]), rows_per_rollout=6, minibatches=4)


def _loss_cfg(**kw):
  base = dict(algorithm="grpo", clip_eps_low=None, clip_eps_high=None, kl_coef=0.0,
              kl_estimator="k3", dynamic_sampling=None, max_sampling_rounds=3, overlong=None,
              overlong_cache=None, tis_cap=None)
  return ml_collections.ConfigDict(dict(base, **kw))


def test_settings_presets_and_overrides():
  s = grpo_mod.settings(_loss_cfg(algorithm="dapo"), max_new_tokens=64)
  assert (s.variant, s.clip_eps_high, s.dynamic_sampling, s.overlong, s.overlong_cache) == (
      "dapo", 0.28, True, True, 16)
  s = grpo_mod.settings(_loss_cfg(algorithm="dr_grpo", clip_eps_high=0.3), max_new_tokens=64)
  assert (s.advantages, s.norm_len, s.clip_eps_high) == ("none", 64.0, 0.3)
  assert grpo_mod.settings(_loss_cfg(algorithm="rloo"), max_new_tokens=8).advantages == "rloo"
  assert grpo_mod.settings(_loss_cfg(algorithm="gspo"), max_new_tokens=8).clip_eps_low == 3e-4
  with pytest.raises(ConfigError, match="unknown 'ppo'"):
    grpo_mod.settings(_loss_cfg(algorithm="ppo"), max_new_tokens=8)
  with pytest.raises(ConfigError, match="overlong_cache"):
    grpo_mod.settings(_loss_cfg(algorithm="dapo", overlong_cache=8), max_new_tokens=8)


def test_advantage_estimators():
  r = np.array([1., 0., 0., 0., 1., 1., 1., 1.])
  np.testing.assert_allclose(grpo_mod.advantages(r, group_size=4, estimator="none")[:4],
                             [0.75, -0.25, -0.25, -0.25])
  g = grpo_mod.advantages(r, group_size=4, estimator="group")
  np.testing.assert_allclose(g[:4] * np.sqrt(3) / 4, [0.75, -0.25, -0.25, -0.25], atol=1e-5)
  np.testing.assert_array_equal(g[4:], 0.0)
  np.testing.assert_allclose(grpo_mod.advantages(r, group_size=4, estimator="rloo")[:4],
                             [1.0, -1 / 3, -1 / 3, -1 / 3], atol=1e-6)


def _tiny_rows(graphdef, params, n_rows=4):
  ids = [[1, 5 + i, 6] for i in range(n_rows)]
  out = sample(graphdef, params, ids, key=jax.random.key(1), prompt_len=4, max_new_tokens=6,
               temperature=1.0, top_p=None, eos_ids=(), pad_id=0)
  return assemble_rows(ids, out["completions"], out["lengths"], out["sampler_logps"],
                       prompt_len=4, pad_id=0)


@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "dr_grpo"])
def test_one_update_raises_positive_and_lowers_negative_advantage_logps(algorithm):
  graphdef, params = nnx.split(Transformer(tiny_config(), rngs=nnx.Rngs(0)))
  rows = _tiny_rows(graphdef, params)
  rows["advantages"] = np.array([1.0, -1.0, 1.0, -1.0], np.float32)
  apply_fn = model_apply_fn(graphdef)
  s = grpo_mod.settings(_loss_cfg(algorithm=algorithm), max_new_tokens=6)
  loss_fn = grpo_mod.grpo_loss_fn(apply_fn, s)
  tx = optax.sgd(0.5)
  state = init_train_state(params, tx, jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  new_state, metrics = jax.jit(lambda st, b: train_step(loss_fn, tx, st, b))(state, batch)
  assert float(metrics["rollout/logp_mismatch"]) < 2e-5
  weight = rows["loss_mask"].sum() if algorithm == "dapo" else 4.0
  assert float(metrics["loss_weight"]) == weight
  seq = lambda p: np.asarray(token_logps(apply_fn, p, batch["tokens"], batch["loss_mask"],
                                         segment_ids_BxT=batch["segment_ids"]).sum(1))
  delta = seq(new_state.params) - seq(params)
  assert delta[0] > 0 and delta[2] > 0 and delta[1] < 0 and delta[3] < 0, delta


def test_old_logps_make_ratio_and_mismatch_use_them():
  graphdef, params = nnx.split(Transformer(tiny_config(), rngs=nnx.Rngs(0)))
  rows = _tiny_rows(graphdef, params)
  rows["advantages"] = np.array([1.0, -1.0, 1.0, -1.0], np.float32)
  rows["old_logps"] = rows["sampler_logps"] - 0.1 * rows["loss_mask"]  # the policy moved up
  s = grpo_mod.settings(_loss_cfg(), max_new_tokens=6)
  loss, m = grpo_mod.grpo_loss_fn(model_apply_fn(graphdef), s)(params, rows)
  np.testing.assert_allclose(float(m["rollout/logp_mismatch"]), 0.1, atol=1e-5)
  assert float(m["pg/ratio_mean"]) == pytest.approx(np.exp(0.1), rel=1e-4)
  assert np.isfinite(float(loss))


class _Stub:
  """A GRPORollouts whose sampling returns scripted rewards (tests dynamic sampling only)."""

  def __init__(self, rewards_by_round, s, P=2, G=2):
    self.cfg = ml_collections.ConfigDict(dict(prompts=P, group_size=G, length_bucket=0))
    self.s = s
    self.rewards_by_round = rewards_by_round
    self.prompt_len, self.pad, self.need_old, self.ref_host = 4, 0, False, None

  def _sample_groups(self, params, index, round_, count):
    r = np.array(self.rewards_by_round[round_], np.float32)
    n = len(r)
    out = dict(completions=np.full((n, 2), 7 + round_), lengths=np.full(n, 2),
               finished=np.ones(n, bool), sampler_logps=np.zeros((n, 2)))
    return np.arange(count), [[1, 2]] * n, out, r, {"math": r}


@pytest.mark.parametrize("dynamic,expected_rows_from_round", [(True, [1, 1, 2, 2]),
                                                              (False, [0, 0, 0, 0])])
def test_dynamic_sampling_drops_all_equal_groups(dynamic, expected_rows_from_round):
  s = grpo_mod.settings(_loss_cfg(algorithm="dapo", dynamic_sampling=dynamic), max_new_tokens=8)
  # round 0: both groups all-equal; round 1: group 0 has spread; round 2: group 1 has spread
  stub = _Stub([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], s)
  rows, metrics = grpo_mod.GRPORollouts.__call__(stub, None, 0)
  assert list(rows["tokens"][:, 2] - 7) == expected_rows_from_round
  if dynamic:
    assert metrics["rollout/sampling_rounds"] == 3.0
    assert metrics["rollout/groups_with_spread"] == pytest.approx(2 / 6)
    assert metrics["rollout/kept_groups_with_spread"] == 1.0
    assert np.all(rows["advantages"] != 0)
  else:
    np.testing.assert_array_equal(rows["advantages"], 0.0)


def _launch(model_dir, workdir, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  args = [sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/grpo_arith.py",
          "--workdir", str(workdir), f"--config.model={model_dir}", "--cpu_devices=8",
          "--config.mesh=(('data', -1), ('fsdp', 2), ('tensor', 2))",
          "--config.rollout.prompts=2", "--config.rollout.group_size=4",
          "--config.rollout.max_new_tokens=8", "--config.rollout.batch_size=8",
          "--config.eval.num_problems=4", "--config.eval.batch_size=4",
          "--config.eval.max_new_tokens=4", "--config.data.num_train=50", "--config.optim.lr=1e-3",
          "--config.checkpoint.every=2", "--config.accum_steps=1", *extra]
  return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_grpo_job_sharded_with_all_paths_then_resumes(tiny_model_dir, tmp_path):
  # DAPO (dynamic sampling, overlong shaping), 2 mini-batches (old log-probs), a KL term (ref)
  extra = ["--config.loss.algorithm=dapo", "--config.loss.kl_coef=0.05",
           "--config.rollout.minibatches=2", "--config.loss.overlong_cache=2",
           "--config.loss.max_sampling_rounds=2"]
  proc = _launch(tiny_model_dir, tmp_path, "--config.steps=2", *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["steps"] == 2 and results["accuracy_after"] is not None
  assert (tmp_path / "reward.png").exists()
  metrics = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "loss" in m]
  assert [m["step"] for m in metrics] == [1, 2]
  first = metrics[0]
  assert first["rollout/logp_mismatch"] < 1e-4
  assert first["pg/ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # old == current at update 1
  assert "kl/ref" in first and "rollout/reward/overlong" in first
  assert "rollout/reward_mean" in first and "rollout/reward_mean" not in metrics[1]
  proc = _launch(tiny_model_dir, tmp_path, "--config.steps=4", *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from" in proc.stdout and json.loads(
      (tmp_path / "results.json").read_text())["steps"] == 4


def test_grpo_job_with_continuous_batching_on_a_mesh(tiny_model_dir, tmp_path):
  """8 rows through 3 decode slots (generate_continuous) with the weights split over fsdp and
  tensor axes: the rollout's log-probs are still those the trainer recomputes."""
  proc = _launch(tiny_model_dir, tmp_path, "--config.steps=1", "--config.rollout.continuous=True",
                 "--config.rollout.batch_size=3", "--config.eval.before=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  first = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "loss" in m][0]
  assert first["rollout/logp_mismatch"] < 1e-4


def test_grpo_job_bad_config_is_one_line(tiny_model_dir, tmp_path):
  proc = _launch(tiny_model_dir, tmp_path, "--config.loss.algorithm=nope")
  assert proc.returncode == 1
  assert "config.loss.algorithm: unknown 'nope'" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_score_completions_adds_weighted_reward_model_scores():
  from postrl.data.records import Problem  # pylint: disable=import-outside-toplevel
  from postrl.trainers.rollout import score_completions  # pylint: disable=import-outside-toplevel

  class FakeRM:
    def batch(self, completions, prompts):
      return [float(len(c)) + (10.0 if p == "b" else 0.0) for c, p in zip(completions, prompts)]

  probs = [Problem(prompt="a", answer="4"), Problem(prompt="b", answer="5")]
  total, per_name = score_completions(["so 4", "= 6"], probs, [3, 9], weights={"math": 1.0},
                                      options={}, reward_model=FakeRM(), reward_model_weight=0.5)
  np.testing.assert_allclose(per_name["math"], [1.0, 0.0])
  np.testing.assert_allclose(per_name["reward_model"], [4.0, 13.0])
  np.testing.assert_allclose(total, [1.0 + 2.0, 0.0 + 6.5])
  total, per_name = score_completions(["x"], probs[:1], [1], weights={}, options={},
                                      reward_model=FakeRM(), reward_model_weight=2.0)
  np.testing.assert_allclose(total, [2.0])


def test_grpo_job_on_a_saved_reward_model(tiny_model_dir, tmp_path):
  from postrl.models import load_pretrained, load_tokenizer  # pylint: disable=import-outside-toplevel
  from postrl.models.heads import ScoredTransformer  # pylint: disable=import-outside-toplevel
  from postrl.rewards.reward_model import save_reward_model  # pylint: disable=import-outside-toplevel
  rm_dir = str(tmp_path / "rm")
  save_reward_model(ScoredTransformer(load_pretrained(tiny_model_dir), rngs=nnx.Rngs(3)), rm_dir,
                    load_tokenizer(tiny_model_dir), max_len=64)
  proc = _launch(tiny_model_dir, tmp_path / "run", "--config.steps=1", "--config.rewards.math=0",
                 f"--config.reward_model.path={rm_dir}", "--config.reward_model.weight=2.0",
                 "--config.eval.num_problems=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  (m,) = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
  assert m["rollout/reward_mean"] == pytest.approx(2.0 * m["rollout/reward/reward_model"],
                                                   rel=1e-4)
  assert "rollout/reward/math" in m  # weight 0: computed and reported, not added


def test_grpo_job_rows_that_do_not_split_are_a_config_error(tiny_model_dir, tmp_path):
  # 2 prompts x 4 samples = 8 rows; 4 batch shards x accum 4 = 16 do not divide them
  proc = _launch(tiny_model_dir, tmp_path, "--config.accum_steps=4")
  assert proc.returncode == 1
  assert "error: ConfigError: config.rollout: prompts x group_size / minibatches = 8 rows" in (
      proc.stderr)
  assert not (tmp_path / "checkpoints").exists()


def test_rows_per_rollout_checks_minibatches():
  from postrl.trainers.rollout import rows_per_rollout  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict(dict(prompts=3, group_size=4, minibatches=4))
  assert rows_per_rollout(cfg) == 12
  cfg.minibatches = 5
  with pytest.raises(ConfigError, match="12 rows do not split into minibatches=5"):
    rows_per_rollout(cfg)
