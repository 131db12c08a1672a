"""Parallel sampling strategies: best-of-N, weighted best-of-N, self-consistency (and greedy).

Each samples N full solutions per problem from the policy (all problems' rows batched through
the jitted sampler together), extracts each solution's final answer, and selects:

  best_of_n             ŷ = argmax_i r(y_i)                          ("max_score")
  best_of_n weighted    â = argmax_a Σ_i r(y_i) 1[ans(y_i) ≡ a]       ("weighted_vote")
  self_consistency      â = argmax_a Σ_i 1[ans(y_i) ≡ a]              ("majority")
                        (with a scorer: reward-weighted vote, the same rule as weighted BoN)

Answers are grouped into equivalence classes by ``equal`` (default ``answers_equal``: "0.5" ≡
"1/2"); ties go to the class seen first in sampling order, and within the winning class the
highest-scored candidate (the first one when unscored) is returned. Candidates without an
extractable answer do not vote; if none has one the result has ``answer=None`` and status
``"no_answer"`` (its ``text`` is still the best-scored / first candidate).

The selection is a pure function of the candidate list (``select``), so ``subsample(result, n)``
re-selects from the first n candidates: one run at the largest N gives the whole accuracy-vs-N
curve (the samples are i.i.d.), with exact per-candidate token costs.
"""

from __future__ import annotations

from typing import Callable, Sequence

from postrl.sampling.search.common import (STATUS_NO_ANSWER, STATUS_NO_CANDIDATES, STATUS_OK,
                                           Candidate, SearchError, SearchResult, as_problems,
                                           as_scores, check_key, check_positive, cluster_answers,
                                           default_equal, default_extract, sum_tokens, vote)
from postrl.sampling.search.scorers import check_scorer

RULES = ("max_score", "weighted_vote", "majority")


def _first_max(indices, score) -> int:
  best = None
  for i in indices:
    if best is None or score(i) > score(best):
      best = i
  return best


def select(prompt: str, strategy: str, candidates: Sequence[Candidate], rule: str, *,
           info: dict | None = None) -> SearchResult:
  """The ``SearchResult`` of a selection ``rule`` over scored, clustered candidates (module doc).

  ``tokens`` is the sum of the candidates' own token costs. ``info`` gets ``select`` (the rule),
  ``n`` and, for votes, ``votes``: the total weight per answer (keyed by the class's first
  answer)."""
  if rule not in RULES:
    raise SearchError(f"unknown selection rule {rule!r}; known: {RULES}")
  candidates = tuple(candidates)
  info = dict(info or {}, select=rule, n=len(candidates))
  tokens = sum_tokens(c.tokens for c in candidates)
  if not candidates:
    return SearchResult(prompt, strategy, None, None, (), tokens, STATUS_NO_CANDIDATES, info)
  scored = all(c.score is not None for c in candidates)
  score = (lambda i: candidates[i].score) if scored else (lambda i: 0.0)
  everyone = range(len(candidates))
  if rule == "max_score":
    if not scored:
      raise SearchError("best-of-N needs a score for every candidate")
    chosen = _first_max(everyone, score)
  else:
    if rule == "weighted_vote" and not scored:
      raise SearchError("a weighted vote needs a score for every candidate")
    weights = [c.score for c in candidates] if rule == "weighted_vote" else None
    winner, totals = vote([c.cluster for c in candidates], weights)
    reps = {}
    for c in candidates:
      if c.cluster is not None:
        reps.setdefault(c.cluster, c.answer)
    info["votes"] = {reps[k]: v for k, v in sorted(totals.items())}
    members = [i for i in everyone if winner is not None and candidates[i].cluster == winner]
    chosen = _first_max(members or everyone, score)
  pick = candidates[chosen]
  info["chosen"] = chosen
  status = STATUS_OK if pick.answer is not None else STATUS_NO_ANSWER
  return SearchResult(prompt, strategy, pick.text, pick.answer, candidates, tokens, status, info)


def subsample(result: SearchResult, n: int) -> SearchResult:
  """``result`` re-selected from its first ``n`` candidates (same rule, exact token costs)."""
  rule = result.info.get("select")
  if rule not in RULES:
    raise SearchError(f"strategy {result.strategy!r} does not select from i.i.d. samples; run it "
                      f"again with n={n} instead of subsampling")
  check_positive(n=n)
  if n > len(result.candidates):
    raise SearchError(f"cannot subsample {n} of {len(result.candidates)} candidates")
  extra = {k: v for k, v in result.info.items() if k not in ("votes", "chosen", "n", "select")}
  return select(result.prompt, result.strategy, result.candidates[:n], rule, info=extra)


def _check_prompts(scorer, problems) -> None:
  """The scorer's own check of the problems (``RewardModelOutcome.check_prompts``: every prompt
  fits its ``max_len``), run before any sampling."""
  check = getattr(scorer, "check_prompts", None)
  if check is not None:
    check(problems)


def _sample(policy, problems, n: int, key, *, scorer, extract, equal, temperature=None):
  """Per problem: Candidates (scored when ``scorer``), clustered by answer."""
  rows = policy.complete(problems, None, n, key=key, temperature=temperature)
  flat = [(p, c) for p, row in zip(problems, rows) for c in row]
  if scorer is not None:
    scores = as_scores(scorer([p for p, _ in flat], [c.text for _, c in flat]), len(flat),
                       "the scorer")
    values, costs = scores.values, scores.item_tokens
  else:
    values, costs = [None] * len(flat), [None] * len(flat)
  out, i = [], 0
  for row in rows:
    answers = [extract(c.text) for c in row]
    clusters = cluster_answers(answers, equal)
    cands = []
    for c, a, k in zip(row, answers, clusters):
      tokens = c.tokens if costs[i] is None else c.tokens + costs[i]
      cands.append(Candidate(text=c.text, answer=a, score=values[i], finished=c.finished,
                             tokens=tokens, cluster=k, info={"logp": c.logp}))
      i += 1
    out.append(cands)
  return out


def best_of_n(policy, problems, *, n: int, scorer, key, weighted: bool = False,
              extract: Callable[[str], str | None] = default_extract,
              equal: Callable[[str, str], bool] = default_equal) -> list[SearchResult]:
  """Best-of-N: N samples per problem, scored by a verifier or a reward model, the best kept.

      ŷ = argmax_{i <= N} r(x, y_i)                                    (weighted=False)
      â = argmax_a Σ_i r(x, y_i) 1[ans(y_i) ≡ a]                       (weighted=True)

  Best-of-N / rejection sampling with a verifier (Cobbe et al. 2021, "Training Verifiers to
  Solve Math Word Problems"; Nakano et al. 2021, WebGPT, with a reward model); the weighted form
  sums the scores of every sample that reaches the same answer (Li et al. 2023; Snell et al.
  2024, "best-of-N weighted"), and needs scores >= 0 (probabilities: a 0/1 verifier or
  ``RewardModelOutcome(..., sigmoid=True)``). Ties: the first sample / first-seen answer.

  Args:
    policy: a ``Policy`` (its sampling settings apply).
    problems: prompts (strings) or problem objects with ``prompt`` (and what the scorer reads).
    n: samples per problem (split into ``policy.batch_size`` rows per compiled call).
    scorer: an outcome scorer ``(problems, texts) -> Scores`` (``verifier_scorer``,
      ``RewardModelOutcome``, or a function returning floats).
    key: PRNG key.
    weighted: weighted best-of-N instead of the single best sample.
    extract: final answer of a text (None when there is none).
    equal: answer equivalence.
  Returns:
    One ``SearchResult`` per problem (``candidates`` in sampling order with their scores).
  """
  check_positive(n=n)
  check_key(key)
  if scorer is None:
    raise SearchError("best_of_n needs a scorer (a verifier or a reward model)")
  check_scorer(policy, scorer, "reward model")
  problems = as_problems(problems)
  _check_prompts(scorer, problems)
  strategy = "weighted_best_of_n" if weighted else "best_of_n"
  rule = "weighted_vote" if weighted else "max_score"
  rows = _sample(policy, problems, n, key, scorer=scorer, extract=extract, equal=equal)
  return [select(p.prompt, strategy, row, rule) for p, row in zip(problems, rows)]


def self_consistency(policy, problems, *, n: int, key, scorer=None,
                     extract: Callable[[str], str | None] = default_extract,
                     equal: Callable[[str, str], bool] = default_equal) -> list[SearchResult]:
  """Self-consistency: the most frequent final answer of N sampled reasoning paths.

      â = argmax_a Σ_{i <= N} w_i 1[ans(y_i) ≡ a],   w_i = 1, or w_i = r(x, y_i) with a scorer

  Wang et al. 2023, "Self-Consistency Improves Chain of Thought Reasoning in Language Models"
  (the majority vote, marginalising out the reasoning path); with a scorer the reward-weighted
  vote (Li et al. 2023; Uesato et al. 2022), identical to weighted best-of-N. Ties go to the
  answer that appears first in sampling order (``vote``); the returned text is the first sample
  (the best-scored one with a scorer) that reaches the winning answer.

  Args:
    policy, problems, n, key, extract, equal: as ``best_of_n``.
    scorer: optional outcome scorer for the reward-weighted vote (scores >= 0).
  """
  check_positive(n=n)
  check_key(key)
  if scorer is not None:
    check_scorer(policy, scorer, "reward model")
  problems = as_problems(problems)
  _check_prompts(scorer, problems)
  rule = "majority" if scorer is None else "weighted_vote"
  rows = _sample(policy, problems, n, key, scorer=scorer, extract=extract, equal=equal)
  return [select(p.prompt, "self_consistency", row, rule) for p, row in zip(problems, rows)]


def greedy(policy, problems, *, extract: Callable[[str], str | None] = default_extract
           ) -> list[SearchResult]:
  """The baseline: one greedy (temperature 0) completion per problem."""
  problems = as_problems(problems)
  import jax  # pylint: disable=import-outside-toplevel
  rows = _sample(policy, problems, 1, jax.random.key(0), scorer=None, extract=extract,
                 equal=default_equal, temperature=0.0)
  return [select(p.prompt, "greedy", row, "majority") for p, row in zip(problems, rows)]
