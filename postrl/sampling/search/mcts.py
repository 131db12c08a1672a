"""Monte-Carlo tree search over reasoning steps with PUCT selection.

A node is a partial solution (the root: no step yet); its children are next steps sampled from
the policy. Each simulation (Coulom 2006; Silver et al. 2017/2018, AlphaGo Zero / AlphaZero):

  1. select   from the root, descend to the child maximising
                  PUCT(s, a) = Q(s, a) + c_puct P(s, a) sqrt(N(s)) / (1 + N(s, a))
              until a node without children (Rosin 2011; AlphaZero's form), or with
              progressive widening one that may draw more steps (below);
  2. expand   sample ``branching`` next steps of that leaf; identical steps merge, and the
              priors are the empirical frequencies P(s, a) = count(a) / branching (the sampled
              policy, as in Sampled MuZero, Hubert et al. 2021);
  3. evaluate every new child with the value function v (a PRM's step score or verifier
              roll-outs, ``RolloutValue``), batched;
  4. backup   each child starts with N = 1, W = v; the leaf and its ancestors add the children's
              count and values, so Q = W / N is the mean value of the evaluations below a node.

A leaf that ends the solution (or sits at ``max_depth`` steps) is terminal: selecting it again
backs up its stored value once more and costs nothing.

Progressive widening (``widening=(c, alpha)``; Coulom 2007, "Computing Elo Ratings of Move
Patterns in the Game of Go"; Couëtoux et al. 2011, "Continuous Upper Confidence Trees"). Without
it (the default, ``widening=None``) a node is expanded once with ``branching`` sampled steps and
never gets more, so once the tree's leaves are finished solutions further simulations only
re-visit them for free and ``simulations`` stops being a compute budget. With it, a node s that
already has children may have drawn at most

    D(s) <= max(branching, ceil(c N(s)^alpha))

sampled steps (blank ones included; identical steps merge, so it holds at most that many
children), N(s) its visit count before the simulation now passing through it. Selection stops at
the first node on its way down whose D(s) is below that bound, and the node is *widened*: it
samples the missing steps, new ones become children (evaluated and backed up as in an expansion),
a step equal to an existing child a is a re-visit of a (it backs up a's stored value when a is
terminal, else Q(a); no evaluation), and when every new step is blank the node itself is
re-visited with Q(s). So every simulation adds at least one visit to the root (as without
widening, save a root whose first draws were all blank, which is expanded afresh), N grows and
the bound with it; the priors become the empirical frequencies over all D(s) draws,
P(s, a) = count(a) / D(s). ``branching`` stays the size of a node's first expansion
and the floor of the bound, so ``widening=(c, 0)`` with ceil(c) <= ``branching`` is exactly the
default. ``ceil`` is taken with a 1e-9 tolerance (1.1 x 50 = 55.00000000000001 gives 55).

The budget is fixed: ``simulations`` iterations per problem, and with ``max_tokens`` no
expansion or widening starts unless the worst case of its cost still fits (its rows of prompt +
prefix + ``max_step_tokens``, the value function's ``worst_case_tokens`` when it has one, and a
greedy completion of a child), and the final completion runs only if it fits, so the tokens spent
stay within the budget (up to re-tokenisation: a prefix is re-encoded from its text, which BPE
merges can only shorten in practice).

Final choice by visit count: from the root, follow the child with the most visits (ties: higher
Q, then the earlier child) down to a node without children; if that node is unfinished, the
policy completes it greedily (those tokens are counted; one batched call for all problems). The
candidates are every finished solution in the tree with its Q, plus the chosen one (unfinished
when the budget left no room to complete it). The problems of a call are searched in lock-step:
each iteration expands or widens one node per problem, and those draws (one ``next_steps`` call:
``k`` = the common number of draws, or one row per draw when the problems need different numbers)
and the new children's evaluations go through the sampler and the value function together.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax

from postrl.sampling.search.common import (STATUS_NO_ANSWER, STATUS_NO_CANDIDATES, STATUS_OK,
                                           Candidate, PartialSolution, SearchError, SearchResult,
                                           TokenCount, as_problems, as_scores, check_key,
                                           check_positive, default_extract)
from postrl.sampling.search.scorers import check_scorer


@dataclasses.dataclass
class Node:
  """A tree node: a partial solution with its statistics."""
  partial: PartialSolution
  prior: float = 1.0
  visits: int = 0
  value_sum: float = 0.0
  value: float = 0.0          # the node's own evaluation
  children: list = dataclasses.field(default_factory=list)
  parent: "Node | None" = None
  dead: bool = False          # every step sampled from it was blank: a dead end of value 0
  draws: int = 0              # steps sampled from it since its first child (blank ones included)
  count: int = 0              # times its step was drawn from its parent: P = count / parent.draws

  @property
  def q(self) -> float:
    return self.value_sum / self.visits if self.visits else 0.0


def puct(parent: Node, child: Node, c_puct: float) -> float:
  """Q(s, a) + c_puct P(s, a) sqrt(N(s)) / (1 + N(s, a))."""
  return child.q + c_puct * child.prior * math.sqrt(parent.visits) / (1 + child.visits)


def check_widening(widening) -> tuple[float, float] | None:
  """``widening`` as (c, alpha) floats, or None; SearchError unless c > 0 and 0 <= alpha <= 1."""
  if widening is None:
    return None
  try:
    c, alpha = (float(x) for x in widening)
  except (TypeError, ValueError):
    raise SearchError(f"widening must be None or (c, alpha), got {widening!r}") from None
  if not (c > 0 and math.isfinite(c) and 0 <= alpha <= 1):
    raise SearchError(f"widening (c, alpha) needs c > 0 and 0 <= alpha <= 1, got {widening!r}")
  return c, alpha


def width_bound(visits: int, branching: int, widening: tuple[float, float] | None) -> int:
  """The most steps a node with ``visits`` visits may have drawn (module doc):
  max(branching, ceil(c N^alpha)) with widening, ``branching`` without."""
  if widening is None:
    return branching
  c, alpha = widening
  return max(branching, math.ceil(c * visits ** alpha - 1e-9))


def _widens(node: Node, branching: int, widening) -> bool:
  """Whether selection stops at ``node`` (which has children) to draw more steps."""
  return widening is not None and node.draws < width_bound(node.visits, branching, widening)


def select_leaf(root: Node, c_puct: float, branching: int = 1, widening=None) -> Node:
  """Descends by PUCT (first child on ties) to a node without children, or with ``widening`` to
  the first node that may draw more steps."""
  node = root
  while node.children and not _widens(node, branching, widening):
    node = max(node.children, key=lambda c, n=node: puct(n, c, c_puct))  # max: first on ties
  return node


def backup(node: Node, visits: int, value_sum: float) -> None:
  """Adds ``visits`` evaluations totalling ``value_sum`` to the node and its ancestors."""
  while node is not None:
    node.visits += visits
    node.value_sum += value_sum
    node = node.parent


def best_path(root: Node) -> Node:
  """The node reached by following the most-visited child (ties: higher Q, earlier child)."""
  node = root
  while node.children:
    node = max(node.children, key=lambda c: (c.visits, c.q))
  return node


def _terminal(node: Node, max_depth: int) -> bool:
  return node.dead or node.partial.finished or len(node.partial.steps) >= max_depth


def _draw_steps(policy, problems, todo, key) -> list[list]:
  """The sampled steps of every (problem, node, draws) in ``todo``: one ``next_steps`` call with
  k = draws when every node draws the same number, else one row (k = 1) per draw."""
  ks = [k for _, _, k in todo]
  if len(set(ks)) == 1:
    return policy.next_steps([problems[i] for i, _, _ in todo],
                             [node.partial.prefix for _, node, _ in todo], ks[0], key=key)
  flat = policy.next_steps([problems[i] for i, _, k in todo for _ in range(k)],
                           [node.partial.prefix for _, node, k in todo for _ in range(k)], 1,
                           key=key)
  out, j = [], 0
  for k in ks:
    out.append([row[0] for row in flat[j:j + k]])
    j += k
  return out


def _add_steps(node: Node, row, widen: bool, max_depth: int) -> list[Node]:
  """Adds the sampled steps ``row`` to ``node`` and returns its new children (to evaluate).

  An expansion (``widen`` False) merges identical steps into children with priors
  count / draws. A widening also re-visits an existing child for each step equal to it (its
  stored value when terminal, else its Q), re-visits ``node`` with its Q when every step was
  blank, and recomputes every child's prior over all of ``node``'s draws."""
  existing = {(c.partial.steps[-1], c.partial.finished): c for c in node.children}
  node.draws = node.draws + len(row) if widen else len(row)
  merged: dict[tuple[str, bool], Node] = {}
  revisits = 0
  for c in row:
    if not c.text.strip():
      continue
    k = (c.text, c.finished)
    if k in existing:
      child = existing[k]
      child.count += 1
      backup(child, 1, child.value if _terminal(child, max_depth) else child.q)
      revisits += 1
      continue
    if k not in merged:
      merged[k] = Node(node.partial.extend(c.text, c.finished), prior=0.0, parent=node)
    merged[k].count += 1
    merged[k].prior += 1.0 / len(row)
  new = list(merged.values())
  node.children += new
  if widen:
    for child in node.children:
      child.prior = child.count / node.draws
    if not new and not revisits:  # every step blank: the simulation re-visits the node itself
      backup(node, 1, node.q)
  return new


def mcts(policy, problems, *, value_fn, key, simulations: int = 16, branching: int = 4,
         c_puct: float = 1.0, max_depth: int = 8, max_tokens: int | None = None,
         widening: tuple[float, float] | None = None,
         extract: Callable[[str], str | None] = default_extract) -> list[SearchResult]:
  """PUCT tree search over reasoning steps with a fixed budget (module doc).

  Args:
    policy: a ``Policy`` (``next_steps``, ``complete``, ``delimiter``, ``max_step_tokens``).
    problems: prompts or problem objects.
    value_fn: ``(problems, partials) -> Scores`` (``ProcessRewardScorer``, ``RolloutValue``, or
      a function returning floats; values in [0, 1] keep c_puct's scale meaningful).
    key: PRNG key (iteration t draws with fold_in(key, t)).
    simulations: iterations per problem.
    branching: next steps sampled by a node's first expansion (and, with ``widening``, the
      fewest it may draw).
    c_puct: exploration constant.
    max_depth: steps at most; a node this deep is terminal.
    max_tokens: per-problem token budget (policy and scorer tokens), or None.
    widening: progressive widening (c, alpha): a node with children may draw up to
      max(branching, ceil(c N^alpha)) steps, N its visits (module doc); None (the default): each
      node is expanded once, with ``branching`` steps.
    extract: final answer of a text.
  Returns:
    One ``SearchResult`` per problem; ``info`` has the root's visits and children, the number of
    expansions (nodes expanded) and of widenings, the chosen path's visit counts and whether the
    budget stopped the search.
  """
  check_positive(simulations=simulations, branching=branching, max_depth=max_depth)
  check_key(key)
  widening = check_widening(widening)
  check_scorer(policy, value_fn, "process reward model")
  problems = as_problems(problems)
  delim = getattr(policy, "delimiter", "\n")
  roots = [Node(PartialSolution(delimiter=delim)) for _ in problems]
  tokens = [TokenCount() for _ in problems]
  counts = {"expansions": [0] * len(problems), "widenings": [0] * len(problems)}
  stopped = [False] * len(problems)
  for t in range(simulations):
    todo = []
    for i, root in enumerate(roots):
      if stopped[i]:
        continue
      leaf = select_leaf(root, c_puct, branching, widening)
      draws = (width_bound(leaf.visits, branching, widening) - leaf.draws if leaf.children
               else branching)
      if leaf is not root and _terminal(leaf, max_depth):
        backup(leaf, 1, leaf.value)
      elif max_tokens is not None and tokens[i].total + _worst_case(
          policy, problems[i], leaf, draws, value_fn) > max_tokens:
        stopped[i] = True
      else:
        todo.append((i, leaf, draws))
    if not todo:
      if all(stopped):
        break
      continue
    steps = _draw_steps(policy, problems, todo, jax.random.fold_in(key, t))
    new_children, owners = [], []
    for (i, leaf, _), row in zip(todo, steps):
      widen = bool(leaf.children)
      counts["widenings" if widen else "expansions"][i] += 1
      for c in row:
        tokens[i] = tokens[i] + c.tokens
      new = _add_steps(leaf, row, widen, max_depth)
      new_children += new
      owners += [i] * len(new)
      if not leaf.children and leaf is not root_of(leaf):  # every sampled step was blank
        leaf.dead = True
        backup(leaf, 1, 0.0)
    if new_children:
      values = as_scores(value_fn([problems[i] for i in owners],
                                  [c.partial for c in new_children]),
                         len(new_children), "the value function")
      for j, (i, child) in enumerate(zip(owners, new_children)):
        tokens[i] = tokens[i] + values.item_tokens[j]
        child.value = values.values[j]
        child.visits, child.value_sum = 1, child.value
        backup(child.parent, 1, child.value)
  return _finish_all(policy, problems, roots, tokens, counts, stopped, extract,
                     jax.random.fold_in(key, simulations + 1), max_tokens)


def root_of(node: Node) -> Node:
  while node.parent is not None:
    node = node.parent
  return node


def _prefix_tokens(policy, problem, partial: PartialSolution) -> int:
  return len(policy.row_ids(problem, partial.prefix)) if hasattr(policy, "row_ids") else 0


def _completion_cost(policy, problem, partial: PartialSolution) -> int:
  """An upper bound on the tokens of completing ``partial`` greedily."""
  return _prefix_tokens(policy, problem, partial) + getattr(policy, "max_new_tokens", 0)


def _worst_case(policy, problem, leaf: Node, draws: int, value_fn) -> int:
  """An upper bound on the tokens of drawing ``draws`` steps from ``leaf`` (an expansion or a
  widening) and then completing one of its children: ``draws`` rows of prompt + prefix + a step,
  the value function's worst case per child (``worst_case_tokens``), and a greedy completion."""
  ids = _prefix_tokens(policy, problem, leaf.partial)
  step_tokens = getattr(policy, "max_step_tokens", 0)
  if hasattr(policy, "tokenizer"):  # a step cut without its delimiter gets one appended
    step_tokens += len(policy.tokenizer.encode(leaf.partial.delimiter, add_bos=False))
  worst = getattr(value_fn, "worst_case_tokens", None)
  scoring = draws * worst(problem, ids + step_tokens) if worst else 0
  completion = ids + step_tokens + getattr(policy, "max_new_tokens", 0)
  return draws * (ids + step_tokens) + scoring + completion


def _finished_nodes(root: Node):
  stack = [root]
  while stack:
    node = stack.pop()
    if node.partial.finished and node.partial.steps:
      yield node
    stack += node.children[::-1]


def _finish_all(policy, problems, roots, tokens, counts, stopped, extract, key, max_tokens
                ) -> list[SearchResult]:
  """The visit-count choice of every problem; the chosen nodes that are unfinished and fit the
  budget are completed greedily in one batched ``policy.complete`` call."""
  chosen = [best_path(root) for root in roots]
  todo = [i for i, (root, node) in enumerate(zip(roots, chosen))
          if node is not root and not node.partial.finished
          and (max_tokens is None or tokens[i].total
               + _completion_cost(policy, problems[i], node.partial) <= max_tokens)]
  outs = policy.complete([problems[i] for i in todo], [chosen[i].partial.prefix for i in todo], 1,
                         key=key, temperature=0.0) if todo else []
  completions = {i: c for i, (c,) in zip(todo, outs)}
  return [_finish(problems[i], roots[i], chosen[i], completions.get(i), tokens[i],
                  counts["expansions"][i], stopped[i], extract, counts["widenings"][i])
          for i in range(len(problems))]


def _finish(problem, root, node, completion, tokens, expansions, stopped, extract, widenings=0
            ) -> SearchResult:
  """One problem's result: the chosen node (plus its greedy ``completion``, or None when it is
  finished or did not fit the budget) and every finished solution in the tree."""
  info = {"root_visits": root.visits, "root_children": len(root.children),
          "expansions": expansions, "widenings": widenings, "budget_stopped": stopped}
  cands = [Candidate(text=n.partial.text, answer=extract(n.partial.text), score=n.q,
                     finished=True, info={"visits": n.visits, "steps": len(n.partial.steps)})
           for n in _finished_nodes(root)]
  if node is root:
    return SearchResult(problem.prompt, "mcts", None, None, tuple(cands), tokens,
                        STATUS_NO_CANDIDATES, info)
  path = []
  walk = node
  while walk.parent is not None:
    path.append(walk.visits)
    walk = walk.parent
  info["path_visits"] = path[::-1]
  text, finished = node.partial.text, node.partial.finished
  if not node.partial.finished:
    info["completed"] = completion is not None
    if completion is not None:
      tokens = tokens + completion.tokens
      text, finished = node.partial.prefix + completion.text, completion.finished
    # else: no budget left to complete it: the path's text as it stands
  answer = extract(text)
  pick = Candidate(text=text, answer=answer, score=node.q, finished=finished,
                   info={"visits": node.visits, "steps": len(node.partial.steps)})
  if not any(c.text == text for c in cands):
    cands.append(pick)
  status = STATUS_OK if answer is not None else STATUS_NO_ANSWER
  return SearchResult(problem.prompt, "mcts", text, answer, tuple(cands), tokens, status, info)
