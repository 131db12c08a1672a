"""Answer extraction on tricky strings."""

import pytest

from postrl.rewards import exact_match, extract_last_number


@pytest.mark.parametrize("text, expected", [
    ("12 + 30 = 42", "42"),
    ("The answer is 1,234.", "1234"),
    ("It is -17", "-17"),
    ("first 3 then 4", "4"),
    ("about 2.50 dollars", "2.50"),
    ("three quarters: 3/4", "3/4"),
    ("no digits here", None),
    ("", None),
])
def test_extract_last_number(text, expected):
  assert extract_last_number(text) == expected


@pytest.mark.parametrize("completion, answer, correct", [
    ("so 95 + 98 = 193", "193", True),
    ("so 95 + 98 = 192", "193", False),
    ("the result is 42.0", "42", True),
    ("the result is -5", "5", False),
    ("the total is 1,005", "1005", True),
    ("I don't know", "7", False),
    ("0.75", "3/4", True),
])
def test_exact_match(completion, answer, correct):
  assert exact_match(completion, answer) is correct
