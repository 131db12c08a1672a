"""Step-level beam search: reasoning steps sampled from the policy, partial solutions kept by a
process reward model or by a verifier's Monte-Carlo roll-outs.

Following Snell et al. 2024 ("Scaling LLM Test-Time Compute Optimally can be More Effective than
Scaling Model Parameters", §5.1 "beam search" against a PRM), for each problem:

    round 0:  sample ``width x expansions`` first steps
    round t:  sample ``expansions`` next steps of each live beam
    score every new partial solution with the value function v (PRM: σ(z) of its last step by
              default; or roll-outs to the end scored by the verifier, ``RolloutValue``)
    keep the ``width`` best distinct new partials; those that end the solution are finished
              and kept aside, the others are the live beams of the next round

until no beam is live or ``max_steps`` rounds have run. Beams still unfinished then (live at
``max_steps``, or live beams whose every expansion was blank) are completed greedily to the end by
the policy (``complete_unfinished``, the default; one batched call for all problems), the
completion split into steps at the delimiter, and the completed solution scored by the same
value function, so that it competes with the solutions that finished on their own; those tokens
are counted. With ``complete_unfinished=False`` they join the candidates as unfinished partial
solutions with their last round's score. The answer is the best-scored finished solution (any
candidate when none finished), or with ``select="weighted"`` the answer with the largest summed
score over the candidates (Snell et al.'s "best-of-N weighted" final selection). A step is
what the policy writes up to the delimiter (``Policy.next_steps``); a blank step is dropped (it
would not advance the solution). Sampling and scoring are batched across all beams of all
problems in each round.
"""

from __future__ import annotations

from typing import Callable

import jax

from postrl.sampling.search.common import (STATUS_NO_ANSWER, STATUS_NO_CANDIDATES, STATUS_OK,
                                           Candidate, PartialSolution, SearchError, SearchResult,
                                           TokenCount, as_problems, as_scores, check_key,
                                           check_positive, cluster_answers, default_equal,
                                           default_extract, vote)
from postrl.sampling.search.scorers import check_scorer

SELECT = ("best", "weighted")


def choose(candidates: list[Candidate], select: str) -> int | None:
  """Index of the chosen candidate: the best-scored finished one (any, when none finished), or
  for "weighted" the best-scored member of the answer class with the largest summed score."""
  if not candidates:
    return None
  pool = [i for i, c in enumerate(candidates) if c.finished] or list(range(len(candidates)))
  if select == "weighted":
    winner, _ = vote([candidates[i].cluster for i in pool], [candidates[i].score for i in pool])
    members = [i for i in pool if winner is not None and candidates[i].cluster == winner]
    pool = members or pool
  return max(pool, key=lambda i: (candidates[i].score, -i))


def keep_best(pool: list[tuple[float, int, PartialSolution]], width: int):
  """The ``width`` best distinct partials of (score, index, partial) entries, best first (ties:
  lower index)."""
  kept, seen = [], set()
  for entry in sorted(pool, key=lambda e: (-e[0], e[1])):
    key = (entry[2].steps, entry[2].finished)
    if key not in seen and len(kept) < width:
      seen.add(key)
      kept.append(entry)
  return kept


def split_completion(partial: PartialSolution, text: str, finished: bool) -> PartialSolution:
  """``partial`` extended by a completion's text cut into steps at the delimiter (blank pieces
  dropped); ``finished`` marks the last step."""
  pieces = [x for x in text.split(partial.delimiter) if x.strip()]
  if not pieces:
    return PartialSolution(partial.steps, finished, partial.delimiter)
  return PartialSolution(partial.steps + tuple(pieces), finished, partial.delimiter)


def complete_and_score(policy, problems, unfinished, value_fn, *, key):
  """Greedy completions of every problem's unfinished partials (one ``policy.complete`` call),
  scored by ``value_fn`` -> (candidates per problem, tokens spent per problem)."""
  owners = [i for i, xs in enumerate(unfinished) for _ in xs]
  parts = [x for xs in unfinished for x, _ in xs]
  extra: list[list[Candidate]] = [[] for _ in problems]
  spent = [TokenCount() for _ in problems]
  if not parts:
    return extra, spent
  outs = policy.complete([problems[i] for i in owners], [x.prefix for x in parts], 1, key=key,
                         temperature=0.0)
  done = []
  for i, x, (c,) in zip(owners, parts, outs):
    spent[i] = spent[i] + c.tokens
    done.append(split_completion(x, c.text, c.finished))
  values = as_scores(value_fn([problems[i] for i in owners], done), len(done),
                     "the value function")
  for j, (i, x) in enumerate(zip(owners, done)):
    spent[i] = spent[i] + values.item_tokens[j]
    extra[i].append(Candidate(text=x.text, answer=None, score=values.values[j],
                              finished=x.finished,
                              info={"steps": len(x.steps), "completed": True}))
  return extra, spent


def _result(problem, strategy, cands, tokens, select, info, extract, equal) -> SearchResult:
  answers = [extract(c.text) for c in cands]
  clusters = cluster_answers(answers, equal)
  cands = tuple(Candidate(text=c.text, answer=a, score=c.score, finished=c.finished,
                          cluster=k, info=c.info) for c, a, k in zip(cands, answers, clusters))
  i = choose(list(cands), select)
  if i is None:
    return SearchResult(problem.prompt, strategy, None, None, (), tokens, STATUS_NO_CANDIDATES,
                        info)
  pick = cands[i]
  info = dict(info, chosen=i)
  status = STATUS_OK if pick.answer is not None else STATUS_NO_ANSWER
  return SearchResult(problem.prompt, strategy, pick.text, pick.answer, cands, tokens, status,
                      info)


def step_beam_search(policy, problems, *, value_fn, key, width: int = 4, expansions: int = 4,
                     max_steps: int = 8, select: str = "best", complete_unfinished: bool = True,
                     extract: Callable[[str], str | None] = default_extract,
                     equal: Callable[[str, str], bool] = default_equal) -> list[SearchResult]:
  """PRM- or verifier-guided beam search over reasoning steps (module doc).

  Args:
    policy: a ``Policy`` (or anything with ``next_steps`` and ``delimiter``).
    problems: prompts or problem objects.
    value_fn: ``(problems, partials) -> Scores``: ``ProcessRewardScorer``, ``RolloutValue`` or
      any function returning one float per ``PartialSolution``.
    key: PRNG key (round t samples with fold_in(key, t)).
    width: beams kept per round (finished ones included).
    expansions: next steps sampled per live beam (``width x expansions`` in round 0).
    max_steps: rounds at most.
    select: "best" or "weighted" final selection.
    complete_unfinished: complete beams still unfinished at the end greedily and score them
      (module doc); False keeps them as unfinished partial solutions.
    extract, equal: final answer of a text and answer equivalence (for "weighted").
  Returns:
    One ``SearchResult`` per problem: the candidates are the final beams (finished first, by
    score); ``info["rounds"]`` lists each round's kept beams (steps, score, finished) and
    ``info["scored"]`` the number of partials scored.
  """
  check_positive(width=width, expansions=expansions, max_steps=max_steps)
  check_key(key)
  if select not in SELECT:
    raise SearchError(f"select must be one of {SELECT}, got {select!r}")
  check_scorer(policy, value_fn, "process reward model")
  problems = as_problems(problems)
  delim = getattr(policy, "delimiter", "\n")
  live = [[PartialSolution(delimiter=delim)] for _ in problems]
  live_scores = [[0.0] for _ in problems]  # each live beam's score from the round that kept it
  done: list[list[Candidate]] = [[] for _ in problems]
  unfinished: list[list[tuple[PartialSolution, float]]] = [[] for _ in problems]
  tokens = [TokenCount() for _ in problems]
  rounds: list[list[list[dict]]] = [[] for _ in problems]
  scored = [0] * len(problems)
  for t in range(max_steps):
    owners = [i for i in range(len(problems)) for _ in live[i]]
    parents = [x for i in range(len(problems)) for x in live[i]]
    if not parents:
      break
    k = width * expansions if t == 0 else expansions
    steps = policy.next_steps([problems[i] for i in owners], [x.prefix for x in parents], k,
                              key=jax.random.fold_in(key, t))
    children, child_owner = [], []
    for i, parent, row in zip(owners, parents, steps):
      for c in row:
        tokens[i] = tokens[i] + c.tokens
        if c.text.strip():
          children.append(parent.extend(c.text, c.finished))
          child_owner.append(i)
    values = as_scores(value_fn([problems[i] for i in child_owner], children) if children else [],
                       len(children), "the value function")
    per_problem: list[list[tuple[float, int, PartialSolution]]] = [[] for _ in problems]
    for j, (i, child) in enumerate(zip(child_owner, children)):
      tokens[i] = tokens[i] + values.item_tokens[j]
      scored[i] += 1
      per_problem[i].append((values.values[j], j, child))
    for i, pool in enumerate(per_problem):
      if not live[i]:
        continue
      if not pool:  # every expansion was blank: the live beams end here, unfinished (not the root)
        unfinished[i] += [(x, sc) for x, sc in zip(live[i], live_scores[i]) if x.steps]
        live[i] = live_scores[i] = []
        continue
      kept = keep_best(pool, width)
      rounds[i].append([{"steps": list(x.steps), "score": s, "finished": x.finished}
                        for s, _, x in kept])
      done[i] += [Candidate(text=x.text, answer=None, score=s, finished=True,
                            info={"steps": len(x.steps)}) for s, _, x in kept if x.finished]
      live[i] = [x for _, _, x in kept if not x.finished]
      live_scores[i] = [s for s, _, x in kept if not x.finished]
      if t == max_steps - 1:
        unfinished[i] += list(zip(live[i], live_scores[i]))
  if complete_unfinished:
    extra, spent = complete_and_score(policy, problems, unfinished, value_fn,
                                      key=jax.random.fold_in(key, max_steps))
    for i in range(len(problems)):
      done[i] += extra[i]
      tokens[i] = tokens[i] + spent[i]
      scored[i] += len(extra[i])
  else:
    for i in range(len(problems)):
      done[i] += [Candidate(text=x.text, answer=None, score=sc, finished=False,
                            info={"steps": len(x.steps)}) for x, sc in unfinished[i]]
  results = []
  for i, problem in enumerate(problems):
    cands = sorted(done[i], key=lambda c: (not c.finished, -c.score))
    info = {"width": width, "expansions": expansions, "rounds": rounds[i], "scored": scored[i],
            "select": select}
    results.append(_result(problem, "step_beam_search", cands, tokens[i], select, info, extract,
                           equal))
  return results
