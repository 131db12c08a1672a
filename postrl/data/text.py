"""Held-out text for perplexity: the champ-dataset corpus, split into calibration and evaluation.

The corpus is the 270 competition-math problems of the PyPI package ``champ-dataset``
(``champ_dataset/dataset_files/v0.json``: ``{"problems": {id: {"_text", "category",
"solution": {"steps": [{"_text", ...}]}, "_answer", ...}}, "concepts", "hints"}``), one document
per problem (the human-written solution steps only; the file's model outputs
``fws_annotations`` / ``conversations`` are not used):

    Problem: <problem text>
    Solution:
    <step 1>
    ...
    Answer: <final answer>

``champ_documents`` splits the problems deterministically into two disjoint sets (stratified by
category: a seeded shuffle of each category's sorted ids, its first ``round(eval_fraction * n)``
to evaluation), and ``token_windows`` turns a list of documents into a fixed token budget
(the protocol of GPTQ / AWQ / SparseGPT on WikiText-2 and C4): each document is tokenised on its
own (no BOS), the documents are concatenated with a separator token between them, and the first
``num_windows * seq_len`` tokens of the stream are cut into ``num_windows`` consecutive,
non-overlapping windows of ``seq_len`` tokens. Calibration and evaluation windows come from
disjoint problems, so they share no text.

``BUDGETS`` holds the default budgets: evaluation 64 x 256 tokens, calibration 32 x 256.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
from typing import NamedTuple, Sequence

import numpy as np

from postrl.data.records import DataError, _no_duplicate_keys

SPLITS = ("calibration", "evaluation")
BUDGETS = {"evaluation": (64, 256), "calibration": (32, 256)}  # (num_windows, seq_len)


class Document(NamedTuple):
  """One text of a corpus and the id of what it came from (a champ problem id)."""

  id: str
  text: str


def champ_path() -> str:
  """The path of ``champ_dataset/dataset_files/v0.json`` (found without importing the package)."""
  spec = importlib.util.find_spec("champ_dataset")
  if spec is None or spec.origin is None:
    raise DataError("the champ corpus ships in the PyPI package 'champ-dataset', which is not "
                    "installed; install it with: pip install champ-dataset")
  return os.path.join(os.path.dirname(spec.origin), "dataset_files", "v0.json")


def _problem_text(pid: str, problem: dict, path: str) -> str:
  try:
    steps = [step["_text"] for step in problem["solution"]["steps"]]
    parts = [f"Problem: {problem['_text']}", "Solution:", *steps, f"Answer: {problem['_answer']}"]
  except (KeyError, TypeError) as e:
    raise DataError(f"{path}: problem {pid!r}: missing field {e}") from None
  if not all(isinstance(p, str) for p in parts):
    raise DataError(f"{path}: problem {pid!r}: a text field is not a string")
  return "\n".join(parts)


def champ_problems(path: str | None = None) -> dict[str, tuple[str, str]]:
  """All champ problems: ``{id: (category, document text)}``, ordered by id."""
  return {pid: (category, text) for pid, category, text in _read_champ(path or champ_path())}


@functools.lru_cache(maxsize=4)
def _read_champ(path: str) -> tuple[tuple[str, str, str], ...]:
  """(id, category, text) of every problem (the file is 70 MB: read it once per process)."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f, object_pairs_hook=_no_duplicate_keys)  # a repeated id: a lost problem
  except FileNotFoundError:
    raise DataError(f"{path}: no such file") from None
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None
  except ValueError as e:  # a duplicate key
    raise DataError(f"{path}: {e}") from None
  problems = data.get("problems") if isinstance(data, dict) else None
  if not isinstance(problems, dict) or not problems:
    raise DataError(f"{path}: expected an object with a non-empty 'problems' object")
  for pid, problem in problems.items():
    if not isinstance(problem, dict):
      raise DataError(f"{path}: problem {pid!r}: expected an object")
  return tuple((pid, str(problems[pid].get("category", "")),
                _problem_text(pid, problems[pid], path)) for pid in sorted(problems))


def champ_documents(split: str, *, seed: int = 0, eval_fraction: float = 0.5,
                    path: str | None = None) -> list[Document]:
  """The documents of one split of the champ corpus, in a seeded (deterministic) order.

  Problems are split per category (so both splits cover all five categories): each category's
  ids, sorted, are shuffled with ``random.Random(f"{seed}:{category}")`` and the first
  ``round(eval_fraction * n)`` go to "evaluation", the rest to "calibration". The two splits
  are disjoint and together hold every problem. The split's documents are then shuffled with
  ``random.Random(seed)`` so any prefix of the stream mixes the categories.

  Args:
    split: "evaluation" or "calibration".
    seed: the split and order seed (the same seed always gives the same documents).
    eval_fraction: fraction of each category's problems held out for evaluation, in (0, 1).
    path: the JSON file (default: the installed package's ``v0.json``).
  """
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
  if not 0.0 < eval_fraction < 1.0:
    raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
  problems = champ_problems(path)
  by_category: dict[str, list[str]] = {}
  for pid, (category, _) in problems.items():
    by_category.setdefault(category, []).append(pid)
  chosen = []
  for category in sorted(by_category):
    ids = sorted(by_category[category])
    random.Random(f"{seed}:{category}").shuffle(ids)
    n_eval = round(eval_fraction * len(ids))
    chosen += ids[:n_eval] if split == "evaluation" else ids[n_eval:]
  random.Random(seed).shuffle(chosen)
  return [Document(pid, problems[pid][1]) for pid in chosen]


def _separator_id(tokenizer) -> int:
  """The end-of-document token: ``<|endoftext|>`` if the vocabulary has it, else ``eos_id``."""
  sep = tokenizer.token_to_id("<|endoftext|>")
  if sep is None:
    sep = tokenizer.eos_id
  if sep is None:
    raise DataError("the tokenizer has no <|endoftext|> and no eos token: pass separator_id")
  return int(sep)


def token_windows(texts: Sequence[str | Document], tokenizer, *, num_windows: int, seq_len: int,
                  separator_id: int | None = None, name: str = "corpus") -> np.ndarray:
  """A fixed token budget from documents: int32 [num_windows, seq_len], windows disjoint.

  The stream is ``encode(d_1) + [sep] + encode(d_2) + [sep] + ...`` (each document encoded
  without BOS); window i is ``stream[i * seq_len : (i + 1) * seq_len]``. Only as many documents
  are encoded as the budget needs.

  Args:
    texts: documents (strings or ``Document``), in stream order.
    tokenizer: a ``postrl.models.Tokenizer``.
    num_windows: B, the number of windows.
    seq_len: T, tokens per window.
    separator_id: token between documents (default ``<|endoftext|>``, SmolLM2's document
      separator, else the tokenizer's eos).
    name: how errors name the corpus.
  Raises:
    DataError: the corpus holds fewer than ``num_windows * seq_len`` tokens (says how many).
  """
  if num_windows < 1 or seq_len < 2:
    raise DataError(f"{name}: need num_windows >= 1 and seq_len >= 2, got {num_windows} x "
                    f"{seq_len}")
  sep = _separator_id(tokenizer) if separator_id is None else int(separator_id)
  budget = num_windows * seq_len
  stream: list[int] = []
  for doc in texts:
    text = doc.text if isinstance(doc, Document) else doc
    stream += list(tokenizer.encode(text, add_bos=False)) + [sep]
    if len(stream) >= budget:
      break
  if len(stream) < budget:
    raise DataError(f"{name}: {len(texts)} documents hold {len(stream)} tokens, fewer than the "
                    f"budget of {num_windows} windows x {seq_len} tokens = {budget}")
  return np.asarray(stream[:budget], np.int32).reshape(num_windows, seq_len)


def champ_windows(tokenizer, split: str, *, num_windows: int | None = None,
                  seq_len: int | None = None, seed: int = 0, eval_fraction: float = 0.5,
                  path: str | None = None) -> np.ndarray:
  """``token_windows`` over ``champ_documents(split)``: int32 [num_windows, seq_len].

  Defaults: ``BUDGETS[split]`` (evaluation 64 x 256 = 16384 tokens, calibration 32 x 256 = 8192;
  each split of the default corpus holds about 37k SmolLM2 tokens).
  """
  docs = champ_documents(split, seed=seed, eval_fraction=eval_fraction, path=path)
  default_b, default_t = BUDGETS[split]
  return token_windows(docs, tokenizer,
                       num_windows=default_b if num_windows is None else num_windows,
                       seq_len=default_t if seq_len is None else seq_len,
                       name=f"champ {split} split")
