"""Searches on the tiny model with the real tokenizer: the policy's sampling and step cuts, token
counts, the outcome and process reward models as scorers, the tokenizer check, and the
``python -m postrl.search`` command with its bad-input errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from postrl import search as search_cli
from postrl.data.preference import StepRecord, tokenize_steps
from postrl.data.records import Problem
from postrl.models import ScoredTransformer, Tokenizer, load_pretrained, load_tokenizer
from postrl.rewards import RewardModelScorer
from postrl.rewards.reward_model import save_reward_model
from postrl.sampling import (PartialSolution, Policy, ProcessRewardScorer, RewardModelOutcome,
                             SearchError, best_of_n, check_tokenizers, self_consistency)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY = jax.random.key(0)
PROBLEMS = [Problem("What is 2 + 3?", "5"), Problem("What is 10 - 4?", "6")]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
  return Policy(load_pretrained(tiny_model_dir), load_tokenizer(tiny_model_dir), max_new_tokens=6,
                batch_size=4, max_step_tokens=5, temperature=1.0)


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("rm"))
  save_reward_model(ScoredTransformer(load_pretrained(tiny_model_dir), rngs=nnx.Rngs(3)), path,
                    load_tokenizer(tiny_model_dir), max_len=64)
  return path


def _word_tokenizer():
  """A 4-word WordLevel tokenizer: not the policy's."""
  # pylint: disable-next=import-outside-toplevel
  from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
  hf = HFTokenizer(models.WordLevel({"<pad>": 0, "<|im_end|>": 1, "what": 2, "is": 3},
                                    unk_token="<pad>"))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  return Tokenizer(backend=hf, eos_id=1, pad_id=0)


@pytest.fixture(scope="module")
def foreign_rm_dir(tiny_model_dir, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("foreign_rm"))
  save_reward_model(ScoredTransformer(load_pretrained(tiny_model_dir), rngs=nnx.Rngs(4)), path,
                    _word_tokenizer(), max_len=64)
  return path


def test_policy_samples_n_larger_than_its_batch_and_counts_tokens(policy):
  tok = policy.tokenizer
  results = self_consistency(policy, PROBLEMS, n=5, key=KEY)  # 10 rows in batches of 4
  for problem, r in zip(PROBLEMS, results):
    assert len(r.candidates) == 5 and r.info["n"] == 5
    prompt_len = len(tok.encode_chat([{"role": "user", "content": problem.prompt}]))
    assert r.tokens.prompt == 5 * prompt_len and r.tokens.scorer == 0
    assert r.tokens.generated == sum(c.tokens.generated for c in r.candidates)
    for c in r.candidates:
      assert 1 <= c.tokens.generated <= 6 and (c.finished or c.tokens.generated == 6)
  again = self_consistency(policy, PROBLEMS, n=5, key=KEY)
  other = self_consistency(policy, PROBLEMS, n=5, key=jax.random.key(1))
  texts = lambda rs: [c.text for r in rs for c in r.candidates]
  assert texts(again) == texts(results) and texts(other) != texts(results)


def test_policy_sampling_impl_auto_is_xla_on_cpu_and_a_bad_one_is_refused(policy):
  auto = Policy((policy.graphdef, policy.params), policy.tokenizer, max_new_tokens=6,
                batch_size=4, max_step_tokens=5, temperature=1.0, top_p=0.9, sampling_impl="auto")
  xla = Policy((policy.graphdef, policy.params), policy.tokenizer, max_new_tokens=6,
               batch_size=4, max_step_tokens=5, temperature=1.0, top_p=0.9)
  texts = lambda p: [c.text for r in self_consistency(p, PROBLEMS, n=2, key=KEY)
                     for c in r.candidates]
  assert texts(auto) == texts(xla)
  with pytest.raises(SearchError, match="sampling_impl"):
    Policy((policy.graphdef, policy.params), policy.tokenizer, sampling_impl="triton")


def test_next_steps_stop_at_the_delimiter(policy):
  rows = policy.next_steps(PROBLEMS, ["", "First line\n"], 4, key=KEY)
  for row in rows:
    assert len(row) == 4
    for step in row:
      assert "\n" not in step.text and 1 <= step.num_tokens <= policy.max_step_tokens
  prefix_len = len(policy.row_ids(PROBLEMS[1], "First line\n"))
  assert all(s.prompt_tokens == prefix_len for s in rows[1])


def test_reward_model_outcome_scores_and_counts_its_tokens(policy, rm_dir):
  rm = RewardModelScorer(rm_dir)
  texts = ["5", "The answer is 6.", "seven"]
  problems = [PROBLEMS[0], PROBLEMS[1], PROBLEMS[1]]
  s = RewardModelOutcome(rm)(problems, texts)
  np.testing.assert_allclose(s.values, rm.score(texts, [p.prompt for p in problems]), rtol=1e-6)
  assert [t.scorer for t in s.item_tokens] == [len(rm.tokens(t, p.prompt))
                                              for t, p in zip(texts, problems)]
  probs = RewardModelOutcome(rm, sigmoid=True)(problems, texts).values
  np.testing.assert_allclose(probs, 1 / (1 + np.exp(-np.asarray(s.values))), rtol=1e-6)
  (r,) = best_of_n(policy, PROBLEMS[:1], n=3, scorer=RewardModelOutcome(rm), key=KEY)
  assert r.info["chosen"] == int(np.argmax([c.score for c in r.candidates]))
  assert r.tokens.scorer == sum(c.tokens.scorer for c in r.candidates) > 0


def test_process_reward_scorer_reads_steps_as_training_lays_them_out(rm_dir):
  prm = ProcessRewardScorer(rm_dir, aggregate="min", batch_size=2)
  steps = ("2 + 3", "= 5")
  # pylint: disable=protected-access
  model, tok, params = prm._scores, prm.tokenizer, prm._params
  data = tokenize_steps([StepRecord(PROBLEMS[0].prompt, steps, (1.0, 1.0))], tok, seq_len=64,
                        max_steps=4)
  row = data.row(0)
  z = np.asarray(model(params, row["tokens"][None], row["segment_ids"][None]))[0]
  expected = 1 / (1 + np.exp(-z[row["step_pos"][:2]]))
  probs, n_tokens = prm.step_probabilities([PROBLEMS[0]], [PartialSolution(steps, True)])
  np.testing.assert_allclose(probs[0], expected, rtol=1e-5)
  assert n_tokens == [int(row["segment_ids"].sum()) - 1]  # training appends an EOS token
  s = prm([PROBLEMS[0]] * 2, [PartialSolution(steps, True), PartialSolution(steps[:1])])
  np.testing.assert_allclose(s.values[0], min(expected), rtol=1e-5)
  np.testing.assert_allclose(s.values[1], expected[0], rtol=1e-5)  # "2 + 3\n": same first step


def test_a_reward_model_with_another_tokenizer_is_refused(policy, foreign_rm_dir):
  with pytest.raises(SearchError, match="differs from the policy's: vocabulary of 4 tokens"):
    check_tokenizers(policy.tokenizer, _word_tokenizer())
  check_tokenizers(policy.tokenizer, policy.tokenizer)
  scorer = RewardModelOutcome(foreign_rm_dir)
  with pytest.raises(SearchError, match="allow_tokenizer_mismatch=True"):
    best_of_n(policy, PROBLEMS, n=2, scorer=scorer, key=KEY)
  with pytest.raises(SearchError, match="differs"):
    self_consistency(policy, PROBLEMS, n=2, key=KEY, scorer=RewardModelOutcome(foreign_rm_dir,
                                                                               sigmoid=True))
  allowed = RewardModelOutcome(foreign_rm_dir, allow_tokenizer_mismatch=True)
  (r, _) = best_of_n(policy, PROBLEMS, n=2, scorer=allowed, key=KEY)
  assert len(r.candidates) == 2 and r.tokens.scorer > 0


# ------------------------------------------------------------------------------------- CLI


def _prompts(tmp_path, lines, name="p.jsonl"):
  path = tmp_path / name
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


GOOD = ['{"prompt": "What is 2 + 3?", "answer": "5", "id": 1}',
        '{"prompt": "What is 10 - 4?", "answer": 6}']


def test_search_command_writes_one_json_line_per_prompt(tiny_model_dir, tmp_path):
  out = tmp_path / "out" / "results.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "postrl.search", "--model", tiny_model_dir, "--strategy",
       "self_consistency", "--n", "3", "--prompts", _prompts(tmp_path, GOOD), "--task",
       "arithmetic", "--max-new-tokens", "4", "--batch-size", "4", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [line["id"] for line in lines] == [1, None]
  assert [line["reference"] for line in lines] == ["5", "6"]
  for line in lines:
    assert line["strategy"] == "self_consistency" and len(line["candidates"]) == 3
    assert line["status"] in ("ok", "no_answer") and isinstance(line["correct"], bool)
    assert line["tokens"]["total"] == line["tokens"]["prompt"] + line["tokens"]["generated"]
  assert "self_consistency n=3: 2 prompts, accuracy" in proc.stderr


def test_search_command_step_strategies_with_a_prm_and_verifier_rollouts(tiny_model_dir, rm_dir,
                                                                         tmp_path, capsys):
  prompts = _prompts(tmp_path, GOOD[:1])
  common = ["--model", tiny_model_dir, "--prompts", prompts, "--max-new-tokens", "4",
            "--batch-size", "4", "--max-step-tokens", "3", "--max-steps", "2"]
  assert search_cli.main(common + ["--strategy", "step_beam_search", "--n", "4", "--width", "2",
                                   "--prm", rm_dir]) == 0
  (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert line["strategy"] == "step_beam_search" and len(line["info"]["rounds"][0]) == 2
  assert line["tokens"]["scorer"] > 0
  assert search_cli.main(common + ["--strategy", "mcts", "--n", "2", "--branching", "2",
                                   "--rollouts", "2", "--task", "arithmetic"]) == 0
  (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert line["strategy"] == "mcts" and line["info"]["expansions"] == 2
  assert line["tokens"]["scorer"] == 0 and line["tokens"]["generated"] > 0
  assert search_cli.main(common + ["--strategy", "mcts", "--n", "6", "--branching", "1",
                                   "--widening", "1,0.5", "--task", "arithmetic"]) == 0
  (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert line["info"]["widenings"] >= 1  # the root holds ceil(sqrt(N)) > 1 steps after 2 visits


@pytest.mark.parametrize("case", ["empty", "missing", "no_model", "no_answer_field", "bad_json",
                                  "wide_beam", "no_scorer", "no_value", "n_zero", "widening"])
def test_search_command_bad_input_is_one_error_line(case, tiny_model_dir, tmp_path, capsys):
  prompts = _prompts(tmp_path, GOOD)
  args = {"strategy": "self_consistency", "n": "2", "model": tiny_model_dir, "prompts": prompts}
  expected = {
      "empty": "no prompts (the file has no non-blank line)",
      "missing": "no such file",
      "no_model": "/no/such/model: no such file or directory",
      "no_answer_field": "p.jsonl:2: field 'answer' is required with --task arithmetic",
      "bad_json": "q.jsonl:1: invalid JSON",
      "wide_beam": "--n 8 (the beam width) is larger than --batch-size 4",
      "no_scorer": "best_of_n needs a scorer: --reward-model DIR, or --task",
      "no_value": "mcts needs a value function: --prm DIR, or --task",
      "n_zero": "--n must be >= 1, got 0",
      "widening": "--widening '1': expected two numbers C,ALPHA",
  }[case]
  extra = []
  if case == "empty":
    args["prompts"] = _prompts(tmp_path, ["", "  "], "p.jsonl")
  elif case == "missing":
    args["prompts"] = str(tmp_path / "nope.jsonl")
  elif case == "no_model":
    args["model"] = "/no/such/model"
  elif case == "no_answer_field":
    args["prompts"] = _prompts(tmp_path, [GOOD[0], '{"prompt": "hi"}'])
    extra = ["--task", "arithmetic"]
  elif case == "bad_json":
    args["prompts"] = _prompts(tmp_path, ["{nope"], "q.jsonl")
  elif case == "wide_beam":
    args.update(strategy="beam_search", n="8")
  elif case == "no_scorer":
    args["strategy"] = "best_of_n"
  elif case == "no_value":
    args["strategy"] = "mcts"
  elif case == "n_zero":
    args["n"] = "0"
  elif case == "widening":
    args["strategy"] = "mcts"
    extra = ["--task", "arithmetic", "--widening", "1"]
  argv = [x for k, v in args.items() for x in (f"--{k}", v)] + extra + ["--batch-size", "4"]
  assert search_cli.main(argv) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_search_command_refuses_a_reward_model_with_another_tokenizer(tiny_model_dir,
                                                                      foreign_rm_dir, tmp_path,
                                                                      capsys):
  argv = ["--model", tiny_model_dir, "--strategy", "best_of_n", "--n", "2", "--prompts",
          _prompts(tmp_path, GOOD), "--reward-model", foreign_rm_dir]
  assert search_cli.main(argv) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: the reward model's tokenizer")
  assert "--allow-tokenizer-mismatch" in err


def test_prompt_files_and_the_countdown_task(tmp_path):
  from postrl.data.records import DataError  # pylint: disable=import-outside-toplevel
  text = _prompts(tmp_path, ["What is 1 + 1?", "", "Name a prime."], "p.txt")
  assert [r.prompt for r in search_cli.read_prompts(text, None)] == ["What is 1 + 1?",
                                                                     "Name a prime."]
  path = _prompts(tmp_path, ['{"prompt": "Reach 16", "numbers": [3, 5, 2], "target": 16}'])
  (record,) = search_cli.read_prompts(path, "countdown")
  assert (record.numbers, record.target, record.answer) == ((3, 5, 2), 16, "16")
  extract, equal, correct, verifier = search_cli.task_functions("countdown")
  answer = extract("Let me try.\n(3 + 5)  * 2 = 16")
  assert answer == "(3 + 5) * 2 = 16" and equal(answer, "(3 + 5) * 2 = 16")
  assert correct(answer, record) and not correct("3 * 5 + 2", record) and not correct(None, record)
  assert correct(extract("<answer>(3 + 5) * 2</answer>"), record)  # no claim: expression decides
  # a wrong claimed result fails, as in the verifier (it used to be ignored)
  assert extract("(3 + 5) * 2 = 17") == "(3 + 5) * 2 = 17"
  assert not correct("(3 + 5) * 2 = 17", record)
  assert not correct(extract("16 = (3 + 5) * 2"), record)
  assert verifier("(3 + 5) * 2 = 16", record) == 1.0
  with pytest.raises(DataError, match="p.jsonl:1: fields 'numbers' and 'target' are required"):
    search_cli.read_prompts(_prompts(tmp_path, ['{"prompt": "x"}']), "countdown")
  with pytest.raises(DataError, match=r"unknown field\(s\) \['answr'\]"):
    search_cli.read_prompts(_prompts(tmp_path, ['{"prompt": "x", "answr": 1}']), None)
