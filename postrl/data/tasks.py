"""Built-in synthetic tasks, generated in-process from a seed, with exact answers.

``arithmetic_problems``: "What is a op b?" over multi-digit integers; the answer is an integer.
"""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass(frozen=True)
class Problem:
  prompt: str
  answer: str


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
