"""Built-in synthetic tasks, generated in-process from a seed, with exact answers.

``arithmetic_problems``: "What is a op b?" over multi-digit integers; the answer is an integer.
``countdown_problems``: reach a target from given numbers with + - * / (each number at most once);
targets are reachable by construction (checked by ``postrl.rewards.countdown_reward``).
``sft_records``: worked completions ("12 + 30 = 42") for supervised fine-tuning on either task.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Sequence

from postrl.data.records import Problem, SFTRecord


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_problems(n: int, *, seed: int, digits: int = 2, ops: str = "+-") -> list[Problem]:
  """``n`` problems "What is a op b?" with a, b uniform over ``digits``-digit integers.

  The same (n, seed, digits, ops) always gives the same problems; different seeds give
  independent draws, so a held-out split is a different seed.
  """
  if n < 0 or digits < 1:
    raise ValueError(f"need n >= 0 and digits >= 1, got n={n}, digits={digits}")
  unknown = set(ops) - set(_OPS)
  if not ops or unknown:
    raise ValueError(f"ops must be drawn from {sorted(_OPS)}, got {ops!r}")
  rng = random.Random(seed)
  lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
  problems = []
  for _ in range(n):
    a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(ops)
    problems.append(Problem(prompt=f"What is {a} {op} {b}?", answer=str(_OPS[op](a, b))))
  return problems


# ------------------------------------------------------------------------------------ Countdown


@dataclasses.dataclass(frozen=True)
class CountdownProblem:
  """A Countdown puzzle: reach ``target`` from ``numbers`` (each at most once) with + - * /.

  ``answer`` is ``str(target)`` (so it reads like a ``Problem``), and ``solution`` is one
  expression over all the numbers that evaluates to the target, which proves it reachable.
  """

  prompt: str
  answer: str
  numbers: tuple[int, ...]
  target: int
  solution: str


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def _combine(a, b, op: str):
  """(value, text, precedence) of ``a op b`` with the fewest parentheses that keep its meaning."""
  (va, ta, pa), (vb, tb, pb) = a, b
  p = _PRECEDENCE[op]
  if pa < p:
    ta = f"({ta})"
  if pb < p or (pb == p and op in "-/"):  # a - (b + c), a / (b * c)
    tb = f"({tb})"
  value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va // vb if vb else None}[op]
  return value, f"{ta} {op} {tb}", p


def _random_expression(rng: random.Random, numbers: Sequence[int], ops: str):
  """A random binary expression tree over all ``numbers`` whose intermediate values are positive
  integers (the rules of the game show); (value, text) or None when no operation applies."""
  pool = [(x, str(x), _ATOM) for x in numbers]
  while len(pool) > 1:
    i, j = rng.sample(range(len(pool)), 2)
    a, b = pool[i], pool[j]
    choices = list(ops)
    rng.shuffle(choices)
    for op in choices:
      if op == "-" and a[0] <= b[0]:
        a, b = b, a  # larger first keeps the result positive
      if op == "-" and a[0] == b[0]:
        continue
      if op == "/" and (b[0] == 0 or a[0] % b[0]):
        a, b = b, a
        if b[0] == 0 or a[0] % b[0]:
          continue
      combined = _combine(a, b, op)
      break
    else:
      return None
    pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [combined]
  return pool[0][0], pool[0][1]


def countdown_prompt(numbers: Sequence[int], target: int) -> str:
  """The instruction for one Countdown puzzle (its last line asks for ``expression = target``,
  the form ``postrl.rewards.countdown_reward`` reads)."""
  listed = ", ".join(str(x) for x in numbers)
  return (f"Using the numbers {listed} (each at most once) and the operations +, -, *, / with "
          f"parentheses, write an expression equal to {target}. "
          f"End with one line of the form: expression = {target}")


def countdown_problems(n: int, *, seed: int, num_numbers: int = 4, max_number: int = 99,
                       min_target: int = 10, max_target: int = 999,
                       ops: str = "+-*/") -> list[CountdownProblem]:
  """``n`` Countdown puzzles with targets that are reachable by construction.

  Each draws ``num_numbers`` integers uniformly from [1, max_number], combines all of them in a
  random binary tree with random operations from ``ops`` (intermediate values kept positive
  integers), and keeps the result as the target if it lies in [min_target, max_target]
  (otherwise draws again). The tree is stored as ``solution``. Deterministic per arguments.
  """
  if n < 0 or num_numbers < 2 or max_number < 1:
    raise ValueError(f"need n >= 0, num_numbers >= 2, max_number >= 1, got n={n}, "
                     f"num_numbers={num_numbers}, max_number={max_number}")
  unknown = set(ops) - set(_PRECEDENCE)
  if not ops or unknown:
    raise ValueError(f"ops must be drawn from {sorted(_PRECEDENCE)}, got {ops!r}")
  if min_target > max_target:
    raise ValueError(f"min_target {min_target} > max_target {max_target}")
  rng = random.Random(seed)
  problems, attempts = [], 0
  while len(problems) < n:
    attempts += 1
    if attempts > 1000 * (n + 1):
      raise ValueError(f"could not draw targets in [{min_target}, {max_target}] from "
                       f"{num_numbers} numbers <= {max_number} with ops {ops!r}")
    numbers = tuple(rng.randint(1, max_number) for _ in range(num_numbers))
    built = _random_expression(rng, numbers, ops)
    if built is None or not min_target <= built[0] <= max_target:
      continue
    target, solution = built
    problems.append(CountdownProblem(prompt=countdown_prompt(numbers, target), answer=str(target),
                                     numbers=numbers, target=target, solution=solution))
  return problems


# ------------------------------------------------------------------------------- SFT records

_ARITHMETIC_PROMPT = re.compile(r"^What is (.+)\?$")


def sft_record(problem: Problem | CountdownProblem) -> SFTRecord:
  """A worked answer for supervised fine-tuning on a built-in task.

  Countdown: ``"<solution> = <target>"``; arithmetic ("What is a op b?"):
  ``"a op b = <answer>"``; any other ``Problem``: the answer alone. Each completion ends with
  the answer number, so ``postrl.rewards.exact_match`` (and ``countdown_reward``) accept it.
  """
  if isinstance(problem, CountdownProblem):
    return SFTRecord(prompt=problem.prompt, completion=f"{problem.solution} = {problem.target}")
  match = _ARITHMETIC_PROMPT.match(problem.prompt)
  if match:
    return SFTRecord(prompt=problem.prompt, completion=f"{match.group(1)} = {problem.answer}")
  return SFTRecord(prompt=problem.prompt, completion=problem.answer)


def sft_records(problems: Sequence[Problem | CountdownProblem]) -> list[SFTRecord]:
  """``sft_record`` of each problem (prompt/completion records for ``sft_batches``)."""
  return [sft_record(p) for p in problems]
