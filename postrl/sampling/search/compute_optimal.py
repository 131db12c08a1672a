"""Compute-optimal test-time scaling: pick the strategy and N that maximise accuracy on a small
calibration set within a token budget.

Snell et al. 2024 ("Scaling LLM Test-Time Compute Optimally can be More Effective than Scaling
Model Parameters", §3.1) define the compute-optimal strategy for a budget B as

    θ*(B) = argmax_θ  E_x [ 1[ answer(Target(θ, B, x)) = y*(x) ] ]

over search hyper-parameters θ (here: the strategy and its N), estimated on calibration
problems. ``calibrate`` runs every strategy at every N on the calibration problems (strategies
that select from i.i.d. samples run once at the largest N and are re-selected on the first n
samples, ``subsample``) and records, per problem, whether the chosen answer is right and the
tokens spent; ``choose_compute_optimal`` keeps the configurations whose mean tokens per problem
fit the budget and returns the most accurate (ties: fewer tokens, then the order given).

Snell et al. also condition θ on question difficulty, binned in five quantiles of the model's
own pass rate ("oracle difficulty", §3.2). With ``bins`` > 0, ``compute_optimal`` estimates each
problem's pass rate as the fraction of correct samples in the largest i.i.d. sample run and
reports the best configuration per difficulty bin (``by_difficulty``): the analysis of their
Figures 3-4. Applying it to new problems needs a difficulty estimate at test time (their
"model-predicted difficulty"), which costs tokens this chooser does not spend.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from postrl.sampling.search.common import SearchError, SearchResult, as_problems
from postrl.sampling.search.sampled import RULES, subsample


def reference_correct(answer: str | None, problem) -> bool:
  """``answers_equal(answer, problem.answer)`` (False without an answer)."""
  from postrl.rewards.math import answers_equal  # pylint: disable=import-outside-toplevel
  reference = getattr(problem, "answer", None)
  if reference is None:
    raise SearchError("calibration problems need a reference 'answer' (or pass correct=...)")
  return answer is not None and answers_equal(answer, str(reference))


@dataclasses.dataclass(frozen=True)
class CalibrationPoint:
  """One (strategy, N) on the calibration problems: per-problem correctness and tokens."""
  strategy: str
  n: int
  correct: tuple[bool, ...]
  tokens: tuple[int, ...]

  def accuracy(self, idx: Sequence[int] | None = None) -> float:
    c = np.asarray(self.correct, float)
    return float(c.mean() if idx is None else c[list(idx)].mean()) if len(c) else 0.0

  def mean_tokens(self, idx: Sequence[int] | None = None) -> float:
    t = np.asarray(self.tokens, float)
    return float(t.mean() if idx is None else t[list(idx)].mean()) if len(t) else 0.0

  def to_json(self) -> dict:
    return {"strategy": self.strategy, "n": self.n, "accuracy": self.accuracy(),
            "mean_tokens": self.mean_tokens()}


def _subsamplable(results: Sequence[SearchResult], n: int) -> bool:
  return all(r.info.get("select") in RULES and len(r.candidates) == n for r in results)


def calibrate(runs: Mapping[str, Callable[[list, int], list[SearchResult]]], problems,
              ns: Sequence[int], *,
              correct: Callable[[str | None, object], bool] = reference_correct
              ) -> tuple[list[CalibrationPoint], dict[str, list[SearchResult]]]:
  """Runs each strategy at each N on the calibration problems.

  Args:
    runs: strategy name -> ``run(problems, n) -> list[SearchResult]`` (e.g.
      ``lambda ps, n: self_consistency(policy, ps, n=n, key=key)``).
    problems: calibration problems (with what ``correct`` reads).
    ns: the N values to try (>= 1).
    correct: ``(answer, problem) -> bool``.
  Returns:
    ``(points, samples)``: one ``CalibrationPoint`` per (strategy, N) in the order given, and
    per strategy the results of its run at the largest N when it selects from i.i.d. samples.
  """
  problems = as_problems(problems)
  ns = sorted({int(n) for n in ns})
  if not ns or ns[0] < 1 or not problems or not runs:
    raise SearchError("calibrate needs strategies, calibration problems and N values >= 1")
  points, samples = [], {}
  def checked(name, results, n):
    results = list(results) if results is not None else []
    if len(results) != len(problems):
      raise SearchError(f"strategy {name!r} at n={n} returned {len(results)} results for "
                        f"{len(problems)} calibration problems (one SearchResult per problem)")
    return results

  for name, run in runs.items():
    top = checked(name, run(problems, ns[-1]), ns[-1])
    if _subsamplable(top, ns[-1]):
      samples[name] = top
      by_n = {n: [subsample(r, n) for r in top] for n in ns}
    else:
      by_n = {n: top if n == ns[-1] else checked(name, run(problems, n), n) for n in ns}
    for n in ns:
      results = by_n[n]
      points.append(CalibrationPoint(
          name, n, tuple(bool(correct(r.answer, p)) for r, p in zip(results, problems)),
          tuple(r.tokens.total for r in results)))
  return points, samples


def choose_compute_optimal(points: Sequence[CalibrationPoint], budget: float, *,
                           idx: Sequence[int] | None = None) -> CalibrationPoint | None:
  """The most accurate point whose mean tokens per problem (over ``idx``, default all) are
  <= ``budget``; ties go to fewer tokens, then to the earlier point. None if none fits."""
  best, key = None, None
  for point in points:
    tokens = point.mean_tokens(idx)
    if tokens > budget:
      continue
    k = (point.accuracy(idx), -tokens)
    if key is None or k > key:
      best, key = point, k
  return best


@dataclasses.dataclass(frozen=True)
class ComputeOptimalChoice:
  """``best``: the chosen point (None when nothing fits the budget); ``points``: every
  measured point; ``by_difficulty``: per difficulty bin, the best point there."""
  best: CalibrationPoint | None
  budget: float
  points: tuple[CalibrationPoint, ...]
  by_difficulty: tuple[dict, ...] = ()

  def to_json(self) -> dict:
    return {"budget": self.budget, "best": self.best.to_json() if self.best else None,
            "points": [p.to_json() for p in self.points],
            "by_difficulty": list(self.by_difficulty)}


def pass_rates(samples: Sequence[SearchResult], problems,
               correct: Callable[[str | None, object], bool] = reference_correct) -> np.ndarray:
  """Fraction of correct candidates per problem (Snell et al.'s oracle difficulty is 1 - it)."""
  return np.asarray([np.mean([bool(correct(c.answer, p)) for c in r.candidates])
                     if r.candidates else 0.0 for r, p in zip(samples, problems)])


def compute_optimal(runs: Mapping[str, Callable[[list, int], list[SearchResult]]], problems, *,
                    ns: Sequence[int], budget: float, bins: int = 0,
                    correct: Callable[[str | None, object], bool] = reference_correct
                    ) -> ComputeOptimalChoice:
  """Calibrates every (strategy, N) and picks the compute-optimal one for ``budget`` tokens per
  problem (module doc). With ``bins`` > 0, also the best per difficulty quantile bin (needs one
  strategy that samples i.i.d., e.g. self-consistency, for the pass rates)."""
  if not isinstance(bins, int) or isinstance(bins, bool) or bins < 0:
    raise SearchError(f"bins must be an integer >= 0 (0: no difficulty bins), got {bins!r}")
  problems = as_problems(problems)
  points, samples = calibrate(runs, problems, ns, correct=correct)
  by_bin = []
  if bins:
    if not samples:
      raise SearchError("difficulty bins need a strategy that samples i.i.d. (self_consistency "
                        "or best_of_n) among the runs, for the pass rates")
    rates = pass_rates(samples[max(samples, key=lambda k: len(samples[k][0].candidates))],
                       problems, correct)
    order = np.argsort(-rates, kind="stable")  # easiest first
    for b, idx in enumerate(np.array_split(order, bins)):
      if not len(idx):
        continue
      pick = choose_compute_optimal(points, budget, idx=idx)
      by_bin.append({"bin": b, "problems": len(idx),
                     "pass_rate": [float(rates[idx].min()), float(rates[idx].max())],
                     "strategy": pick.strategy if pick else None, "n": pick.n if pick else None,
                     "accuracy": pick.accuracy(idx) if pick else None,
                     "mean_tokens": pick.mean_tokens(idx) if pick else None})
  return ComputeOptimalChoice(choose_compute_optimal(points, budget), float(budget),
                              tuple(points), tuple(by_bin))
