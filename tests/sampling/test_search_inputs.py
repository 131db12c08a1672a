"""Bad input to the searches and to ``python -m postrl.search``: each is one clear error, raised
before any sampling (most before the model loads), or a documented result; never an exception
from inside JAX or a search loop, and never a partial output file."""

import jax
import pytest
from flax import nnx

from postrl import search as search_cli
from postrl.data.records import DataError, Problem
from postrl.models import Transformer
from postrl.sampling import (Policy, RewardModelOutcome, RolloutValue, SearchError, beam_search_ids,
                             best_of_n, calibrate, compute_optimal, mcts, self_consistency,
                             step_beam_search, subsample)
from postrl.sampling.search import vote
from tests.conftest import tiny_config
from tests.sampling.test_search import FakePolicy, table_scorer

KEY = jax.random.key(0)


def value(problems, partials):
  del problems
  return [0.5] * len(partials)


# ------------------------------------------------------------------------------ prompt files


def test_prompt_file_encoding_errors_name_the_line(tmp_path):
  latin1 = tmp_path / "p.jsonl"
  latin1.write_bytes(b'{"prompt": "a"}\n\n{"prompt": "caf\xe9"}\n')
  with pytest.raises(DataError, match=r"p.jsonl:3: not UTF-8 text \(byte 0xe9 at column 16\)"):
    search_cli.read_prompts(str(latin1), None)
  # a byte-order mark is not part of the first prompt; \r\n lines read as \n lines
  bom = tmp_path / "q.txt"
  bom.write_bytes(b"\xef\xbb\xbfWhat is 1 + 1?\r\n\r\nName a prime.\r\n")
  records = search_cli.read_prompts(str(bom), None)
  assert [r.prompt for r in records] == ["What is 1 + 1?", "Name a prime."]
  assert [r.where for r in records] == [f"{bom}:1", f"{bom}:3"]
  with pytest.raises(DataError, match="is a directory, not a prompt file"):
    search_cli.read_prompts(str(tmp_path), None)


# ----------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("extra,expected", [
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0, got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--strategy", "step_beam_search", "--n", "4", "--width", "0", "--task", "arithmetic"],
     "--width must be >= 1, got 0"),
    (["--strategy", "beam_search", "--length-penalty", "nan"],
     "--length-penalty must be a finite number, got nan"),
    (["--strategy", "mcts", "--task", "arithmetic", "--reward-model", "RM"],
     "--reward-model is not used by mcts (it scores best_of_n, weighted_best_of_n, "
     "self_consistency)"),
    (["--strategy", "best_of_n", "--task", "arithmetic", "--prm", "RM"],
     "--prm is not used by best_of_n (it scores step_beam_search, mcts)"),
    (["--out", "{tmp}/a_file/out.jsonl"],
     "/out.jsonl: cannot create its folder {tmp}/a_file ({tmp}/a_file is a file)"),
])
def test_search_command_checks_settings_before_loading_the_model(extra, expected, tmp_path,
                                                                 capsys):
  # the model does not exist: each error must come first (not minutes into loading or sampling)
  (tmp_path / "a_file").write_text("")
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"prompt": "What is 2 + 3?", "answer": "5"}\n')
  argv = ["--model", str(tmp_path / "no_model"), "--prompts", str(prompts), "--strategy",
          "self_consistency", "--n", "2", "--batch-size", "4"]
  argv += [x.replace("{tmp}", str(tmp_path)) for x in extra]
  assert search_cli.main(argv) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert expected.replace("{tmp}", str(tmp_path)) in err[0], err


class FakeRewardScorer:
  """A ``RewardModelScorer`` stand-in with room for 12 characters of prompt."""
  tokenizer = None

  def tokens(self, completion, prompt):
    if len(prompt) > 12:
      raise ValueError(f"the prompt has {len(prompt)} tokens, no room for a reply in max_len=12")
    return [0] * (len(prompt) + len(completion))

  def score(self, completions, prompts):
    self.tokens(completions[0], prompts[0])
    return [0.5] * len(completions)


def test_a_prompt_too_long_for_the_reward_model_stops_before_sampling(tmp_path):
  policy = FakePolicy(["so 1"])
  scorer = RewardModelOutcome(FakeRewardScorer(), sigmoid=True)
  with pytest.raises(SearchError, match="prompt #2 of 2: the prompt has 28 tokens, no room"):
    best_of_n(policy, ["short", "a prompt of twenty-eight ch."], n=2, scorer=scorer, key=KEY)
  with pytest.raises(SearchError, match="prompt #1 of 1"):
    self_consistency(policy, ["a prompt of twenty-eight ch."], n=2, scorer=scorer, key=KEY)
  assert not policy.calls  # nothing was sampled
  (r,) = best_of_n(policy, ["short"], n=2, scorer=scorer, key=KEY)
  assert r.status == "ok" and r.answer == "1"


def test_search_command_names_the_line_a_reward_model_cannot_read(tiny_model_dir, tmp_path,
                                                                  monkeypatch, capsys):
  from postrl.sampling import search  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(search, "RewardModelOutcome",
                      lambda path, **kw: RewardModelOutcome(FakeRewardScorer(), sigmoid=True))
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"prompt": "2 + 3?"}\n\n{"prompt": "What is 10 - 4 - 1 - 1?"}\n')
  out = tmp_path / "out" / "r.jsonl"
  argv = ["--model", tiny_model_dir, "--prompts", str(prompts), "--strategy", "best_of_n", "--n",
          "2", "--batch-size", "4", "--max-new-tokens", "2", "--reward-model", "RM", "--out",
          str(out)]
  assert search_cli.main(argv) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {prompts}:3: field 'prompt': the prompt has "
                                             "23 tokens, no room"), err
  assert err[0].endswith("(reward model)")
  assert not out.exists()


def test_write_failure_is_a_clear_error_and_leaves_no_file(tmp_path):
  (tmp_path / "a_file").write_text("")
  path = tmp_path / "a_file" / "r.jsonl"
  with pytest.raises(SearchError, match="cannot write the results"):
    search_cli._write(str(path), [{"x": 1}])  # pylint: disable=protected-access
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# ------------------------------------------------------------------------------ the library


def test_bad_sampling_settings_are_refused_when_the_policy_is_built():
  # checked before the model is touched (a None model would fail later)
  for kw, match in [(dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
                    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
                    (dict(temperature=float("nan")), "temperature must be a finite number"),
                    (dict(min_p=1.0), r"min_p must be in \[0, 1\)"),
                    (dict(top_k=2.5), "top_k must be an integer"),
                    (dict(top_k=0), "top_k must be an integer >= 1")]:
    with pytest.raises(SearchError, match=match):
      Policy(None, None, **kw)
  with pytest.raises(SearchError, match="temperature must be a finite number"):
    RolloutValue(FakePolicy(), lambda text, problem: 1.0, key=KEY, temperature=-1.0)


@pytest.mark.parametrize("key", [None, 0, jax.random.split(KEY, 2)])
def test_a_key_that_is_not_one_prng_key_is_a_clear_error(key):
  policy = FakePolicy(["so 1"], tree=lambda prefix: [("so 1", True)])
  match = "search: key must be one jax.random key"
  with pytest.raises(SearchError, match=match):
    self_consistency(policy, ["q"], n=2, key=key)
  with pytest.raises(SearchError, match=match):
    best_of_n(policy, ["q"], n=2, key=key, scorer=table_scorer({"so 1": 1.0}))
  with pytest.raises(SearchError, match=match):
    step_beam_search(policy, ["q"], value_fn=value, key=key, width=1, expansions=1)
  with pytest.raises(SearchError, match=match):
    mcts(policy, ["q"], value_fn=value, key=key, simulations=1, branching=1)
  with pytest.raises(SearchError, match=match):
    RolloutValue(policy, lambda text, problem: 1.0, key=key)
  assert not policy.calls


def test_vote_and_subsample_refuse_malformed_input():
  with pytest.raises(SearchError, match="vote got 1 weights for 3 items"):
    vote([0, 1, 1], [1.0])
  with pytest.raises(SearchError, match="finite scores, got nan for candidate 0"):
    vote([0, 1], [float("nan"), 1.0])
  (r,) = self_consistency(FakePolicy(["so 1", "so 2", "so 2"]), ["q"], n=3, key=KEY)
  for n in (0, -1):  # -1 used to drop the last candidate silently
    with pytest.raises(SearchError, match="n must be an integer >= 1"):
      subsample(r, n)


def test_beam_search_refuses_a_non_finite_length_penalty():
  # a NaN alpha made every score NaN: every prompt came back "no_candidates"
  model = Transformer(tiny_config(), rngs=nnx.Rngs(0))
  for alpha in (float("nan"), float("inf")):
    with pytest.raises(SearchError, match="length_penalty must be a finite number"):
      beam_search_ids(model, [[1, 2, 3]], [3], width=2, max_new_tokens=2, length_penalty=alpha)


def test_compute_optimal_refuses_wrong_result_counts_and_negative_bins():
  problems = [Problem("a", "1"), Problem("b", "2")]
  policy = FakePolicy(["so 1"])
  # a run that returns one result for two problems used to be scored on the first problem only
  with pytest.raises(SearchError, match="'sc' at n=2 returned 1 results for 2 calibration"):
    calibrate({"sc": lambda ps, n: self_consistency(policy, ps[:1], n=n, key=KEY)}, problems,
              [1, 2])
  with pytest.raises(SearchError, match="bins must be an integer >= 0"):
    compute_optimal({"sc": lambda ps, n: self_consistency(policy, ps, n=n, key=KEY)}, problems,
                    ns=[1], budget=100, bins=-1)
