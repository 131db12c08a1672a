"""Answer extraction and exact-match checking for numeric answers.

``extract_last_number``: the last number in a completion (thousands separators and a trailing
period removed), the convention of GSM8K-style evaluation (Cobbe et al. 2021).
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")


def extract_last_number(text: str) -> str | None:
  """The last number in ``text`` ("1,234" -> "1234", "-5", "3/4", "2.50"), or None."""
  matches = _NUMBER.findall(text)
  if not matches:
    return None
  return matches[-1].replace(",", "")


def _value(s: str) -> Fraction | None:
  try:
    return Fraction(s)
  except (ValueError, ZeroDivisionError):
    return None


def exact_match(completion: str, answer: str) -> bool:
  """1 if the last number of ``completion`` equals ``answer`` numerically ("42.0" == "42")."""
  got = extract_last_number(completion)
  if got is None:
    return False
  a, b = _value(got), _value(answer)
  return a is not None and a == b
