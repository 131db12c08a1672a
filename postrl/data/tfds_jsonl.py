"""A TFDS dataset from local JSONL files of one record schema, stored as array_record.

``jsonl_builder(name, schema, splits, data_dir=...)`` returns a ``tfds.core.GeneratorBasedBuilder``
whose ``download_and_prepare()`` validates every line (``read_jsonl``) and writes the splits with
``file_format="array_record"``; read them back with ``builder.as_data_source()`` or
``tfds.data_source(name, data_dir=...)``, and turn TFDS examples into records with ``TfdsRecords``.

Works without TensorFlow (tensorflow-datasets 4.9): features are ``tfds.features.Text`` and
``tfds.features.Sequence`` of them, which encode to UTF-8 bytes with numpy alone, and the info is
built with ``tfds.core.DatasetInfo(builder=self, ...)`` (``dataset_info_from_configs`` looks for
a package directory with metadata files, which a builder made at run time does not have).
Strings come back from a data source as ``bytes``. ``disable_shuffling=True`` keeps each split in
file order (example i is line i of the valid lines).

Optional fields (``SFTRecord``'s two forms) are stored as ``""`` / ``[]``: a record with
messages is read back in the chat form, any other in the prompt/completion form.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from typing import Any, Mapping, Sequence

from postrl.data.records import DataError, SFTRecord, parse_record, read_jsonl, schema_class

_LIST_FIELDS = {"responses"}  # fields holding a list of strings


def _features(cls: type):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  features = {}
  for f in dataclasses.fields(cls):
    if f.name == "messages":
      features[f.name] = tfds.features.Sequence(
          {"role": tfds.features.Text(), "content": tfds.features.Text()})
    elif f.name in _LIST_FIELDS:
      features[f.name] = tfds.features.Sequence(tfds.features.Text())
    else:
      features[f.name] = tfds.features.Text()
  return tfds.features.FeaturesDict(features)


def to_tfds_example(record) -> dict:
  """A record -> the feature dict ``jsonl_builder`` writes (None fields as "" / [])."""
  example = {}
  for f in dataclasses.fields(record):
    value = getattr(record, f.name)
    if f.name == "messages":
      example[f.name] = [m.to_json() for m in value or ()]
    elif f.name in _LIST_FIELDS:
      example[f.name] = list(value)
    else:
      example[f.name] = "" if value is None else value
  return example


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def from_tfds_example(example: Mapping[str, Any], schema: str | type):
  """A TFDS example (as a data source returns it: bytes, messages as a dict of lists) -> a record
  of ``schema``."""
  cls = schema_class(schema)
  obj = {}
  for f in dataclasses.fields(cls):
    value = example[f.name]
    if f.name == "messages":
      obj[f.name] = [{"role": _text(r), "content": _text(c)}
                     for r, c in zip(value["role"], value["content"])]
    elif f.name in _LIST_FIELDS:
      obj[f.name] = [_text(v) for v in value]
    else:
      obj[f.name] = _text(value)
  if cls is SFTRecord:
    obj = ({"messages": obj["messages"]} if obj["messages"]
           else {"prompt": obj["prompt"], "completion": obj["completion"]})
  return parse_record(obj, cls)


class _JsonlBuilder:
  """Mixed into the generated ``GeneratorBasedBuilder``; the class attributes are set by
  ``jsonl_builder``."""

  _schema: type = SFTRecord
  _splits: dict[str, str] = {}
  _skip_malformed: bool = False

  def _info(self):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    return tfds.core.DatasetInfo(
        builder=self, description=f"{self._schema.__name__} records from local JSONL files "
        f"({', '.join(f'{k}: {v}' for k, v in self._splits.items())})",
        features=_features(self._schema), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # local files: nothing to download
    return {split: self._generate_examples(path) for split, path in self._splits.items()}

  def _generate_examples(self, path):
    records, _ = read_jsonl(path, self._schema, skip_malformed=self._skip_malformed)
    for i, r in enumerate(records):
      yield i, to_tfds_example(r)


def jsonl_builder(name: str, schema: str | type, splits: Mapping[str, str | os.PathLike] | str, *,
                  data_dir: str | os.PathLike, version: str = "1.0.0",
                  skip_malformed: bool = False):
  """A TFDS builder for local JSONL files of one record schema, written as array_record.

  Args:
    name: the dataset name (snake_case): its directory under ``data_dir`` and the name for
      ``tfds.data_source(name, data_dir=data_dir)``.
    schema: a name in ``SCHEMAS`` or a record class.
    splits: ``{"train": path, "test": path}``, or one path for a "train" split.
    data_dir: where the prepared dataset is written.
    version: the dataset version ("1.0.0"); a new version for new data.
    skip_malformed: skip malformed lines (see ``read_jsonl``) instead of failing.

  Returns:
    A ``tfds.core.GeneratorBasedBuilder`` instance (not registered in TFDS's global registry).
    Call ``download_and_prepare()`` once, then ``as_data_source()`` -> ``{split: source}``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"dataset name must be snake_case ([a-z][a-z0-9_]*), got {name!r}")
  cls = schema_class(schema)
  if isinstance(splits, (str, os.PathLike)):
    splits = {"train": splits}
  splits = {k: os.fspath(v) for k, v in splits.items()}
  for path in splits.values():
    if not os.path.exists(path):
      raise DataError(f"{path}: no such file")
  class_name = "".join(part.title() for part in name.split("_")) or "Jsonl"
  attributes = {"name": name, "VERSION": tfds.core.Version(version),
                "RELEASE_NOTES": {version: "Local JSONL."}, "_schema": cls, "_splits": splits,
                "_skip_malformed": skip_malformed, "__module__": __name__,
                # No code directory (no checksums file to look up). TFDS's own lookup for a
                # module of a package imports the `importlib_resources` backport, absent here.
                "code_path": None}
  builder_cls = types.new_class(class_name, (_JsonlBuilder, tfds.core.GeneratorBasedBuilder),
                                {"skip_registration": True},
                                lambda ns: ns.update(attributes))
  return builder_cls(data_dir=os.fspath(data_dir), file_format="array_record")


class TfdsRecords:
  """Records from a TFDS data source (``builder.as_data_source()[split]`` or
  ``tfds.data_source(...)[split]``): ``len`` and ``[i]`` give records of ``schema``, so it can be
  passed straight to ``sft_batches`` / ``grain.MapDataset.source``."""

  def __init__(self, source: Sequence, schema: str | type):
    self.source, self.schema = source, schema_class(schema)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    return from_tfds_example(self.source[index], self.schema)

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

