"""Built-in synthetic tasks are deterministic per seed and their answers are right."""

import pytest

from postrl.data import arithmetic_problems


def test_arithmetic_deterministic_and_correct():
  a = arithmetic_problems(50, seed=3, digits=3, ops="+-*")
  assert a == arithmetic_problems(50, seed=3, digits=3, ops="+-*")
  assert a != arithmetic_problems(50, seed=4, digits=3, ops="+-*")
  for p in a:
    expr = p.prompt.removeprefix("What is ").removesuffix("?")
    x, op, y = expr.split()
    assert 100 <= int(x) <= 999 and 100 <= int(y) <= 999
    assert int(p.answer) == eval(f"{x} {op} {y}")  # pylint: disable=eval-used


def test_arithmetic_bad_arguments():
  with pytest.raises(ValueError, match="ops"):
    arithmetic_problems(3, seed=0, ops="/")
  with pytest.raises(ValueError, match="digits"):
    arithmetic_problems(3, seed=0, digits=0)
