"""Monte-Carlo tree search over reasoning steps with PUCT selection.

A node is a partial solution (the root: no step yet); its children are next steps sampled from
the policy. Each simulation (Coulom 2006; Silver et al. 2017/2018, AlphaGo Zero / AlphaZero):

  1. select   from the root, descend to the child maximising
                  PUCT(s, a) = Q(s, a) + c_puct P(s, a) sqrt(N(s)) / (1 + N(s, a))
              until a node without children (Rosin 2011; AlphaZero's form);
  2. expand   sample ``branching`` next steps of that leaf; identical steps merge, and the
              priors are the empirical frequencies P(s, a) = count(a) / branching (the sampled
              policy, as in Sampled MuZero, Hubert et al. 2021);
  3. evaluate every new child with the value function v (a PRM's step score or verifier
              roll-outs, ``RolloutValue``), batched;
  4. backup   each child starts with N = 1, W = v; the leaf and its ancestors add the children's
              count and values, so Q = W / N is the mean value of the evaluations below a node.

A leaf that ends the solution (or sits at ``max_depth`` steps) is terminal: selecting it again
backs up its stored value once more and costs nothing. The budget is fixed: ``simulations``
iterations per problem, and with ``max_tokens`` no expansion starts unless the worst case of
its cost still fits (``branching`` rows of prompt + prefix + ``max_step_tokens``, the value
function's ``worst_case_tokens`` when it has one, and a greedy completion of a child), and the
final completion runs only if it fits, so the tokens spent stay within the budget (up to
re-tokenisation: a prefix is re-encoded from its text, which BPE merges can only shorten in
practice).

Final choice by visit count: from the root, follow the child with the most visits (ties: higher
Q, then the earlier child) down to a node without children; if that node is unfinished, the
policy completes it greedily (those tokens are counted; one batched call for all problems). The
candidates are every finished solution in the tree with its Q, plus the chosen one (unfinished
when the budget left no room to complete it). The problems of a call are searched in lock-step:
each iteration expands one leaf per problem, and those expansions and evaluations go through the
sampler and the value function together.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax

from postrl.sampling.search.common import (STATUS_NO_ANSWER, STATUS_NO_CANDIDATES, STATUS_OK,
                                           Candidate, PartialSolution, SearchResult, TokenCount,
                                           as_problems, as_scores, check_positive,
                                           default_extract)
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

  @property
  def q(self) -> float:
    return self.value_sum / self.visits if self.visits else 0.0


def puct(parent: Node, child: Node, c_puct: float) -> float:
  """Q(s, a) + c_puct P(s, a) sqrt(N(s)) / (1 + N(s, a))."""
  return child.q + c_puct * child.prior * math.sqrt(parent.visits) / (1 + child.visits)


def select_leaf(root: Node, c_puct: float) -> Node:
  """Descends by PUCT (first child on ties) to a node without children."""
  node = root
  while node.children:
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


def mcts(policy, problems, *, value_fn, key, simulations: int = 16, branching: int = 4,
         c_puct: float = 1.0, max_depth: int = 8, max_tokens: int | None = None,
         extract: Callable[[str], str | None] = default_extract) -> list[SearchResult]:
  """PUCT tree search over reasoning steps with a fixed budget (module doc).

  Args:
    policy: a ``Policy`` (``next_steps``, ``complete``, ``delimiter``, ``max_step_tokens``).
    problems: prompts or problem objects.
    value_fn: ``(problems, partials) -> Scores`` (``ProcessRewardScorer``, ``RolloutValue``, or
      a function returning floats; values in [0, 1] keep c_puct's scale meaningful).
    key: PRNG key (iteration t expands with fold_in(key, t)).
    simulations: iterations per problem.
    branching: next steps sampled per expansion.
    c_puct: exploration constant.
    max_depth: steps at most; a node this deep is terminal.
    max_tokens: per-problem token budget (policy and scorer tokens), or None.
    extract: final answer of a text.
  Returns:
    One ``SearchResult`` per problem; ``info`` has the root's visits, the number of expansions,
    the chosen path's visit counts and whether the budget stopped the search.
  """
  check_positive(simulations=simulations, branching=branching, max_depth=max_depth)
  check_scorer(policy, value_fn, "process reward model")
  problems = as_problems(problems)
  delim = getattr(policy, "delimiter", "\n")
  roots = [Node(PartialSolution(delimiter=delim)) for _ in problems]
  tokens = [TokenCount() for _ in problems]
  expansions = [0] * len(problems)
  stopped = [False] * len(problems)
  for t in range(simulations):
    todo = []
    for i, root in enumerate(roots):
      if stopped[i]:
        continue
      leaf = select_leaf(root, c_puct)
      if leaf is not root and _terminal(leaf, max_depth):
        backup(leaf, 1, leaf.value)
      elif max_tokens is not None and tokens[i].total + _worst_case(
          policy, problems[i], leaf, branching, value_fn) > max_tokens:
        stopped[i] = True
      else:
        todo.append((i, leaf))
    if not todo:
      if all(stopped):
        break
      continue
    steps = policy.next_steps([problems[i] for i, _ in todo],
                              [leaf.partial.prefix for _, leaf in todo], branching,
                              key=jax.random.fold_in(key, t))
    new_children, owners = [], []
    for (i, leaf), row in zip(todo, steps):
      expansions[i] += 1
      merged: dict[tuple[str, bool], Node] = {}
      for c in row:
        tokens[i] = tokens[i] + c.tokens
        if not c.text.strip():
          continue
        k = (c.text, c.finished)
        if k not in merged:
          merged[k] = Node(leaf.partial.extend(c.text, c.finished), prior=0.0, parent=leaf)
        merged[k].prior += 1.0 / branching
      leaf.children = list(merged.values())
      new_children += leaf.children
      owners += [i] * len(leaf.children)
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
  return _finish_all(policy, problems, roots, tokens, expansions, stopped, extract,
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


def _worst_case(policy, problem, leaf: Node, branching: int, value_fn) -> int:
  """An upper bound on the tokens of expanding ``leaf`` and then completing one of its
  children: ``branching`` rows of prompt + prefix + a step, the value function's worst case
  per child (``worst_case_tokens``), and a greedy completion."""
  ids = _prefix_tokens(policy, problem, leaf.partial)
  step_tokens = getattr(policy, "max_step_tokens", 0)
  if hasattr(policy, "tokenizer"):  # a step cut without its delimiter gets one appended
    step_tokens += len(policy.tokenizer.encode(leaf.partial.delimiter, add_bos=False))
  worst = getattr(value_fn, "worst_case_tokens", None)
  scoring = branching * worst(problem, ids + step_tokens) if worst else 0
  completion = ids + step_tokens + getattr(policy, "max_new_tokens", 0)
  return branching * (ids + step_tokens) + scoring + completion


def _finished_nodes(root: Node):
  stack = [root]
  while stack:
    node = stack.pop()
    if node.partial.finished and node.partial.steps:
      yield node
    stack += node.children[::-1]


def _finish_all(policy, problems, roots, tokens, expansions, stopped, extract, key, max_tokens
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
  return [_finish(problems[i], roots[i], chosen[i], completions.get(i), tokens[i], expansions[i],
                  stopped[i], extract) for i in range(len(problems))]


def _finish(problem, root, node, completion, tokens, expansions, stopped, extract
            ) -> SearchResult:
  """One problem's result: the chosen node (plus its greedy ``completion``, or None when it is
  finished or did not fit the budget) and every finished solution in the tree."""
  info = {"root_visits": root.visits, "expansions": expansions, "budget_stopped": stopped}
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
