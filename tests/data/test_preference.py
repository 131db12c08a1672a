"""Preference data: pair / ranking rows, truncation, batches that keep a record's rows together,
resume, shards, step labels, graded verifier rewards and the verifier-data cache."""

import json

import grain
import numpy as np
import pytest

from postrl.data import preference as pref
from postrl.data.preference import (StepRecord, pairwise_accuracy, listwise_accuracy,
                                    prompt_and_response_ids, read_step_jsonl, record_batches,
                                    sequential_batches, tokenize_preferences, tokenize_steps)
from postrl.data.records import (DataError, PreferenceRecord, Problem, RankingRecord, SFTRecord,
                                 read_jsonl)
from postrl.data.pipeline import tokenize_sft
from postrl.trainers.step import split_microbatches

PAIRS = [PreferenceRecord(prompt=f"q{i}", chosen=f"good{i}" + "!" * (i % 3),
                          rejected=f"bad{i}" + "?" * (i % 4)) for i in range(10)]


def _text(tok, ids):
  return tok.decode([int(i) for i in ids])


def test_rows_are_the_sft_tokenisation_split_at_the_response(fake_tokenizer, smollm_tokenizer):
  for tok in (fake_tokenizer, smollm_tokenizer):
    p, r = prompt_and_response_ids("What is 2 + 3?", "2 + 3 = 5", tok)
    sft = tokenize_sft(SFTRecord(prompt="What is 2 + 3?", completion="2 + 3 = 5"), tok,
                       max_len=500)
    np.testing.assert_array_equal(np.concatenate([p, r]), sft["tokens"])
    assert int(sft["loss_mask"].sum()) == len(r) and r[-1] == tok.eos_id
  p, r = prompt_and_response_ids("q", "a", fake_tokenizer, system_prompt="be brief")
  assert _text(fake_tokenizer, p) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n"
                                      "q<|im_end|>\n<|im_start|>assistant\n")
  assert _text(fake_tokenizer, r) == "a<|im_end|>"


def test_pair_rows_chosen_first_with_masks_on_the_response_only(fake_tokenizer):
  tok = fake_tokenizer
  data = tokenize_preferences(PAIRS, tok, seq_len=64)
  assert data.kind == "pairs" and data.k == 2 and len(data) == 10 and data.num_truncated == 0
  row = data.row(2)
  assert row["tokens"].shape == (2, 64) and row["response_mask"].tolist() == [1, 1]
  for j, want in enumerate(("good2!!", "bad2??")):
    n = int(row["segment_ids"][j].sum())
    assert (row["segment_ids"][j, :n] == 1).all() and (row["tokens"][j, n:] == tok.pad_id).all()
    masked = row["tokens"][j][row["loss_mask"][j] > 0]
    assert _text(tok, masked) == want + "<|im_end|>"
    assert _text(tok, row["tokens"][j, :n]).startswith("<|im_start|>user\nq2<|im_end|>")
  empty = data.empty_row()
  assert empty["segment_ids"].sum() == 0 and empty["response_mask"].sum() == 0


def test_over_long_responses_are_cut_and_counted_or_an_error_naming_the_record(fake_tokenizer):
  records = [PreferenceRecord("q", "short", "x" * 10),
             PreferenceRecord("q", "y" * 40, "z" * 3)]
  prompt_len = len(prompt_and_response_ids("q", "", fake_tokenizer)[0])
  seq_len = prompt_len + 8
  data = tokenize_preferences(records, fake_tokenizer, seq_len=seq_len)
  assert data.num_truncated == 2  # record 0 rejected (11 tokens), record 1 chosen (41)
  row = data.row(1)
  assert int(row["segment_ids"][0].sum()) == seq_len
  assert _text(fake_tokenizer, row["tokens"][0][row["loss_mask"][0] > 0]) == "y" * 8
  assert _text(fake_tokenizer, row["tokens"][1][row["loss_mask"][1] > 0]) == "zzz<|im_end|>"
  with pytest.raises(DataError, match=r"train.jsonl: record 1 \(chosen\).*seq_len"):
    tokenize_preferences([records[0], records[1]], fake_tokenizer, seq_len=prompt_len + 12,
                         overflow="error", source="train.jsonl")
  with pytest.raises(DataError, match="record 0.*no room"):
    tokenize_preferences(records, fake_tokenizer, seq_len=prompt_len)


def test_rankings_pad_to_the_longest_list(fake_tokenizer):
  records = [RankingRecord("a", ("1", "2", "3")), RankingRecord("b", ("4", "5"))]
  data = tokenize_preferences(records, fake_tokenizer, seq_len=40)
  assert data.kind == "rankings" and data.k == 3
  assert data.row(0)["response_mask"].tolist() == [1, 1, 1]
  row = data.row(1)
  assert row["response_mask"].tolist() == [1, 1, 0] and row["segment_ids"][2].sum() == 0
  assert tokenize_preferences(records, fake_tokenizer, seq_len=40, k=5).k == 5
  with pytest.raises(DataError, match="all records must be RankingRecord"):
    tokenize_preferences(records + PAIRS[:1], fake_tokenizer, seq_len=40)


NO_THREADS = dict(read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=1))


def _collect(it, n):
  return [next(it) for _ in range(n)]


def test_batches_keep_records_whole_shuffle_resume_and_shard(fake_tokenizer):
  data = tokenize_preferences(PAIRS, fake_tokenizer, seq_len=32)
  ref = np.arange(20, dtype=np.float32).reshape(10, 2)
  it = record_batches(data, batch_size=4, seed=3, per_record={"ref_logps": ref}, shard_index=0,
                      shard_count=1, **NO_THREADS)
  batches = _collect(it, 6)
  for b in batches:
    assert b["tokens"].shape == (4, 2, 32) and b["response_mask"].shape == (4, 2)
    for r, i in enumerate(b["index"]):
      for key, value in data.row(int(i)).items():
        np.testing.assert_array_equal(b[key][r], value)
      np.testing.assert_array_equal(b["ref_logps"][r], ref[i])
  first_epoch = np.concatenate([b["index"] for b in batches])[:10]
  assert sorted(first_epoch.tolist()) == list(range(10))
  assert first_epoch.tolist() != list(range(10))            # shuffled
  again = record_batches(data, batch_size=4, seed=3, shard_index=0, shard_count=1, **NO_THREADS)
  assert [b["index"].tolist() for b in _collect(again, 6)] == [b["index"].tolist() for b in batches]
  # resume: the state after 2 batches gives batches 3.. of the uninterrupted stream
  it = record_batches(data, batch_size=4, seed=3, shard_index=0, shard_count=1, **NO_THREADS)
  _collect(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  resumed = record_batches(data, batch_size=4, seed=3, shard_index=0, shard_count=1, **NO_THREADS)
  resumed.set_state(state)
  assert [b["index"].tolist() for b in _collect(resumed, 4)] == [
      b["index"].tolist() for b in batches[2:]]
  # two processes: each keeps half of the same global batch
  halves = [next(record_batches(data, batch_size=4, seed=3, shard_index=i, shard_count=2,
                                **NO_THREADS)) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["tokens"] for h in halves]),
                                batches[0]["tokens"])
  # micro-batches split the record dimension only: a pair never spans two micro-batches
  micro = split_microbatches(batches[0], 2)
  assert micro["tokens"].shape == (2, 2, 2, 32)
  for m in range(2):
    for r in range(2):
      np.testing.assert_array_equal(micro["tokens"][m, r],
                                    data.row(int(micro["index"][m, r]))["tokens"])


def test_sequential_batches_cover_every_record_once(fake_tokenizer):
  data = tokenize_preferences(PAIRS, fake_tokenizer, seq_len=32)
  out = sequential_batches(data, batch_size=4, per_record={"x": np.ones((10, 2))})
  assert [n for _, n in out] == [4, 4, 2]
  last, _ = out[-1]
  assert last["index"].tolist() == [8, 9, -1, -1]
  assert last["segment_ids"][2:].sum() == 0 and last["x"][2:].sum() == 0


def test_accuracy_helpers():
  scores = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, -1.0], [1.0, 1.0, 9.0]])
  mask = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]])
  # pairs above: row 0: 3/3, row 1: (0>1 no, 0>-1 yes, 1>-1 yes) 2/3, row 2: tie 0/1
  assert pairwise_accuracy(scores, mask) == pytest.approx(5 / 7)
  assert listwise_accuracy(scores, mask) == {"top1": 1 / 3, "full_order": 1 / 3}
  assert pairwise_accuracy(scores[:, :2], np.ones((3, 2))) == pytest.approx(1 / 3)


def test_graded_rewards_order_right_close_far_and_none():
  r = pref.graded_arithmetic_reward
  right, close, far, none = r("7", "7"), r("8", "7"), r("70", "7"), r("seven", "7")
  assert right > close > far > none
  assert 0.99 < right <= 1.0 and none < 0.0
  assert r("so 8", "7") < r("8", "7")                       # same answer: shorter ranks higher
  c = pref.graded_countdown_reward
  assert c("1 + 2 = 3", [1, 2], 3) > c("1 * 2 = 2", [1, 2], 3) > c("no", [1, 2], 3)
  assert pref.verifier_reward("arithmetic")("it is 12", Problem("What is 5 + 7?", "12")) == 1.0


def test_verifier_data_is_cached_and_reused(tmp_path, monkeypatch):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from postrl.models import Transformer, load_tokenizer  # pylint: disable=import-outside-toplevel
  from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel
  tok = load_tokenizer("smollm2-135m-instruct")
  model = Transformer(tiny_config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=32,
                                  eos_token_id=tok.eos_id, tie_word_embeddings=True),
                      rngs=nnx.Rngs(0))
  problems = [Problem(f"What is {i} + 1?", str(i + 1)) for i in range(3)]
  reward = pref.verifier_reward("arithmetic", "graded")
  cache = str(tmp_path / "data" / "train_pairs.jsonl")
  kwargs = dict(num_samples=3, max_new_tokens=4, batch_size=9, seed=1, cache_path=cache,
                settings={"model": "tiny"})
  records, info = pref.verifier_preference_data(model, tok, problems, reward, **kwargs)
  assert records and not info["cached"] and info["num_prompts"] == 3
  assert read_jsonl(cache, "preference")[0] == records
  assert {r.prompt for r in records} <= {p.prompt for p in problems}

  def fail(*a, **k):
    raise AssertionError("sampled again instead of reading the cache")

  monkeypatch.setattr("postrl.data.verifier.sample_and_score", fail)
  again, info = pref.verifier_preference_data(model, tok, problems, reward, **kwargs)
  assert again == records and info["cached"]
  with pytest.raises(DataError, match="other settings.*num_samples"):
    pref.verifier_preference_data(model, tok, problems, reward, **dict(kwargs, num_samples=4))
  monkeypatch.undo()
  with pytest.raises(DataError, match="no pairs from 3 prompts"):
    pref.verifier_preference_data(model, tok, problems, lambda c, p: 0.0,
                                  **dict(kwargs, cache_path=None))


def test_step_records_parse_errors_and_token_positions(tmp_path, fake_tokenizer):
  path = tmp_path / "steps.jsonl"
  good = {"prompt": "q", "steps": ["a = 1", "b = 22", "c"], "labels": [1, 0.5, 0]}
  path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, labels=[1, 2, 0])) + "\n")
  with pytest.raises(DataError, match=r"steps.jsonl:2: field 'labels\[1\]'.*\[0, 1\]"):
    read_step_jsonl(path)
  records, skipped = read_step_jsonl(path, skip_malformed=True)
  assert skipped == 1 and records == [StepRecord("q", ("a = 1", "b = 22", "c"), (1.0, 0.5, 0.0))]
  data = tokenize_steps(records, fake_tokenizer, seq_len=64, max_steps=4)
  row = data.row(0)
  n = int(row["segment_ids"].sum())
  assert row["step_mask"].tolist() == [1, 1, 1, 0]
  assert row["step_labels"].tolist() == [1.0, 0.5, 0.0, 0.0]
  ends = [_text(fake_tokenizer, row["tokens"][:p + 1]) for p in row["step_pos"][:3]]
  assert ends[0].endswith("a = 1\n") and ends[1].endswith("a = 1\nb = 22\n")
  assert ends[2].endswith("\nc")
  assert _text(fake_tokenizer, row["tokens"][:n]).endswith("c<|im_end|>")
  # a cut at seq_len drops the steps it reaches into
  short = tokenize_steps(records, fake_tokenizer, seq_len=int(row["step_pos"][1]), max_steps=4)
  assert short.num_truncated == 1 and short.num_dropped_steps == 2
  assert short.row(0)["step_mask"].tolist() == [1, 0, 0, 0]
  assert tokenize_steps(records, fake_tokenizer, seq_len=64, max_steps=2).num_dropped_steps == 1
