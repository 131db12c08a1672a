"""Record schemas: errors name file, line and field; JSONL and array_record round trips."""

import json
import os

import grain
import pytest

from postrl.data import (SCHEMAS, ArrayRecordRecords, DataError, Message, PreferenceRecord,
                         Problem, RankingRecord, SFTRecord, read_jsonl, write_array_record,
                         write_jsonl)

EXAMPLES = {
    "sft": [SFTRecord(prompt="What is 1 + 2?", completion="1 + 2 = 3"),
            SFTRecord(messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi é ✓"},
                                {"role": "assistant", "content": "Hello."}])],
    "preference": [PreferenceRecord("p", "good", "bad"), PreferenceRecord("q", "", "x")],
    "ranking": [RankingRecord("p", ("a", "b", "c")), RankingRecord("q", ["x", "y"])],
    "rl": [Problem("What is 2 + 2?", "4"), Problem("p", "-1")],
}


def _write(tmp_path, lines, name="train.jsonl"):
  path = tmp_path / name
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def test_schemas_registry():
  assert SCHEMAS == {"sft": SFTRecord, "preference": PreferenceRecord, "ranking": RankingRecord,
                     "rl": Problem}


@pytest.mark.parametrize("schema", sorted(EXAMPLES))
def test_jsonl_round_trip(tmp_path, schema):
  path = str(tmp_path / "data.jsonl")
  assert write_jsonl(path, EXAMPLES[schema]) == len(EXAMPLES[schema])
  records, skipped = read_jsonl(path, schema)
  assert records == EXAMPLES[schema] and skipped == 0
  assert read_jsonl(path, SCHEMAS[schema])[0] == records  # a class works as well as a name


BAD_LINES = [
    ("preference", '{"prompt": "p", "chosen": 3, "rejected": "r"}',
     "field 'chosen': expected a string, got int"),
    ("preference", '{"prompt": "p", "chosen": "c"}', "missing field 'rejected'"),
    ("preference", '{"prompt": "p", "chosen": "c", "rejected": "r", "score": 1, "id": 2}',
     "unknown fields 'score', 'id'"),
    ("rl", '{"prompt": "p", "answer": null}', "field 'answer': expected a string, got null"),
    ("rl", '{"prompt": "p", "answer": "1", "extra": 0}', "unknown field 'extra'"),
    ("rl", '{"prompt": "p", "answer": ', "invalid JSON"),
    ("rl", '[1, 2]', "expected a JSON object, got list"),
    ("ranking", '{"prompt": "p", "responses": ["a"]}',
     "field 'responses': expected at least 2 responses, got 1"),
    ("ranking", '{"prompt": "p", "responses": ["a", 2]}',
     "field 'responses[1]': expected a string, got int"),
    ("ranking", '{"prompt": "p", "responses": "ab"}',
     "field 'responses': expected a list of strings, got string"),
    ("sft", '{"prompt": "p"}', "missing field 'completion'"),
    ("sft", '{"completion": 1.5, "prompt": "p"}',
     "field 'completion': expected a string, got float"),
    ("sft", '{}', "missing field 'messages' (or 'prompt' and 'completion')"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}]}',
     "field 'messages[0].role': the last message must be the assistant's, got 'user'"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}',
     "missing field 'messages[1].content'"),
    ("sft", '{"messages": [{"role": "assistant", "content": true}]}',
     "field 'messages[0].content': expected a string, got bool"),
    ("sft", '{"messages": [{"role": "assistant", "content": "x", "name": "bot"}]}',
     "unknown field 'messages[0].name'"),
    ("sft", '{"messages": ["hi"]}', "field 'messages[0]': expected an object, got string"),
    ("sft", '{"messages": []}', "field 'messages': expected at least one message"),
    ("sft", '{"prompt": "p", "completion": "c", '
            '"messages": [{"role": "assistant", "content": "x"}]}',
     "field 'messages': give either 'messages' or 'prompt' and 'completion', not both"),
    # json.loads keeps the last of a repeated key: these were silently the prompt "b" / reply "y"
    ("rl", '{"prompt": "a", "answer": "1", "prompt": "b"}',
     "duplicate key 'prompt' (given twice in one JSON object"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}, '
            '{"role": "assistant", "content": "x", "content": "y"}]}', "duplicate key 'content'"),
    # conversations that would not be the example meant: ChatML renders "human" as a literal
    # header (Qwen2's template drops it), a late system prompt follows a template's default one,
    # and a reply split in two is trained on its second half only
    ("sft", '{"messages": [{"role": "human", "content": "hi"}, '
            '{"role": "assistant", "content": "yo"}]}',
     "field 'messages[0].role': unknown role 'human' (expected one of 'system', 'user', "
     "'assistant')"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}, '
            '{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "yo"}]}',
     "field 'messages[1].role': a 'system' message must be the first message"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}, '
            '{"role": "assistant", "content": "The answer"}, '
            '{"role": "assistant", "content": " is 4."}]}',
     "field 'messages[2].role': two consecutive 'assistant' messages (messages[1] and "
     "messages[2]): user and assistant turns must alternate"),
    ("sft", '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, '
            '{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}',
     "field 'messages[2].role': two consecutive 'user' messages"),
]


@pytest.mark.parametrize("schema,line,message", BAD_LINES)
def test_errors_name_file_line_and_field(tmp_path, schema, line, message):
  good = json.dumps(EXAMPLES[schema][0].to_json())
  path = _write(tmp_path, [good, "", good, line, good])  # the blank line still counts: line 4
  with pytest.raises(DataError) as e:
    read_jsonl(path, schema)
  assert str(e.value).startswith(f"{path}:4: ")
  assert message in str(e.value)


@pytest.mark.parametrize("schema,line,message", BAD_LINES)
def test_skip_malformed_counts(tmp_path, schema, line, message):
  del message
  good = json.dumps(EXAMPLES[schema][1].to_json())
  path = _write(tmp_path, [line, good, line, line, good])
  records, skipped = read_jsonl(path, schema, skip_malformed=True)
  assert records == [EXAMPLES[schema][1]] * 2 and skipped == 3


def test_chat_records_that_stay_valid():
  # a multi-turn conversation and empty contents (an empty reply, like an empty completion)
  SFTRecord(messages=[Message("system", ""), Message("user", "a"), Message("assistant", "b"),
                      Message("user", "c"), Message("assistant", "")])
  SFTRecord(messages=[Message("assistant", "unconditional")])
  with pytest.raises(ValueError, match=r"messages\[1\].role': unknown role 'Assistant'"):
    SFTRecord(messages=[Message("user", "a"), Message("Assistant", "b")])  # built directly too


def test_encoding_errors_name_the_line(tmp_path):
  path = tmp_path / "bom.jsonl"
  good = json.dumps(EXAMPLES["rl"][0].to_json()).encode()
  path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good[:-2] + b"\xff\"}\n")  # BOM is fine
  with pytest.raises(DataError, match=rf"{path}:2: invalid UTF-8 \(byte {len(good) - 1}: "):
    read_jsonl(str(path), "rl")
  assert read_jsonl(str(path), "rl", skip_malformed=True) == ([EXAMPLES["rl"][0]], 1)


def test_nothing_valid_left_is_an_error(tmp_path):
  path = _write(tmp_path, ['{"prompt": 1, "answer": "2"}', "not json"])
  with pytest.raises(DataError, match=r"no valid records \(2 malformed lines skipped; first: .*:1: "
                                      r"field 'prompt'"):
    read_jsonl(path, "rl", skip_malformed=True)


def test_missing_and_empty_files(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(DataError, match=f"{missing}: no such file"):
    read_jsonl(missing, "sft")
  for name, content in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")]:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=f"{path}: no records"):
      read_jsonl(str(path), "sft", skip_malformed=True)
  with pytest.raises(ValueError, match="unknown schema 'dpo'"):
    read_jsonl(missing, "dpo")


def test_direct_construction_is_validated():
  with pytest.raises(ValueError, match="missing field 'completion'"):
    SFTRecord(prompt="p")
  with pytest.raises(ValueError, match="field 'chosen': expected a string, got int"):
    PreferenceRecord("p", 1, "r")
  record = SFTRecord(messages=[Message("user", "a"), {"role": "assistant", "content": "b"}])
  assert record.messages == (Message("user", "a"), Message("assistant", "b"))
  assert record.chat_messages() == [{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}]
  assert SFTRecord(prompt="a", completion="b").chat_messages() == record.chat_messages()
  assert hash(record) == hash(SFTRecord.from_json(record.to_json()))


@pytest.mark.parametrize("schema", sorted(EXAMPLES))
def test_array_record_round_trip(tmp_path, schema):
  path = str(tmp_path / "sub" / "data.array_record")
  records = EXAMPLES[schema] * 3
  assert write_array_record(path, records) == len(records)
  assert sorted(os.listdir(tmp_path / "sub")) == ["data.array_record"]  # no temp file left
  source = ArrayRecordRecords(path, schema)
  assert len(source) == len(records) and list(source) == records
  assert source[-1] == records[-1]
  assert list(grain.MapDataset.source(source)) == records  # a grain data source
  with pytest.raises(IndexError):
    source[len(records)]


def test_array_record_several_files_and_errors(tmp_path):
  a, b = str(tmp_path / "a.ar"), str(tmp_path / "b.ar")
  write_array_record(a, EXAMPLES["rl"])
  write_array_record(b, EXAMPLES["rl"][::-1])
  assert list(ArrayRecordRecords([a, b], "rl")) == EXAMPLES["rl"] + EXAMPLES["rl"][::-1]
  with pytest.raises(DataError, match="no such file"):
    ArrayRecordRecords(str(tmp_path / "missing.ar"), "rl")
  with pytest.raises(DataError, match=rf"{b}: record 1: missing field 'chosen'"):
    ArrayRecordRecords([a, b], "preference")[3]  # read with the wrong schema


def test_array_record_write_is_atomic(tmp_path):
  path = str(tmp_path / "data.ar")
  write_array_record(path, EXAMPLES["rl"])

  def failing():
    yield EXAMPLES["rl"][0]
    raise RuntimeError("disk on fire")

  with pytest.raises(RuntimeError, match="disk on fire"):
    write_array_record(path, failing())
  assert os.listdir(tmp_path) == ["data.ar"]
  assert list(ArrayRecordRecords(path, "rl")) == EXAMPLES["rl"]  # the old file, untouched
