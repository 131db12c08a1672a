"""Types shared by the decoding searches: what a strategy returns, how tokens are counted, how
answers are clustered and voted on.

Every strategy returns one ``SearchResult`` per problem: the chosen completion and its extracted
answer, every candidate with its score, and the tokens spent. Tokens are counted honestly and in
three parts (``TokenCount``):

  prompt     tokens the policy read as prompts: every generated row prefills its whole prompt
             (chat-templated problem plus any partial solution), so a prompt sampled N times
             counts N times; beam search prefills a prompt once for all its beams;
  generated  tokens the policy produced, including verifier roll-outs used as values and the
             one greedy completion MCTS may need at the end;
  scorer     tokens a reward model or process-reward model read (one row per scored text).

Rows added only to fill a fixed-shape batch, and the padding after a row has ended, are computed
by the compiled programs but are not counted: they are an artefact of static shapes, not tokens
the method needs. A rule-based verifier costs no tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

STATUS_OK = "ok"
STATUS_NO_ANSWER = "no_answer"          # candidates exist, none has an extractable answer
STATUS_NO_CANDIDATES = "no_candidates"  # the search produced no candidate at all


class SearchError(ValueError):
  """Bad input to a search (settings, scorer, tokenizer): the message names the problem."""


@dataclasses.dataclass(frozen=True)
class TokenCount:
  """Tokens spent by a search (module doc): ``prompt`` + ``generated`` by the policy, ``scorer``
  by reward / process-reward models."""
  prompt: int = 0
  generated: int = 0
  scorer: int = 0

  @property
  def total(self) -> int:
    return self.prompt + self.generated + self.scorer

  def __add__(self, other: "TokenCount") -> "TokenCount":
    return TokenCount(self.prompt + other.prompt, self.generated + other.generated,
                      self.scorer + other.scorer)

  def to_json(self) -> dict:
    return {"prompt": self.prompt, "generated": self.generated, "scorer": self.scorer,
            "total": self.total}


def sum_tokens(counts) -> TokenCount:
  """The sum of an iterable of ``TokenCount``."""
  total = TokenCount()
  for c in counts:
    total = total + c
  return total


@dataclasses.dataclass(frozen=True)
class Completion:
  """One sampled continuation from the policy.

  ``text`` is the new text only (for a step: cut at the step delimiter); ``finished`` means the
  solution ended (an end-of-sequence token), not only the step; ``logp`` is the plain model's
  log-probability of the generated tokens (their sum)."""
  text: str
  prompt_tokens: int
  num_tokens: int
  finished: bool
  logp: float = 0.0

  @property
  def tokens(self) -> TokenCount:
    return TokenCount(prompt=self.prompt_tokens, generated=self.num_tokens)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A candidate solution of a search with its score.

  ``score`` is the strategy's own (verifier or reward-model score, PRM value, length-penalised
  log-probability, MCTS value; None when unscored); ``cluster`` the index of its answer's
  equivalence class (voting); ``tokens`` what this candidate alone cost, where that is separable
  (sampling strategies: its row's prompt, its generated tokens, its scoring)."""
  text: str
  answer: str | None
  score: float | None = None
  finished: bool = True
  tokens: TokenCount = TokenCount()
  cluster: int | None = None
  info: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    out = {"text": self.text, "answer": self.answer, "score": self.score,
           "finished": self.finished, "tokens": self.tokens.to_json()}
    if self.info:
      out["info"] = self.info
    return out


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """What every strategy returns for one problem.

  ``text`` / ``answer``: the chosen completion and its extracted answer (None when there is no
  candidate; ``answer`` None when no answer could be extracted, see ``status``).
  ``candidates``: every candidate with its score. ``tokens``: the tokens spent on this problem.
  ``status``: ``"ok"``, ``"no_answer"`` or ``"no_candidates"``. ``info``: strategy details
  (votes per answer, beams per round, tree statistics)."""
  prompt: str
  strategy: str
  text: str | None
  answer: str | None
  candidates: tuple[Candidate, ...]
  tokens: TokenCount
  status: str = STATUS_OK
  info: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return {"prompt": self.prompt, "strategy": self.strategy, "text": self.text,
            "answer": self.answer, "status": self.status, "tokens": self.tokens.to_json(),
            "candidates": [c.to_json() for c in self.candidates], "info": self.info}


class Scores(NamedTuple):
  """A scorer's output: one value per scored item and the tokens each item's scoring spent."""
  values: list
  item_tokens: list | None = None  # TokenCount per item; None: scoring cost nothing

  @property
  def tokens(self) -> TokenCount:
    return sum_tokens(self.item_tokens or ())


def as_scores(out, n: int, what: str) -> Scores:
  """A scorer's return value (``Scores`` or a plain sequence of numbers, costing no tokens)
  checked to hold ``n`` finite numbers, with ``item_tokens`` filled in."""
  if not isinstance(out, Scores):
    try:
      out = Scores(list(out))
    except TypeError:
      raise SearchError(f"{what} must return Scores or a sequence of numbers, got "
                        f"{type(out).__name__}") from None
  try:
    values = [float(v) for v in out.values]
  except (TypeError, ValueError):
    raise SearchError(f"{what} returned a score that is not a number: "
                      f"{str(out.values)[:200]}") from None
  if len(values) != n:
    raise SearchError(f"{what} returned {len(values)} scores for {n} items")
  bad = [v for v in values if v != v or v in (float("inf"), float("-inf"))]
  if bad:
    raise SearchError(f"{what} returned a non-finite score ({bad[0]})")
  item_tokens = list(out.item_tokens) if out.item_tokens is not None else [TokenCount()] * n
  if len(item_tokens) != n:
    raise SearchError(f"{what} returned token counts for {len(item_tokens)} of {n} items")
  return Scores(values, item_tokens)


@dataclasses.dataclass(frozen=True)
class PartialSolution:
  """A solution written so far, as reasoning steps (step searches and MCTS).

  ``text`` joins the steps with the delimiter; ``prefix`` is what the policy continues from
  (``text`` plus a closing delimiter while the solution is unfinished)."""
  steps: tuple[str, ...] = ()
  finished: bool = False
  delimiter: str = "\n"

  @property
  def text(self) -> str:
    return self.delimiter.join(self.steps)

  @property
  def prefix(self) -> str:
    return self.text + self.delimiter if self.steps and not self.finished else self.text

  def extend(self, step: str, finished: bool) -> "PartialSolution":
    return PartialSolution(self.steps + (step,), finished, self.delimiter)


# --------------------------------------------------------------------------------- problems


@dataclasses.dataclass(frozen=True)
class TextProblem:
  """A bare prompt (no reference answer)."""
  prompt: str


def as_problem(problem) -> Any:
  """A problem object with a ``prompt`` attribute (strings are wrapped in ``TextProblem``)."""
  if isinstance(problem, str):
    return TextProblem(problem)
  if not isinstance(getattr(problem, "prompt", None), str):
    raise SearchError(f"a problem must be a string or have a string 'prompt' attribute, got "
                      f"{type(problem).__name__}")
  return problem


def as_problems(problems) -> list:
  """``as_problem`` of each; a single string or problem is a list of one."""
  if isinstance(problems, str) or hasattr(problems, "prompt"):
    problems = [problems]
  return [as_problem(p) for p in problems]


def check_positive(**values) -> None:
  """SearchError unless every given integer setting is >= 1."""
  for name, v in values.items():
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise SearchError(f"{name} must be an integer >= 1, got {v!r}")


def check_key(key) -> None:
  """SearchError unless ``key`` is one JAX PRNG key (``jax.random.key(seed)`` or a legacy
  ``PRNGKey``): a seed, None or a batch of keys would otherwise fail inside JAX mid-search. The
  rule is ``postrl.sampling.generate.check_key``'s (the sampler the search calls)."""
  from postrl.sampling.generate import check_key as check_one_key  # pylint: disable=import-outside-toplevel
  try:
    check_one_key("search", key)
  except ValueError as e:
    raise SearchError(str(e)) from None


# -------------------------------------------------------------------------------- answers


def default_extract(text: str) -> str | None:
  """``postrl.rewards.extract_answer(text, method="auto")``: boxed, else an answer marker, else
  the last number."""
  from postrl.rewards.math import extract_answer  # pylint: disable=import-outside-toplevel
  return extract_answer(text)


def default_equal(a: str, b: str) -> bool:
  """``postrl.rewards.answers_equal``: numeric and light symbolic equivalence."""
  from postrl.rewards.math import answers_equal  # pylint: disable=import-outside-toplevel
  return a == b or answers_equal(a, b)


def cluster_answers(answers: Sequence[str | None],
                    equal: Callable[[str, str], bool] = default_equal) -> list[int | None]:
  """Equivalence-class index of each answer (None for no answer).

  Answers are taken in order; each joins the first class whose first member it ``equal``s, else
  opens a new class. Classes are numbered by first appearance, so the result is deterministic
  (``equal`` need not be transitive)."""
  reps: list[str] = []
  exact: dict[str, int] = {}
  out: list[int | None] = []
  for a in answers:
    if a is None:
      out.append(None)
      continue
    c = exact.get(a)
    if c is None:
      c = next((i for i, r in enumerate(reps) if equal(a, r)), None)
      if c is None:
        c = len(reps)
        reps.append(a)
      exact[a] = c
    out.append(c)
  return out


def vote(clusters: Sequence[int | None], weights: Sequence[float] | None = None
         ) -> tuple[int | None, dict[int, float]]:
  """(winning class, total weight per class) of a (weighted) vote.

      winner = argmax_a sum_i w_i 1[cluster_i = a]      (w_i = 1: majority vote)

  Self-consistency (Wang et al. 2023, "Self-Consistency Improves Chain of Thought Reasoning in
  Language Models") with w_i = 1; weighted majority / weighted best-of-N with w_i a verifier or
  reward score (Li et al. 2023, "Making Language Models Better Reasoners with Step-Aware
  Verifier"; Snell et al. 2024, "Scaling LLM Test-Time Compute Optimally ...", §5).
  Ties go to the class that appears first in sampling order (its first member has the lowest
  index): deterministic, and independent of how answers are spelled. Items without a class do
  not vote; the winner is None when no item has one. Weights must be finite and >= 0, one per
  item.
  """
  if weights is not None and len(weights) != len(clusters):
    raise SearchError(f"vote got {len(weights)} weights for {len(clusters)} items")
  totals: dict[int, float] = {}
  for i, c in enumerate(clusters):
    if c is None:
      continue
    w = 1.0 if weights is None else float(weights[i])
    if not math.isfinite(w):
      raise SearchError(f"weighted voting needs finite scores, got {w} for candidate {i}")
    if w < 0:
      raise SearchError(f"weighted voting needs non-negative scores, got {w} for candidate {i}; "
                        "use probabilities (e.g. RewardModelOutcome(..., sigmoid=True)) or a "
                        "0/1 verifier")
    totals[c] = totals.get(c, 0.0) + w
  if not totals:
    return None, totals
  best = max(totals.values())
  winner = min(c for c, t in totals.items() if t == best)  # classes are numbered by appearance
  return winner, totals
