"""Preference data for training: pairs, rankings and step labels -> fixed-shape batches, and
verifier-made preference data cached in the workdir.

A preference batch is a dict of numpy arrays whose first dimension is the *record* (b rows on
this process), so the responses of one record always stay together: on one device, in one
micro-batch (``postrl.trainers.step.split_microbatches`` splits dimension 0 only):

  ``tokens``         int32 [b, K, T]  chat-template prompt + response k, right-padded
  ``segment_ids``    int32 [b, K, T]  1 on real tokens, 0 on padding
  ``loss_mask``      int32 [b, K, T]  1 on the response tokens (through the end-of-turn token)
  ``response_mask``  int32 [b, K]     1 for responses present (rankings may hold fewer than K)
  ``index``          int32 [b]        the record's position in the dataset
  + any ``per_record`` arrays (e.g. cached reference log-probs ``ref_logps`` float32 [b, K])

K = 2 for pairs (column 0 chosen, column 1 rejected); for rankings K is the longest list, best
first. Response k of a record is tokenised exactly as SFT would tokenise the conversation
[system?, user: prompt, assistant: response] (``postrl.data.pipeline.tokenize_sft``): the prompt
through the assistant header, then the response through its end-of-turn token.

Step-labelled data (process reward models) has one row per record instead: ``tokens``,
``segment_ids`` [b, T] plus ``step_pos`` (the token that ends step s), ``step_labels`` (float32 in
[0, 1]) and ``step_mask`` [b, S].

Batches come from a grain pipeline (``record_batches``): a global shuffle with a seed (a new
permutation every epoch), repeated forever, the global batch built identically on every process
and this process's rows sliced, as in ``postrl.data.pipeline.sft_batches``; ``get_state`` /
``set_state`` checkpoint the position so a resumed run sees exactly the same batches.

Records are tokenised once, up front (``tokenize_preferences``): a too-long record is reported (or
is an error) before any training step, and its ids are kept unpadded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from postrl.data.pipeline import _shard, tokenize_sft  # one process-sharding rule for all batches
from postrl.data.records import (DataError, Message, PreferenceRecord, RankingRecord, SFTRecord,
                                 _check_str, _check_strs, _read_json_lines, read_jsonl,
                                 write_jsonl)

OVERFLOW_MODES = ("truncate", "error")
KINDS = ("pairs", "rankings")


# ------------------------------------------------------------------------------ tokenisation


def prompt_and_response_ids(prompt: str, response: str, tokenizer, *,
                            system_prompt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(prompt ids, response ids) of one reply, exactly as ``tokenize_sft`` splits the
  conversation [system?, user: prompt, assistant: response]: the prompt runs through the
  assistant header, the response through the end-of-turn token."""
  messages = [Message("system", system_prompt)] if system_prompt else []
  messages += [Message("user", prompt), Message("assistant", response)]
  ex = tokenize_sft(SFTRecord(messages=tuple(messages)), tokenizer, max_len=2 ** 62)
  n_response = int(ex["loss_mask"].sum())
  n_prompt = len(ex["tokens"]) - n_response
  return ex["tokens"][:n_prompt], ex["tokens"][n_prompt:]


@dataclasses.dataclass(frozen=True)
class TokenizedRecord:
  """A record's prompt ids and its responses' ids (unpadded, already cut to fit seq_len)."""
  prompt_ids: np.ndarray
  response_ids: tuple[np.ndarray, ...]


def _fit_response(prompt_ids, response_ids, *, seq_len: int, overflow: str, where: str):
  """(response ids cut to fit seq_len, whether they were cut); errors name ``where``."""
  room = seq_len - len(prompt_ids)
  if len(response_ids) <= room:
    return response_ids, False
  if room < 1:
    raise DataError(f"{where}: the prompt alone has {len(prompt_ids)} tokens, which leaves no "
                    f"room for the response in seq_len={seq_len}; raise config.seq_len")
  if overflow == "error":
    raise DataError(f"{where}: prompt + response is {len(prompt_ids) + len(response_ids)} tokens, "
                    f"longer than seq_len={seq_len}; raise config.seq_len or set "
                    f"config.data.overflow='truncate' (cuts the response)")
  return response_ids[:room], True


@dataclasses.dataclass
class PreferenceData:
  """Tokenised pairs or rankings (see the module doc); ``row(i)`` is record i's padded arrays."""
  kind: str                         # "pairs" or "rankings"
  examples: list[TokenizedRecord]
  k: int                            # responses per batch row (2 for pairs; longest ranking)
  seq_len: int
  pad_id: int
  num_truncated: int                # responses cut to fit seq_len

  def __len__(self) -> int:
    return len(self.examples)

  def row(self, i: int) -> dict[str, np.ndarray]:
    return pad_record(self.examples[i], seq_len=self.seq_len, k=self.k, pad_id=self.pad_id)

  def empty_row(self) -> dict[str, np.ndarray]:
    return pad_record(TokenizedRecord(np.zeros((0,), np.int32), ()), seq_len=self.seq_len,
                      k=self.k, pad_id=self.pad_id)

  def fingerprint(self) -> str:
    """sha256 of every token id, the layout and seq_len: equal iff the batches are equal."""
    h = hashlib.sha256(json.dumps([self.kind, self.k, self.seq_len, self.pad_id]).encode())
    for ex in self.examples:
      for ids in (ex.prompt_ids, *ex.response_ids):
        h.update(np.int64(len(ids)).tobytes())
        h.update(np.asarray(ids, np.int32).tobytes())
      h.update(b"|")
    return h.hexdigest()

  def stats(self) -> dict[str, float]:
    lengths = [len(ex.prompt_ids) + len(r) for ex in self.examples for r in ex.response_ids]
    return {"num_records": len(self.examples), "num_truncated": self.num_truncated,
            "max_length": max(lengths, default=0),
            "mean_length": float(np.mean(lengths)) if lengths else 0.0}


def _pad_id(tokenizer) -> int:
  return tokenizer.pad_id if tokenizer.pad_id is not None else 0


def tokenize_preferences(records: Sequence[PreferenceRecord | RankingRecord], tokenizer, *,
                         seq_len: int, system_prompt: str | None = None,
                         overflow: str = "truncate", source: str = "records",
                         k: int | None = None) -> PreferenceData:
  """Pairs (``PreferenceRecord``: K = 2, chosen first) or rankings (``RankingRecord``: K = the
  longest list, or ``k``) -> ``PreferenceData``.

  Every row is ``prompt_and_response_ids`` of one response. A row longer than ``seq_len`` keeps
  its whole prompt and the first ``seq_len - len(prompt)`` response tokens (``overflow=
  "truncate"``, counted in ``num_truncated``) or raises a ``DataError`` naming ``source`` and
  the record index (``overflow="error"``). A prompt that leaves no room for a response is always
  an error.
  """
  if overflow not in OVERFLOW_MODES:
    raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
  if not records:
    raise DataError(f"{source}: no records")
  pairs = isinstance(records[0], PreferenceRecord)
  examples, truncated = [], 0
  for i, r in enumerate(records):
    if isinstance(r, PreferenceRecord) != pairs or not isinstance(
        r, (PreferenceRecord, RankingRecord)):
      raise DataError(f"{source}: record {i} is a {type(r).__name__}; all records must be "
                      f"{'PreferenceRecord' if pairs else 'RankingRecord'}")
    responses = (r.chosen, r.rejected) if pairs else r.responses
    prompt_ids, fitted = None, []
    for j, response in enumerate(responses):
      p_ids, r_ids = prompt_and_response_ids(r.prompt, response, tokenizer,
                                             system_prompt=system_prompt)
      prompt_ids = p_ids if prompt_ids is None else prompt_ids
      name = ("chosen", "rejected")[j] if pairs else f"responses[{j}]"
      r_ids, cut = _fit_response(prompt_ids, r_ids, seq_len=seq_len, overflow=overflow,
                                 where=f"{source}: record {i} ({name})")
      truncated += cut
      fitted.append(np.asarray(r_ids, np.int32))
    examples.append(TokenizedRecord(np.asarray(prompt_ids, np.int32), tuple(fitted)))
  longest = max(len(ex.response_ids) for ex in examples)
  if k is not None and k < longest:
    raise DataError(f"{source}: a ranking has {longest} responses, more than k={k}")
  return PreferenceData(kind="pairs" if pairs else "rankings", examples=examples,
                        k=2 if pairs else (k or longest), seq_len=seq_len,
                        pad_id=_pad_id(tokenizer), num_truncated=truncated)


def pad_record(example: TokenizedRecord, *, seq_len: int, k: int, pad_id: int) -> dict:
  """One record -> ``tokens``, ``segment_ids``, ``loss_mask`` [k, seq_len] and
  ``response_mask`` [k]; responses beyond the record's own are empty rows (mask 0)."""
  tokens = np.full((k, seq_len), pad_id, np.int32)
  segment_ids = np.zeros((k, seq_len), np.int32)
  loss_mask = np.zeros((k, seq_len), np.int32)
  response_mask = np.zeros((k,), np.int32)
  P = len(example.prompt_ids)
  for j, r_ids in enumerate(example.response_ids):
    n = P + len(r_ids)
    tokens[j, :P] = example.prompt_ids
    tokens[j, P:n] = r_ids
    segment_ids[j, :n] = 1
    loss_mask[j, P:n] = 1
    loss_mask[j, 0] = 0  # the first token of a sequence has no context to be predicted from
    response_mask[j] = 1
  return {"tokens": tokens, "segment_ids": segment_ids, "loss_mask": loss_mask,
          "response_mask": response_mask}


# ----------------------------------------------------------------------------- step labels


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """A solution split into reasoning steps with a correctness label in [0, 1] per step
  (PRM800K-style hard labels or Math-Shepherd-style soft ones): one JSONL line
  ``{"prompt": str, "steps": [str, ...], "labels": [number, ...]}`` (steps non-blank)."""
  prompt: str
  steps: tuple[str, ...]
  labels: tuple[float, ...]

  @classmethod
  def from_json(cls, obj: Any) -> StepRecord:
    if not isinstance(obj, dict):
      raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"prompt", "steps", "labels"})
    if unknown:
      raise ValueError(f"unknown field(s) {unknown} (expected prompt, steps, labels)")
    for key in ("prompt", "steps", "labels"):
      if key not in obj:
        raise ValueError(f"missing field {key!r}")
    _check_str(obj["prompt"], "prompt")
    steps, labels = _check_strs(obj["steps"], "steps"), obj["labels"]
    if not steps:
      raise ValueError("field 'steps': expected a non-empty list of strings")
    for i, step in enumerate(steps):  # its score is read at its last token: it needs one
      if not step.strip():
        raise ValueError(f"field 'steps[{i}]': blank step (steps are non-blank lines, as "
                         f"split_steps makes them)")
    if not isinstance(labels, list) or len(labels) != len(steps):
      raise ValueError(f"field 'labels': expected a list of {len(steps)} numbers (one per step)")
    for i, y in enumerate(labels):
      if isinstance(y, bool) or not isinstance(y, (int, float)) or not 0.0 <= y <= 1.0:
        raise ValueError(f"field 'labels[{i}]': expected a number in [0, 1], got {y!r}")
    return cls(obj["prompt"], tuple(steps), tuple(float(y) for y in labels))

  def to_json(self) -> dict:
    return {"prompt": self.prompt, "steps": list(self.steps), "labels": list(self.labels)}


def read_step_jsonl(path: str | os.PathLike, *, skip_malformed: bool = False
                    ) -> tuple[list[StepRecord], int]:
  """Reads step-labelled records; a malformed line is a ``DataError`` naming file:line (or is
  skipped and counted with ``skip_malformed``), as ``read_jsonl``. Returns
  ``(records, num_skipped)``."""
  return _read_json_lines(path, StepRecord.from_json, skip_malformed=skip_malformed)


@dataclasses.dataclass
class StepData:
  """Tokenised step-labelled records: ``row(i)`` has ``tokens``, ``segment_ids`` [T] and
  ``step_pos``, ``step_labels``, ``step_mask`` [max_steps]."""
  examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (ids, step end positions, labels)
  seq_len: int
  max_steps: int
  pad_id: int
  num_truncated: int          # records cut to fit seq_len
  num_dropped_steps: int      # steps lost to the cut or beyond max_steps

  def __len__(self) -> int:
    return len(self.examples)

  def row(self, i: int) -> dict[str, np.ndarray]:
    ids, ends, labels = self.examples[i]
    return _step_row(ids, ends, labels, seq_len=self.seq_len, max_steps=self.max_steps,
                     pad_id=self.pad_id)

  def empty_row(self) -> dict[str, np.ndarray]:
    empty = np.zeros((0,), np.int32)
    return _step_row(empty, empty, np.zeros((0,), np.float32), seq_len=self.seq_len,
                     max_steps=self.max_steps, pad_id=self.pad_id)

  def stats(self) -> dict[str, float]:
    return {"num_records": len(self.examples), "num_truncated": self.num_truncated,
            "num_dropped_steps": self.num_dropped_steps,
            "num_steps": int(sum(len(e[1]) for e in self.examples))}


def _step_row(ids, ends, labels, *, seq_len: int, max_steps: int, pad_id: int) -> dict:
  tokens = np.full((seq_len,), pad_id, np.int32)
  tokens[:len(ids)] = ids
  segment_ids = np.zeros((seq_len,), np.int32)
  segment_ids[:len(ids)] = 1
  step_pos = np.zeros((max_steps,), np.int32)
  step_pos[:len(ends)] = ends
  step_labels = np.zeros((max_steps,), np.float32)
  step_labels[:len(labels)] = labels
  step_mask = np.zeros((max_steps,), np.int32)
  step_mask[:len(ends)] = 1
  return {"tokens": tokens, "segment_ids": segment_ids, "step_pos": step_pos,
          "step_labels": step_labels, "step_mask": step_mask}


def tokenize_steps(records: Sequence[StepRecord], tokenizer, *, seq_len: int, max_steps: int,
                   system_prompt: str | None = None, overflow: str = "truncate",
                   source: str = "records") -> StepData:
  """Step records -> ``StepData``. The response is the steps joined by newlines; each step is
  encoded on its own (``step + "\\n"``, the last without the newline) and the ids concatenated,
  so step s ends at a known token, its last one (the newline that closes it, for all but the
  last step): its score is read there (Lightman et al. 2023). Steps cut by
  ``seq_len`` (``overflow="truncate"``) or beyond ``max_steps`` are dropped and counted."""
  if overflow not in OVERFLOW_MODES:
    raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
  if not records:
    raise DataError(f"{source}: no records")
  examples, truncated, dropped = [], 0, 0
  for i, r in enumerate(records):
    prompt_ids, _ = prompt_and_response_ids(r.prompt, "", tokenizer, system_prompt=system_prompt)
    response, ends = [], []
    for s, step in enumerate(r.steps):
      text = step + ("\n" if s < len(r.steps) - 1 else "")
      step_ids = list(tokenizer.encode(text, add_bos=False))
      if not step_ids:  # its label would land on the previous step's last token
        raise DataError(f"{source}: record {i}: step {s} ({step!r}) encodes to no token")
      response += step_ids
      ends.append(len(prompt_ids) + len(response) - 1)
    response.append(tokenizer.eos_id)
    fitted, cut = _fit_response(prompt_ids, response, seq_len=seq_len, overflow=overflow,
                                where=f"{source}: record {i}")
    truncated += cut
    n = len(prompt_ids) + len(fitted)
    keep = [s for s, e in enumerate(ends) if e < n][:max_steps]
    dropped += len(ends) - len(keep)
    examples.append((np.concatenate([prompt_ids, np.asarray(fitted, np.int32)]).astype(np.int32),
                     np.asarray([ends[s] for s in keep], np.int32),
                     np.asarray([r.labels[s] for s in keep], np.float32)))
  return StepData(examples=examples, seq_len=seq_len, max_steps=max_steps,
                  pad_id=_pad_id(tokenizer), num_truncated=truncated, num_dropped_steps=dropped)


# ---------------------------------------------------------------------------------- batches


def local_rows(batch: Mapping[str, np.ndarray], shard_index: int, shard_count: int) -> dict:
  """This process's rows of a global batch: rows [i B/n, (i+1) B/n)."""
  rows = len(next(iter(batch.values()))) // shard_count
  return {k: v[shard_index * rows:(shard_index + 1) * rows] for k, v in batch.items()}


def _indexed_row(i, *, row_fn, per_record):
  out = dict(row_fn(int(i)), index=np.int32(i))
  for name, values in per_record.items():
    out[name] = values[i]
  return out


def record_batches(data, *, batch_size: int, seed: int = 0,
                   per_record: Mapping[str, np.ndarray] | None = None,
                   shard_index: int | None = None, shard_count: int | None = None,
                   read_options=None):
  """An endless iterator of batches of ``data`` (``PreferenceData`` or ``StepData``): each a
  dict of numpy arrays [batch_size // shard_count, ...] (keys in the module doc).

  Records are shuffled with ``seed`` (a new permutation every epoch) and repeated forever; the
  global batch is the same on every process and each keeps its own rows. ``per_record`` maps a
  name to an array [N, ...] whose row i is added to record i (cached reference log-probs).

  Returns grain's ``DatasetIterator``: ``get_state()`` is a small JSON-able dict and
  ``set_state`` resumes so the following batches are those of an uninterrupted run.
  ``read_options``: ``grain.ReadOptions`` for the threads that pad rows ahead (None: grain's
  default); the order never depends on it.
  """
  import grain  # pylint: disable=import-outside-toplevel
  index, count = _shard(shard_index, shard_count)
  if batch_size < 1 or batch_size % count:
    raise ValueError(f"global batch_size {batch_size} must be a positive multiple of the "
                     f"{count} processes")
  if len(data) == 0:
    raise DataError("no records to batch")
  per_record = dict(per_record or {})
  for name, values in per_record.items():
    if len(values) != len(data):
      raise ValueError(f"per_record[{name!r}] has {len(values)} rows for {len(data)} records")
  ds = grain.MapDataset.source(np.arange(len(data))).shuffle(seed=seed).repeat(None)
  ds = ds.map(functools.partial(_indexed_row, row_fn=data.row, per_record=per_record))
  ds = ds.batch(batch_size)
  if count > 1:
    ds = ds.map(functools.partial(local_rows, shard_index=index, shard_count=count))
  return iter(ds.to_iter_dataset(read_options))


def sequential_batches(data, *, batch_size: int,
                       per_record: Mapping[str, np.ndarray] | None = None):
  """Every record once, in order: a list of (global batch, number of real records). The last
  batch is filled with empty records (all masks 0) so every batch has the same shape."""
  per_record = dict(per_record or {})
  out = []
  for start in range(0, len(data), batch_size):
    ids = list(range(start, min(start + batch_size, len(data))))
    rows = [_indexed_row(i, row_fn=data.row, per_record=per_record) for i in ids]
    empty = dict(data.empty_row(), index=np.int32(-1))
    for name, values in per_record.items():
      empty[name] = np.zeros_like(values[0])
    rows += [empty] * (batch_size - len(ids))
    out.append(({k: np.stack([r[k] for r in rows]) for k in rows[0]}, len(ids)))
  return out


def pairwise_accuracy(scores_BxK, mask_BxK) -> float:
  """Fraction of ordered pairs (i ranked above j, both present) with score_i > score_j:
  the pair accuracy for K = 2, the concordant-pair fraction for rankings."""
  s, m = np.asarray(scores_BxK, np.float64), np.asarray(mask_BxK) > 0
  K = s.shape[-1]
  above = np.triu(np.ones((K, K), bool), 1)[None] & m[:, :, None] & m[:, None, :]
  return float((above & (s[:, :, None] > s[:, None, :])).sum() / max(above.sum(), 1))


def listwise_accuracy(scores_BxK, mask_BxK) -> dict[str, float]:
  """``top1``: the best-ranked response scores strictly highest; ``full_order``: the scores are
  strictly decreasing over the ranking; both over records with >= 2 responses."""
  s, m = np.asarray(scores_BxK, np.float64), np.asarray(mask_BxK) > 0
  top1, order, n = 0, 0, 0
  for row, valid in zip(s, m):
    v = row[valid]
    if len(v) < 2:
      continue
    n += 1
    top1 += bool(np.all(v[0] > v[1:]))
    order += bool(np.all(np.diff(v) < 0))
  return {"top1": top1 / max(n, 1), "full_order": order / max(n, 1)}


# -------------------------------------------------------------------------- verifier data


def graded_arithmetic_reward(completion: str, answer: str) -> float:
  """A graded verifier reward for a numeric answer a (so that rankings have K levels):

      r = 1                                   if the answer is right (``math_reward``)
      r = 0.5 exp(-|x - a| / (1 + |a|))       if the last number x is wrong (closer is better)
      r = 0                                   if there is no number
      minus 1e-4 per character: among equally scored replies the shorter one ranks higher.
  """
  # pylint: disable-next=import-outside-toplevel
  from postrl.rewards.math import extract_last_number, math_reward
  r = math_reward(completion, answer)
  if r < 1.0:
    x = extract_last_number(completion.replace("\u2212", "-"))
    try:
      r = 0.5 * math.exp(-abs(float(x) - float(answer)) / (1.0 + abs(float(answer))))
    except (TypeError, ValueError, OverflowError):
      r = 0.0
  return r - 1e-4 * len(completion)


def graded_countdown_reward(completion: str, numbers: Sequence[int], target: int) -> float:
  """As ``graded_arithmetic_reward`` for Countdown: 1 if ``countdown_reward`` accepts the reply,
  else 0.5 exp(-|v - target| / (1 + target)) for a valid expression of value v, else 0; minus
  1e-4 per character."""
  # pylint: disable=import-outside-toplevel
  from postrl.rewards.countdown import (countdown_reward, evaluate_countdown_expression,
                                        extract_countdown_answer)
  r = countdown_reward(completion, numbers, target)
  if r < 1.0:
    found = extract_countdown_answer(completion)
    value = evaluate_countdown_expression(found[0], numbers) if found else None
    r = 0.0 if value is None else 0.5 * math.exp(-abs(float(value) - target) / (1.0 + target))
  return r - 1e-4 * len(completion)


REWARD_KINDS = ("exact", "graded")


def verifier_reward(task: str, kind: str = "exact") -> Callable[[str, Any], float]:
  """``(completion, problem) -> float`` for a built-in task: ``exact`` is the task's verifier
  (``math_reward`` against ``problem.answer``, or ``countdown_reward``), ``graded`` the graded
  rewards above (needed for rankings with K > 2, which need K distinct reward levels)."""
  # pylint: disable=import-outside-toplevel
  from postrl.rewards.countdown import countdown_reward
  from postrl.rewards.math import math_reward
  if kind not in REWARD_KINDS:
    raise ValueError(f"unknown reward {kind!r}; expected one of {REWARD_KINDS}")
  if task == "countdown":
    if kind == "exact":
      return lambda c, p: countdown_reward(c, p.numbers, p.target)
    return lambda c, p: graded_countdown_reward(c, p.numbers, p.target)
  if kind == "exact":
    return lambda c, p: math_reward(c, p.answer)
  return lambda c, p: graded_arithmetic_reward(c, p.answer)


def _write_json_atomic(path: str, obj) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def verifier_preference_data(model, tokenizer, problems: Sequence, reward_fn, *,
                             kind: str = "pairs", num_samples: int = 8, max_new_tokens: int = 48,
                             temperature: float = 1.0, pairs_per_prompt: int = 1, k: int = 4,
                             seed: int = 0, batch_size: int = 64,
                             system_prompt: str | None = None, cache_path: str | None = None,
                             settings: Mapping[str, Any] | None = None) -> tuple[list, dict]:
  """Preference data made by the model itself: ``num_samples`` completions of every problem
  (``postrl.data.verifier.sample_and_score``), scored by ``reward_fn(completion, problem)``,
  turned into pairs (``preference_pairs``: a better-scored vs a worse-scored completion) or
  rankings of K (``rankings``: K strictly ordered reward levels, best first).

  With ``cache_path`` the records are written there (JSONL, atomically, by process 0) with a
  ``<cache_path>.meta.json`` holding the settings and statistics; a later call with the same
  settings reads them back instead of sampling, so a resumed run trains on exactly the same data.
  A cache made with other settings is an error (never silently reused or overwritten).

  Args:
    model: the policy (``Transformer`` or ``(graphdef, params)``).
    tokenizer: its tokenizer.
    problems: objects with ``prompt`` (and whatever ``reward_fn`` reads).
    reward_fn: ``(completion, problem) -> float`` (``verifier_reward``).
    kind: "pairs" or "rankings".
    num_samples, max_new_tokens, temperature: sampling settings.
    pairs_per_prompt: pairs per prompt at most (pairs).
    k: responses per ranking (rankings).
    seed: sampling key and pair/ranking choice.
    batch_size: rows per ``generate`` call (part of the sampling: the same value gives the same
      samples).
    system_prompt: optional system message before each prompt.
    cache_path: the JSONL file of the records (None: no cache).
    settings: anything else that determines the data (model, task, reward name), stored with it.
  Returns:
    ``(records, info)``: ``info`` has ``reward_stats`` (``postrl.data.verifier.reward_stats``),
    ``num_prompts``, ``num_records`` and ``cached`` (whether they were read back).
  Raises:
    DataError: no record could be made (every prompt's samples scored alike), or a cache with
      other settings.
  """
  import jax  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from postrl.data.verifier import preference_pairs, rankings, reward_stats, sample_and_score
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  prompts_hash = hashlib.sha256("\n".join(p.prompt for p in problems).encode()).hexdigest()
  full = dict(settings or {}, kind=kind, num_samples=num_samples, max_new_tokens=max_new_tokens,
              temperature=temperature, seed=seed, batch_size=batch_size,
              system_prompt=system_prompt or "", num_problems=len(problems), prompts=prompts_hash,
              **({"pairs_per_prompt": pairs_per_prompt} if kind == "pairs" else {"k": k}))
  full = json.loads(json.dumps(full, default=str))
  schema = "preference" if kind == "pairs" else "ranking"
  meta_path = f"{cache_path}.meta.json" if cache_path else None
  if cache_path and os.path.exists(cache_path) and os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("settings") != full:
      diff = sorted(key for key in set(full) | set(meta.get("settings", {}))
                    if full.get(key) != meta.get("settings", {}).get(key))
      raise DataError(f"{cache_path}: cached preference data was made with other settings "
                      f"(differing: {diff}); use a new workdir or delete the file")
    records, _ = read_jsonl(cache_path, schema)
    return records, dict(meta["info"], cached=True)

  samples = sample_and_score(model, tokenizer, problems, reward_fn, num_samples=num_samples,
                             key=jax.random.key(seed), max_new_tokens=max_new_tokens,
                             temperature=temperature, batch_size=batch_size,
                             system_prompt=system_prompt)
  if kind == "pairs":
    records = preference_pairs(samples, pairs_per_prompt=pairs_per_prompt, seed=seed)
  else:
    records = rankings(samples, k=k, seed=seed)
  stats = reward_stats(samples)
  info = {"reward_stats": stats, "num_prompts": len(problems), "num_records": len(records)}
  if not records:
    raise DataError(
        f"the verifier made no {kind} from {len(problems)} prompts x {num_samples} samples "
        f"(reward mean {stats['reward_mean']:.3f}, prompts with any reward spread "
        f"{stats['spread_fraction']:.1%}): every prompt's samples scored alike. Use an easier "
        f"or harder task, more samples, or config.data.reward='graded'"
        + (" (rankings of K > 2 need K distinct reward levels)" if kind == "rankings" else ""))
  if cache_path and jax.process_index() == 0:
    write_jsonl(cache_path, records)
    _write_json_atomic(meta_path, {"settings": full, "info": info})
  return records, dict(info, cached=False)
