"""Built-in synthetic tasks are deterministic per seed and their answers are right."""

import re

import pytest

from postrl.data import (Problem, SFTRecord, arithmetic_problems, countdown_problems,
                         sft_records)
from postrl.rewards import countdown_reward, evaluate_countdown_expression, exact_match


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


def test_countdown_deterministic_reachable_and_in_range():
  a = countdown_problems(200, seed=1, num_numbers=3, max_number=20, min_target=5, max_target=60)
  assert a == countdown_problems(200, seed=1, num_numbers=3, max_number=20, min_target=5,
                                 max_target=60)
  assert a != countdown_problems(200, seed=2, num_numbers=3, max_number=20, min_target=5,
                                 max_target=60)
  for p in a:
    assert len(p.numbers) == 3 and all(1 <= x <= 20 for x in p.numbers)
    assert 5 <= p.target <= 60 and p.answer == str(p.target)
    assert evaluate_countdown_expression(p.solution, p.numbers) == p.target
    assert sorted(int(x) for x in re.findall(r"\d+", p.solution)) == sorted(p.numbers)  # all used
    assert ", ".join(map(str, p.numbers)) in p.prompt and p.prompt.endswith(f"= {p.target}")
  assert len({p.target for p in a}) > 20


@pytest.mark.parametrize("ops", ["+", "*", "-+", "/*"])
def test_countdown_ops(ops):
  for p in countdown_problems(30, seed=0, ops=ops, min_target=1, max_target=10**6):
    assert set(re.findall(r"[-+*/]", p.solution)) <= set(ops)
    assert countdown_reward(f"{p.solution} = {p.target}", p.numbers, p.target) == 1.0


def test_countdown_bad_arguments():
  with pytest.raises(ValueError, match="ops"):
    countdown_problems(3, seed=0, ops="^")
  with pytest.raises(ValueError, match="num_numbers"):
    countdown_problems(3, seed=0, num_numbers=1)
  with pytest.raises(ValueError, match="could not draw"):
    countdown_problems(3, seed=0, ops="+", max_number=5, min_target=100, max_target=200)


def test_sft_records_end_with_the_answer():
  arithmetic = arithmetic_problems(20, seed=0, ops="+-*")
  for p, r in zip(arithmetic, sft_records(arithmetic)):
    assert r.prompt == p.prompt and exact_match(r.completion, p.answer)
    x, op, y = p.prompt.removeprefix("What is ").removesuffix("?").split()
    assert r.completion == f"{x} {op} {y} = {p.answer}"
  assert sft_records([Problem("Name a prime.", "7")]) == [SFTRecord(prompt="Name a prime.",
                                                                    completion="7")]
  countdown = countdown_problems(5, seed=0)
  for p, r in zip(countdown, sft_records(countdown)):
    assert r.completion == f"{p.solution} = {p.target}"
    assert countdown_reward(r.completion, p.numbers, p.target) == 1.0
