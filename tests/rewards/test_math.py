"""Answer extraction and equivalence on tricky strings; nothing is ever evaluated as Python."""

import builtins
import time

import pytest

from postrl.rewards import (answers_equal, exact_match, extract_answer, extract_answer_tag,
                            extract_boxed, extract_last_number, extract_regex, math_reward)


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


# ------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{42}", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
    (r"$\boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{1} no wait \boxed{2}", "2"),  # the last one
    (r"\fbox{7}", "7"),
    (r"\boxed { 8 }", "8"),
    (r"\boxed 5$", "5"),  # MATH's brace-less form
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not nest
    (r"\boxed{}", ""),
    (r"\boxed{1} then \boxed{2", None),  # truncated: not the retracted earlier answer
    (r"\boxed{", None),
    (r"\boxedx{3}", None),  # another command
    ("no box", None),
    ("", None),
])
def test_extract_boxed(text, expected):
  assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("#### 1,234", "1,234"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("<answer> 42 </answer>", "42"),
    ("<ANSWER>\n7\n</ANSWER>", "7"),
    ("<answer>41</answer> <answer>42</answer>", "42"),
    ("The answer is 42.", "42"),
    ("The answer is 3.5. Let me check.", "3.5"),  # decimal point is not a sentence end
    ("the answer is: -3", "-3"),
    ("Answer: 7\nwhich is odd", "7"),
    ("Answer:\n\n12", "12"),
    ("**Final Answer:** $\\frac12$", "$\\frac12$"),
    ("ANSWER IS 9", "9"),
    ("<answer>The answer is 42</answer>", "42"),  # a phrase inside a tag
    ("The answer is 41. <answer>42</answer>", "42"),  # the last marker wins ...
    ("<answer>41</answer> wait, the answer is 43", "43"),  # ... whichever kind it is
    ("Answer: 1\n#### 2\nThe answer is 3", "3"),
    ("<answer>  </answer>", None),
    ("answers: 5", None),
    ("12 + 30 = 42", None),
    ("", None),
])
def test_extract_answer_tag(text, expected):
  assert extract_answer_tag(text) == expected


def test_extract_regex():
  assert extract_regex("x=12, x=13", r"x=(\d+)") == "13"  # group 1 of the last match
  assert extract_regex("x=12, x=13", r"x=\d+") == "x=13"  # whole match without groups
  assert extract_regex("RESULT: 5", r"(?i)result:\s*(\S+)") == "5"
  assert extract_regex("a", r"(b)?a") is None  # group 1 did not take part
  assert extract_regex("nothing", r"x=(\d+)") is None
  assert extract_regex(None, r"x") is None
  with pytest.raises(ValueError, match="invalid regex"):
    extract_regex("x", "(unclosed")


TEXT = r"We get 3, then the answer is −5. Check: \boxed{6}. Total 7"


@pytest.mark.parametrize("method, pattern, expected", [
    ("auto", None, "6"),
    ("boxed", None, "6"),
    ("tag", None, "−5"),
    ("last_number", None, "7"),
    ("regex", r"get (\d+)", "3"),
])
def test_extract_answer_methods(method, pattern, expected):
  assert extract_answer(TEXT, method=method, pattern=pattern) == expected


@pytest.mark.parametrize("text, expected", [
    (r"\boxed{1} The answer is 2. 3", "1"),  # boxed first ...
    (r"\boxed{} The answer is 2. 3", None),  # ... a box decides, even an empty one ...
    (r"\boxed{1} and then \boxed{ The answer is 2. 3", None),  # ... or a truncated one
    ("The answer is 2. 3", "2"),  # ... then tags ...
    ("The total is −12", "-12"),  # ... then the last number (unicode minus read as minus)
    ("nothing here", None),
])
def test_extract_answer_auto_order(text, expected):
  assert extract_answer(text) == expected


def test_extract_answer_bad_arguments():
  with pytest.raises(ValueError, match="unknown extraction method"):
    extract_answer("1", method="first_number")
  with pytest.raises(ValueError, match="pattern is required"):
    extract_answer("1", method="regex")
  with pytest.raises(ValueError, match="only used there"):
    extract_answer("1", method="boxed", pattern=r"\d")
  assert extract_answer(None) is None
  assert extract_answer(123) is None


# ----------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("predicted, reference", [
    ("1,234", "1234"), ("1,000,000", "10^6"), ("42.0", "42"), ("042", "42"), (".5", "0.5"),
    ("−5", "-5"), ("\u20135", "-5"), ("-0", "0"),
    ("3/4", "0.75"), (r"\frac{3}{4}", "0.75"), (r"\dfrac{3}{4}", "3/4"), (r"\tfrac34", "0.75"),
    (r"\frac12", "0.5"), (r"-\frac{1}{2}", "-0.5"), (r"\frac{-1}{2}", "-1/2"),
    (r"2\frac{1}{2}", "5/2"), (r"-2\frac{1}{2}", "-2.5"),  # mixed numbers
    (r"\sqrt{8}", r"2\sqrt{2}"), (r"\sqrt2", r"\sqrt{2}"), ("√2", r"\sqrt{2}"),
    (r"\sqrt{4}", "2"), (r"\sqrt[3]{8}", "2"), ("8^{1/3}", "2"), ("2^{-1}", "0.5"),
    (r"\frac{\sqrt{3}}{2}", "sqrt(3)/2"), (r"\frac{\pi}{2}", r"\pi/2"), (r"2 \pi", r"\pi \cdot 2"),
    ("50%", "50"), (r"50\%", "50"), ("50 percent", "50"),
    ("$42$", "42"), (r"\$42", "42"), ("$1,234.00", "1234"), ("42 dollars", "42"),
    (r"42 \text{ dollars}", "42"), ("12 cm^2", "12"), (r"\text{5}", "5"), (r"\mathrm{7}", "7"),
    ("x = 5", "5"), ("y=2x+1", "2x+1"), (r"\(\frac{1}{3}\)", "1/3"), ("42.", "42"),
    (r"30^\circ", "30"), ("30°", "30"), (r"\boxed{42}", "42"), (r"\left(3\right)", "3"),
    ("1e3", "1000"), ("10^{100}", "1e100"), (r"3 \times 4", "12"), ("6 ÷ 2", "3"),
    ("x^2 + 2x + 1", "(x+1)^2"), ("2(x+1)", "2x+2"), (r"\frac{x^2-1}{x-1}", "x+1"),
    ("(1, 2)", "(1,2)"), (r"\left( 1, \frac{1}{2} \right)", "(1, 0.5)"), ("[0, 1)", "[0,1)"),
    (r"(-\infty, 3]", r"(-\infty,3]"), (r"\{3, 1, 2\}", r"\{1,2,3\}"),
    ("((1,2),(3,4))", "((1, 2), (3, 4))"), ("1, 2", "1,2"), ("(3,100)", "(3, 100)"),
    ("1,234, 5", "1234, 5"), ("1 000", "1000"), (r"\text{(A)}", "A"), ("Monday", r"\text{Monday}"),
    (42, "42"), ("0.5", 0.5),
])
def test_answers_equal(predicted, reference):
  assert answers_equal(predicted, reference)
  assert answers_equal(reference, predicted)  # symmetric


@pytest.mark.parametrize("predicted, reference", [
    ("1,234", "1.234"), ("(1,234)", "1234"), ("(1,234)", "(1234)"), ("1,2", "12"),
    ("1234", "1235"), ("-5", "5"), ("0.33", "1/3"), ("0.333333", "1/3"),
    ("3.14", r"\pi"), (r"\sqrt{2}", "1.41"), (r"\sqrt{3}", r"\sqrt{2}"), (r"\frac{3}{4}", "4/3"),
    ("50%", "0.5"),  # percent signs are dropped, not divided by 100
    ("5 m", "5"),  # single letters are not units
    ("2x", "2"), ("x+1", "y+1"), ("x^2", "x"), ("dog", "god"),  # words are not products
    ("(1, 2)", "(2, 1)"), ("(1, 2)", "[1, 2]"), ("(1, 2)", "1, 2"), ("(1, 2)", "(1, 2, 3)"),
    (r"\{1, 2\}", r"\{1, 1\}"), ("[0, 1)", "[0, 1]"),
    ("A", "B"), ("", "0"), ("", ""), ("  ", "  "), ("$$", ""), ("1/0", "2/0"), ("0/0", "0"),
    ("9^9^9^9", "1"), ("2^{10000000}", "0"), ("(" * 400 + "1" + ")" * 400, "1"),
    (None, "1"), ("1", None), (True, "1"), (["1"], "1"), (b"1", "1"),
    ("__import__('os').system('true')", "0"), ("().__class__", "0"), ("lambda: 1", "1"),
    ("1; 1", "1"), ("1 if 1 else 0", "1"), ("[1][0]", "1"), ("a.b", "a.c"), ("1 + ", "1"),
])
def test_answers_not_equal(predicted, reference):
  assert not answers_equal(predicted, reference)
  assert not answers_equal(reference, predicted)


def test_injection_is_never_evaluated(tmp_path, monkeypatch):
  marker = tmp_path / "pwned"
  calls = []
  for name in ("eval", "exec"):
    monkeypatch.setattr(builtins, name, lambda *a, _name=name, **k: calls.append(_name))
  payloads = [
      f"__import__('os').system('touch {marker}')",
      f"\\boxed{{__import__('pathlib').Path('{marker}').touch()}}",
      f"<answer>open('{marker}', 'w')</answer>",
      f"The answer is exec(\"open('{marker}','w')\")",
  ]
  for payload in payloads:
    for method in ("auto", "boxed", "tag", "last_number"):
      assert math_reward(payload, "12345", method=method) == 0.0
    assert not answers_equal(payload, "0") and not answers_equal(payload, payload + "+1")
  assert not marker.exists() and calls == []


def test_long_and_adversarial_inputs_are_fast():
  start = time.perf_counter()
  big = [
      "x" * 10**6, "1" * 10**6, "{" * 10**5, "\\boxed{" * 10**5, "<answer>" * 10**5,
      "</answer>" * 10**5 + "<answer>", "answer is " * 10**5, "#### " * 10**5,
      "\\boxed{" + "\\frac{" * 10**4, "9^" * 10**4 + "9", "(" * 10**4 + "1" + ")" * 10**4,
  ]
  for text in big:
    for method in ("auto", "boxed", "tag", "last_number"):
      math_reward(text, "1", method=method)
    assert not answers_equal(text, "1")
  assert not answers_equal("9^9^9^9", "1")
  assert not answers_equal("2^{2^{2^{2^{2^{2}}}}}", "1")
  assert not answers_equal("1" * 999, "1" * 998)
  assert answers_equal("1" * 2000, "1" * 2000)  # over the length cap: string comparison only
  assert not answers_equal("1" * 2000, "1" * 1999 + "2")
  assert time.perf_counter() - start < 3.0


# --------------------------------------------------------------------------------- math_reward


@pytest.mark.parametrize("completion, reference, reward", [
    (r"... so the probability is $\boxed{\frac{1}{2}}$.", "0.5", 1.0),
    (r"... so it is $\boxed{\dfrac{3}{4}}$", r"\frac{3}{4}", 1.0),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", 1.0),
    ("so the cost is\n#### 1,234", "1234", 1.0),
    ("<think>6 * 7</think><answer> 42 </answer>", "42", 1.0),
    ("The answer is $42.", "42", 1.0),
    ("The answer is −5.", "-5", 1.0),
    ("It is 12 + 30 = 42", "42", 1.0),  # auto falls back to the last number
    (r"\boxed{41} no, \boxed{42}", "42", 1.0),  # the last answer counts
    (r"\boxed{42} no, \boxed{41}", "42", 0.0),
    (r"\boxed{42} and then \boxed{", "42", 0.0),  # truncated after a retraction
    ("I don't know", "42", 0.0),
    ("", "42", 0.0),
    (r"\boxed{x = 5}", "5", 1.0),
    (r"\boxed{(1, 2)}", "(1,2)", 1.0),
])
def test_math_reward(completion, reference, reward):
  assert math_reward(completion, reference) == reward


def test_math_reward_methods():
  text = r"first \boxed{3}, answer: 4. And finally 5"
  assert [math_reward(text, "3", method=m) for m in ("auto", "boxed", "tag", "last_number")] == \
      [1.0, 1.0, 0.0, 0.0]
  assert math_reward(text, "4", method="tag") == 1.0
  assert math_reward(text, "5", method="last_number") == 1.0
  assert math_reward("ans=(7)", "7", method="regex", pattern=r"ans=\((\d+)\)") == 1.0
  assert math_reward("ans=(7)", "7", method="regex", pattern=r"res=(\d+)") == 0.0
  assert isinstance(math_reward("1", "1"), float)


@pytest.mark.parametrize("text, expected", [
    # a comma run that is not thousands grouping separates numbers: these read "0", "5", "23456"
    ("100,200,3000", "3000"),
    ("1,2345", "2345"),
    ("1,23,456", "456"),
    ("1,234,5678", "5678"),
    ("1,23", "23"),
    # valid grouping is one number, with a sign and decimals
    ("1,234.5", "1234.5"),
    ("-1,000", "-1000"),
    ("\u22121,000", "-1000"),
    ("it is 1,234,567.", "1234567"),
    ("12,345", "12345"),
])
def test_extract_last_number_reads_commas_as_grouping_only_when_valid(text, expected):
  assert extract_last_number(text) == expected
  assert extract_answer(text, method="last_number") == expected


def test_exact_match_and_rewards_follow_the_comma_reading():
  assert exact_match("the counts are 100,200,3000", "3000")
  assert not exact_match("the counts are 100,200,3000", "1002003000")
  assert exact_match("so 1,23", "23") and exact_match("total: -1,000", "-1000")
  assert exact_match("total: 1,234.5", "2469/2")
  assert math_reward("the counts are 100,200,3000", "3000") == 1.0
  with pytest.raises(ValueError, match="is not a number"):  # never a glued reference either
    exact_match("1002003000", "100,200,3000")


def test_extract_last_number_reads_unicode_minus():
  assert extract_last_number("so the result is \u22125") == "-5"
  assert exact_match("12 \u2212 30 = \u221218", "-18")
