"""The reward-model trainer and scorer: losses and where scores are read, Bradley-Terry through
launch.py on 8 devices with resume, the saved model scored by postrl and by transformers alike,
Plackett-Luce on rankings and a process reward model on step labels."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from postrl.data.preference import (StepRecord, record_batches, tokenize_preferences,
                                    tokenize_steps)
from postrl.data.records import PreferenceRecord, Problem, RankingRecord, write_jsonl
from postrl.metrics import read_metrics
from postrl.models import ConfigError, ScoredTransformer, Transformer, WeightsError
from postrl.rewards import REWARDS, RewardModelScorer, combine_rewards, make_reward_model_reward
from postrl.trainers import reward_model as rmt
from tests.conftest import tiny_config
from tests.data.conftest import FakeTokenizer
from tests.jax_cache import JAX_CACHE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731


@pytest.fixture(scope="module")
def tiny_rm():
  rm = ScoredTransformer(Transformer(tiny_config(vocab_size=160), rngs=nnx.Rngs(0)),
                         rngs=nnx.Rngs(1))
  return nnx.split(rm)


def test_reward_losses_on_hand_checked_scores():
  s = jnp.array([[2.0, 1.0, 7.0], [0.0, 1.5, -1.0]])
  mask = jnp.array([[1, 1, 0], [1, 1, 1]])
  loss, m = rmt.reward_loss("bradley_terry", s, mask, margin=0.5)
  want = np.mean([-math.log(sig(2.0 - 1.0 - 0.5)), -math.log(sig(0.0 - 1.5 - 0.5))])
  assert float(loss) == pytest.approx(want, rel=1e-6) and float(m["rm/accuracy"]) == 0.5
  loss, m = rmt.reward_loss("plackett_luce", s, mask)
  row0 = -math.log(sig(1.0))                                      # the masked 7 takes no part
  row1 = -(0.0 - math.log(1 + math.exp(1.5) + math.exp(-1.0))) - (1.5 - math.log(
      math.exp(1.5) + math.exp(-1.0)))
  assert float(loss) == pytest.approx((row0 + row1) / 2, rel=1e-6)
  assert float(m["rm/top1_accuracy"]) == 0.5


def test_scores_are_read_at_each_rows_last_real_token(tiny_rm):
  graphdef, params = tiny_rm
  tok = FakeTokenizer()
  records = [PreferenceRecord(f"q{i}", "a" * (i + 1), "b" * (5 - i)) for i in range(4)]
  data = tokenize_preferences(records, tok, seq_len=40)
  batch = next(record_batches(data, batch_size=4, seed=0, shard_index=0, shard_count=1))
  scores = jax.jit(lambda p, b: rmt.sequence_scores(graphdef, p, b))(params, batch)
  token_scores = jax.jit(lambda p, t, s: nnx.merge(graphdef, p).token_scores(t, s))
  per_token = token_scores(params, batch["tokens"].reshape(8, 40),
                           batch["segment_ids"].reshape(8, 40))
  for r in range(4):
    for j in range(2):
      n = int(batch["segment_ids"][r, j].sum())
      np.testing.assert_allclose(scores[r, j], per_token[2 * r + j, n - 1], rtol=1e-6)
  n = int(batch["segment_ids"][0, 1].sum())
  alone = token_scores(params, batch["tokens"][0, 1:2, :n], None)  # no padding at all
  np.testing.assert_allclose(scores[0, 1], alone[0, -1], rtol=1e-5, atol=1e-6)
  steps = tokenize_steps([StepRecord("q", ("x = 1", "y = 22"), (1.0, 0.0))], tok, seq_len=40,
                         max_steps=3)
  batch = next(record_batches(steps, batch_size=2, seed=0, shard_index=0, shard_count=1))
  z = rmt.step_logits(graphdef, params, batch)
  per_token = token_scores(params, batch["tokens"], batch["segment_ids"])
  pos = batch["step_pos"][0]
  np.testing.assert_allclose(z[0, :2], per_token[0, pos[:2]], rtol=1e-6)


def test_bad_config_is_a_config_error():
  def config(**data):
    return ml_collections.ConfigDict(dict(
        loss=dict(name=data.pop("loss", "bradley_terry")),
        data=dict(dict(kind="pairs", path="", overflow="truncate", reward="exact"), **data)))
  rmt.check_config(config())
  rmt.check_config(config(loss="process_reward", kind="steps"))  # no path: self-made step labels
  for kwargs, message in [(dict(loss="bt"), "config.loss.name"),
                          (dict(kind="steps"), "does not suit"),
                          (dict(loss="process_reward", kind="rankings"), "does not suit"),
                          (dict(loss="process_reward", kind="steps", step_rollouts=0),
                           "config.data.step_rollouts"),
                          (dict(reward="fuzzy"), "config.data.reward")]:
    with pytest.raises(ConfigError, match=message):
      rmt.check_config(config(**kwargs))


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=JAX_CACHE_DIR,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  env.pop("XLA_FLAGS", None)
  return env


def _launch(model_dir, workdir, *extra):
  args = [sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/rm_arith.py",
          "--workdir", str(workdir), f"--config.model={model_dir}", "--cpu_devices=8",
          "--config.steps=2", "--config.batch_size=4", "--config.seq_len=64",
          "--config.data.num_prompts=8", "--config.data.num_eval_prompts=4",
          "--config.data.num_samples=4", "--config.data.max_new_tokens=8",
          "--config.data.sample_batch_size=16", "--config.data.reward=graded",
          "--config.optim.lr=1e-3", "--config.optim.warmup_steps=0",
          "--config.mesh=(('data', -1), ('fsdp', 2), ('tensor', 2))", *extra]
  return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def test_launch_bradley_terry_resume_and_the_saved_model_scores_like_transformers(
    tiny_model_dir, tmp_path):
  workdir = tmp_path / "rm"
  first = _launch(tiny_model_dir, workdir)
  assert first.returncode == 0, first.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["steps"] == 2 and results["num_devices"] == 8 and results["num_eval_records"]
  assert 0 <= results["pair_accuracy_before"] <= 1 and 0 <= results["pair_accuracy_after"] <= 1
  again = _launch(tiny_model_dir, workdir, "--config.steps=4")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stdout and "(read from the cache)" in again.stdout
  losses = [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]
  assert losses == [1, 2, 3, 4]

  path = str(workdir / "model")
  reward = make_reward_model_reward(path, batch_size=4)
  prompts = ["What is 3 + 4?"] * 3 + ["What is 9 - 2?"]
  completions = ["3 + 4 = 7", "It is 8.", "no idea", "7"]
  scores = reward.batch(completions, prompts)
  assert scores == pytest.approx([reward(c, p) for c, p in zip(completions, prompts)], abs=1e-6)
  total, _ = combine_rewards(completions, weights={"rm": 2.0}, registry={**REWARDS, "rm": reward},
                             problems=[Problem(p, "7") for p in prompts])
  assert total == pytest.approx([2 * s for s in scores], rel=1e-6)
  assert len(set(np.round(scores, 6))) == 4

  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
  assert type(hf).__name__ == "LlamaForSequenceClassification"
  rows = [reward.scorer.tokens(c, p) for c, p in zip(completions, prompts)]
  pad, T = hf.config.pad_token_id, max(len(r) for r in rows)
  assert pad != reward.scorer.tokenizer.eos_id
  ids = torch.tensor([list(r) + [pad] * (T - len(r)) for r in rows])
  attention = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
  with torch.no_grad():
    theirs = hf(input_ids=ids, attention_mask=attention).logits[:, 0].numpy()
  np.testing.assert_allclose(theirs, scores, rtol=1e-4, atol=1e-5)
  with pytest.raises(WeightsError, match="not a reward model"):
    RewardModelScorer(tiny_model_dir)


def _in_process_config(model_dir, **data):
  from configs import rm_arith  # pylint: disable=import-outside-toplevel
  config = rm_arith.get_config()
  config.update(model=model_dir, steps=3, batch_size=4, seq_len=64, save_model=False,
                mesh=(("data", -1), ("fsdp", 2), ("tensor", 2)))
  config.optim.update(lr=1e-2, warmup_steps=0)
  config.data.update(**data)
  return config


def test_plackett_luce_on_rankings_reports_listwise_accuracy(tiny_model_dir, tmp_path):
  ranks = [RankingRecord(f"What is {i} + 1?", (f"{i + 1}", f"{i + 3}", "no idea"))
           for i in range(8)]
  write_jsonl(tmp_path / "ranks.jsonl", ranks)
  config = _in_process_config(tiny_model_dir, kind="rankings", path=str(tmp_path / "ranks.jsonl"),
                              eval_path=str(tmp_path / "ranks.jsonl"))
  config.loss.name = "plackett_luce"
  summary = rmt.run(config, str(tmp_path / "w"))
  for key in ("pair_accuracy", "top1_accuracy", "order_accuracy"):
    assert 0 <= summary[f"{key}_before"] <= 1 and 0 <= summary[f"{key}_after"] <= 1
  metrics = read_metrics(tmp_path / "w" / "metrics.jsonl")
  assert all("rm/top1_accuracy" in r for r in metrics if "loss" in r)


def test_process_reward_model_learns_step_labels(tiny_model_dir, tmp_path):
  records = [StepRecord(f"What is {i} + 1?", (f"{i} + 1 = {i + 1}", f"so {i + 1}"), (1.0, 1.0))
             for i in range(8)]
  write_jsonl(tmp_path / "steps.jsonl", records)
  config = _in_process_config(tiny_model_dir, kind="steps", path=str(tmp_path / "steps.jsonl"),
                              eval_path=str(tmp_path / "steps.jsonl"))
  config.loss.name = "process_reward"
  summary = rmt.run(config, str(tmp_path / "w"))
  assert summary["step_loss_after"] < summary["step_loss_before"]
  assert summary["step_accuracy_after"] == 1.0 and summary["last_loss"] < summary["first_loss"]
  metrics = [r for r in read_metrics(tmp_path / "w" / "metrics.jsonl") if "loss" in r]
  assert [r["loss_weight"] for r in metrics] == [8.0] * 3           # 4 records x 2 steps


# ------------------------------------------------- Bradley-Terry on rankings, held-out rankings


def test_bradley_terry_on_rankings_averages_every_pair_of_each_ranking():
  s = jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, 7.0]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]])
  loss, m = rmt.reward_loss("bradley_terry", s, mask, kind="rankings")
  row0 = -(2 * math.log(sig(1.0)) + math.log(sig(2.0))) / 3       # pairs (0,1), (0,2), (1,2)
  row1 = -math.log(sig(-1.0))                                     # the masked 7 takes no part
  assert float(loss) == pytest.approx((row0 + row1) / 2, rel=1e-6)
  assert float(m["rm/accuracy"]) == 0.5 and float(m["loss_weight"]) == 2
  pairs, _ = rmt.reward_loss("bradley_terry", s[:, :2], mask[:, :2])   # K = 2: the pair loss
  as_rankings, _ = rmt.reward_loss("bradley_terry", s[:, :2], mask[:, :2], kind="rankings")
  assert float(as_rankings) == pytest.approx(float(pairs), rel=1e-6)
  with pytest.raises(ValueError, match="pairs only"):
    rmt.reward_loss("bradley_terry", s, mask, margin=0.5, kind="rankings")
  config = ml_collections.ConfigDict(dict(
      loss=dict(name="bradley_terry", margin=0.0),
      data=dict(kind="rankings", path="", overflow="truncate", reward="graded")))
  rmt.check_config(config)
  config.loss.margin = 0.5
  with pytest.raises(ConfigError, match="config.loss.margin"):
    rmt.check_config(config)


def test_held_out_rankings_keep_their_own_k_and_are_scored_over_all_pairs():
  from types import SimpleNamespace  # pylint: disable=import-outside-toplevel
  from postrl import sharding as shd  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(dict(
      seq_len=40, system_prompt="", data=dict(kind="rankings", k=2, overflow="truncate")))
  records = [RankingRecord("q0", ("a", "b", "c", "d")), RankingRecord("q1", ("a", "b", "c")),
             RankingRecord("q2", ("a", "bb", "c", "dd"))]
  held = rmt.held_out_data(records, SimpleNamespace(tokenizer=FakeTokenizer()), config)
  assert held.k == 4 and len(held) == 3                            # not data.k = 2
  np.testing.assert_array_equal(rmt.response_masks(held), [[1, 1, 1, 1], [1, 1, 1, 0],
                                                           [1, 1, 1, 1]])
  table = jnp.array([[3.0, 2.0, 1.0, 0.0],      # right order: 6/6 pairs, top-1, full order
                     [0.0, 1.0, 2.0, 9.0],      # reversed (the padded 9 is not read): 0/3 pairs
                     [3.0, 2.0, 0.0, 1.0]])     # 5/6 pairs, top-1, not the full order
  score_fn = jax.jit(lambda p, b: {"scores": table[b["index"]]})
  mesh = shd.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  out = rmt.sequence_eval(score_fn, held, batch_size=8, mesh=mesh)(None, 0)
  assert out["pair_accuracy"] == pytest.approx(11 / 15)
  assert out["top1_accuracy"] == pytest.approx(2 / 3)
  assert out["order_accuracy"] == pytest.approx(1 / 3)


def test_bradley_terry_trains_on_rankings_and_evaluates_longer_held_out_rankings(
    tiny_model_dir, tmp_path):
  # pylint: disable-next=import-outside-toplevel
  from postrl.models import load_pretrained, load_tokenizer
  train = [RankingRecord(f"What is {i} + 1?", (f"{i + 1}", f"{i + 3}", "no idea"))
           for i in range(8)]
  held = [RankingRecord(f"What is {i} + 2?", (f"{i + 2}", f"{i + 3}", f"{i + 9}", "no"))
          for i in range(5)]
  write_jsonl(tmp_path / "train.jsonl", train)
  write_jsonl(tmp_path / "held.jsonl", held)
  config = _in_process_config(tiny_model_dir, kind="rankings", k=3, reward="graded",
                              path=str(tmp_path / "train.jsonl"),
                              eval_path=str(tmp_path / "held.jsonl"))
  summary = rmt.run(config, str(tmp_path / "w"))
  assert summary["train_k"] == 3 and summary["eval_k"] == 4 and summary["num_eval_records"] == 5
  for key in ("pair_accuracy", "top1_accuracy", "order_accuracy"):
    for when in ("before", "after"):   # 5 rankings x 6 pairs; 5 rankings
      value = summary[f"{key}_{when}"] * (30 if key == "pair_accuracy" else 5)
      assert value == pytest.approx(round(value), abs=1e-6)
  saved = np.load(tmp_path / "w" / "eval" / "scores_step3.npz")     # the held-out scores
  assert saved["scores"].shape == (5, 4) and saved["mask"].all()
  assert summary["pair_accuracy_after"] == pytest.approx(
      np.mean([saved["scores"][:, i] > saved["scores"][:, j]
               for i in range(4) for j in range(i + 1, 4)]))
  metrics = [r for r in read_metrics(tmp_path / "w" / "metrics.jsonl") if "loss" in r]
  assert [r["loss_weight"] for r in metrics] == [4.0] * 3           # rankings, not pairs
  assert all("rm/accuracy" in r and "rm/top1_accuracy" in r for r in metrics)

  # the first step's loss is the InstructGPT loss of the initial model on the first batch
  rm = ScoredTransformer(load_pretrained(tiny_model_dir, param_dtype="float32", dtype="float32"),
                         rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(rm)
  data = tokenize_preferences(train, load_tokenizer(tiny_model_dir), seq_len=config.seq_len, k=3)
  batch = next(record_batches(data, batch_size=4, seed=config.seed, shard_index=0,
                              shard_count=1))
  scores = rmt.sequence_scores(graphdef, params, batch)
  want, _ = rmt.reward_loss("bradley_terry", scores, batch["response_mask"], kind="rankings")
  pl, _ = rmt.reward_loss("plackett_luce", scores, batch["response_mask"])
  assert metrics[0]["loss"] == pytest.approx(float(want), rel=1e-4)
  assert abs(float(want) - float(pl)) > 1e-2                         # the test tells them apart
