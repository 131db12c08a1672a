"""Record schemas, JSONL reading with precise errors, and array_record files.

One frozen dataclass per kind of post-training data; a JSONL line is ``record.to_json()``:

  ``SFTRecord``         {"prompt": str, "completion": str}
                        or {"messages": [{"role": str, "content": str}, ...]}
                        (chat form: the last message is the assistant's, the one trained on)
  ``PreferenceRecord``  {"prompt": str, "chosen": str, "rejected": str}
  ``RankingRecord``     {"prompt": str, "responses": [str, ...]}  (K >= 2, best first)
  ``Problem``           {"prompt": str, "answer": str}  (RL prompts with a reference answer)

``SCHEMAS`` maps a schema name to its class. ``read_jsonl`` validates every line and raises a
``DataError`` that names the file, the 1-based line and the field
(``data/train.jsonl:17: field 'chosen': expected a string, got int``); unknown fields are errors
too, so a typo (``"complet1on"``) never silently becomes an empty field, and so is a key given
twice in one object (``{"prompt": "a", "prompt": "b"}``, which ``json.loads`` would silently read
as its last value).

``write_array_record`` stores the same JSON, one record per array_record entry, and
``ArrayRecordRecords`` reads it back as a random-access, grain-compatible source of records.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, ClassVar, Iterable, Sequence


class DataError(ValueError):
  """Malformed data: the message names the file, the 1-based line and the field where known."""


class FieldError(ValueError):
  """A record field with a wrong type or value; ``str(e)`` is ``field 'name': problem``."""

  def __init__(self, field: str, problem: str):
    super().__init__(f"field {field!r}: {problem}")
    self.field, self.problem = field, problem


def _json_type(value: Any) -> str:
  if value is None:
    return "null"
  return {bool: "bool", int: "int", float: "float", str: "string", list: "list",
          dict: "object"}.get(type(value), type(value).__name__)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_str(value: Any, field: str) -> str:
  if not isinstance(value, str):
    raise FieldError(field, f"expected a string, got {_json_type(value)}")
  bad = _SURROGATE.search(value)
  if bad:  # JSON's "\ud83d" escape alone (an emoji cut in half): no tokenizer can encode it
    raise FieldError(field, f"invalid Unicode: a lone surrogate U+{ord(bad.group()):04X} at "
                     f"character {bad.start()}")
  return value


def _check_strs(value: Any, field: str) -> tuple[str, ...]:
  if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
    raise FieldError(field, f"expected a list of strings, got {_json_type(value)}")
  return tuple(_check_str(v, f"{field}[{i}]") for i, v in enumerate(value))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
  """``json.loads``'s ``object_pairs_hook``: the object as a dict, or a ``ValueError`` naming a
  key given twice (plain ``json.loads`` keeps the last value without a word)."""
  out = {}
  for key, value in pairs:
    if key in out:
      raise ValueError(f"duplicate key {key!r} (given twice in one JSON object: which value "
                       f"is meant is ambiguous)")
    out[key] = value
  return out


def _loads(text: str) -> Any:
  """``json.loads`` refusing duplicate keys (a ``ValueError`` naming the key)."""
  return json.loads(text, object_pairs_hook=_no_duplicate_keys)


def _check_object_keys(obj: Any, required: Sequence[str], optional: Sequence[str] = (),
                       where: str = "") -> None:
  """Raises if ``obj`` is not a dict, lacks a required key or has a key outside the schema."""
  if not isinstance(obj, dict):
    if where:
      raise FieldError(where, f"expected an object, got {_json_type(obj)}")
    raise ValueError(f"expected a JSON object, got {_json_type(obj)}")
  prefix = f"{where}." if where else ""
  for key in required:
    if key not in obj:
      raise ValueError(f"missing field {prefix + key!r}")
  unknown = [k for k in obj if k not in required and k not in optional]
  if unknown:
    names = ", ".join(repr(prefix + str(k)) for k in unknown)
    allowed = ", ".join(list(required) + list(optional))
    raise ValueError(f"unknown field{'s' if len(unknown) > 1 else ''} {names} "
                     f"(expected {allowed})")


# The roles a chat record may use: every template renders these, and the loss mask (the last
# assistant turn) is defined in their terms.
CHAT_ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Message:
  """One chat turn: ``role`` (one of ``CHAT_ROLES`` in an ``SFTRecord``) and ``content``."""

  role: str
  content: str

  def __post_init__(self):
    _check_str(self.role, "role")
    _check_str(self.content, "content")

  def to_json(self) -> dict:
    return {"role": self.role, "content": self.content}


def _messages(value: Any, field: str = "messages") -> tuple[Message, ...]:
  """A list of ``Message`` or ``{"role", "content"}`` dicts -> tuple of ``Message``."""
  if not isinstance(value, (list, tuple)):
    raise FieldError(field, f"expected a list of messages, got {_json_type(value)}")
  out = []
  for i, m in enumerate(value):
    where = f"{field}[{i}]"
    if isinstance(m, Message):
      out.append(m)
      continue
    _check_object_keys(m, ("role", "content"), where=where)
    try:
      out.append(Message(m["role"], m["content"]))
    except FieldError as e:
      raise FieldError(f"{where}.{e.field}", e.problem) from None
  return tuple(out)


class _Record:
  """JSON conversion shared by the record classes (each a frozen dataclass)."""

  _REQUIRED: ClassVar[tuple[str, ...]] = ()
  _OPTIONAL: ClassVar[tuple[str, ...]] = ()

  @classmethod
  def from_json(cls, obj: Any):
    """A parsed JSON object -> record. Raises ``ValueError`` naming the field on any mismatch."""
    _check_object_keys(obj, cls._REQUIRED, cls._OPTIONAL)
    return cls(**obj)

  def to_json(self) -> dict:
    """The JSON object of one JSONL line (fields that are None are left out)."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if value is None:
        continue
      if isinstance(value, tuple):
        value = [v.to_json() if isinstance(v, Message) else v for v in value]
      out[f.name] = value
    return out


@dataclasses.dataclass(frozen=True)
class SFTRecord(_Record):
  """A supervised example: ``prompt`` + ``completion`` strings, or chat ``messages``.

  Exactly one form is given. In the chat form the last message has role "assistant" and is the
  completion; all earlier messages (system, user, earlier assistant turns) are the prompt.

  Refused in the chat form, because the example would silently not be the conversation meant:
  a role other than "system", "user" and "assistant" (ChatML renders "human" / "gpt" as literal
  headers the model never sees at inference, and templates such as Qwen2's skip unknown roles
  without a word); a "system" message that is not the first (templates that look for it at
  ``messages[0]`` add their default system prompt in front of it, others refuse it mid-way);
  and two consecutive messages with the same role (a reply split in two would be trained on its
  second half only, with the first half as context; templates that assume user / assistant
  alternation raise from inside Jinja). Empty contents are kept: an empty reply is a valid (if
  rare) target, as an empty ``completion`` is.
  """

  prompt: str | None = None
  completion: str | None = None
  messages: tuple[Message, ...] | None = None

  def __post_init__(self):
    if self.messages is not None:
      if self.prompt is not None or self.completion is not None:
        raise FieldError("messages", "give either 'messages' or 'prompt' and 'completion', "
                         "not both")
      msgs = _messages(self.messages)
      if not msgs:
        raise FieldError("messages", "expected at least one message")
      for i, m in enumerate(msgs):
        if m.role not in CHAT_ROLES:
          raise FieldError(f"messages[{i}].role", f"unknown role {m.role!r} (expected one of "
                           f"{', '.join(map(repr, CHAT_ROLES))})")
        if m.role == "system" and i > 0:
          raise FieldError(f"messages[{i}].role", "a 'system' message must be the first message")
        if i > 0 and m.role == msgs[i - 1].role:
          raise FieldError(f"messages[{i}].role", f"two consecutive {m.role!r} messages "
                           f"(messages[{i - 1}] and messages[{i}]): user and assistant turns "
                           f"must alternate (merge the two into one message)")
      if msgs[-1].role != "assistant":
        raise FieldError(f"messages[{len(msgs) - 1}].role",
                         f"the last message must be the assistant's, got {msgs[-1].role!r}")
      object.__setattr__(self, "messages", msgs)
      return
    if self.prompt is None and self.completion is None:
      raise ValueError("missing field 'messages' (or 'prompt' and 'completion')")
    for name in ("prompt", "completion"):
      if getattr(self, name) is None:
        raise ValueError(f"missing field {name!r}")
      _check_str(getattr(self, name), name)

  @classmethod
  def from_json(cls, obj: Any) -> SFTRecord:
    _check_object_keys(obj, (), ("prompt", "completion", "messages"))
    return cls(**obj)

  @property
  def is_chat(self) -> bool:
    return self.messages is not None

  def chat_messages(self) -> list[dict]:
    """The record as ``[{"role", "content"}, ...]``; the prompt/completion form becomes one user
    turn and one assistant turn."""
    if self.messages is not None:
      return [m.to_json() for m in self.messages]
    return [{"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.completion}]


@dataclasses.dataclass(frozen=True)
class PreferenceRecord(_Record):
  """A preference pair: ``chosen`` is preferred over ``rejected`` as a reply to ``prompt``."""

  prompt: str
  chosen: str
  rejected: str
  _REQUIRED: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected")

  def __post_init__(self):
    for name in self._REQUIRED:
      _check_str(getattr(self, name), name)


@dataclasses.dataclass(frozen=True)
class RankingRecord(_Record):
  """K >= 2 ``responses`` to ``prompt``, best first (the input of Plackett-Luce / listwise DPO)."""

  prompt: str
  responses: tuple[str, ...]
  _REQUIRED: ClassVar[tuple[str, ...]] = ("prompt", "responses")

  def __post_init__(self):
    _check_str(self.prompt, "prompt")
    responses = _check_strs(self.responses, "responses")
    if len(responses) < 2:
      raise FieldError("responses", f"expected at least 2 responses, got {len(responses)}")
    object.__setattr__(self, "responses", responses)


@dataclasses.dataclass(frozen=True)
class Problem(_Record):
  """A prompt with a reference answer (RL with verifiable rewards, evaluation)."""

  prompt: str
  answer: str
  _REQUIRED: ClassVar[tuple[str, ...]] = ("prompt", "answer")

  def __post_init__(self):
    _check_str(self.prompt, "prompt")
    _check_str(self.answer, "answer")


SCHEMAS: dict[str, type] = {
    "sft": SFTRecord,
    "preference": PreferenceRecord,
    "ranking": RankingRecord,
    "rl": Problem,
}


def schema_class(schema: str | type) -> type:
  """A schema name from ``SCHEMAS`` or a record class -> the record class."""
  if isinstance(schema, str):
    if schema not in SCHEMAS:
      raise ValueError(f"unknown schema {schema!r}; known: {sorted(SCHEMAS)}")
    return SCHEMAS[schema]
  if schema not in SCHEMAS.values():
    raise ValueError(f"{schema!r} is not a record class; known: {sorted(SCHEMAS)}")
  return schema


def parse_record(obj: Any, schema: str | type):
  """A parsed JSON value -> a record of ``schema``; ``ValueError`` naming the field if malformed."""
  cls = schema_class(schema)
  try:
    return cls.from_json(obj)
  except TypeError as e:  # an unexpected keyword that slipped past the key check
    raise ValueError(str(e)) from None


# --------------------------------------------------------------------------------------- JSONL


def read_jsonl(path: str | os.PathLike, schema: str | type, *,
               skip_malformed: bool = False) -> tuple[list, int]:
  """Reads a JSONL file of one schema; blank lines are ignored.

  Args:
    path: the file; each non-blank line one JSON object.
    schema: a name in ``SCHEMAS`` ("sft", "preference", "ranking", "rl") or a record class.
    skip_malformed: skip (and count) lines that are not valid JSON or do not match the schema,
      instead of raising on the first.

  Returns:
    ``(records, num_skipped)``.

  Raises:
    DataError: the file is missing or holds no valid record, or (unless ``skip_malformed``) a
      line is malformed: ``path:LINE: field 'x': expected a string, got int``.
  """
  cls = schema_class(schema)
  return _read_json_lines(path, lambda obj: parse_record(obj, cls),
                          skip_malformed=skip_malformed)


def _read_json_lines(path: str | os.PathLike, parse, *,
                     skip_malformed: bool = False) -> tuple[list, int]:
  """``read_jsonl`` with any ``parse(json_value) -> record`` that raises ``ValueError`` naming
  the field (e.g. ``StepRecord.from_json``); the same errors, UTF-8 handling and skipping."""
  path = os.fspath(path)
  try:
    f = open(path, "rb")  # decoded line by line, so a bad byte is reported with its line
  except FileNotFoundError:
    raise DataError(f"{path}: no such file") from None
  except IsADirectoryError:
    raise DataError(f"{path}: is a directory, not a JSONL file") from None
  except OSError as e:  # permission denied, a name too long, ...
    raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
  records, skipped, first_error = [], 0, None
  with f:
    for lineno, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        try:
          line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
          raise ValueError(f"invalid UTF-8 (byte {e.start + 1}: {e.reason})") from None
        try:
          obj = _loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
        records.append(parse(obj))
      except ValueError as e:
        error = DataError(f"{path}:{lineno}: {e}")
        if not skip_malformed:
          raise error from None
        skipped += 1
        first_error = first_error or error
  if not records:
    if skipped:
      raise DataError(f"{path}: no valid records ({skipped} malformed line"
                      f"{'s' if skipped > 1 else ''} skipped; first: {first_error})")
    raise DataError(f"{path}: no records (the file is empty)")
  return records, skipped


def _atomic_write(path: str, write_fn) -> None:
  """Calls ``write_fn(tmp_path)`` and renames the result to ``path`` (readers never see half a
  file; a failed write leaves no file behind)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  try:
    write_fn(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_jsonl(path: str | os.PathLike, records: Iterable) -> int:
  """Writes records (``to_json()`` of each) one per line, atomically; returns how many."""
  path = os.fspath(path)
  count = 0

  def write(tmp):
    nonlocal count
    with open(tmp, "w", encoding="utf-8") as f:
      for r in records:
        f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        count += 1

  _atomic_write(path, write)
  return count


# -------------------------------------------------------------------------------- array_record


def write_array_record(path: str | os.PathLike, records: Iterable) -> int:
  """Writes records as UTF-8 JSON bytes (``to_json()``), one per array_record entry, atomically
  (a temporary file renamed with ``os.replace``). Returns the number written.

  ``group_size:1`` keeps every record individually addressable, which random access (grain's
  global shuffle) needs.
  """
  # pylint: disable-next=import-outside-toplevel
  from array_record.python.array_record_module import ArrayRecordWriter
  path = os.fspath(path)
  count = 0

  def write(tmp):
    nonlocal count
    writer = ArrayRecordWriter(tmp, "group_size:1")
    try:
      for r in records:
        writer.write(json.dumps(r.to_json(), ensure_ascii=False).encode("utf-8"))
        count += 1
    finally:
      writer.close()

  _atomic_write(path, write)
  return count


class ArrayRecordRecords:
  """Random-access records from array_record files written by ``write_array_record``.

  A grain data source (``len`` and ``[i]``; pass it to ``grain.MapDataset.source`` or straight to
  ``sft_batches``); reading goes through ``grain.sources.ArrayRecordDataSource``, and each entry
  is parsed and validated into the ``schema``'s record class.

  Args:
    paths: one file or a list of files (read in order, as one sequence).
    schema: a name in ``SCHEMAS`` or a record class.
  """

  def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], schema: str | type):
    import grain  # pylint: disable=import-outside-toplevel
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    self.paths = [os.fspath(p) for p in paths]
    for p in self.paths:
      if not os.path.exists(p):
        raise DataError(f"{p}: no such file")
      if os.path.isdir(p):
        raise DataError(f"{p}: is a directory, not an array_record file")
    self.schema = schema_class(schema)
    try:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    except RuntimeError:  # array_record's reader names neither the file nor, often, the problem
      for p in self.paths:
        try:
          grain.sources.ArrayRecordDataSource([p])
        except RuntimeError as e:
          raise DataError(f"{p}: not a readable array_record file (write_array_record writes "
                          f"one): {e}") from None
      raise

  def __len__(self) -> int:
    return len(self._source)

  def _where(self, index: int) -> str:
    """``path: record i`` (0-based within that file) of global record ``index``."""
    import grain  # pylint: disable=import-outside-toplevel
    for path in self.paths:
      n = len(grain.sources.ArrayRecordDataSource([path]))
      if index < n:
        return f"{path}: record {index}"
      index -= n
    return f"{self.paths[-1]}: record {index}"

  def _parse(self, index: int, raw: bytes):
    try:
      return parse_record(_loads(raw.decode("utf-8")), self.schema)
    except (ValueError, UnicodeDecodeError) as e:
      raise DataError(f"{self._where(index)}: {e}") from None

  def __getitem__(self, index: int):
    if not -len(self) <= index < len(self):
      raise IndexError(f"record {index} out of range for {len(self)} records")
    index = index % len(self)
    return self._parse(index, self._source[index])

  def __getitems__(self, indices: Sequence[int]) -> list:
    return [self._parse(i, raw) for i, raw in zip(indices, self._source.__getitems__(indices))]

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def __repr__(self) -> str:
    return f"ArrayRecordRecords({self.paths!r}, schema={self.schema.__name__}, len={len(self)})"
