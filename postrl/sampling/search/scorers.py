"""Scorers for the searches: outcome scorers rate whole solutions, value functions rate partial
solutions (reasoning-step prefixes).

    outcome scorer   scorer(problems, texts) -> Scores            (best-of-N, weighted votes)
    value function   value(problems, partials) -> Scores          (step beam search, MCTS)

``problems[i]`` goes with ``texts[i]`` / ``partials[i]`` (calls are batched across problems). A
plain list of floats is accepted where ``Scores`` is expected (no tokens spent), so a test or a
custom heuristic is a lambda. The library's scorers:

  verifier_scorer(reward_fn)        r(y) from a rule-based verifier (0 tokens)
  RewardModelOutcome(path)          a trained outcome reward model, r(x, y) = w · h_last + b
  ProcessRewardScorer(path)         a trained process reward model: σ(z_s) per step, aggregated
  RolloutValue(policy, reward_fn)   Monte-Carlo roll-outs of the policy scored by the verifier

A reward model whose tokenizer differs from the policy's is refused (``check_scorer``): it
reads the policy's text through another vocabulary than the one it was trained next to, so its
scores are not comparable to those it was validated with; ``allow_tokenizer_mismatch=True``
scores the text anyway (the text is re-tokenised, so it is well defined).
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Sequence

import numpy as np

from postrl.sampling.search.common import (PartialSolution, Scores, SearchError, TokenCount,
                                           as_problem, check_key, sum_tokens)

# pylint: disable=import-outside-toplevel  # reward models import JAX models only when built


def verifier_scorer(reward_fn: Callable[[str, object], float]):
  """An outcome scorer from a verifier ``reward_fn(text, problem) -> float`` (e.g.
  ``postrl.data.preference.verifier_reward("arithmetic")``); costs no tokens."""

  def score(problems, texts) -> Scores:
    return Scores([float(reward_fn(t, as_problem(p))) for p, t in zip(problems, texts)])

  score.tokenizer = None
  return score


# ------------------------------------------------------------------------------- tokenizers

_FINGERPRINTS: dict[int, tuple] = {}


def tokenizer_fingerprint(tokenizer) -> tuple[int, int | None, str]:
  """(vocabulary size, EOS id, sha256 of every token string in id order)."""
  key = id(tokenizer)
  if key not in _FINGERPRINTS:
    n = tokenizer.vocab_size
    h = hashlib.sha256()
    for i in range(n):
      h.update(str(tokenizer.id_to_token(i)).encode("utf-8", "replace") + b"\0")
    _FINGERPRINTS[key] = (n, tokenizer.eos_id, h.hexdigest())
  return _FINGERPRINTS[key]


def check_tokenizers(policy_tokenizer, scorer_tokenizer, *, what: str = "reward model") -> None:
  """SearchError naming the difference when the two tokenizers differ (vocabulary or EOS)."""
  a, b = tokenizer_fingerprint(policy_tokenizer), tokenizer_fingerprint(scorer_tokenizer)
  if a == b:
    return
  where = getattr(scorer_tokenizer, "source", "") or what
  if a[0] != b[0]:
    diff = f"vocabulary of {b[0]} tokens vs the policy's {a[0]}"
  elif a[1] != b[1]:
    diff = f"end-of-sequence id {b[1]} vs the policy's {a[1]}"
  else:
    diff = "same vocabulary size but different tokens"
  raise SearchError(f"the {what}'s tokenizer ({where}) differs from the policy's: {diff}. It "
                    f"was trained next to another model; pass allow_tokenizer_mismatch=True "
                    f"(CLI: --allow-tokenizer-mismatch) to score the text anyway")


def check_scorer(policy, scorer, what: str) -> None:
  """``check_tokenizers`` for scorers that carry a ``tokenizer`` (reward models), unless they
  were built with ``allow_tokenizer_mismatch=True``."""
  tok = getattr(scorer, "tokenizer", None)
  policy_tok = getattr(policy, "tokenizer", None)
  if tok is None or policy_tok is None or getattr(scorer, "allow_tokenizer_mismatch", False):
    return
  check_tokenizers(policy_tok, tok, what=what)


# ----------------------------------------------------------------------------- reward models


def _sigmoid(x: float) -> float:
  return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class RewardModelOutcome:
  """An outcome scorer from a trained reward model (``postrl.rewards.RewardModelScorer``).

  r(x, y) = w · h_last + b (InstructGPT, Ouyang et al. 2022), or σ(r) with ``sigmoid=True``
  (scores in (0, 1), as weighted voting needs). Each scored row (prompt and reply in the reward
  model's chat template) counts its tokens as scorer tokens.

  Args:
    path_or_scorer: a folder written by ``postrl.trainers.reward_model`` or a
      ``RewardModelScorer``.
    sigmoid: map scores through σ.
    allow_tokenizer_mismatch: score the policy's text even when the tokenizers differ.
    **scorer_kwargs: ``RewardModelScorer`` options (batch_size, max_len, system_prompt, dtype).
  """

  def __init__(self, path_or_scorer, *, sigmoid: bool = False,
               allow_tokenizer_mismatch: bool = False, **scorer_kwargs):
    from postrl.rewards.reward_model import RewardModelScorer
    if isinstance(path_or_scorer, str):
      path_or_scorer = RewardModelScorer(path_or_scorer, **scorer_kwargs)
    self.scorer = path_or_scorer
    self.tokenizer = path_or_scorer.tokenizer
    self.sigmoid, self.allow_tokenizer_mismatch = sigmoid, allow_tokenizer_mismatch

  def prompt_error(self, prompt: str) -> str | None:
    """Why the reward model cannot score replies to ``prompt`` (it leaves no room for a reply
    in ``max_len``), or None."""
    try:
      self.scorer.tokens("", prompt)
    except ValueError as e:
      return str(e)
    return None

  def check_prompts(self, problems) -> None:
    """SearchError, before any sampling, when a problem's prompt leaves no room for a reply in
    the reward model's ``max_len`` (scoring would otherwise fail after every sample was drawn).
    A problem with a ``where`` attribute (the command line's records: "file:line") is named by
    it, else by its position."""
    for i, p in enumerate(problems):
      error = self.prompt_error(as_problem(p).prompt)
      if error:
        where = getattr(p, "where", None)
        if where:
          raise SearchError(f"{where}: field 'prompt': {error} (reward model)")
        raise SearchError(f"reward model: prompt #{i + 1} of {len(problems)}: {error}")

  def __call__(self, problems, texts) -> Scores:
    prompts = [as_problem(p).prompt for p in problems]
    try:
      n_tokens = [len(self.scorer.tokens(t, p)) for t, p in zip(texts, prompts)]
      values = self.scorer.score(list(texts), prompts)
    except ValueError as e:  # a prompt longer than the reward model's max_len
      raise SearchError(f"reward model: {e}") from None
    if self.sigmoid:
      values = [_sigmoid(v) for v in values]
    return Scores(values, [TokenCount(scorer=n) for n in n_tokens])


AGGREGATES = ("last", "min", "prod")


class ProcessRewardScorer:
  """A value function from a trained process reward model (PRM).

  The partial solution is laid out exactly as ``postrl.data.preference.tokenize_steps`` lays out
  training records: the prompt in the chat template, then each step encoded on its own followed
  by a newline (the last step of a finished solution without it). Step s's correctness
  probability is p_s = σ(z_s), z_s the per-token score at the step's last token (Lightman et al.
  2023, "Let's Verify Step by Step"). The value of a partial solution aggregates them:

      last:  v = p_S          min:  v = min_s p_s          prod:  v = prod_s p_s

  (``last`` is what Snell et al. 2024 found best for search; min / prod are Lightman et al.'s
  and Wang et al.'s solution-level scores). Rows run ``batch_size`` at a time in one compiled
  program of ``max_len`` tokens; a row longer than that keeps its first ``max_len`` tokens, and
  the steps that end past the cut are not scored (a partial with no scored step gets 0).

  Args:
    path: a folder written by ``postrl.trainers.reward_model`` (loss ``process_reward``).
    aggregate: "last", "min" or "prod".
    batch_size, max_len: the compiled shape (max_len default: the training seq_len, else 512).
    system_prompt: default: the one the model was trained with.
    allow_tokenizer_mismatch: score the policy's text even when the tokenizers differ.
  """

  def __init__(self, path: str, *, aggregate: str = "last", batch_size: int = 16,
               max_len: int | None = None, system_prompt: str | None = None,
               param_dtype: str = "float32", allow_tokenizer_mismatch: bool = False):
    import jax
    from flax import nnx
    from postrl.rewards.reward_model import load_reward_model
    if aggregate not in AGGREGATES:
      raise SearchError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    model, self.tokenizer, meta = load_reward_model(path, param_dtype=param_dtype)
    self.aggregate, self.batch_size = aggregate, batch_size
    self.max_len = int(max_len or meta.get("max_len") or 512)
    self.system_prompt = meta.get("system_prompt") if system_prompt is None else system_prompt
    self.allow_tokenizer_mismatch = allow_tokenizer_mismatch
    graphdef, self._params = nnx.split(model)
    self._scores = jax.jit(lambda p, t, s: nnx.merge(graphdef, p).token_scores(t, s))

  def worst_case_tokens(self, problem, prefix_tokens: int) -> int:
    """The most tokens scoring one partial can read (a row is cut to ``max_len``)."""
    del problem, prefix_tokens
    return self.max_len

  def rows(self, problem, partial: PartialSolution) -> tuple[list[int], list[int]]:
    """(token ids cut to max_len, positions of the scored steps' last tokens)."""
    from postrl.data.preference import prompt_and_response_ids
    prompt_ids, _ = prompt_and_response_ids(as_problem(problem).prompt, "", self.tokenizer,
                                            system_prompt=self.system_prompt or None)
    ids, ends = [int(i) for i in prompt_ids], []
    for s, step in enumerate(partial.steps):
      last = s == len(partial.steps) - 1 and partial.finished
      ids += list(self.tokenizer.encode(step + ("" if last else "\n"), add_bos=False))
      ends.append(len(ids) - 1)
    ids = ids[:self.max_len]
    return ids, [e for e in ends if e < len(ids)]

  def step_probabilities(self, problems, partials: Sequence[PartialSolution]
                         ) -> tuple[list[list[float]], list[int]]:
    """p_s of every scored step of every partial, and the tokens each row read."""
    rows = [self.rows(p, x) for p, x in zip(problems, partials)]
    out = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      tokens = np.zeros((self.batch_size, self.max_len), np.int32)
      segments = np.zeros((self.batch_size, self.max_len), np.int32)
      for b, (ids, _) in enumerate(chunk):
        tokens[b, :len(ids)] = ids
        segments[b, :len(ids)] = 1
      z = np.asarray(self._scores(self._params, tokens, segments), np.float64)
      out += [[_sigmoid(float(z[b, e])) for e in ends] for b, (_, ends) in enumerate(chunk)]
    return out, [len(ids) for ids, _ in rows]

  def __call__(self, problems, partials: Sequence[PartialSolution]) -> Scores:
    probs, n_tokens = self.step_probabilities(problems, partials)
    values = []
    for p in probs:
      if not p:
        values.append(0.0)
      elif self.aggregate == "last":
        values.append(p[-1])
      elif self.aggregate == "min":
        values.append(min(p))
      else:
        values.append(float(np.prod(p)))
    return Scores(values, [TokenCount(scorer=n) for n in n_tokens])


class RolloutValue:
  """Monte-Carlo value of a partial solution from the policy and an outcome verifier.

  Each unfinished partial s_1..s_j is completed ``rollouts`` times by the policy and every full
  text is scored by the verifier, r_i = clip(reward_fn(s_1..s_j + completion_i), 0, 1):

      soft (default)   v = mean_i r_i        hard   v = max_i r_i

  (Math-Shepherd's soft / hard estimates, Wang et al. 2024, the labels
  ``postrl.data.verifier.monte_carlo_step_labels`` makes; the "simulation" of MCTS). A finished
  solution is scored directly. The roll-outs are policy tokens (prompt and generated) and are
  counted as such. Calls are batched across partials; call t samples with fold_in(key, t).

  Args:
    policy: the ``Policy`` that completes the prefixes (usually the searched one).
    reward_fn: ``(text, problem) -> float``.
    rollouts: completions per partial.
    soft: mean (True) or max (False).
    key: PRNG key.
    max_new_tokens, temperature: roll-out settings (default: the policy's).
  """

  def __init__(self, policy, reward_fn: Callable[[str, object], float], *, rollouts: int = 4,
               soft: bool = True, key, max_new_tokens: int | None = None,
               temperature: float | None = None):
    import jax
    from postrl.sampling.search.policy import check_sampling
    if not isinstance(rollouts, int) or rollouts < 1:
      raise SearchError(f"rollouts must be an integer >= 1, got {rollouts!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
      raise SearchError(f"max_new_tokens must be an integer >= 1 (or None), got "
                        f"{max_new_tokens!r}")
    if temperature is not None:
      check_sampling(temperature=temperature)
    check_key(key)
    self.policy, self.reward_fn, self.rollouts, self.soft = policy, reward_fn, rollouts, soft
    self.key, self._calls, self._fold = key, 0, jax.random.fold_in
    self.max_new_tokens, self.temperature = max_new_tokens, temperature

  def worst_case_tokens(self, problem, prefix_tokens: int) -> int:
    """The most tokens valuing one partial of ``prefix_tokens`` (prompt included) can cost."""
    del problem
    n = self.max_new_tokens or getattr(self.policy, "max_new_tokens", 0)
    return self.rollouts * (prefix_tokens + n)

  def _reward(self, text: str, problem) -> float:
    return float(np.clip(self.reward_fn(text, as_problem(problem)), 0.0, 1.0))

  def __call__(self, problems, partials: Sequence[PartialSolution]) -> Scores:
    values: list[float | None] = [None] * len(partials)
    tokens = [TokenCount()] * len(partials)
    todo = []
    for i, (problem, partial) in enumerate(zip(problems, partials)):
      if partial.finished:
        values[i] = self._reward(partial.text, problem)
      else:
        todo.append(i)
    if todo:
      key = self._fold(self.key, self._calls)
      self._calls += 1
      rows = self.policy.complete([problems[i] for i in todo], [partials[i].prefix for i in todo],
                                  self.rollouts, key=key, max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature)
      for i, completions in zip(todo, rows):
        r = [self._reward(partials[i].prefix + c.text, problems[i]) for c in completions]
        values[i] = float(np.mean(r)) if self.soft else max(r)
        tokens[i] = sum_tokens(c.tokens for c in completions)
    return Scores(values, tokens)
