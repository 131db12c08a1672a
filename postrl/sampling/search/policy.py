"""The policy the searches sample from: a model, its tokenizer and the sampling settings, behind
two calls every strategy uses.

    policy = Policy(model, tokenizer, max_new_tokens=64, temperature=0.8, batch_size=16)
    rows = policy.complete(problems, prefixes, n, key=key)     # n full continuations each
    rows = policy.next_steps(problems, prefixes, k, key=key)   # k next reasoning steps each

A problem's prompt goes through the chat template as a user turn (after an optional system
turn); a prefix is text the assistant has already written (steps so far) and is appended to the
templated prompt as plain text. All rows of a call go through ``postrl.sampling.generate``
``batch_size`` at a time with the KV cache (a short last batch is padded with copies and prompts
are padded to a multiple of 16 tokens, so a few compiled programs serve a whole search); batch j
of a call samples with ``fold_in(key, j)``.

A reasoning step ends at the step delimiter (default a newline). Every token whose text contains
the delimiter is a stop token of the step program, next to the end-of-sequence tokens, so a step
costs only its own tokens; the text is then cut at the first delimiter. A delimiter that no
single token contains (e.g. two newlines tokenised as two tokens) is still honoured by the cut,
after the step ran to ``max_step_tokens``.

Anything with the same two methods (and ``delimiter``) can stand in for a ``Policy``; the tests
use deterministic fakes.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from postrl.sampling.generate import generate, pad_prompts, stop_and_pad_ids, to_host
from postrl.sampling.search.common import Completion, SearchError, as_problem, check_positive

_DELIMITER_IDS: dict[tuple[int, str, int], tuple[int, ...]] = {}


def delimiter_ids(tokenizer, delimiter: str, vocab_size: int) -> tuple[int, ...]:
  """Ids of the tokens whose decoded text contains ``delimiter`` (cached per tokenizer)."""
  cache_key = (id(tokenizer), delimiter, vocab_size)
  if cache_key not in _DELIMITER_IDS:
    found = []
    for i in range(vocab_size):
      try:
        text = tokenizer.decode([i])
      except Exception:  # pylint: disable=broad-except  # ids past the tokenizer's vocabulary
        continue
      if delimiter in text:
        found.append(i)
    _DELIMITER_IDS[cache_key] = tuple(found)
  return _DELIMITER_IDS[cache_key]


def check_sampling(*, temperature=1.0, top_k=None, top_p=None, min_p=None,
                   flags: bool = False) -> None:
  """SearchError naming the setting (as a command-line flag with ``flags``) unless the sampling
  settings are valid (``generate``'s rules): checked when the policy is built, not at its first
  sampler call deep inside a search."""
  def number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

  def name(setting):
    return "--" + setting.replace("_", "-") if flags else setting

  if not number(temperature) or temperature < 0:
    raise SearchError(f"{name('temperature')} must be a finite number >= 0, got {temperature!r}")
  if top_p is not None and not (number(top_p) and 0.0 < top_p <= 1.0):
    raise SearchError(f"{name('top_p')} must be in (0, 1], got {top_p!r}")
  if min_p is not None and not (number(min_p) and 0.0 <= min_p < 1.0):
    raise SearchError(f"{name('min_p')} must be in [0, 1), got {min_p!r}")
  if top_k is not None and (not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool)
                            or top_k < 1):
    raise SearchError(f"{name('top_k')} must be an integer >= 1 (or None), got {top_k!r}")


class Policy:
  """A model and tokenizer with sampling settings (module doc).

  Args:
    model: a ``postrl.models.Transformer`` (or ``(graphdef, params)``).
    tokenizer: its tokenizer.
    max_new_tokens: tokens per full completion at most.
    temperature, top_k, top_p, min_p: sampling settings (``postrl.sampling.generate``).
    batch_size: rows per compiled generate call.
    system_prompt: an optional system message before every prompt.
    delimiter: the text that ends a reasoning step.
    max_step_tokens: tokens per reasoning step at most.
    sampling_impl: generate's sampler, "xla" | "auto" | "pallas" (the sort-free kernel).
  """

  def __init__(self, model, tokenizer, *, max_new_tokens: int = 64, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
               batch_size: int = 16, system_prompt: str | None = None, delimiter: str = "\n",
               max_step_tokens: int = 32, sampling_impl: str = "auto"):
    check_positive(max_new_tokens=max_new_tokens, batch_size=batch_size,
                   max_step_tokens=max_step_tokens)
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if not delimiter:
      raise SearchError("the step delimiter must be a non-empty string")
    if isinstance(model, tuple):
      self.graphdef, self.params = model
      merged = nnx.merge(self.graphdef, self.params)
    else:
      self.graphdef, self.params = nnx.split(model)
      merged = model
    self.config = merged.config
    self.tokenizer = tokenizer
    self.eos_ids, self.pad_id = stop_and_pad_ids(merged, tokenizer)
    self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
    if sampling_impl not in ("xla", "auto", "pallas"):
      raise SearchError(f"sampling_impl must be 'xla', 'auto' or 'pallas', got {sampling_impl!r}")
    self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                         sampling_impl=sampling_impl)
    self.system_prompt, self.delimiter, self.max_step_tokens = (system_prompt, delimiter,
                                                                max_step_tokens)
    self._prompt_cache: dict[str, list[int]] = {}

  @property
  def model(self):
    """The ``(graphdef, params)`` pair ``generate`` takes."""
    return self.graphdef, self.params

  def prompt_ids(self, problem) -> list[int]:
    """The chat-templated prompt of a problem (through the assistant header)."""
    prompt = as_problem(problem).prompt
    if prompt not in self._prompt_cache:
      system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
      self._prompt_cache[prompt] = list(self.tokenizer.encode_chat(
          system + [{"role": "user", "content": prompt}]))
    return self._prompt_cache[prompt]

  def row_ids(self, problem, prefix: str) -> list[int]:
    """Prompt ids followed by the ids of the assistant's text so far."""
    ids = self.prompt_ids(problem)
    return ids + list(self.tokenizer.encode(prefix, add_bos=False)) if prefix else list(ids)

  def complete(self, problems: Sequence, prefixes: Sequence[str] | None, n: int, *, key,
               max_new_tokens: int | None = None, temperature: float | None = None
               ) -> list[list[Completion]]:
    """``n`` continuations of each (problem, prefix) to the end of the solution.

    Returns one list of ``n`` ``Completion`` per problem, in sampling order; ``text`` is the new
    text only. ``temperature`` overrides the policy's (0 = greedy)."""
    check_positive(n=n)
    prefixes = [""] * len(problems) if prefixes is None else list(prefixes)
    rows = [self.row_ids(p, x) for p, x in zip(problems, prefixes) for _ in range(n)]
    outs = self._run(rows, key=key, max_new_tokens=max_new_tokens or self.max_new_tokens,
                     temperature=temperature, extra_stops=())
    done = [Completion(text=self.tokenizer.decode(ids), prompt_tokens=len(row),
                       num_tokens=len(ids), finished=eos, logp=logp)
            for row, (ids, eos, logp) in zip(rows, outs)]
    return [done[i * n:(i + 1) * n] for i in range(len(problems))]

  def next_steps(self, problems: Sequence, prefixes: Sequence[str], k: int, *, key
                 ) -> list[list[Completion]]:
    """``k`` sampled next reasoning steps of each (problem, prefix) (module doc).

    A ``Completion``'s ``text`` is the step without its delimiter; ``finished`` is True when the
    step ended the solution (end-of-sequence before any delimiter)."""
    check_positive(k=k)
    stops = delimiter_ids(self.tokenizer, self.delimiter, self.config.vocab_size)
    rows = [self.row_ids(p, x) for p, x in zip(problems, prefixes) for _ in range(k)]
    outs = self._run(rows, key=key, max_new_tokens=self.max_step_tokens, temperature=None,
                     extra_stops=stops)
    done = []
    for row, (ids, eos, logp) in zip(rows, outs):
      text = self.tokenizer.decode(ids)
      step, sep, _ = text.partition(self.delimiter)
      done.append(Completion(text=step, prompt_tokens=len(row), num_tokens=len(ids),
                             finished=eos and not sep, logp=logp))
    return [done[i * k:(i + 1) * k] for i in range(len(problems))]

  def _run(self, rows: Sequence[Sequence[int]], *, key, max_new_tokens: int,
           temperature: float | None, extra_stops: Sequence[int]
           ) -> list[tuple[np.ndarray, bool, float]]:
    """(new ids, ended with an EOS token, summed model log-prob) per row, in order."""
    if not rows:
      return []
    eos = set(self.eos_ids)
    stops = tuple(sorted(eos | set(extra_stops)))
    sampling = dict(self.sampling)
    if temperature is not None:
      sampling["temperature"] = temperature
    if sampling["temperature"] == 0.0:
      sampling.update(top_k=None, top_p=None, min_p=None)
    out = []
    for j, start in enumerate(range(0, len(rows), self.batch_size)):
      chunk = list(rows[start:start + self.batch_size])
      ids = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
      tokens, lengths = pad_prompts(ids, pad_id=self.pad_id, multiple=16)
      res = generate(self.model, tokens, lengths, key=jax.random.fold_in(key, j),
                     max_new_tokens=max_new_tokens, eos_ids=stops, pad_id=self.pad_id, **sampling)
      toks, lens = to_host(res.tokens_BxN), to_host(res.lengths_B)
      logps = to_host(res.model_logps_BxN)
      for b in range(len(chunk)):
        new = toks[b, :lens[b]]
        ended = bool(lens[b]) and int(new[-1]) in eos
        out.append((new, ended, float(logps[b, :lens[b]].sum())))
    return out
