"""Process reward models on self-made step labels (no ``data.path``): Math-Shepherd roll-out
labels of the policy's own solutions, cached in the workdir."""

import hashlib
import json

import pytest

from postrl.data.preference import StepRecord, read_step_jsonl
from postrl.data.records import DataError, Problem, write_jsonl
from postrl.metrics import read_metrics
from postrl.trainers import reward_model as rmt


def _config(model_dir, **data):
  from configs import rm_arith  # pylint: disable=import-outside-toplevel
  config = rm_arith.get_config()
  config.update(model=model_dir, steps=2, batch_size=4, seq_len=64, save_model=False,
                mesh=(("data", -1), ("fsdp", 2), ("tensor", 2)))
  config.optim.update(lr=1e-2, warmup_steps=0)
  config.loss.name = "process_reward"
  config.data.update(kind="steps", path="", num_prompts=4, num_eval_prompts=2, num_samples=2,
                     step_rollouts=2, max_new_tokens=6, sample_batch_size=8, max_steps=4)
  config.data.update(**data)
  return config


def test_process_reward_on_self_made_steps_caches_and_refuses_other_settings(
    tiny_model_dir, tmp_path, capsys):
  workdir = tmp_path / "prm"
  summary = rmt.run(_config(tiny_model_dir), str(workdir))
  train_path = workdir / "data" / "train_steps.jsonl"
  eval_path = workdir / "data" / "eval_steps.jsonl"
  train, _ = read_step_jsonl(train_path)
  held, _ = read_step_jsonl(eval_path)
  assert summary["num_train_records"] == len(train) and summary["num_eval_records"] == len(held)
  assert summary["data"]["source"] == "verifier" and not summary["data"]["train"]["cached"]
  assert len(train) <= 4 * 2 and len(held) <= 2 * 2   # at most one record per solution
  for r in train + held:
    assert len(r.labels) == len(r.steps) <= 4 and all(0.0 <= y <= 1.0 for y in r.labels)
  meta = json.loads((workdir / "data" / "train_steps.jsonl.meta.json").read_text())
  assert meta["settings"]["rollouts"] == 2 and meta["settings"]["soft"] is False
  assert meta["info"]["num_steps"] == sum(len(r.steps) for r in train)
  assert 0 <= summary["step_accuracy_before"] <= 1 and 0 <= summary["step_accuracy_after"] <= 1
  losses = [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]
  assert losses == [1, 2]
  capsys.readouterr()

  before = train_path.read_text()
  again = rmt.run(_config(tiny_model_dir), str(workdir))   # same settings: the cache is reused
  assert "(read from the cache)" in capsys.readouterr().out
  assert again["data"]["train"]["cached"] and train_path.read_text() == before
  assert again["num_train_records"] == len(train)

  with pytest.raises(DataError, match=r"other settings \(differing: \['soft'\]\)"):
    rmt.run(_config(tiny_model_dir, step_soft=True), str(workdir))
  assert train_path.read_text() == before


def test_verifier_step_data_reads_a_matching_cache_and_refuses_another(tmp_path):
  problems = [Problem("What is 1 + 2?", "3"), Problem("What is 2 + 2?", "4")]
  records = [StepRecord("What is 1 + 2?", ("1 + 2", "= 3"), (1.0, 0.5))]
  cache = str(tmp_path / "train_steps.jsonl")
  kwargs = dict(rollouts=2, soft=False, num_samples=2, max_new_tokens=6, seed=0, batch_size=8,
                cache_path=cache, settings={"model": "m"})
  # a cache with the settings these arguments store is read back (model=None: nothing sampled)
  settings = dict(model="m", kind="steps", num_samples=2, rollouts=2, soft=False, max_steps=0,
                  max_new_tokens=6, temperature=1.0, seed=0, batch_size=8, system_prompt="",
                  num_problems=2,
                  prompts=hashlib.sha256(b"What is 1 + 2?\nWhat is 2 + 2?").hexdigest())
  write_jsonl(cache, records)
  with open(f"{cache}.meta.json", "w", encoding="utf-8") as f:
    json.dump({"settings": settings, "info": {"num_records": 1}}, f)
  got, info = rmt.verifier_step_data(None, None, problems, None, **kwargs)
  assert got == records and info == {"num_records": 1, "cached": True}
  for change, differing in [(dict(rollouts=3), "rollouts"), (dict(soft=True), "soft"),
                            (dict(seed=1), "seed"), (dict(settings={"model": "x"}), "model")]:
    with pytest.raises(DataError, match=rf"train_steps.jsonl: .*other settings .*'{differing}'"):
      rmt.verifier_step_data(None, None, problems, None, **dict(kwargs, **change))
  with pytest.raises(DataError, match="prompts"):
    rmt.verifier_step_data(None, None, problems[:1], None, **kwargs)


def test_verifier_step_data_forwards_the_labelling_settings_and_writes_the_cache(
    tmp_path, monkeypatch):
  from postrl.data.verifier import ScoredSample  # pylint: disable=import-outside-toplevel
  problems = [Problem("What is 1 + 2?", "3")]
  samples = [[ScoredSample("What is 1 + 2?", "1 + 2\n= 3", 1.0, 5, True)]]
  labelled = [StepRecord("What is 1 + 2?", ("1 + 2", "= 3"), (0.5, 1.0))]
  calls = {}

  def fake_sample(*args, **kwargs):
    calls["sample"] = kwargs
    return samples

  def fake_label(model, tokenizer, probs, got_samples, reward_fn, **kwargs):
    assert probs == problems and got_samples is samples
    calls["label"] = kwargs
    return labelled

  monkeypatch.setattr(rmt, "sample_and_score", fake_sample)
  monkeypatch.setattr(rmt, "monte_carlo_step_labels", fake_label)
  cache = str(tmp_path / "data" / "train_steps.jsonl")
  got, info = rmt.verifier_step_data("model", "tok", problems, "reward", rollouts=3, soft=True,
                                     num_samples=2, max_steps=5, seed=7, cache_path=cache)
  assert got == labelled and not info["cached"]
  assert info["num_steps"] == 2 and info["label_mean"] == pytest.approx(0.75)
  assert calls["sample"]["num_samples"] == 2
  assert (calls["label"]["rollouts"], calls["label"]["soft"], calls["label"]["max_steps"]) == (
      3, True, 5)
  assert read_step_jsonl(cache)[0] == labelled
  settings = json.loads(open(f"{cache}.meta.json", encoding="utf-8").read())["settings"]
  assert (settings["rollouts"], settings["soft"], settings["seed"]) == (3, True, 7)
