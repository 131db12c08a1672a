"""The preference-optimisation trainer: losses on hand-checked inputs, sequence log-probs per
record, exact accumulation with whole records, cached = online reference, and the job through
launch.py on 8 devices with resume."""

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

from postrl import sharding as shd
from postrl.data.preference import record_batches, tokenize_preferences
from postrl.data.records import PreferenceRecord, RankingRecord, write_jsonl
from postrl.logprobs import model_apply_fn, token_logps
from postrl.metrics import read_metrics
from postrl.models import ConfigError, Transformer
from postrl.trainers import dpo
from postrl.trainers.step import loss_and_grads
from tests.conftest import tiny_config
from tests.data.conftest import FakeTokenizer
from tests.jax_cache import JAX_CACHE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LP = np.array([[-3.0, -5.0], [-4.0, -2.0]], np.float32)     # log π(chosen), log π(rejected)
REF = np.array([[-3.5, -4.0], [-4.0, -3.0]], np.float32)
LEN = np.array([[2.0, 4.0], [5.0, 1.0]], np.float32)
ONES = np.ones((2, 2), np.int32)
sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731


def _loss(name, **kw):
  kw.setdefault("beta", 0.1)
  loss, metrics = dpo.preference_loss(name, jnp.asarray(LP), jnp.asarray(LEN), jnp.asarray(REF),
                                      jnp.asarray(ONES), **kw)
  return float(loss), {k: float(v) for k, v in metrics.items()}


def test_preference_losses_on_hand_checked_inputs():
  h = (LP[:, 0] - REF[:, 0]) - (LP[:, 1] - REF[:, 1])        # [1.5, -1.0]
  want = np.mean([-math.log(sig(0.1 * x)) for x in h])
  loss, m = _loss("dpo")
  assert loss == pytest.approx(want, rel=1e-6)
  assert m["rewards/accuracy"] == 0.5 and m["rewards/margin"] == pytest.approx(0.1 * h.mean())
  assert _loss("listwise_dpo")[0] == pytest.approx(want, rel=1e-6)   # K = 2: DPO
  assert _loss("dpo", variant="ipo")[0] == pytest.approx(np.mean((h - 5.0) ** 2), rel=1e-6)
  avg = LP / LEN                                              # [[-1.5, -1.25], [-0.8, -2]]
  simpo = np.mean([-math.log(sig(2.0 * (a - b) - 0.5)) for a, b in avg])
  assert _loss("simpo", beta=2.0, gamma=0.5)[0] == pytest.approx(simpo, rel=1e-6)
  log_odds = lambda a: a - math.log(-math.expm1(a))  # noqa: E731
  orpo = np.mean([-a for a in avg[:, 0]]) + 0.1 * np.mean(
      [-math.log(sig(log_odds(a) - log_odds(b))) for a, b in avg])
  assert _loss("orpo", lam=0.1)[0] == pytest.approx(orpo, rel=1e-6)
  cpo = np.mean([-math.log(sig(0.1 * (a - b))) for a, b in LP]) + np.mean(-avg[:, 0])
  assert _loss("cpo", alpha=1.0)[0] == pytest.approx(cpo, rel=1e-6)
  # KTO: chosen desirable, rejected undesirable, z = max(0, mean log-ratio) = max(0, -0.125)
  r = (LP - REF).ravel()
  z = max(0.0, r.mean())
  kto = np.mean([1 - sig(0.1 * (x - z)) if i % 2 == 0 else 1 - sig(0.1 * (z - x))
                 for i, x in enumerate(r)])
  loss, m = _loss("kto", desirable_weight=1.0, undesirable_weight=1.0)
  assert loss == pytest.approx(kto, rel=1e-6) and m["rewards/accuracy"] == 0.5


def _config(**loss):
  data = ml_collections.ConfigDict(dict(kind="pairs", overflow="truncate", reward="exact"))
  base = dict(name="dpo", variant="sigmoid", beta=0.1, label_smoothing=0.0, reference="cached",
              tau=0.05, running_mean=0.0, gamma=0.5, lam=0.1, alpha=1.0, desirable_weight=1.0,
              undesirable_weight=1.0)
  return ml_collections.ConfigDict(dict(loss=dict(base, **loss), data=data))


@pytest.mark.parametrize("loss,kind,message", [
    (dict(name="dop"), "pairs", "config.loss.name: unknown loss 'dop'"),
    (dict(variant="sigmod"), "pairs", "config.loss.variant: unknown DPO variant"),
    (dict(variant="robust", label_smoothing=0.6), "pairs", "config.loss:.*0 <= label_smoothing"),
    (dict(variant="ipo", label_smoothing=0.1), "pairs", "config.loss:.*label_smoothing"),
    (dict(reference="sometimes"), "pairs", "config.loss.reference"),
    (dict(name="kto"), "rankings", "trains on pairs"),
])
def test_bad_loss_config_is_a_config_error(loss, kind, message):
  config = _config(**loss)
  config.data.kind = kind
  with pytest.raises(ConfigError, match=message):
    dpo.check_loss_config(config)
  dpo.check_loss_config(_config(name="listwise_dpo"))


@pytest.fixture(scope="module")
def fake_tokenizer():
  return FakeTokenizer()


@pytest.fixture(scope="module")
def tiny():
  """A tiny random model whose vocabulary covers the fake tokenizer's ids."""
  model = Transformer(tiny_config(vocab_size=160), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  return graphdef, params


def _data(fake_tokenizer, kind="pairs"):
  if kind == "pairs":
    records = [PreferenceRecord(f"q{i}", f"yes {i}" + "!" * i, f"no{i}") for i in range(8)]
  else:
    records = [RankingRecord(f"q{i}", tuple(f"r{j}" * (j + 1) for j in range(2 + i % 2)))
               for i in range(8)]
  return tokenize_preferences(records, fake_tokenizer, seq_len=48)


def test_sequence_logps_sum_each_responses_tokens(tiny, fake_tokenizer):
  graphdef, params = tiny
  data = _data(fake_tokenizer)
  batch = next(record_batches(data, batch_size=4, seed=0, shard_index=0, shard_count=1))
  apply_fn = model_apply_fn(graphdef)
  logps, lengths = jax.jit(lambda p, b: dpo.sequence_logps(apply_fn, p, b))(params, batch)
  row_logps = jax.jit(lambda p, t: token_logps(apply_fn, p, t)[0])
  for r, i in enumerate(batch["index"]):
    row = data.row(int(i))
    for j in range(2):
      lp = row_logps(params, row["tokens"][j:j + 1])
      mask = row["loss_mask"][j] > 0
      assert lengths[r, j] == mask.sum() == len(data.examples[int(i)].response_ids[j])
      np.testing.assert_allclose(logps[r, j], lp[mask].sum(), rtol=1e-5)


@pytest.mark.parametrize("name,kind", [("dpo", "pairs"), ("listwise_dpo", "rankings")])
def test_accumulation_over_whole_records_is_exact(tiny, fake_tokenizer, name, kind):
  graphdef, params = tiny
  data = _data(fake_tokenizer, kind)
  ref = np.random.default_rng(0).normal(-20, 3, (len(data), data.k)).astype(np.float32)
  batch = next(record_batches(data, batch_size=4, seed=0, per_record={"ref_logps": ref},
                              shard_index=0, shard_count=1))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  loss_fn = dpo.preference_loss_fn(model_apply_fn(graphdef), _config(name=name).loss)
  grads = jax.jit(lambda p, b, k: loss_and_grads(loss_fn, p, b, jax.random.key(0),
                                                  accum_steps=k), static_argnums=2)
  one, two = grads(params, batch, 1), grads(params, batch, 2)
  np.testing.assert_allclose(two[0], one[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(two[2]), jax.tree.leaves(one[2])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert float(one[3]) == 4.0  # loss_weight: records


def test_online_reference_equals_cached_on_a_sharded_mesh(tiny, fake_tokenizer):
  graphdef, params = tiny
  mesh = shd.make_mesh([("data", -1), ("fsdp", 2), ("tensor", 2)])
  data = _data(fake_tokenizer, "rankings")
  seq_fn = jax.jit(lambda p, b: dict(zip(("logps", "lengths"), dpo.sequence_logps(
      model_apply_fn(graphdef), p, b))))
  config = ml_collections.ConfigDict(dict(batch_size=4, dtype="float32", logprob_chunk=None,
                                          vocab_chunk=None))
  cached = dpo.reference_logps(seq_fn, params, {"train": data}, config=config, workdir=None,
                               mesh=mesh)["train"]
  assert cached.shape == (8, 3) and (cached[dpo.response_masks(data) == 0] == 0).all()
  online = dpo.OnlineReference(
      record_batches(data, batch_size=4, seed=1, shard_index=0, shard_count=1), seq_fn,
      dpo.place_params(params, mesh), mesh)
  for step in range(3):
    batch = online.next_batch(None, step)
    np.testing.assert_allclose(batch["ref_logps"], cached[batch["index"]], rtol=1e-5)
  state = online.get_state()
  assert state == {"next_index": 3}


def test_job_in_process_starts_at_the_reference_loss(tiny_model_dir, tmp_path):
  """Step 1's loss is its value at π = π_ref: log 3! for listwise DPO over 3 responses (online
  reference), 1/2 for KTO (cached; log 2 for DPO in the launch test); wrong reference log-probs
  would move it."""
  from configs import dpo_arith  # pylint: disable=import-outside-toplevel
  pairs = [PreferenceRecord(f"What is {i} + 1?", f"{i + 1}", f"{i + 2} maybe") for i in range(8)]
  ranks = [RankingRecord(p.prompt, (p.chosen, p.rejected, "no idea")) for p in pairs]
  write_jsonl(tmp_path / "pairs.jsonl", pairs)
  write_jsonl(tmp_path / "ranks.jsonl", ranks)
  cases = [("listwise_dpo", "rankings", "online", math.log(6)), ("kto", "pairs", "cached", 0.5)]
  for name, kind, reference, want in cases:
    config = dpo_arith.get_config()
    config.model = tiny_model_dir
    config.update(steps=1, batch_size=4, seq_len=48, mesh=(("data", -1), ("fsdp", 2),
                                                           ("tensor", 2)))
    config.loss.update(name=name, reference=reference)
    config.data.update(kind=kind, path=str(tmp_path / ("pairs.jsonl" if kind == "pairs"
                                                       else "ranks.jsonl")))
    config.eval.update(num_problems=0, before=False)
    summary = dpo.run(config, None)
    assert summary["first_loss"] == pytest.approx(want, rel=1e-4), (name, reference)
    assert summary["num_train_records"] == 8 and summary["reference"] == reference


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=JAX_CACHE_DIR,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  env.pop("XLA_FLAGS", None)
  return env


def _launch(model_dir, workdir, *extra):
  args = [sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/dpo_arith.py",
          "--workdir", str(workdir), f"--config.model={model_dir}", "--cpu_devices=8",
          "--config.steps=2", "--config.batch_size=4", "--config.seq_len=64",
          "--config.data.num_prompts=8", "--config.data.num_eval_prompts=4",
          "--config.data.num_samples=4", "--config.data.max_new_tokens=8",
          "--config.data.sample_batch_size=16", "--config.data.reward=graded",
          "--config.eval.num_problems=4", "--config.eval.batch_size=4",
          "--config.eval.max_new_tokens=4", "--config.optim.lr=1e-3",
          "--config.optim.warmup_steps=0", "--config.optim.min_lr_ratio=1.0",  # lr(t) = lr
          "--config.mesh=(('data', -1), ('fsdp', 2), ('tensor', 2))", *extra]
  return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if "loss" in r}


def test_launch_two_steps_on_8_devices_then_resume_to_four(tiny_model_dir, tmp_path):
  """The resumed run's losses equal an uninterrupted 4-step run's (a constant learning rate, so
  the schedule does not depend on config.steps)."""
  first = _launch(tiny_model_dir, tmp_path / "run")
  assert first.returncode == 0, first.stderr[-3000:]
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert results["steps"] == 2 and results["num_devices"] == 8
  assert results["num_train_records"] > 0 and results["num_eval_records"] > 0
  assert results["pref_accuracy_before"] == 0.0 and results["pref_margin_before"] == 0.0
  assert results["pref_margin_after"] != 0.0 and 0 <= results["logp_accuracy_after"] <= 1
  assert 0 <= results["accuracy_before"] <= 1 and 0 <= results["accuracy_after"] <= 1
  assert _losses(tmp_path / "run")[1] == pytest.approx(math.log(2), rel=1e-4)
  again = _launch(tiny_model_dir, tmp_path / "run", "--config.steps=4")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stdout and "(read from the cache)" in again.stdout
  assert "reference log-probs read from" in again.stdout
  straight = _launch(tiny_model_dir, tmp_path / "straight", "--config.steps=4")
  assert straight.returncode == 0, straight.stderr[-3000:]
  resumed, want = _losses(tmp_path / "run"), _losses(tmp_path / "straight")
  assert sorted(resumed) == [1, 2, 3, 4] and want[4] != want[1]
  np.testing.assert_allclose([resumed[s] for s in range(1, 5)], [want[s] for s in range(1, 5)],
                             rtol=1e-5)


def test_bad_inputs_are_one_line_errors(tiny_model_dir, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                 '{"prompt": "a", "chosen": 1, "rejected": "c"}\n')
  proc = _launch(tiny_model_dir, tmp_path / "w1", f"--config.data.path={bad}")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: DataError")
  assert f"{bad}:2" in proc.stderr and "chosen" in proc.stderr
  proc = _launch(tiny_model_dir, tmp_path / "w2", "--config.loss.name=ppo")
  assert proc.returncode == 1 and "error: ConfigError: config.loss.name" in proc.stderr
