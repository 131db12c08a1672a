"""Exact verifier for Countdown: reach a target from given numbers with + - * / and parentheses.

Answer convention (``extract_countdown_answer``): the content of the last ``<answer>...</answer>``
tag if the completion has one, otherwise its last line containing ``=``. In that text the
expression is what stands before the first ``=``; anything after it must be the claimed result,
a plain number equal to the target (``"(50 - 25) * 3 - 12 = 63"``). Without ``=`` the whole
tag content is the expression.

The expression is parsed with ``ast`` and evaluated by walking the tree in exact rational
arithmetic (``fractions.Fraction``), so ``1 / 49 * 49`` is exactly 1 and non-integer
intermediate values are allowed; nothing is ever passed to ``eval``. Only non-negative integer
literals, binary ``+ - * /`` and parentheses are accepted (no unary minus, no powers, names,
calls or floats), and each literal must be one of the given numbers, each used at most as often
as it is given. Division by zero, garbage and anything else give reward 0.
"""

from __future__ import annotations

import ast
import collections
import collections.abc
import numbers
import operator
import re
from fractions import Fraction
from typing import Sequence

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_MAX_CHARS = 500  # longer "expressions" are rejected before parsing
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}
_UNICODE = str.maketrans({"×": "*", "÷": "/", "−": "-", "–": "-"})
_CLAIM = re.compile(r"^-?\d+(?:\.0+)?$")


class _Invalid(Exception):
  pass


def _integer(x) -> int | None:
  """``x`` as an int if it is an integer (or an integral float), else None."""
  if isinstance(x, bool):
    return None
  if isinstance(x, numbers.Integral):
    return int(x)
  if isinstance(x, numbers.Real) and float(x).is_integer():
    return int(x)
  return None


def _check_numbers(numbers_: Sequence[int]) -> list[int]:
  """The problem's numbers as ints; ValueError naming the field for a malformed problem (which
  would otherwise score every completion 0, or truncate 2.5 to 2)."""
  if isinstance(numbers_, (str, bytes)) or not isinstance(numbers_, collections.abc.Iterable):
    raise ValueError(f"countdown: field 'numbers' must be a list of non-negative integers, got "
                     f"{numbers_!r}")
  values = list(numbers_)
  if not values:
    raise ValueError("countdown: field 'numbers' is empty (a problem needs at least one number)")
  ints = [_integer(x) for x in values]
  bad = [x for x, i in zip(values, ints) if i is None or i < 0]
  if bad:
    raise ValueError(f"countdown: field 'numbers' must hold non-negative integers (the only "
                     f"literals an answer may use), got {bad[0]!r} in {values!r}")
  return ints


def extract_countdown_answer(completion: str) -> tuple[str, str | None] | None:
  """``(expression, claimed_result or None)`` from a completion, or None when there is none.

  The last ``<answer>`` tag's content, else the last line with ``=``; split at the first ``=``.
  The claimed result joins any further ``=``-separated parts (``"a = b = 63"`` claims ``b = 63``
  and fails the plain-number check in ``countdown_reward``).
  """
  if not isinstance(completion, str):
    return None
  tags = _ANSWER_TAG.findall(completion)
  if tags:
    text = tags[-1]
  else:
    lines = [line for line in completion.splitlines() if "=" in line]
    if not lines:
      return None
    text = lines[-1]
  text = text.translate(_UNICODE).strip().strip("`$*").strip()
  if "=" not in text:
    return (text, None) if text else None
  expression, claim = text.split("=", 1)
  return expression.strip(), claim.strip().rstrip(".").strip("`$*").strip()


def evaluate_countdown_expression(expression: str, numbers: Sequence[int]) -> Fraction | None:
  """The exact value of ``expression`` if it is a valid Countdown expression over ``numbers``.

  Valid: non-negative integer literals, binary + - * /, parentheses; every literal one of
  ``numbers`` and used at most as often as it appears there. None if invalid or dividing by zero.
  """
  numbers = _check_numbers(numbers)
  if not isinstance(expression, str) or not expression.strip() or len(expression) > _MAX_CHARS:
    return None
  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None
  available = collections.Counter(_check_numbers(numbers))
  used = collections.Counter()
  for node in ast.walk(tree):  # check every node before evaluating anything
    if isinstance(node, ast.Constant):
      if type(node.value) is not int or node.value < 0:  # bool, float, str, bytes, None
        return None
      used[node.value] += 1
    elif isinstance(node, ast.BinOp):
      if type(node.op) not in _OPS:
        return None
    elif not isinstance(node, (ast.Expression, ast.operator)):
      return None
  if any(count > available[x] for x, count in used.items()):
    return None

  def value(node) -> Fraction:
    if isinstance(node, ast.Expression):
      return value(node.body)
    if isinstance(node, ast.Constant):
      return Fraction(node.value)
    left, right = value(node.left), value(node.right)
    if isinstance(node.op, ast.Div) and right == 0:
      raise _Invalid
    return _OPS[type(node.op)](left, right)

  try:
    return value(tree)  # depth <= number of literals <= len(numbers)
  except _Invalid:
    return None


def countdown_reward(completion: str, numbers: Sequence[int], target: int) -> float:
  """1.0 if the completion's final expression reaches ``target`` exactly, else 0.0.

  The expression is extracted by ``extract_countdown_answer`` (last ``<answer>`` tag, else last
  line with ``=``), must use only ``numbers`` (each at most once), + - * / and parentheses, and
  must evaluate exactly (rational arithmetic) to ``target``; a claimed result after ``=`` must be
  a plain number equal to ``target``.

  Args:
    completion: the model's text.
    numbers: the given numbers (a multiset: a number given twice may be used twice).
    target: the integer to reach.
  Raises:
    ValueError: a malformed problem (``numbers`` empty or not non-negative integers, ``target``
      not an integer); a malformed completion only scores 0.
  """
  numbers = _check_numbers(numbers)
  if _integer(target) is None:  # "63" or None would score every completion 0
    raise ValueError(f"countdown: field 'target' must be an integer, got {target!r}")
  found = extract_countdown_answer(completion)
  if found is None:
    return 0.0
  expression, claim = found
  if claim is not None and (not _CLAIM.match(claim) or Fraction(claim) != target):
    return 0.0
  got = evaluate_countdown_expression(expression, numbers)
  return 1.0 if got is not None and got == target else 0.0
