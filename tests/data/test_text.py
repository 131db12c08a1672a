"""The champ text corpus: deterministic disjoint splits, exact token budgets, clear errors."""

import json

import numpy as np
import pytest

from postrl.data.records import DataError
from postrl.data.text import (BUDGETS, Document, champ_documents, champ_path, champ_problems,
                              champ_windows, token_windows)
from postrl.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("smollm2-135m-instruct")


def test_document_text_follows_the_file():
  with open(champ_path(), encoding="utf-8") as f:
    raw = json.load(f)["problems"]["P_Combinatorics_1"]
  category, text = champ_problems()["P_Combinatorics_1"]
  assert category == "Combinatorics"
  steps = [s["_text"] for s in raw["solution"]["steps"]]
  assert text == "\n".join([f"Problem: {raw['_text']}", "Solution:", *steps, "Answer: 239"])
  assert "@@" not in text  # the plain text, not the raw text with math markers


def test_splits_are_disjoint_complete_stratified_and_deterministic():
  ev, cal = champ_documents("evaluation"), champ_documents("calibration")
  ev_ids, cal_ids = {d.id for d in ev}, {d.id for d in cal}
  assert not ev_ids & cal_ids
  assert len(ev_ids | cal_ids) == 270 and len(ev) + len(cal) == 270
  problems = champ_problems()
  for split_ids in (ev_ids, cal_ids):
    assert {problems[i][0] for i in split_ids} == {problems[i][0] for i in problems}
  assert champ_documents("evaluation") == ev
  assert champ_documents("evaluation", seed=1) != ev
  assert len(champ_documents("evaluation", eval_fraction=0.25)) < len(ev)


def test_budget_is_exact_and_windows_are_the_stream_prefix(tok):
  for split, (b, t) in BUDGETS.items():
    windows = champ_windows(tok, split)
    assert windows.shape == (b, t) and windows.dtype == np.int32
  docs = champ_documents("evaluation")
  stream = []
  for d in docs[:3]:
    stream += tok.encode(d.text, add_bos=False) + [tok.token_to_id("<|endoftext|>")]
  windows = champ_windows(tok, "evaluation", num_windows=2, seq_len=100)
  assert windows.shape == (2, 100)
  np.testing.assert_array_equal(windows.ravel(), stream[:200])


def test_token_windows_hand_example(tok):
  a, b = "Problem: 1 + 1\nAnswer: 2", "Problem: 2 + 3\nAnswer: 5"
  stream = tok.encode(a) + [7] + tok.encode(b) + [7]
  n = len(stream) // 3
  np.testing.assert_array_equal(
      token_windows([a, Document("b", b)], tok, num_windows=3, seq_len=n, separator_id=7),
      np.asarray(stream[:3 * n]).reshape(3, n))


def test_calibration_and_evaluation_windows_share_no_problem(tok):
  ev_text = tok.decode(champ_windows(tok, "evaluation").ravel())
  cal_text = tok.decode(champ_windows(tok, "calibration").ravel())
  problems = champ_problems()
  headers = {pid: text.split("\nSolution:")[0] + "\nSolution:" for pid, (_, text) in
             problems.items()}
  ev_ids = {d.id for d in champ_documents("evaluation")}
  in_ev = {pid for pid, h in headers.items() if h in ev_text}
  in_cal = {pid for pid, h in headers.items() if h in cal_text}
  assert len(in_ev) > 30 and len(in_cal) > 15  # the check finds the problems that are there
  assert in_ev <= ev_ids and not in_cal & ev_ids


def test_too_small_corpus_is_a_clear_error(tok, tmp_path):
  with pytest.raises(DataError, match=r"2 documents hold \d+ tokens, fewer than the budget of "
                     r"4 windows x 16 tokens = 64"):
    token_windows(["a short text", "another"], tok, num_windows=4, seq_len=16)
  with pytest.raises(DataError, match=r"champ evaluation split: 135 documents hold \d+ tokens"):
    champ_windows(tok, "evaluation", num_windows=400, seq_len=256)
  with pytest.raises(DataError, match="unknown split"):
    champ_documents("train")
  bad = tmp_path / "v0.json"
  bad.write_text(json.dumps({"problems": {"P_1": {"_text": "x", "category": "A",
                                                   "_answer": "1"}}}))
  with pytest.raises(DataError, match=r"problem 'P_1': missing field 'solution'"):
    champ_documents("evaluation", path=str(bad))
  # a problem id given twice: json.load kept the last, one problem silently lost
  twice = tmp_path / "twice.json"
  problem = json.dumps({"_text": "x", "category": "A", "_answer": "1",
                        "solution": {"steps": [{"_text": "s"}]}})
  twice.write_text(f'{{"problems": {{"P_1": {problem}, "P_1": {problem}}}}}')
  with pytest.raises(DataError, match=rf"{twice}: duplicate key 'P_1'"):
    champ_documents("evaluation", path=str(twice))
