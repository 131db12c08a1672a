"""TFDS builder for local JSONL: prepared as array_record and read back, without TensorFlow."""

import sys

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

# pylint: disable=wrong-import-position
from postrl.data import (DataError, PreferenceRecord, Problem, RankingRecord, SFTRecord, read_jsonl,
                         sft_batches, write_jsonl)
from postrl.data.tfds_jsonl import TfdsRecords, jsonl_builder

RECORDS = {
    "sft": [SFTRecord(prompt=f"p{i} é", completion=f"c{i}") for i in range(5)]
           + [SFTRecord(messages=[{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "yo"}]),
              SFTRecord(prompt="", completion="empty prompt")],
    "preference": [PreferenceRecord(f"p{i}", "good", "bad") for i in range(4)],
    "ranking": [RankingRecord("p", ("a", "b", "c")), RankingRecord("q", ("x", "y"))],
    "rl": [Problem(f"What is {i} + 1?", str(i + 1)) for i in range(6)],
}


@pytest.fixture(autouse=True, scope="module")
def _quiet():
  tfds.disable_progress_bar()


@pytest.mark.parametrize("schema", sorted(RECORDS))
def test_round_trip(tmp_path, schema):
  train, test = str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")
  write_jsonl(train, RECORDS[schema])
  write_jsonl(test, RECORDS[schema][:2])
  name = f"local_{schema}"
  builder = jsonl_builder(name, schema, {"train": train, "test": test}, data_dir=tmp_path / "tfds")
  builder.download_and_prepare()
  sources = builder.as_data_source()
  assert list(TfdsRecords(sources["train"], schema)) == RECORDS[schema]  # file order kept
  assert list(TfdsRecords(sources["test"], schema)) == RECORDS[schema][:2]
  by_name = tfds.data_source(name, data_dir=str(tmp_path / "tfds"))  # from the files alone
  assert list(TfdsRecords(by_name["train"], schema)) == RECORDS[schema]
  assert "tensorflow" not in sys.modules


def test_feeds_the_pipeline_and_skips_malformed(tmp_path, fake_tokenizer):
  path = tmp_path / "train.jsonl"
  write_jsonl(str(path), RECORDS["sft"])
  with open(path, "a") as f:
    f.write('{"prompt": 3, "completion": "x"}\n')
  with pytest.raises(DataError, match=r"train.jsonl:8: field 'prompt'"):
    jsonl_builder("bad_sft", "sft", str(path), data_dir=tmp_path / "tfds").download_and_prepare()
  builder = jsonl_builder("ok_sft", "sft", str(path), data_dir=tmp_path / "tfds",
                          skip_malformed=True)
  builder.download_and_prepare()
  records = TfdsRecords(builder.as_data_source()["train"], "sft")
  assert list(records) == read_jsonl(str(path), "sft", skip_malformed=True)[0]
  batch = next(sft_batches(records, fake_tokenizer, batch_size=2, seq_len=64, seed=0,
                           shard_index=0, shard_count=1))
  assert batch["tokens"].shape == (2, 64)


def test_bad_arguments(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    jsonl_builder("x", "rl", str(tmp_path / "missing.jsonl"), data_dir=tmp_path)
  with pytest.raises(ValueError, match="snake_case"):
    jsonl_builder("My-Data", "rl", str(tmp_path / "missing.jsonl"), data_dir=tmp_path)
