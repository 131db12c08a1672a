"""grain input pipelines: records -> tokens with loss masks -> fixed-shape [B, T] batches.

A batch is a dict of int32 numpy arrays, all [B, T] (B = rows on this process):

  ``tokens``       token ids; padding is ``tokenizer.pad_id`` (0 if it has none)
  ``segment_ids``  0 on padding, 1, 2, 3, ... for the sequences packed into a row (1 unpacked)
  ``loss_mask``    1 where token t counts: the loss uses log p(tokens[t] | tokens[<t] of its
                   segment), aligned with ``tokens`` (``postrl.logprobs``); 0 on prompts/padding

The pipeline (``sft_dataset``), all deterministic and single-process (grain threads only prefetch):

  records -> global shuffle (seed; a new permutation every epoch) -> repeat(num_epochs)
          -> tokenize (``tokenize_sft``) -> pack first-fit into rows (or right-pad one per row)
          -> global batch (the last, short batch is filled with empty rows: tokens=pad, masks 0)
          -> this process's rows (process i of n keeps rows [i B/n, (i+1) B/n))

Every process builds the same global batch and keeps its own rows, so the global batch (packing
included) is the same whatever the number of processes, a run can resume on another number of
hosts, and all processes have the same iterator state (one state in the checkpoint). The cost:
each process tokenises and packs the whole stream, which is cheap next to a training step at the
sizes SFT data comes in; a sharded source for web-scale data is future work.
The returned iterator is grain's ``DatasetIterator``: ``get_state()`` is a small JSON-able dict
and ``set_state(state)`` resumes so that the following batches are exactly those of an
uninterrupted run (save it with the checkpoint).

Another record type gets its own ``tokenize_*`` function of the same shape and reuses
``batch_examples``.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from postrl.data.records import DataError, SFTRecord

_KEYS = ("tokens", "segment_ids", "loss_mask")


def _sft_ids(record: SFTRecord | Mapping, tokenizer, *, chat: bool) -> tuple[list[int], list[int]]:
  """Untruncated (ids, loss mask) of one SFT record; see ``tokenize_sft``."""
  if not isinstance(record, SFTRecord):
    record = SFTRecord.from_json(dict(record))
  eos = tokenizer.eos_id
  if eos is None:
    raise ValueError("tokenize_sft needs a tokenizer with an eos_id (the end-of-turn token)")
  if chat or record.is_chat:
    messages = record.chat_messages()
    prompt = list(tokenizer.encode_chat(messages[:-1], add_generation_prompt=True))
    full = list(tokenizer.encode_chat(messages, add_generation_prompt=False))
    if full[:len(prompt)] == prompt:
      completion = full[len(prompt):]
      # Keep the completion through its end-of-turn token; the template's text after it (ChatML's
      # "\n") is never generated, so it is not trained on.
      if eos in completion:
        completion = completion[:completion.index(eos) + 1]
      else:
        completion = completion + [eos]
    else:  # a template whose prompt does not prefix the conversation: encode the reply alone
      completion = list(tokenizer.encode(messages[-1]["content"], add_bos=False)) + [eos]
  else:
    prompt = list(tokenizer.encode(record.prompt))
    completion = list(tokenizer.encode(record.completion, add_bos=False)) + [eos]
  ids = prompt + completion
  mask = [0] * len(prompt) + [1] * len(completion)
  mask[0] = 0  # the first token of a sequence has no context to be predicted from
  return ids, mask


def tokenize_sft(record: SFTRecord | Mapping, tokenizer, *, max_len: int,
                 chat: bool = True) -> dict[str, np.ndarray]:
  """One SFT record -> ``{"tokens": int32[L], "loss_mask": int32[L]}``, L <= max_len.

  Chat (default, and always for ``messages`` records): the prompt is
  ``encode_chat(messages[:-1], add_generation_prompt=True)`` (every turn before the last, up to
  and including the assistant header) with mask 0; the completion is the rest of
  ``encode_chat(messages)`` through the end-of-turn token ``tokenizer.eos_id`` (ChatML's
  ``<|im_end|>``) with mask 1. A prompt/completion record is one user turn and one assistant
  turn. ``chat=False`` (plain LM): ``encode(prompt)`` (BOS as the tokenizer adds it) with mask 0,
  then ``encode(completion) + [eos]`` with mask 1. The first token never counts.

  Sequences longer than ``max_len`` keep their first ``max_len`` tokens (``sft_length_stats``
  counts how many are cut).

  Args:
    record: an ``SFTRecord`` (or its JSON dict).
    tokenizer: a ``postrl.models.Tokenizer`` (``encode``, ``encode_chat``, ``eos_id``).
    max_len: the longest output.
    chat: render prompt/completion records with the chat template.
  """
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  ids, mask = _sft_ids(record, tokenizer, chat=chat)
  return {"tokens": np.asarray(ids[:max_len], np.int32),
          "loss_mask": np.asarray(mask[:max_len], np.int32)}


def sft_length_stats(records: Sequence, tokenizer, *, max_len: int,
                     chat: bool = True) -> dict[str, float]:
  """Token-length statistics before truncation: ``num_records``, ``num_truncated`` (longer than
  ``max_len``), ``num_without_loss`` (no completion token left after truncation), ``max_length``,
  ``mean_length``, ``mean_completion_length``."""
  lengths, completions, truncated, without_loss = [], [], 0, 0
  for r in records:
    ids, mask = _sft_ids(r, tokenizer, chat=chat)
    lengths.append(len(ids))
    completions.append(sum(mask))
    truncated += len(ids) > max_len
    without_loss += sum(mask[:max_len]) == 0
  return {"num_records": len(lengths), "num_truncated": truncated,
          "num_without_loss": without_loss, "max_length": max(lengths, default=0),
          "mean_length": float(np.mean(lengths)) if lengths else 0.0,
          "mean_completion_length": float(np.mean(completions)) if completions else 0.0}


def _check_lengths(records: Sequence, tokenizer, *, seq_len: int, chat: bool, warn: bool) -> None:
  """``sft_length_stats`` before training: a ``DataError`` if a record keeps no completion token
  within ``seq_len`` (its prompt fills the row, so it would silently train on nothing), and a
  warning counting the records whose completion is cut."""
  stats = sft_length_stats(records, tokenizer, max_len=seq_len, chat=chat)
  if stats["num_without_loss"]:
    first = next(i for i, r in enumerate(records)
                 if not any(_sft_ids(r, tokenizer, chat=chat)[1][:seq_len]))
    where = (records._where(first) if hasattr(records, "_where")  # pylint: disable=protected-access
             else f"SFT record {first} (0-based)")
    ids, mask = _sft_ids(records[first], tokenizer, chat=chat)
    raise DataError(
        f"{where}: no completion token fits in seq_len={seq_len} (its prompt alone is "
        f"{len(ids) - sum(mask)} tokens; {stats['num_without_loss']} of {stats['num_records']} "
        f"records are like this): raise seq_len or shorten those prompts")
  if stats["num_truncated"] and warn:
    warnings.warn(f"{stats['num_truncated']} of {stats['num_records']} SFT records are longer "
                  f"than seq_len={seq_len} (the longest has {stats['max_length']} tokens): their "
                  f"completions are cut")


def _pad_example(example: Mapping[str, np.ndarray], *, seq_len: int, pad_id: int) -> dict:
  """One example right-padded to ``seq_len`` as a row with segment id 1 (0 on padding)."""
  n = len(example["tokens"])
  tokens = np.full((seq_len,), pad_id, np.int32)
  tokens[:n] = example["tokens"]
  segment_ids = np.zeros((seq_len,), np.int32)
  segment_ids[:n] = 1
  loss_mask = np.zeros((seq_len,), np.int32)
  loss_mask[:n] = example["loss_mask"]
  return {"tokens": tokens, "segment_ids": segment_ids, "loss_mask": loss_mask}


def _from_packed(row: Mapping[str, np.ndarray]) -> dict:
  """grain's packed row (``tokens``, ``tokens_segment_ids``, ...) -> the batch keys."""
  return {"tokens": np.asarray(row["tokens"], np.int32),
          "segment_ids": np.asarray(row["tokens_segment_ids"], np.int32),
          "loss_mask": np.asarray(row["loss_mask"], np.int32)}


def _stack_rows(rows: Sequence[Mapping[str, np.ndarray]], *, batch_size: int, seq_len: int,
                pad_id: int) -> dict:
  """Stacks rows into [batch_size, seq_len], filling a short final batch with empty rows."""
  out = {}
  for key in _KEYS:
    fill = pad_id if key == "tokens" else 0
    array = np.full((batch_size, seq_len), fill, np.int32)
    array[:len(rows)] = np.stack([r[key] for r in rows])
    out[key] = array
  return out


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  import jax  # pylint: disable=import-outside-toplevel
  index = jax.process_index() if shard_index is None else shard_index
  count = jax.process_count() if shard_count is None else shard_count
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {index} and {count}")
  return index, count


def _check_example(example: Mapping[str, np.ndarray], *, seq_len: int,
                   vocab_size: int | None = None) -> Mapping[str, np.ndarray]:
  """``example`` unchanged if it has 1-D ``tokens`` and ``loss_mask`` of one length in
  [1, seq_len] and integer token ids in [0, vocab_size); a ``DataError`` otherwise (packing put a
  longer mask's extra 1s on padding, a longer example failed deep inside grain or numpy, and an
  id out of range is never caught later: under jit a negative id reads the embedding from its
  end and an id >= the vocabulary gives NaN log-probs, and the int32 batch would wrap an id
  >= 2**31)."""
  for key in ("tokens", "loss_mask"):
    if key not in example:
      raise DataError(f"batch_examples: an example is missing key {key!r} (has "
                      f"{sorted(example)})")
  shapes = [np.shape(example[key]) for key in ("tokens", "loss_mask")]
  if any(len(shape) != 1 for shape in shapes):
    raise DataError(f"batch_examples: an example has tokens of shape {shapes[0]} and loss_mask "
                    f"of shape {shapes[1]}; both must be 1-D")
  (n,), (m,) = shapes
  if n != m:
    raise DataError(f"batch_examples: an example has {n} tokens but {m} loss_mask entries")
  if n == 0:
    raise DataError("batch_examples: an example has no tokens")
  if n > seq_len:
    raise DataError(f"batch_examples: an example has {n} tokens, longer than seq_len={seq_len} "
                    f"(truncate it first, e.g. tokenize_sft's max_len)")
  tokens = np.asarray(example["tokens"])
  if tokens.dtype.kind not in "iu":
    raise DataError(f"batch_examples: an example has tokens of dtype {tokens.dtype}; token ids "
                    f"must be integers")
  limit = np.iinfo(np.int32).max + 1 if vocab_size is None else vocab_size
  bad = np.flatnonzero((tokens < 0) | (tokens >= limit))
  if bad.size:
    i = int(bad[0])
    raise DataError(f"batch_examples: an example has token id {int(tokens[i])} at position {i}, "
                    f"outside the vocabulary [0, {limit})" + (
                        "" if vocab_size is not None else " of int32 ids"))
  return example


def batch_examples(examples, *, batch_size: int, seq_len: int, pack: bool, pad_id: int = 0,
                   seed: int = 0, num_packing_bins: int | None = None,
                   drop_remainder: bool = False, vocab_size: int | None = None):
  """A ``grain.IterDataset`` of tokenized examples (dicts with int32[L] ``tokens`` and
  ``loss_mask``, L <= seq_len) -> one of [batch_size, seq_len] batches (keys in the module doc).

  ``pack=True``: first-fit packing (``grain.experimental.FirstFitPackIterDataset``): each example
  goes into the first of ``num_packing_bins`` open rows (default ``batch_size``) with room for it;
  when one fits nowhere, the open rows are emitted. No example is split across rows.
  ``pack=False``: one example per row, right-padded with ``pad_id``.
  The last short batch is filled with empty rows unless ``drop_remainder``. An example whose
  ``tokens`` and ``loss_mask`` differ in length, or are empty or longer than ``seq_len``, is a
  ``DataError``, and so is one with a token id that is not an integer in [0, ``vocab_size``)
  (pass the model's ``config.vocab_size`` for pre-tokenized examples: their ids never went
  through a tokenizer that ``postrl.models.check_fits`` checked; None checks [0, 2**31)).
  """
  import grain  # pylint: disable=import-outside-toplevel
  if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(
      vocab_size, numbers.Integral) or vocab_size < 1):
    raise ValueError(f"batch_examples: vocab_size must be a positive integer, got {vocab_size!r}")
  examples = examples.map(functools.partial(_check_example, seq_len=seq_len,
                                            vocab_size=vocab_size))
  if pack:
    rows = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct={"tokens": seq_len, "loss_mask": seq_len},
        num_packing_bins=num_packing_bins or batch_size, seed=seed, shuffle_bins=False,
        padding_struct={"tokens": pad_id, "loss_mask": 0}).map(_from_packed)
  else:
    rows = examples.map(functools.partial(_pad_example, seq_len=seq_len, pad_id=pad_id))
  return rows.batch(batch_size, drop_remainder=drop_remainder, batch_fn=functools.partial(
      _stack_rows, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id))


def sft_dataset(records: Sequence, tokenizer, *, batch_size: int, seq_len: int, pack: bool = True,
                seed: int = 0, num_epochs: int | None = None, shard_index: int | None = None,
                shard_count: int | None = None, chat: bool = True,
                num_packing_bins: int | None = None, drop_remainder: bool = False,
                read_options=None):
  """The SFT pipeline as a ``grain.IterDataset`` of batches; see ``sft_batches``."""
  import grain  # pylint: disable=import-outside-toplevel
  index, count = _shard(shard_index, shard_count)
  if batch_size < 1 or batch_size % count:
    raise ValueError(f"global batch_size {batch_size} must be a positive multiple of the "
                     f"{count} processes")
  if len(records) == 0:
    raise DataError("sft_dataset needs at least one record")
  _check_lengths(records, tokenizer, seq_len=seq_len, chat=chat, warn=index == 0)
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map(functools.partial(tokenize_sft, tokenizer=tokenizer, max_len=seq_len, chat=chat))
  batches = batch_examples(ds.to_iter_dataset(read_options), batch_size=batch_size,
                           seq_len=seq_len, pack=pack, pad_id=pad_id, seed=seed,
                           num_packing_bins=num_packing_bins, drop_remainder=drop_remainder)
  if count == 1:
    return batches
  rows = batch_size // count
  return batches.map(lambda b: {k: v[index * rows:(index + 1) * rows] for k, v in b.items()})


def sft_batches(records: Sequence, tokenizer, *, batch_size: int, seq_len: int, pack: bool = True,
                seed: int = 0, num_epochs: int | None = None, shard_index: int | None = None,
                shard_count: int | None = None, chat: bool = True,
                num_packing_bins: int | None = None, drop_remainder: bool = False,
                read_options=None) -> Any:
  """An iterator of SFT batches, each ``{"tokens", "segment_ids", "loss_mask"}`` int32
  [batch_size // shard_count, seq_len] numpy arrays (see the module doc).

  Args:
    records: a random-access sequence of ``SFTRecord`` (a list, ``ArrayRecordRecords``, ...).
    tokenizer: a ``postrl.models.Tokenizer``; see ``tokenize_sft``.
    batch_size: the global batch (rows over all processes); each process yields
      ``batch_size // shard_count`` rows.
    seq_len: T; longer examples are truncated to it (with a warning that counts them). A
      record that keeps no completion token within T is a ``DataError`` before any batch.
    pack: several examples per row (first-fit) instead of one per row.
    seed: the shuffle seed (same seed, same order; each epoch is a new permutation).
    num_epochs: passes over the data; None repeats forever.
    shard_index, shard_count: this process's shard; default ``jax.process_index()`` and
      ``jax.process_count()``.
    chat: render prompt/completion records with the chat template (``tokenize_sft``).
    num_packing_bins: open rows for first-fit packing (default: rows per batch).
    drop_remainder: drop the last short batch instead of filling it with empty rows.
    read_options: ``grain.ReadOptions`` for reading and tokenizing ahead in threads (None:
      grain's default, 16 threads and 500 examples); the order never depends on it.

  Returns:
    grain's ``DatasetIterator``: ``next()`` gives a batch; ``get_state()`` -> JSON-able dict,
    ``set_state(state)`` resumes exactly; the state is the same on every process.
  """
  return iter(sft_dataset(records, tokenizer, batch_size=batch_size, seq_len=seq_len, pack=pack,
                          seed=seed, num_epochs=num_epochs, shard_index=shard_index,
                          shard_count=shard_count, chat=chat, num_packing_bins=num_packing_bins,
                          drop_remainder=drop_remainder, read_options=read_options))
