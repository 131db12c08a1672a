"""Verifiable math rewards: answer extraction, answer equivalence, and the 0/1 reward.

Extraction (``extract_answer`` dispatches; each returns a string or None, never raises on text):

  extract_boxed        the last ``\\boxed{...}`` / ``\\fbox{...}``, nested braces matched (the MATH
                       convention, Hendrycks et al. 2021, "Measuring Mathematical Problem Solving
                       With the MATH Dataset", ``last_boxed_only_string``).
  extract_answer_tag   the last of ``<answer>...</answer>``, ``#### 42`` (GSM8K, Cobbe et al. 2021,
                       "Training Verifiers to Solve Math Word Problems"), "answer: 42" and
                       "the answer is 42".
  extract_last_number  the last number in the text (GSM8K-style evaluation).
  extract_regex        the last match of a configurable regex (group 1 if it has groups).

Equivalence (``answers_equal``) normalises both strings in the spirit of the MATH ``is_equiv``
(Hendrycks et al. 2021) and Minerva (Lewkowycz et al. 2022, "Solving Quantitative Reasoning
Problems with Language Models", Appendix D.1) normalisers, then compares values:

* Normalisation: surrounding ``$``, ``\\$``, ``\\(...\\)``, ``\\boxed{}``, ``\\text{}``,
  ``\\mathrm{}`` and friends, ``\\left`` / ``\\right``, LaTeX spacing, degrees, a leading
  ``x =`` (a single-letter left-hand side), a trailing period, unicode minus signs (U+2212 etc.),
  ``×`` / ``÷`` / ``√``, thousands separators ("1,234" == "1234").
* Percent: ``%`` and ``\\%`` are dropped, so "50%" == "50" (the MATH ``strip_string`` convention;
  references to "what percent" questions hold the bare number). "50%" != "0.5": accepting both
  readings would make the relation non-transitive ("0.5" == "50%" == "50" but "0.5" != "50").
* Units: a plain number followed by one to three words of two or more letters loses the words
  ("42 dollars", "12 cm^2", "5 apples" -> the number); single letters are never units ("5 m"
  stays "5 m" = 5·m), nor are ``pi`` / ``sqrt``.
* Tuples and intervals: "(1, 2)", "[0, 1)", bare "1, 2" compare item by item with the same
  brackets; sets ``\\{1, 2\\}`` compare as multisets. Inside brackets a comma always
  separates items ("(3,100)" is a pair); outside, "1,234" is one number.
* Spaces are ignored when strings are compared (as in MATH's ``strip_string``), so "1 000" ==
  "1000"; the value parser itself refuses two adjacent numbers.
* Values: each item is parsed by a small safe parser (LaTeX ``\\frac`` / ``\\dfrac`` /
  ``\\tfrac``, ``\\sqrt{}`` / ``\\sqrt[n]{}``, ``\\pi``, ``^``, implicit multiplication "2x",
  "2\\sqrt{3}", mixed numbers "2\\frac{1}{2}" = 5/2) into a Python ``ast`` checked against a
  whitelist (numbers, single-letter variables, ``pi``, ``sqrt(...)``, + - * / ^, parentheses);
  nothing is ever passed to ``eval`` and the text never reaches ``ast.parse`` before every
  character of it is tokenised. Rational values compare exactly (``fractions.Fraction``), so
  "0.75" == "3/4" == "\\frac{3}{4}" but "0.33" != "1/3". Anything involving irrationals or
  variables is compared by evaluating both sides in floating point at fixed pseudo-random
  points of the variables (randomised polynomial identity testing, Schwartz 1980 / Zippel 1979),
  relative tolerance 1e-9: "2\\sqrt{2}" == "\\sqrt{8}", "x^2 + 2x + 1" == "(x+1)^2"; a decimal
  agreeing with an irrational value to about 9 significant digits is accepted too.
* sympy is deliberately not used even where it is importable (it is only a transitive test
  dependency here): ``sympy.parse_expr`` calls ``eval`` and is documented as unsafe on
  untrusted input, ``simplify`` has no time bound, and a reward whose verdict depends on
  whether an optional package is installed would make runs irreproducible.
* Garbage, over-long strings (> 1000 characters are compared as stripped strings only) and
  undefined values (division by zero) give False; nothing raises on any input.
"""

from __future__ import annotations

import ast
import functools
import math
import numbers
import operator
import random
import re
from fractions import Fraction
from typing import Pattern

# A comma run is one number only when it is valid thousands grouping as a whole (1 to 3 digits,
# then groups of exactly 3, not glued to more digits or commas: the rule of ``_THOUSANDS``);
# otherwise the commas separate numbers ("100,200,3000" is 100, 200 and 3000: its last number is
# 3000, never a glued 1002003000 nor the "0" left over after "100,200,300").
_NUMBER = re.compile(r"-?(?<![\d.])(?<!\d,)\d{1,3}(?:,\d{3})+(?!\d|,\d)(?:\.\d+)?"
                     r"|-?\d+(?:\.\d+)?(?:/\d+)?")


def extract_last_number(text: str) -> str | None:
  """The last number in ``text`` ("1,234" -> "1234", "-5", "−5" -> "-5", "3/4", "2.50"), or None.

  Commas are thousands separators only in valid grouping ("1,234,567", "-1,000", "1,234.5");
  anywhere else they separate numbers, and the last one is taken: "100,200,3000" -> "3000",
  "1,23" -> "23", "1,23,456" -> "456"."""
  matches = _NUMBER.findall(text.replace("\u2212", "-"))  # U+2212 MINUS SIGN
  if not matches:
    return None
  return matches[-1].replace(",", "")


def _value(s: str) -> Fraction | None:
  try:
    return Fraction(s)
  except (ValueError, ZeroDivisionError):
    return None


def _check_reference(reference, who: str, field: str):
  """A reference answer must be a non-blank string or a number: a missing one (None, "") would
  otherwise score every completion 0 without a word."""
  if reference is None or isinstance(reference, bool) or not isinstance(
      reference, (str, numbers.Real)):
    raise ValueError(f"{who}: {field} (the reference answer) must be a non-empty string or a "
                     f"number, got {reference!r}")
  if isinstance(reference, str) and not reference.strip():
    raise ValueError(f"{who}: {field} (the reference answer) is blank: {reference!r}")


def _number(answer) -> Fraction | None:
  """A reference number (a string read as ``extract_last_number`` reads one: "1,234", "−5",
  "3/4", "2.50"; or a finite Python / numpy number) as an exact ``Fraction``, or None."""
  if isinstance(answer, numbers.Integral):
    return Fraction(int(answer))
  if isinstance(answer, numbers.Real):
    return Fraction(float(answer)) if math.isfinite(float(answer)) else None
  text = answer.strip().translate(_MINUS)
  if not _NUMBER.fullmatch(text):
    return None
  return _value(text.replace(",", ""))


def exact_match(completion: str, answer: str) -> bool:
  """1 if the last number of ``completion`` equals ``answer`` numerically ("42.0" == "42").

  The reference is read like the completion's number (thousands separators and unicode minus
  signs allowed: "1,234", "−5"). ValueError if ``answer`` is missing (None or blank) or is not
  a number (no completion could match it; ``math_reward`` compares symbolic answers)."""
  _check_reference(answer, "exact_match", "answer")
  b = _number(answer)
  if b is None:
    raise ValueError(f"exact_match: answer {answer!r} is not a number (a plain number such as "
                     f"'42', '-1,234', '2.5' or '3/4'); use math_reward for other answers")
  got = extract_last_number(completion) if isinstance(completion, str) else None
  return got is not None and _value(got) == b


# ------------------------------------------------------------------------------------ extraction

_MINUS = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-"})
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE = re.compile(r"\\[{}]|[{}]")


def _closing_brace(text: str, open_index: int) -> int:
  """Index of the ``}`` matching the ``{`` at ``open_index`` (``\\{``, ``\\}`` skipped), or -1."""
  depth = 0
  for m in _BRACE.finditer(text, open_index):
    token = m.group()
    if token == "{":
      depth += 1
    elif token == "}":
      depth -= 1
      if depth == 0:
        return m.start()
  return -1


def _boxed_contents(text: str) -> list[str | None]:
  """The stripped contents of the top-level ``\\boxed`` / ``\\fbox`` in ``text``, in order.

  ``\\boxed{...}`` matches nested braces; ``\\boxed 5`` (no braces) takes the next token. An
  unclosed box (a truncated completion) gives None and ends the scan: the rest is inside it.
  """
  found, pos = [], 0
  while True:
    m = _BOX_COMMAND.search(text, pos)
    if m is None:
      return found
    i = m.end()
    while i < len(text) and text[i] in " \t":
      i += 1
    if i < len(text) and text[i] == "{":
      close = _closing_brace(text, i)
      if close < 0:
        found.append(None)
        return found
      found.append(text[i + 1:close].strip())
      pos = close + 1
    else:
      token = re.match(r"[^\s$]*", text[i:i + 1000]).group()
      found.append(token if token else None)
      if not token:
        return found
      pos = i + len(token)


def extract_boxed(text: str) -> str | None:
  """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text``, or None.

  Braces nest (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``) and escaped braces ``\\{`` ``\\}``
  do not count; an empty box gives ``""``. If the last box is unclosed (a truncated completion)
  the result is None rather than an earlier, possibly retracted, answer.
  """
  if not isinstance(text, str):
    return None
  found = _boxed_contents(text)
  return found[-1] if found else None


_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_PHRASE = re.compile(r"\banswer\b[\s*_]*(?:\bis\b|:)[\s*_:]*([^\n]*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")


def _clean_phrase(content: str) -> str:
  """A phrase's answer: up to a closing tag or the end of the sentence, markdown stripped."""
  cut = content.find("</")
  if cut >= 0:
    content = content[:cut]
  end = _SENTENCE_END.search(content)
  if end:
    content = content[:end.start()]
  return content.strip().strip("*").strip()


def extract_answer_tag(text: str) -> str | None:
  """The answer marked by a tag or phrase, the last one in ``text`` wins; None if none.

  Markers: ``<answer>...</answer>`` (case-insensitive; its whole content), ``#### 42``
  (GSM8K; the rest of the line), and "answer: 42" / "Answer: 42" / "**Final Answer:** 42" /
  "the answer is 42" (case-insensitive; up to the end of the line, a closing tag, or the end
  of the sentence, i.e. a period followed by a space; an empty line after "Answer:" is skipped).
  Whichever marker starts last is used, so "<answer>The answer is 42</answer>" gives "42".
  Content that is empty after stripping counts as no answer.
  """
  if not isinstance(text, str):
    return None
  candidates = []  # (start, content)
  lower = text.lower()
  close = lower.rfind("</answer>")
  if close >= 0:
    open_ = lower.rfind("<answer>", 0, close)
    if open_ >= 0:
      candidates.append((open_, text[open_ + len("<answer>"):close].strip()))
  for regex in (_HASHES, _PHRASE):
    last = None
    for last in regex.finditer(text):
      pass
    if last is not None:
      candidates.append((last.start(), _clean_phrase(last.group(1))))
  if not candidates:
    return None
  answer = max(candidates)[1]
  return answer or None


def extract_regex(text: str, pattern: str | Pattern[str]) -> str | None:
  """The last match of ``pattern`` in ``text`` (its group 1 if it has groups), stripped; or None.

  ``pattern`` is a regex string or compiled pattern (``(?i)`` etc. for flags). An invalid
  pattern is a configuration error and raises ValueError; a group that did not take part in
  the match gives None.
  """
  regex = _compile(pattern)
  if not isinstance(text, str):
    return None
  last = None
  for last in regex.finditer(text):
    pass
  if last is None:
    return None
  got = last.group(1) if regex.groups else last.group(0)
  return None if got is None else got.strip()


def _compile(pattern) -> Pattern[str]:
  if isinstance(pattern, re.Pattern):
    return pattern
  if not isinstance(pattern, str):
    raise ValueError(f"pattern must be a regex string, got {type(pattern).__name__}")
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"invalid regex pattern {pattern!r}: {e}") from None


METHODS = ("auto", "boxed", "tag", "last_number", "regex")


def extract_answer(text: str, *, method: str = "auto",
                   pattern: str | Pattern[str] | None = None) -> str | None:
  """The final answer of a completion by ``method``, or None.

  Args:
    text: the completion.
    method: "boxed" (``extract_boxed``), "tag" (``extract_answer_tag``), "last_number"
      (``extract_last_number``, after mapping unicode minus signs to "-"), "regex"
      (``extract_regex`` with ``pattern``), or "auto": the first format the completion uses
      decides: boxed if it contains ``\\boxed`` / ``\\fbox`` (an empty or unclosed last box
      then gives None rather than falling back to a number the model may have retracted), else
      tag if it has an answer marker, else the last number.
    pattern: the regex for method="regex" (required there, refused elsewhere).
  """
  if method not in METHODS:
    raise ValueError(f"unknown extraction method {method!r}; known: {list(METHODS)}")
  if (method == "regex") != (pattern is not None):
    raise ValueError("pattern is required with method='regex' and only used there, "
                     f"got method={method!r}, pattern={pattern!r}")
  if method == "regex":
    return extract_regex(text, pattern)
  if not isinstance(text, str):
    return None
  if method == "boxed":
    return extract_boxed(text)
  if method == "tag":
    return extract_answer_tag(text)
  if method == "last_number":
    return extract_last_number(text.translate(_MINUS))  # same length: positions unchanged
  if _BOX_COMMAND.search(text):  # the completion chose the boxed format: it alone decides
    return extract_boxed(text) or None
  tagged = extract_answer_tag(text)
  if tagged is not None:
    return tagged
  return extract_last_number(text.translate(_MINUS))


# ----------------------------------------------------------------------------------- equivalence

_MAX_ANSWER_CHARS = 1000  # longer answers are compared as stripped strings only
_MAX_EXPR_CHARS = 300     # longer items are not parsed
_MAX_EXPONENT = 4096      # exact powers with larger integer exponents go to floating point
_MAX_POWER_BITS = 20000   # ... and so do exact powers whose result would exceed this many bits
_POINTS = 5               # evaluation points for expressions with variables
_REL_TOL, _ABS_TOL = 1e-9, 1e-12

_UNICODE = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-", "\ufe63": "-",
                          "\uff0d": "-", "×": "*", "·": "*", "÷": "/", "°": "",
                          "∞": "\\infty ", "π": "\\pi ", "\u00a0": " ", "\u2009": " ",
                          "\u202f": " "})
_UNWRAP = re.compile(r"\\(?:boxed|fbox|text|textbf|textit|textrm|textnormal|mathrm|mathbf|"
                     r"mathit|mbox|operatorname)\s*\{")
_DROP = re.compile(r"\\(?:left|right|displaystyle|big|Big|bigg|Bigg)(?![A-Za-z])|"
                   r"\\[,;:!]|\\q?quad(?![A-Za-z])|~|\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|"
                   r"\\circ(?![A-Za-z])|\\degree(?![A-Za-z])|\\?%")
_MATH_DELIMITERS = re.compile(r"^\\[(\[](.*)\\[)\]]$", re.DOTALL)
_LHS = re.compile(r"^[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?\s*=\s*(?=\S)")
_THOUSANDS = re.compile(r"(?<![\d.])(?<!\d,)\d{1,3}(?:,\d{3})+(?!\d|,\d)")
_UNIT_TAIL = re.compile(r"([-+]?\d[\d.,/]*)\s+((?:[A-Za-z]{2,}\.?(?:\^\{?\d\}?)?\s*){1,3})")
_NOT_UNITS = {"pi", "sqrt", "infty"}
_OPEN, _CLOSE = "([{", ")]}"


def _unwrap(s: str) -> str:
  """``\\text{abc}`` -> ``abc`` (and \\boxed, \\mathrm, ...), innermost structure kept."""
  pos = 0
  while True:
    m = _UNWRAP.search(s, pos)
    if m is None:
      return s
    close = _closing_brace(s, m.end() - 1)
    if close < 0:
      return s[:m.start()] + s[m.end():]
    s = s[:m.start()] + s[m.end():close] + s[close + 1:]
    pos = m.start()


def _normalize(s: str) -> str:
  """Strips presentation (delimiters, \\text, units are later) so that values can be compared."""
  s = s.translate(_UNICODE).strip()
  s = re.sub(r"√\s*(\d+(?:\.\d+)?|[A-Za-z])", r"\\sqrt{\1}", s).replace("√", "\\sqrt")
  s = _unwrap(s)
  s = s.replace("\\$", "").replace("$", "")
  s = _DROP.sub("", s).strip()
  m = _MATH_DELIMITERS.match(s)
  if m:
    s = m.group(1).strip()
  s = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", s)
  s = s.replace("\\{", "{").replace("\\}", "}")
  s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
  s = _LHS.sub("", s)
  return s


def _top_level_split(s: str) -> list[str] | None:
  """``s`` split at commas outside brackets; None if the brackets do not balance."""
  items, depth, start = [], 0, 0
  for i, c in enumerate(s):
    if c in _OPEN:
      depth += 1
    elif c in _CLOSE:
      depth -= 1
      if depth < 0:
        return None
    elif c == "," and depth == 0:
      items.append(s[start:i].strip())
      start = i + 1
  if depth != 0:
    return None
  items.append(s[start:].strip())
  return items


def _as_sequence(s: str) -> tuple[str, str, list[str]] | None:
  """``(open, close, items)`` if ``s`` is a tuple / interval / set / bare list, else None."""
  if len(s) >= 2 and s[0] in _OPEN and s[-1] in _CLOSE:
    depth = 0
    for i, c in enumerate(s):  # do the first and last brackets enclose everything?
      depth += (c in _OPEN) - (c in _CLOSE)
      if depth == 0 and i < len(s) - 1:
        break
    else:
      items = _top_level_split(s[1:-1])
      if items is not None and len(items) >= 2:
        return s[0], s[-1], items
      return None
  items = _top_level_split(_THOUSANDS.sub(_no_commas, s))  # bare "1,234" is one number
  if items is not None and len(items) >= 2:
    return "", "", items
  return None


def _strip_units(s: str) -> str:
  """A plain number followed by 1-3 words of 2+ letters (not pi / sqrt) -> the number."""
  m = _UNIT_TAIL.fullmatch(s)
  if m and not any(w.lower() in _NOT_UNITS for w in re.findall(r"[A-Za-z]+", m.group(2))):
    return m.group(1)
  return s


def _equal(a: str, b: str) -> bool:
  """Equivalence of two normalised answers (sequences item by item, scalars by value)."""
  if a == b:
    return True
  seq_a, seq_b = _as_sequence(a), _as_sequence(b)
  if seq_a is not None or seq_b is not None:
    if seq_a is None or seq_b is None or seq_a[:2] != seq_b[:2] or len(seq_a[2]) != len(seq_b[2]):
      return False
    items_a, items_b = seq_a[2], seq_b[2]
    if seq_a[0] == "{" and seq_a[1] == "}":  # a set: match items in any order
      unused = list(items_b)
      for x in items_a:
        hit = next((k for k, y in enumerate(unused) if _equal(x, y)), None)
        if hit is None:
          return False
        unused.pop(hit)
      return True
    return all(_equal(x, y) for x, y in zip(items_a, items_b))
  a, b = (_THOUSANDS.sub(_no_commas, _strip_units(x)) for x in (a, b))
  if a.replace(" ", "") == b.replace(" ", ""):
    return bool(a)
  ea, eb = _expression(a), _expression(b)
  return ea is not None and eb is not None and _values_equal(ea, eb)


def answers_equal(predicted: str, reference: str) -> bool:
  """Whether a predicted final answer is equivalent to the reference answer.

  Normalisation and comparison rules are in the module docstring: numeric equivalence
  ("1,234" == "1234", "42.0" == "42", "−5" == "-5", "3/4" == "0.75" == "\\frac{3}{4}"),
  presentation stripped ("$42$", "\\$42", "42 dollars", "\\text{...}", "x = 5"), percent signs
  dropped ("50%" == "50", "50%" != "0.5"), simple symbolic equivalence by exact rational
  arithmetic or evaluation at fixed points ("2\\sqrt{2}" == "\\sqrt{8}"), tuples and intervals
  item by item. Never raises: garbage and non-string inputs (other than numbers, Python or
  numpy, which are formatted with ``str``) give False.

  Args:
    predicted: the extracted answer (see ``extract_answer``).
    reference: the reference final answer.
  """
  texts = []
  for x in (predicted, reference):
    if isinstance(x, numbers.Real) and not isinstance(x, bool):  # numpy scalars too
      x = str(x)
    if not isinstance(x, str):
      return False
    texts.append(x)
  p, r = texts
  if len(p) > _MAX_ANSWER_CHARS or len(r) > _MAX_ANSWER_CHARS:
    return bool(p.strip()) and p.strip() == r.strip()
  try:
    p, r = _normalize(p), _normalize(r)
    if not p or not r:
      return False
    return _equal(p, r)
  except (RecursionError, MemoryError, ArithmeticError, ValueError):  # defensive: never crash
    return False


def _no_commas(m: re.Match) -> str:
  return m.group().replace(",", "")


# ------------------------------------------------------------- safe parsing of simple expressions


class _Invalid(Exception):
  """Not a well-formed or not a defined expression."""


class _Inexact(Exception):
  """Not representable as an exact rational (irrational, variables, huge powers)."""


_COMMAND = re.compile(r"\\([A-Za-z]+)")
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|"
                    r"([A-Za-z]+)|(\*\*|[-+*/^()]))")
_FUNCTIONS, _CONSTANTS = ("sqrt",), ("pi",)
_BIN_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)


def _argument(s: str, i: int) -> tuple[str, int]:
  """A LaTeX macro argument at ``s[i:]``: a brace group, a ``\\command`` or one character."""
  while i < len(s) and s[i] == " ":
    i += 1
  if i >= len(s):
    raise _Invalid
  if s[i] == "{":
    close = _closing_brace(s, i)
    if close < 0:
      raise _Invalid
    return s[i + 1:close], close + 1
  if s[i] == "\\":
    m = _COMMAND.match(s, i)
    if m is None:
      raise _Invalid
    return m.group(), m.end()
  return s[i], i + 1


def _latex_to_python(s: str) -> str:
  """LaTeX math (``\\frac``, ``\\sqrt``, ``\\pi``, ``\\cdot``, braces) -> Python-like infix text."""
  out, i = [], 0
  while i < len(s):
    c = s[i]
    if c == "\\":
      m = _COMMAND.match(s, i)
      if m is None:
        raise _Invalid
      name, i = m.group(1), m.end()
      if name == "frac":
        num, i = _argument(s, i)
        den, i = _argument(s, i)
        text = f"(({_latex_to_python(num)})/({_latex_to_python(den)}))"
        done = "".join(out)
        whole = re.search(r"(\d+)\s*$", done)
        if whole and num.strip().isdigit() and den.strip().isdigit():  # mixed number 2\frac{1}{2}
          out = [done[:whole.start()], f"({whole.group(1)}+{text})"]
        else:
          out.append(text)
      elif name == "sqrt":
        index = None
        while i < len(s) and s[i] == " ":
          i += 1
        if i < len(s) and s[i] == "[":
          close = s.find("]", i)
          if close < 0:
            raise _Invalid
          index, i = s[i + 1:close], close + 1
        arg, i = _argument(s, i)
        arg = _latex_to_python(arg)
        out.append(f"sqrt({arg})" if index is None else
                   f"(({arg})**(1/({_latex_to_python(index)})))")
      elif name in ("pi",):
        out.append(" pi ")
      elif name in ("cdot", "times", "ast"):
        out.append("*")
      elif name == "div":
        out.append("/")
      else:
        raise _Invalid
    else:
      out.append("(" if c == "{" else ")" if c == "}" else c)
      i += 1
  return "".join(out)


@functools.lru_cache(maxsize=4096)
def _expression(s: str) -> ast.Expression | None:
  """``s`` parsed into a whitelisted ``ast.Expression``, or None.

  Every character is tokenised first (numbers, single letters, ``pi``, ``sqrt``, + - * / ^ **
  and parentheses; anything else -> None), numbers are rewritten as exact integer ratios,
  implicit multiplication is made explicit, and only then is the text handed to
  ``ast.parse``, whose tree is checked node by node. Nothing is evaluated here.
  """
  if not s or len(s) > _MAX_EXPR_CHARS:
    return None
  try:
    src = _latex_to_python(s).strip()
  except (_Invalid, RecursionError):
    return None
  pieces, prev, pos = [], None, 0
  while pos < len(src):
    m = _TOKEN.match(src, pos)
    if m is None:
      return None
    pos = m.end()
    number, name, op = m.groups()
    if number is not None:
      kind = "num"
      mantissa_exponent = re.search(r"[eE]([-+]?\d+)$", number)
      if mantissa_exponent and abs(int(mantissa_exponent.group(1))) > 100:
        return None
      value = Fraction(number)
      text = str(value.numerator) if value.denominator == 1 else \
          f"({value.numerator}/{value.denominator})"
    elif name is not None:
      if name in _FUNCTIONS:
        kind = "func"
      elif name in _CONSTANTS:
        kind = "const"
      elif len(name) == 1:
        kind = "var"
      else:  # "abc" is a word, not a*b*c (anagrams would compare equal)
        return None
      text = name
    else:
      kind = op
      text = "**" if op == "^" else op
    if prev in ("num", "var", "const", ")") and kind in ("num", "var", "const", "func", "("):
      if prev == "num" and kind == "num":  # "1 000": not a product
        return None
      pieces.append("*")
    pieces.append(text)
    prev = kind
  if not pieces:
    return None
  try:
    tree = ast.parse(" ".join(pieces), mode="eval")
  except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
    return None
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      if (not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS
          or len(node.args) != 1 or node.keywords):
        return None
    elif isinstance(node, ast.Name):
      if node.id in _FUNCTIONS:
        continue  # only reachable as a Call's func (a bare "sqrt" fails below in evaluation)
      if not (node.id in _CONSTANTS or len(node.id) == 1):
        return None
    elif isinstance(node, ast.Constant):
      if type(node.value) is not int:
        return None
    elif isinstance(node, ast.BinOp):
      if not isinstance(node.op, _BIN_OPS):
        return None
    elif isinstance(node, ast.UnaryOp):
      if not isinstance(node.op, (ast.USub, ast.UAdd)):
        return None
    elif not isinstance(node, (ast.Expression, ast.Load, ast.operator, ast.unaryop)):
      return None
  return tree


def _iroot(k: int, n: int) -> int:
  """floor(k ** (1/n)) for k >= 0 by integer Newton iteration (exact for any size)."""
  if k < 2:
    return k
  x = 1 << -(-k.bit_length() // n)  # an upper bound of the root
  while True:
    y = ((n - 1) * x + k // x ** (n - 1)) // n
    if y >= x:
      return x
    x = y


def _exact_root(x: Fraction, n: int) -> Fraction | None:
  """The exact n-th root of a non-negative rational, if it is rational."""
  num, den = _iroot(x.numerator, n), _iroot(x.denominator, n)
  if num ** n != x.numerator or den ** n != x.denominator:
    return None
  return Fraction(num, den)


# the four operations both evaluators share (power is handled apart: exactly, or by math.pow)
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
               ast.Div: operator.truediv}


def _exact(node) -> Fraction:
  """Exact rational value of a whitelisted tree; raises _Inexact or _Invalid."""
  if isinstance(node, ast.Expression):
    return _exact(node.body)
  if isinstance(node, ast.Constant):
    return Fraction(node.value)
  if isinstance(node, ast.Name):
    raise _Inexact
  if isinstance(node, ast.UnaryOp):
    v = _exact(node.operand)
    return -v if isinstance(node.op, ast.USub) else v
  if isinstance(node, ast.Call):
    v = _exact(node.args[0])
    if v < 0:
      raise _Invalid
    root = _exact_root(v, 2)
    if root is None:
      raise _Inexact
    return root
  left, right = _exact(node.left), _exact(node.right)
  if isinstance(node.op, ast.Div) and right == 0:
    raise _Invalid
  if type(node.op) in _ARITHMETIC:
    return _ARITHMETIC[type(node.op)](left, right)
  # power: integer exponents exactly (bounded size), p/q exponents through exact q-th roots
  if left == 0 and right < 0:
    raise _Invalid
  if right.denominator > 1:
    if left < 0 or right.denominator > 64:
      raise _Inexact
    left = _exact_root(left, right.denominator)
    if left is None:
      raise _Inexact
  e = right.numerator
  bits = max(left.numerator.bit_length(), left.denominator.bit_length())
  if abs(e) > _MAX_EXPONENT or bits * abs(e) > _MAX_POWER_BITS:
    raise _Inexact
  return left ** e


def _approx(node, env: dict[str, float]) -> float:
  """Floating-point value of a whitelisted tree with variables from ``env``."""
  if isinstance(node, ast.Expression):
    return _approx(node.body, env)
  if isinstance(node, ast.Constant):
    return float(node.value)
  if isinstance(node, ast.Name):
    return math.pi if node.id == "pi" else env[node.id]
  if isinstance(node, ast.UnaryOp):
    v = _approx(node.operand, env)
    return -v if isinstance(node.op, ast.USub) else v
  if isinstance(node, ast.Call):
    return math.sqrt(_approx(node.args[0], env))
  left, right = _approx(node.left, env), _approx(node.right, env)
  return _ARITHMETIC.get(type(node.op), math.pow)(left, right)


def _variables(tree) -> set[str]:
  return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and len(n.id) == 1}


def _point(name: str, k: int) -> float:
  # Seeded by a string: the same values in every process (str hashing is not involved).
  return random.Random(f"postrl/{name}/{k}").uniform(0.5, 2.5)


def _values_equal(a: ast.Expression, b: ast.Expression) -> bool:
  """Exact comparison when both are rational, otherwise evaluation at fixed points."""
  exact = []
  for tree in (a, b):
    try:
      exact.append(_exact(tree))
    except _Inexact:
      exact.append(None)
    except (_Invalid, ZeroDivisionError, OverflowError, ValueError):
      return False
  if exact[0] is not None and exact[1] is not None:
    return exact[0] == exact[1]
  names = sorted(_variables(a) | _variables(b))
  points = _POINTS if names else 1
  for k in range(points):
    env = {n: _point(n, k) for n in names}
    try:
      x, y = _approx(a, env), _approx(b, env)
    except (ArithmeticError, ValueError, KeyError, RecursionError):
      return False
    if not (math.isfinite(x) and math.isfinite(y)):
      return False
    if not math.isclose(x, y, rel_tol=_REL_TOL, abs_tol=_ABS_TOL):
      return False
  return True


def math_reward(completion: str, reference: str, *, method: str = "auto",
                pattern: str | Pattern[str] | None = None) -> float:
  """Verifiable outcome reward: 1.0 if the completion's final answer equals the reference, else 0.

  r(y) = 1[answers_equal(extract_answer(y; method, pattern), reference)], the binary accuracy
  reward of RL with verifiable rewards (Lambert et al. 2024, "Tülu 3", RLVR; DeepSeek-AI 2025,
  "DeepSeek-R1", the rule-based accuracy reward).

  Args:
    completion: the model's text.
    reference: the reference final answer (not a full solution).
    method, pattern: see ``extract_answer``.
  Raises:
    ValueError: ``reference`` missing (None, blank) or not a string / number; a bad method or
      pattern.
  """
  _check_reference(reference, "math_reward", "reference")
  answer = extract_answer(completion, method=method, pattern=pattern)
  return 1.0 if answer is not None and answers_equal(answer, reference) else 0.0
