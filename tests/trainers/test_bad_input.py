"""Bad input to the trainers: a clear error naming the problem, never a silently wrong run, a NaN
in a checkpoint or training lost to a raw ``StopIteration``."""

import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from postrl import sharding
from postrl.data.records import DataError
from postrl.data.tasks import arithmetic_problems
from postrl.models import ConfigError
from postrl.trainers import dpo, grpo, ppo
from postrl.trainers.loop import NonFiniteError, fit
from postrl.trainers.rollout import rows_per_rollout, score_completions
from postrl.trainers.step import OptimizerConfig


class Rows:
  """y = x @ w_true; ``n`` batches (None: endless), with a checkpointable position."""

  def __init__(self, n=None):
    self.i, self.n = 0, n

  def __next__(self):
    if self.n is not None and self.i >= self.n:
      raise StopIteration
    x = np.random.default_rng(self.i).standard_normal((8, 4)).astype(np.float32)
    self.i += 1
    return {"x": x, "y": x @ np.arange(4, dtype=np.float32)}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def _loss_fn(params, batch):  # params["unused"] never enters the loss: its gradient is 0
  return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}


def _fit(workdir, tx, batches, *, total_steps=6, save_every=1):
  params = {"w": np.zeros(4, np.float32), "unused": np.zeros(4, np.float32)}
  return fit(_loss_fn, params, tx, batches, mesh=sharding.make_mesh([("data", -1)]),
             total_steps=total_steps, workdir=str(workdir), save_every=save_every, progress=False)


def _saved(workdir):
  return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())


def test_nonfinite_update_from_finite_gradient_is_not_applied_nor_saved(tmp_path):
  """Adam with eps=0 divides 0 by 0 where a gradient is 0: the loss stays finite, so only a check
  of the update keeps the NaN out of the parameters and the checkpoints."""
  with pytest.raises(NonFiniteError, match="step 1: non-finite optimizer update from a finite"):
    _fit(tmp_path, optax.adam(1e-2, eps=0.0), Rows())
  assert _saved(tmp_path) == []


def test_batches_running_out_keep_the_steps_done(tmp_path):
  with pytest.raises(DataError, match="ran out at step 4 of total_steps=6; last checkpoint: "
                                      "step 3"):
    _fit(tmp_path, optax.sgd(1e-2), Rows(n=3), save_every=10)
  assert _saved(tmp_path) == [3]
  result = _fit(tmp_path, optax.sgd(1e-2), Rows(), save_every=10)  # more data: resumes
  assert result.resumed_from == 3 and int(result.state.step) == 6


def test_empty_batches_and_zero_steps_are_clear_errors(tmp_path):
  with pytest.raises(DataError, match="ran out at step 1 of total_steps=6"):
    _fit(tmp_path / "empty", optax.sgd(1e-2), Rows(n=0))
  with pytest.raises(ConfigError, match="total_steps .* must be an integer >= 1, got 0"):
    _fit(tmp_path / "zero", optax.sgd(1e-2), Rows(), total_steps=0, save_every=0)


@pytest.mark.parametrize("field,value", [
    ("lr", 0.0), ("lr", -1e-5), ("lr", float("nan")), ("lr", "1e-5"), ("eps", 0.0),
    ("b2", 1.0), ("min_lr_ratio", -0.1), ("clip_norm", 0.0), ("warmup_steps", -1)])
def test_optimizer_config_rejects_values_that_train_wrong(field, value):
  with pytest.raises(ConfigError, match=rf"config\.optim: {field}="):
    OptimizerConfig(**{field: value})


@pytest.mark.parametrize("config_name,module", [
    ("sft_arith", "sft"), ("dpo_arith", "dpo"), ("grpo_arith", "grpo"), ("ppo_arith", "ppo"),
    ("rm_arith", "reward_model"), ("distill_arith", "distill")])
def test_unknown_optim_key_is_named_before_the_model_loads(config_name, module, monkeypatch):
  """``--config.optim.learning_rate`` (the field is ``lr``): one ConfigError naming the key and
  the fields, raised before any model is loaded (a bad optimizer setting costs no model load)."""
  import importlib  # pylint: disable=import-outside-toplevel
  config = importlib.import_module(f"configs.{config_name}").get_config()
  trainer = importlib.import_module(f"postrl.trainers.{module}")

  def no_load(*a, **k):
    raise AssertionError("the model was loaded before the optimizer config was checked")

  for mod in ("postrl.trainers.common", f"postrl.trainers.{module}"):
    for name in ("load_pretrained", "load_tokenizer"):
      monkeypatch.setattr(f"{mod}.{name}", no_load, raising=False)
  config.optim.learning_rate = 1e-5
  with pytest.raises(ConfigError, match=r"config\.optim: unknown key 'learning_rate'; the fields "
                                        r"are lr, warmup_steps, min_lr_ratio"):
    trainer.run(config, None)
  del config.optim["learning_rate"]
  config.optim.lr = -1.0  # a bad value, too, fails before the model load
  with pytest.raises(ConfigError, match=r"config\.optim: lr=-1\.0"):
    trainer.run(config, None)


def test_optimizer_config_from_a_config_dict():
  from postrl.trainers.common import optimizer_config  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(dict(steps=7, optim=dict(lr=1e-3, warmup_steps=2)))
  assert optimizer_config(config) == OptimizerConfig(lr=1e-3, warmup_steps=2, total_steps=7)
  config.optim.update(weight_dacay=0.1, beta1=0.9)
  with pytest.raises(ConfigError, match="unknown keys 'beta1', 'weight_dacay'; the fields are lr,"):
    optimizer_config(config)
  config = ml_collections.ConfigDict(dict(steps=7, optim=dict(lr=1e-3, total_steps=9)))
  with pytest.raises(ConfigError, match=r"config\.optim\.total_steps: set by config\.steps"):
    optimizer_config(config)


@pytest.mark.parametrize("name", ["dpo", "simpo", "kto"])
@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_preference_beta_must_be_positive(name, beta):
  from configs.dpo_arith import get_config  # pylint: disable=import-outside-toplevel
  config = get_config()
  config.loss.update(name=name, beta=beta)
  with pytest.raises(ConfigError, match=f"config.loss.beta: must be a finite number > 0 for "
                                        f"'{name}'"):
    dpo.check_loss_config(config)


def test_policy_loss_settings_reject_nan_and_negative_ranges():
  ppo_cfg = dict(clip_eps_low=0.2, clip_eps_high=0.2, vf_coef=0.1, vf_clip=0.2, kl_coef=0.0,
                 kl_in_reward=True, gamma=1.0, lam=0.95, whiten_advantages=True)
  for bad in (dict(clip_eps_low=-0.2), dict(clip_eps_high=float("nan")), dict(vf_clip=-1.0),
              dict(kl_coef=float("nan"))):
    with pytest.raises(ConfigError, match="config.loss"):
      ppo.settings(ml_collections.ConfigDict(dict(ppo_cfg, **bad)))
  grpo_cfg = dict(algorithm="grpo", clip_eps_low=None, clip_eps_high=None, kl_coef=0.0,
                  kl_estimator="k3", dynamic_sampling=None, max_sampling_rounds=3, overlong=None,
                  overlong_cache=None, tis_cap=None)
  for bad in (dict(kl_coef=float("nan")), dict(clip_eps_high=float("nan")), dict(tis_cap=-1.0),
              dict(max_sampling_rounds=-2)):
    with pytest.raises(ConfigError, match="config.loss"):
      grpo.settings(ml_collections.ConfigDict(dict(grpo_cfg, **bad)), max_new_tokens=8)


@pytest.mark.parametrize("key,value", [("minibatches", 0), ("epochs", 0), ("prompts", 0),
                                       ("group_size", -1)])
def test_rollout_sizes_must_be_positive_integers(key, value):
  cfg = ml_collections.ConfigDict(dict(prompts=2, group_size=4, minibatches=2, epochs=1))
  assert rows_per_rollout(cfg) == 8
  cfg[key] = value
  with pytest.raises(ConfigError, match=rf"config.rollout.{key} must be an integer >= 1"):
    rows_per_rollout(cfg)


class _RewardModel:
  def __init__(self, scores):
    self.scores = scores

  def batch(self, texts, prompts):
    del texts, prompts
    return self.scores


def test_reward_model_of_wrong_shape_or_nan_is_named():
  problems = arithmetic_problems(4, seed=0)
  texts = [p.answer for p in problems]
  score = lambda rm: score_completions(texts, problems, [3] * 4, weights={"math": 1.0},  # noqa: E731
                                       options={}, reward_model=rm)
  total, _ = score(_RewardModel([0.0, 1.0, 2.0, 3.0]))
  np.testing.assert_array_equal(total, [1.0, 2.0, 3.0, 4.0])
  for scores in ([1.0], np.ones((4, 1))):  # numpy would broadcast these silently
    with pytest.raises(ValueError, match=r"scores of shape \((1|4, 1),?\) for 4 completions"):
      score(_RewardModel(scores))
  with pytest.raises(NonFiniteError, match=rf"reward 'reward_model' is nan for completion 2 .*"
                                           rf"{problems[2].prompt}"):
    score(_RewardModel([0.0, 1.0, float("nan"), 3.0]))



def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tmp_path):
  """A model folder whose tokenizer has more ids than the model's embedding (a mismatched pair):
  ``trainers.common.start`` refuses it naming both sizes, before any step (its ids would read
  past the embedding: NaN or another token's row)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from postrl.models import (Transformer, TokenizerError, check_fits,  # pylint: disable=import-outside-toplevel
                             load_tokenizer, save_pretrained, save_tokenizer)
  from postrl.trainers import common  # pylint: disable=import-outside-toplevel
  from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel
  import configs.sft_arith  # pylint: disable=import-outside-toplevel
  tok = load_tokenizer("smollm2-135m-instruct")
  assert check_fits(tok, 49152, "x") is tok  # equal sizes fit, as do padded model vocabularies
  with pytest.raises(TokenizerError, match=r"x: the tokenizer has 49152 tokens, more than the "
                                           r"model's vocabulary of 101"):
    check_fits(tok, 101, "x")
  folder = tmp_path / "mismatched"
  save_pretrained(Transformer(tiny_config(), rngs=nnx.Rngs(0)), str(folder))
  save_tokenizer(tok, str(folder))
  config = configs.sft_arith.get_config()
  with pytest.raises(TokenizerError, match=r"mismatched: the tokenizer has 49152 tokens, more "
                                           r"than the model's vocabulary of 101"):
    common.start(config, model=str(folder))


def test_blank_answers_are_refused_at_load_when_a_reward_compares_against_them(tmp_path):
  """An rl JSONL record with a blank answer: refused when the problems are read if a configured
  reward takes the reference (``math``), naming the file and the problem; accepted for a run
  whose rewards never read it (reward-model or format rewards only)."""
  import json  # pylint: disable=import-outside-toplevel
  import configs.grpo_arith  # pylint: disable=import-outside-toplevel
  path = tmp_path / "rl.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in (
      {"prompt": "1 + 1 =", "answer": "2"}, {"prompt": "2 + 5 =", "answer": "  "})) + "\n")
  config = configs.grpo_arith.get_config()
  config.data.path = str(path)
  config.rewards = {"math": 1.0}
  with pytest.raises(ConfigError, match=r"rl\.jsonl: problem 1 \(prompt '2 \+ 5 ='\) has a blank "
                                        r"'answer', which reward\(s\) \['math'\] compare"):
    grpo._training_problems(config, [])  # pylint: disable=protected-access
  config.rewards = {"format": 1.0}
  assert len(grpo._training_problems(config, [])) == 2  # pylint: disable=protected-access
