"""Bad input to the data layer: a DataError naming the file, line or record and the field, never
a trace from inside a decoder, grain or array_record, and no record silently trained on nothing."""

import json

import numpy as np
import pytest

from postrl.data import (ArrayRecordRecords, DataError, SFTRecord, batch_examples, read_jsonl,
                         sft_batches)
from postrl.data.preference import StepRecord, read_step_jsonl, tokenize_steps

STEP = {"prompt": "q", "steps": ["a = 1", "b"], "labels": [1, 0]}


def test_step_jsonl_reads_like_read_jsonl(tmp_path):
  good = json.dumps(STEP).encode()
  path = tmp_path / "steps.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good[:-2] + b"\xff]}\n")  # BOM, bad byte
  with pytest.raises(DataError, match=rf"{path}:2: invalid UTF-8"):
    read_step_jsonl(path)
  assert read_step_jsonl(path, skip_malformed=True) == ([StepRecord.from_json(STEP)], 1)
  with pytest.raises(DataError, match=f"{tmp_path}: is a directory"):
    read_step_jsonl(tmp_path)
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(DataError, match=r"empty.jsonl: no records \(the file is empty\)"):
    read_step_jsonl(tmp_path / "empty.jsonl")


def test_lone_surrogate_names_line_and_field(tmp_path):
  # JSON allows "\ud83d" alone (an emoji cut in half); no tokenizer can encode the string
  path = tmp_path / "train.jsonl"
  path.write_text('{"prompt": "p", "completion": "ok"}\n'
                  '{"prompt": "p", "completion": "so \\ud83d"}\n')
  with pytest.raises(DataError, match=rf"{path}:2: field 'completion': invalid Unicode: a lone "
                                      r"surrogate U\+D83D at character 3"):
    read_jsonl(path, "sft")
  steps = tmp_path / "steps.jsonl"
  steps.write_text(json.dumps(dict(STEP, steps=["a", "b\ud800"])) + "\n")
  with pytest.raises(DataError, match=r"steps.jsonl:1: field 'steps\[1\]': invalid Unicode"):
    read_step_jsonl(steps)


def test_unreadable_path_is_a_data_error(tmp_path):
  path = str(tmp_path / ("x" * 300 + ".jsonl"))  # longer than a file name may be
  with pytest.raises(DataError, match=r"\.jsonl: cannot be read \(File name too long\)"):
    read_jsonl(path, "sft")


def test_array_record_path_that_is_not_one(tmp_path):
  jsonl = tmp_path / "train.array_record"
  jsonl.write_text('{"prompt": "p", "completion": "c"}\n')
  with pytest.raises(DataError, match=f"{jsonl}: not a readable array_record file"):
    ArrayRecordRecords(str(jsonl), "sft")
  folder = tmp_path / "shards.array_record"
  folder.mkdir()
  with pytest.raises(DataError, match=f"{folder}: is a directory"):
    ArrayRecordRecords(str(folder), "sft")


def _batches(records, tok, seq_len):
  return sft_batches(records, tok, batch_size=2, seq_len=seq_len, num_epochs=1, shard_index=0,
                     shard_count=1)


def test_prompt_that_fills_seq_len_is_an_error_not_a_silent_zero_loss(fake_tokenizer):
  # the chat prompt of "x" * 40 is 59 tokens: at seq_len 32 not one completion token is left
  records = [SFTRecord(prompt="q", completion="a"), SFTRecord(prompt="x" * 40, completion="a")]
  with pytest.raises(DataError, match=r"SFT record 1 \(0-based\): no completion token fits in "
                                      r"seq_len=32 \(its prompt alone is 59 tokens; 1 of 2"):
    _batches(records, fake_tokenizer, 32)
  with pytest.raises(DataError, match="no completion token fits in seq_len=0"):
    _batches(records[:1], fake_tokenizer, 0)


def test_truncation_is_counted_in_a_warning(fake_tokenizer):
  records = [SFTRecord(prompt="q", completion="a"), SFTRecord(prompt="q", completion="y" * 40)]
  with pytest.warns(UserWarning, match=r"1 of 2 SFT records are longer than seq_len=32 \(the "
                                       r"longest has 61 tokens\)"):
    batches = list(_batches(records, fake_tokenizer, 32))
  assert sum(int(b["loss_mask"].sum()) for b in batches) > 0


def test_blank_step_is_refused(tmp_path, fake_tokenizer):
  # an empty last step encoded to no token: its label was read at the previous step's last
  # token, which then carried two contradicting labels
  path = tmp_path / "steps.jsonl"
  path.write_text(json.dumps(STEP) + "\n" + json.dumps(dict(STEP, steps=["a = 1", ""])) + "\n")
  with pytest.raises(DataError, match=rf"{path}:2: field 'steps\[1\]': blank step"):
    read_step_jsonl(path)
  record = StepRecord("q", ("a = 1", ""), (1.0, 0.0))  # built directly, bypassing from_json
  with pytest.raises(DataError, match=r"records: record 0: step 1 .* no token"):
    tokenize_steps([record], fake_tokenizer, seq_len=64, max_steps=4)


def _examples(*examples):
  import grain  # pylint: disable=import-outside-toplevel
  return grain.MapDataset.source(list(examples)).to_iter_dataset()


@pytest.mark.parametrize("pack", [True, False])
def test_batch_examples_checks_each_example(pack):
  # tokens 4, loss_mask 5: packed, the extra mask entry landed on padding (loss on a pad token)
  ok = {"tokens": np.arange(1, 4, dtype=np.int32), "loss_mask": np.array([0, 1, 1], np.int32)}
  bad = [({"tokens": np.arange(1, 5), "loss_mask": np.ones(5)}, r"4 tokens but 5 loss_mask"),
         ({"tokens": np.arange(1, 11), "loss_mask": np.ones(10)}, r"10 tokens, longer than "
                                                                  r"seq_len=8"),
         ({"tokens": np.arange(1, 5)}, r"missing key 'loss_mask'"),
         ({"tokens": np.zeros((0,)), "loss_mask": np.zeros((0,))}, "no tokens"),
         ({"tokens": np.ones((2, 2)), "loss_mask": np.ones((2, 2))}, "1-D")]
  for example, match in bad:
    with pytest.raises(DataError, match=r"batch_examples: an example .*" + match):
      list(batch_examples(_examples(ok, example), batch_size=2, seq_len=8, pack=pack))


def test_duplicate_keys_name_the_record_and_key(tmp_path):
  # json.loads keeps the last of a repeated key: these records were silently read with it
  steps = tmp_path / "steps.jsonl"
  steps.write_text(json.dumps(STEP) + "\n" + json.dumps(STEP)[:-1] + ', "labels": [0, 0]}\n')
  with pytest.raises(DataError, match=rf"{steps}:2: duplicate key 'labels'"):
    read_step_jsonl(steps)
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "train.array_record")
  writer = ArrayRecordWriter(path, "group_size:1")
  writer.write(b'{"prompt": "p", "completion": "c"}')
  writer.write(b'{"prompt": "p", "completion": "c", "completion": "d"}')
  writer.close()
  records = ArrayRecordRecords(path, "sft")
  assert records[0] == SFTRecord("p", "c")
  with pytest.raises(DataError, match=rf"{path}: record 1: duplicate key 'completion'"):
    records[1]  # pylint: disable=pointless-statement


@pytest.mark.parametrize("pack", [True, False])
def test_batch_examples_checks_token_ids(pack):
  # pre-tokenized ids never went through a tokenizer check_fits checked: under jit -1 read the
  # embedding's last row, an id >= the vocabulary gave NaN, 2**32 + 5 became 5 in the int32 batch
  ok = {"tokens": np.arange(1, 4, dtype=np.int32), "loss_mask": np.array([0, 1, 1], np.int32)}
  mask = np.ones(3, np.int32)
  bad = [({"tokens": np.array([1, -1, 2]), "loss_mask": mask}, None,
          r"token id -1 at position 1, outside the vocabulary \[0, 2147483648\) of int32 ids"),
         ({"tokens": np.array([1, 2, 2 ** 32 + 5]), "loss_mask": mask}, None,
          r"token id 4294967301 at position 2"),
         ({"tokens": np.array([1, 16, 2]), "loss_mask": mask}, 16,
          r"token id 16 at position 1, outside the vocabulary \[0, 16\)(?! of)"),
         ({"tokens": np.array([1.0, 2.5, 3.0]), "loss_mask": mask}, None,
          r"tokens of dtype float64; token ids must be integers")]
  for example, vocab_size, match in bad:
    with pytest.raises(DataError, match=r"batch_examples: an example has " + match):
      list(batch_examples(_examples(ok, example), batch_size=2, seq_len=8, pack=pack,
                          vocab_size=vocab_size))
  batch = next(iter(batch_examples(_examples(ok, dict(ok, tokens=np.array([0, 15, 3]))),
                                   batch_size=2, seq_len=8, pack=pack, vocab_size=16)))
  assert batch["tokens"].max() == 15
  with pytest.raises(ValueError, match="vocab_size must be a positive integer, got 0"):
    batch_examples(_examples(ok), batch_size=2, seq_len=8, pack=pack, vocab_size=0)
