"""SFT tokenisation and batching: mask placement, packed = unpacked, shuffle, shards, resume."""

import collections
import itertools
import json

import numpy as np
import pytest

from postrl.data import (SFTRecord, arithmetic_problems, sft_batches, sft_length_stats,
                         sft_records, tokenize_sft)

RECORDS = [SFTRecord(prompt=f"q{i}" + "?" * (i % 7), completion=f"a{i}" + "!" * (i % 5))
           for i in range(23)]
SEQ = 80


def _batches(tok, records=RECORDS, **kwargs):
  kwargs = dict(dict(batch_size=4, seq_len=SEQ, pack=True, seed=0, num_epochs=1, shard_index=0,
                     shard_count=1), **kwargs)
  return sft_batches(records, tok, **kwargs)


def _segments(batches):
  """Every packed/padded sequence as (tokens, loss_mask) tuples, in order of appearance."""
  out = []
  for b in batches:
    for tokens, seg, mask in zip(b["tokens"], b["segment_ids"], b["loss_mask"]):
      for s in range(1, seg.max() + 1):
        out.append((tuple(tokens[seg == s]), tuple(mask[seg == s])))
  return out


def _example(tok, record, max_len=SEQ):
  e = tokenize_sft(record, tok, max_len=max_len)
  return tuple(e["tokens"]), tuple(e["loss_mask"])


# ------------------------------------------------------------------------------- tokenize_sft


def test_tokenize_sft_golden_fake(fake_tokenizer):
  tok = fake_tokenizer
  out = tokenize_sft(SFTRecord(prompt="2+2?", completion="4"), tok, max_len=64)
  prompt = tok.encode("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
  assert out["tokens"].dtype == np.int32 and out["loss_mask"].dtype == np.int32
  assert out["tokens"].tolist() == prompt + [ord("4") + 10, tok.eos_id]  # no trailing "\n"
  assert out["loss_mask"].tolist() == [0] * len(prompt) + [1, 1]
  plain = tokenize_sft(SFTRecord(prompt="2+2?", completion="4"), tok, max_len=64, chat=False)
  assert tok.decode(plain["tokens"]) == "2+2?4<|im_end|>"
  assert plain["loss_mask"].tolist() == [0] * 4 + [1, 1]
  cut = tokenize_sft(SFTRecord(prompt="2+2?", completion="4"), tok, max_len=5)
  assert cut["tokens"].tolist() == prompt[:5] and cut["loss_mask"].tolist() == [0] * 5


def test_first_token_never_counts(fake_tokenizer):
  out = tokenize_sft(SFTRecord(prompt="", completion="ab"), fake_tokenizer, max_len=8, chat=False)
  assert fake_tokenizer.decode(out["tokens"]) == "ab<|im_end|>"
  assert out["loss_mask"].tolist() == [0, 1, 1]


def test_tokenize_sft_smollm_masks(smollm_tokenizer):
  tok = smollm_tokenizer
  msgs = [{"role": "user", "content": "What is 12 + 30?"},
          {"role": "assistant", "content": "12 + 30 = 42"}]
  out = tokenize_sft(SFTRecord(prompt=msgs[0]["content"], completion=msgs[1]["content"]), tok,
                     max_len=512)
  chat = tokenize_sft(SFTRecord(messages=msgs), tok, max_len=512)
  assert {k: v.tolist() for k, v in out.items()} == {k: v.tolist() for k, v in chat.items()}
  tokens, mask = out["tokens"], out["loss_mask"]
  prompt = tok.encode_chat(msgs[:1], add_generation_prompt=True)
  full = tok.encode_chat(msgs, add_generation_prompt=False)
  assert tokens.tolist() == full[:len(tokens)]  # a prefix of the full conversation ...
  assert tokens.tolist()[:len(prompt)] == prompt and not mask[:len(prompt)].any()
  assert mask[len(prompt):].all() and tokens[-1] == tok.eos_id == tok.token_to_id("<|im_end|>")
  assert tok.decode(tokens[mask == 1], skip_special_tokens=False) == "12 + 30 = 42<|im_end|>"
  assert len(full) == len(tokens) + 1  # ... without the "\n" after <|im_end|>


def test_tokenize_sft_multi_turn_trains_last_reply_only(smollm_tokenizer):
  tok = smollm_tokenizer
  msgs = [{"role": "system", "content": "Answer with a number."},
          {"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"},
          {"role": "user", "content": "And 2 + 2?"}, {"role": "assistant", "content": "4"}]
  out = tokenize_sft(SFTRecord(messages=msgs), tok, max_len=512)
  trained = out["tokens"][out["loss_mask"] == 1]
  assert tok.decode(trained, skip_special_tokens=False) == "4<|im_end|>"
  assert tok.decode(out["tokens"], skip_special_tokens=False).count("<|im_start|>assistant\n2") == 1


def test_length_stats(fake_tokenizer):
  records = [SFTRecord(prompt="p" * n, completion="c") for n in (1, 10, 30)]
  fixed = len(fake_tokenizer.encode_chat([{"role": "user", "content": ""}])) + 2  # + "c", eos
  stats = sft_length_stats(records, fake_tokenizer, max_len=fixed + 10)
  assert stats["num_records"] == 3 and stats["max_length"] == fixed + 30
  assert stats["num_truncated"] == 1 and stats["num_without_loss"] == 1
  assert stats["mean_completion_length"] == 2


# ------------------------------------------------------------------------------------ batches


@pytest.mark.parametrize("pack", [True, False])
def test_batch_format(fake_tokenizer, pack):
  batches = list(_batches(fake_tokenizer, pack=pack))
  for b in batches:
    assert sorted(b) == ["loss_mask", "segment_ids", "tokens"]
    for v in b.values():
      assert v.shape == (4, SEQ) and v.dtype == np.int32
    seg = b["segment_ids"]
    assert not b["loss_mask"][seg == 0].any() and (b["tokens"][seg == 0] == 0).all()
    for row in seg:  # ids 1..n in runs, padding only at the end
      n = row.max()
      runs = [int(k) for k, _ in itertools.groupby(row)]
      assert runs in ([], [0], list(range(1, n + 1)), list(range(1, n + 1)) + [0])
      assert n <= 1 or pack
    starts = np.concatenate([np.ones((4, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert not b["loss_mask"][starts].any()  # a segment's first token is never predicted
  if not pack:
    assert len(batches) == -(-len(RECORDS) // 4)


def test_packed_equals_unpacked(fake_tokenizer):
  """Packing moves whole sequences into shared rows; the (tokens, mask) multiset is unchanged."""
  expected = collections.Counter(_example(fake_tokenizer, r) for r in RECORDS)
  packed = list(_batches(fake_tokenizer, pack=True))
  unpacked = list(_batches(fake_tokenizer, pack=False))
  assert collections.Counter(_segments(packed)) == expected
  assert collections.Counter(_segments(unpacked)) == expected
  assert len(packed) < len(unpacked)  # and it did pack
  assert max(b["segment_ids"].max() for b in packed) > 1


def test_truncated_examples_still_fit(fake_tokenizer):
  # chat prompts of 25 tokens, completions of 1 to 41: all but the first are cut at 32
  long = [SFTRecord(prompt="x" * 6, completion="y" * (10 * i)) for i in range(5)]
  for pack in (True, False):
    with pytest.warns(UserWarning, match="4 of 5 SFT records are longer than seq_len=32"):
      segs = _segments(_batches(fake_tokenizer, long, seq_len=32, pack=pack))
    assert sorted(segs) == sorted(_example(fake_tokenizer, r, 32) for r in long)


def test_smollm_pipeline(smollm_tokenizer):
  records = sft_records(arithmetic_problems(12, seed=0))
  batches = list(_batches(smollm_tokenizer, records, batch_size=2, seq_len=128))
  assert (collections.Counter(_segments(batches))
          == collections.Counter(_example(smollm_tokenizer, r, 128) for r in records))
  pad = batches[-1]["tokens"][batches[-1]["segment_ids"] == 0]
  assert (pad == smollm_tokenizer.pad_id).all()


def test_shuffle_deterministic(fake_tokenizer):
  def order(seed, num_epochs=1):
    return [t for t, _ in _segments(_batches(fake_tokenizer, pack=False, seed=seed,
                                             num_epochs=num_epochs))]
  assert order(0) == order(0)
  assert order(0) != order(1)
  assert sorted(order(0)) == sorted(order(1))
  two = order(0, num_epochs=2)  # each epoch a full pass, in a new order
  n = len(RECORDS)
  assert two[:n] == order(0) and sorted(two[n:]) == sorted(two[:n]) and two[n:] != two[:n]


@pytest.mark.parametrize("pack", [True, False])
def test_shards_disjoint_and_covering(fake_tokenizer, pack):
  shards = [_segments(_batches(fake_tokenizer, pack=pack, batch_size=6, shard_index=i,
                               shard_count=3)) for i in range(3)]
  for i in range(3):
    assert next(iter(_batches(fake_tokenizer, batch_size=6, shard_index=i,
                              shard_count=3)))["tokens"].shape == (2, SEQ)
  seen = [t for shard in shards for t in shard]
  assert len(seen) == len(set(seen)) == len(RECORDS)
  assert set(seen) == {_example(fake_tokenizer, r) for r in RECORDS}


@pytest.mark.parametrize("pack", [True, False])
def test_global_batch_independent_of_process_count(fake_tokenizer, pack):
  """The rows of n processes, stacked in process order, are the 1-process batch (packing too)."""
  one = list(_batches(fake_tokenizer, pack=pack, batch_size=4))
  two = [list(_batches(fake_tokenizer, pack=pack, batch_size=4, shard_index=i, shard_count=2))
         for i in range(2)]
  assert len(two[0]) == len(two[1]) == len(one)
  for step, batch in enumerate(one):
    for key in batch:
      np.testing.assert_array_equal(
          np.concatenate([two[0][step][key], two[1][step][key]]), batch[key])


def test_bad_arguments(fake_tokenizer):
  with pytest.raises(ValueError, match="multiple of the 3 processes"):
    _batches(fake_tokenizer, batch_size=4, shard_index=0, shard_count=3)
  with pytest.raises(ValueError, match="shard_index"):
    _batches(fake_tokenizer, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="at least one record"):
    _batches(fake_tokenizer, [])


@pytest.mark.parametrize("pack", [True, False])
def test_resume_gives_identical_batches(fake_tokenizer, pack):
  """Stop after k batches, save the state as JSON, resume in a new iterator: same batches."""
  kwargs = dict(pack=pack, num_epochs=None, seed=7, batch_size=4)  # forever: crosses epochs
  reference = _batches(fake_tokenizer, **kwargs)
  expected = [next(reference) for _ in range(20)]
  for k in (0, 3, 9):
    it = _batches(fake_tokenizer, **kwargs)
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = _batches(fake_tokenizer, **kwargs)
    resumed.set_state(state)
    for want in expected[k:]:
      got = next(resumed)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
