"""Countdown verifier: exact, strict about the numbers, never evaluates anything but arithmetic."""

import time

import pytest

from postrl.data import countdown_problems, sft_records
from postrl.rewards import countdown_reward, evaluate_countdown_expression, extract_countdown_answer

NUMBERS = (25, 50, 3, 7)  # 68 = (50 - 25) * 3 - 7


def test_generated_solutions_verify():
  problems = countdown_problems(300, seed=0)
  for p, r in zip(problems, sft_records(problems)):
    assert countdown_reward(p.solution, p.numbers, p.target) == 0.0  # no "=": not an answer line
    assert countdown_reward(f"<answer>{p.solution}</answer>", p.numbers, p.target) == 1.0
    assert countdown_reward(r.completion, p.numbers, p.target) == 1.0
    assert countdown_reward(r.completion, p.numbers, p.target + 1) == 0.0


@pytest.mark.parametrize("completion,reward", [
    ("(50 - 25) * 3 - 7 = 68", 1.0),
    ("Let me think.\n50 + 7 = 57\n(50 - 25) * 3 - 7 = 68\nDone.", 1.0),  # the last line with "="
    ("(50 - 25) * 3 - 7 = 68\nso 50 + 7 = 57", 0.0),
    ("<answer>(50 - 25) * 3 - 7</answer>", 1.0),
    ("<answer>(50 - 25) * 3 - 7 = 68</answer>\n1 + 1 = 2", 1.0),  # a tag wins over lines
    ("<answer>50 + 7</answer> <answer>(50-25)*3-7</answer>", 1.0),  # the last tag
    ("**(50 − 25) × 3 − 7 = 68.**", 1.0),  # markdown, unicode operators, trailing period
    ("(50 - 25) * 3 - 7 = 68.0", 1.0),
    ("(50 - 25) * 3 - 7 = 69", 0.0),  # wrong claimed result
    ("(50 - 25) * 3 - 7 = 60 + 8", 0.0),  # the claim must be a plain number
    ("(50 - 25) * 3 = 75", 0.0),  # right arithmetic, wrong target
    ("(50 - 25) * 3 - 7 - 3 + 3 = 68", 0.0),  # 3 used twice
    ("(50 - 25) * 3 - 7 + 0 = 68", 0.0),  # 0 is not given
    ("(50 - 24) * 3 - 10 = 68", 0.0),  # numbers not given
    ("68 = 68", 0.0),
    ("50 + 18 = 68", 0.0),
    ("", 0.0), ("no idea", 0.0), ("=", 0.0), (" = 68", 0.0), ("((50 - 25) * 3 - 7 = 68", 0.0),
])
def test_reward_cases(completion, reward):
  assert countdown_reward(completion, NUMBERS, 68) == reward


def test_division_is_exact():
  assert (1 / 49) * 49 != 1  # floating point gets this wrong ...
  assert countdown_reward("1 / 49 * 49 = 1", (1, 49, 49), 1) == 1.0  # ... Fraction does not
  assert evaluate_countdown_expression("(1 / 3 + 2) * 9", (1, 2, 3, 9)) == 21
  assert countdown_reward("(1 / 3 + 2) * 9 = 21", (1, 2, 3, 9), 21) == 1.0
  assert countdown_reward("7 / 2 = 3", (7, 2), 3) == 0.0  # no integer division
  assert countdown_reward("7 / 2 * 2 = 7", (7, 2, 2), 7) == 1.0
  assert countdown_reward("5 / (3 - 3) = 0", (5, 3, 3), 0) == 0.0  # division by zero


def test_multiset_of_numbers():
  assert countdown_reward("5 + 5 = 10", (5, 5), 10) == 1.0
  assert countdown_reward("5 + 5 = 10", (5, 2), 10) == 0.0
  assert countdown_reward("5 = 5", (5, 2), 5) == 1.0  # "at most once": a subset is fine


@pytest.mark.parametrize("expression", [
    "__import__('os').system('echo pwned')",
    "__import__('os').system('echo pwned') = 68",
    "().__class__.__bases__[0].__subclasses__()",
    "open('/etc/passwd').read()",
    "exec('import os')", "eval('1+1')", "lambda: 68", "[68][0]", "{68}.pop()", "68 if 1 else 2",
    "x", "50 + x", "a := 68", "f'{68}'", "'68'", "b'68'", "True + 67", "68.0", "6.8e1", "1e3",
    "-3 + 71", "+68", "~-69", "2 ** 6 + 4", "50 // 3", "50 % 7", "50 @ 3", "50 << 1", "50 & 3",
    "50 < 3", "not 3", "(50, 3)", "50; 3", "50\n+ 3", "...", "None",
])
def test_rejects_anything_but_arithmetic(expression):
  assert evaluate_countdown_expression(expression, (25, 50, 3, 7, 4, 6, 1, 2, 69, 71, 68)) is None
  assert countdown_reward(f"<answer>{expression}</answer>", (25, 50, 3, 7, 68, 69, 71), 68) == 0.0


def test_huge_inputs_are_fast():
  start = time.perf_counter()
  assert countdown_reward("9 ** 9 ** 9 ** 9 = 1", (9, 9, 9, 9), 1) == 0.0  # never computed
  assert countdown_reward("(" * 5000 + "1" + ")" * 5000 + " = 1", (1,), 1) == 0.0
  assert countdown_reward("1 + " * 10000 + "1 = 1", (1,), 1) == 0.0
  assert countdown_reward("x" * 10**6, (1,), 1) == 0.0
  assert time.perf_counter() - start < 1.0


def test_extraction_convention():
  assert extract_countdown_answer("a\n3 + 4 = 7\nb") == ("3 + 4", "7")
  assert extract_countdown_answer("<answer> 3 + 4 </answer>") == ("3 + 4", None)
  assert extract_countdown_answer("<ANSWER>3 + 4 = 7</ANSWER>") == ("3 + 4", "7")
  assert extract_countdown_answer("3 + 4 is seven") is None
  assert extract_countdown_answer(None) is None
