"""Test-time scaling with SmolLM2-135M-Instruct: accuracy vs tokens spent for greedy decoding,
self-consistency, best-of-N (verifier = oracle, trained reward model, reward-weighted vote), beam
search, and verifier-guided step beam search and MCTS, on 1-digit arithmetic and Countdown.

    python experiments/test_time_scaling/run.py                      # ~60 min on a 2-core CPU
    python experiments/test_time_scaling/run.py --stages greedy,sample --tasks arithmetic
    python experiments/test_time_scaling/run.py --rm_data TRAIN.jsonl,EVAL.jsonl   # RM pairs
    python experiments/test_time_scaling/run.py --tiny --model DIR --out /tmp/tts   # seconds

The model is loaded only when a stage has to run, so a rerun over saved stages only rebuilds the
table, ``summary.json`` and the plot (seconds).

Problems (fixed seeds, duplicates removed): ``--num_problems`` "What is a ± b?" with 1-digit a, b
(the task ``configs/rm_arith.py`` trains its reward model on; every prompt that reward model saw
in training or validation is left out) and ``--num_problems`` Countdown puzzles (``COUNTDOWN``).
Each stage runs once per task and is saved in ``<out>/<task>/<stage>.json`` (a rerun with the
same settings reuses it; other settings are an error, delete the file to rerun):

  greedy        one temperature-0 completion per problem (``postrl.sampling.search.greedy``)
  sample        ``--n`` samples per problem at ``--temperature`` (``self_consistency``): every
                sampled strategy below re-selects from these same samples
  beam          token-level beam search, width W in ``--widths`` (``beam_search``, α = 1)
  reward_model  the outcome reward model's score of every sample (``RewardModelOutcome``): the
                model of ``--reward_model``, else one trained here by ``launch.py --config
                configs/rm_arith.py`` (Bradley-Terry on the policy's own answers, or on the
                ``--rm_data`` pairs; ``<out>/rm``); ``--rm_tasks`` (arithmetic: its task)
  step_beam     step beam search over newline-delimited steps, values from verifier roll-outs
                (``RolloutValue``), on the first ``--search_problems`` problems of
                ``--search_tasks`` (arithmetic): one stage ``step_beam_w{W}`` per width W in
                ``--step_widths`` (``--step_expansions`` expansions per beam)
  mcts          PUCT tree search over the same steps with the same values, same problems: one
                stage ``mcts_s{S}`` per simulation count S in ``--simulations``, and with
                progressive widening ``--widening C,ALPHA`` (a node may draw max(branching,
                ceil(C N^ALPHA)) steps) one stage ``mcts_pw{C}-{ALPHA}_s{S}`` per S in
                ``--widened_simulations``

Selections from the N samples (``select`` on disjoint blocks of n of the N samples, averaged over
the N / n blocks: an unbiased estimate of the accuracy at n from one run):

  self_consistency   majority vote over extracted answers (Wang et al. 2023)
  bon_verifier       best-of-n by the task's verifier: an ORACLE (it reads the reference answer);
                     its accuracy is pass@n (on Countdown the verifier also rejects a right
                     expression whose claimed result is wrong, so it can be a little lower), an
                     upper bound for any selection from these samples
  bon_rm             best-of-n by the reward model's score r(x, y)
  weighted_bon_rm    reward-weighted vote, weights σ(r(x, y)) (Li et al. 2023; Snell et al. 2024)

The compute-optimal chooser (Snell et al. 2024, ``choose_compute_optimal``) is cross-fitted on
the saved per-problem results, no model needed (``cross_fit_chooser``): for each budget in
``--budgets`` it picks the strategy and N / W / S on the even-numbered problems and is scored on
the odd ones, and the reverse; once with the strategies that never read the reference answer,
once with all of them.

Tokens per problem (x axis) are the library's exact counts (``TokenCount``): prompt tokens the
policy prefilled (a prompt sampled n times counts n times), tokens it generated (roll-outs
included), and tokens the reward model read. Accuracy has binomial standard errors
sqrt(p (1 - p) / problems) (for block-averaged points this overstates the noise a little), and
every strategy is compared with greedy on the same problems (paired difference and its standard
error). Writes ``<out>/summary.json``, prints a markdown table and plots
``<out>/test_time_scaling.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from experiments import common  # pylint: disable=wrong-import-position

STAGES = ("greedy", "sample", "beam", "reward_model", "step_beam", "mcts")
TASK_NAMES = ("arithmetic", "countdown")
ARITHMETIC = dict(name="arithmetic", digits=1, ops="+-")
# 3 numbers up to 10: the 135M model solves none of the 4-number, up-to-99 puzzles of the default
# task greedily; these leave a few solvable by sampling.
COUNTDOWN = dict(name="countdown", num_numbers=3, max_number=10, min_target=1, max_target=100)
# Tokens per completion: enough that an arithmetic answer is not cut (a cut ramble's last number
# is often one from the question); Countdown answers are one line.
MAX_NEW_TOKENS = {"arithmetic": 128, "countdown": 80}
LABELS = {"greedy": "greedy", "self_consistency": "self-consistency (majority)",
          "bon_verifier": "best-of-N, verifier (oracle)",
          "bon_rm": "best-of-N, reward model", "weighted_bon_rm": "weighted best-of-N, RM",
          "beam": "beam search", "step_beam": "step beam search (verifier roll-outs)",
          "mcts": "MCTS (verifier roll-outs)",
          "mcts_pw": "MCTS + progressive widening (verifier roll-outs)"}
# Short names of a (strategy, N) in the chooser's table, and the letter of its budget.
SHORT = {"greedy": ("greedy", ""), "self_consistency": ("vote", "N"),
         "bon_verifier": ("oracle BoN", "N"), "bon_rm": ("RM BoN", "N"),
         "weighted_bon_rm": ("weighted RM", "N"), "beam": ("beam", "W"),
         "step_beam": ("step beam", "W"), "mcts": ("MCTS", "S"),
         "mcts_pw": ("MCTS+PW", "S")}
# The compute-optimal chooser's menus: without every strategy that reads the reference answer
# (the verifier's best-of-N, and step search / MCTS, whose values are verifier roll-outs), and
# with them.
MENUS = {"non-oracle": ("greedy", "self_consistency", "bon_rm", "weighted_bon_rm", "beam"),
         "all": ("greedy", "self_consistency", "bon_rm", "weighted_bon_rm", "beam",
                 "bon_verifier", "step_beam", "mcts", "mcts_pw")}


# ------------------------------------------------------------------------------------ problems


def _rm_config():
  spec = importlib.util.spec_from_file_location("rm_arith",
                                                os.path.join(ROOT, "configs", "rm_arith.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def reward_model_prompts(rm_data: list[str]) -> set[str]:
  """Every prompt ``configs/rm_arith.py`` samples its training and validation pairs from, and
  every prompt of the ``--rm_data`` files."""
  from postrl.trainers import common  # pylint: disable=import-outside-toplevel
  data = _rm_config().data
  prompts = set()
  for n, seed in ((data.num_prompts, data.train_seed), (data.num_eval_prompts, data.eval_seed)):
    prompts |= {p.prompt for p in common.task_problems(data.task, n, seed)}
  for path in rm_data:
    with open(path) as f:
      prompts |= {json.loads(line)["prompt"] for line in f if line.strip()}
  return prompts


def task_problems(task: dict, n: int, seed: int, exclude=frozenset()) -> list:
  """The first ``n`` distinct problems of a built-in task drawn with ``seed``, leaving out the
  prompts in ``exclude``; SystemExit when the task has fewer."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from postrl.trainers import common  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict(task)
  draws = max(4 * n, 64)
  while True:
    seen, out = set(exclude), []
    for p in common.task_problems(cfg, draws, seed):
      if p.prompt not in seen:
        seen.add(p.prompt)
        out.append(p)
    if len(out) >= n:
      return out[:n]
    if draws > 64 * max(n, 16):
      raise SystemExit(f"task {task} has only {len(out)} distinct problems outside the reward "
                       f"model's prompts; lower --num_problems")
    draws *= 2


# ------------------------------------------------------------------------------ saved stages


def fingerprint(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def stage_path(out: str, task: str, stage: str) -> str:
  return os.path.join(out, task, f"{stage}.json")


def load_stage(path: str, settings: dict):
  """The saved stage's record, None when absent; SystemExit when made with other settings."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  if record["settings"] != settings:
    raise SystemExit(f"{path} was made with other settings; use another --out or delete it.\n"
                     f"saved: {record['settings']}\nnow:   {settings}")
  return record


def save_stage(path: str, settings: dict, seconds: float, rows: list) -> dict:
  record = dict(settings=settings, seconds=round(seconds, 1), rows=rows)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f)
  os.replace(tmp, path)
  return record


def result_rows(results, problems, correct) -> list[dict]:
  """``SearchResult.to_json()`` of each result with the problem's reference and correctness."""
  return [dict(r.to_json(), reference=p.answer, correct=bool(correct(r.answer, p)))
          for r, p in zip(results, problems)]


def candidates_of(row: dict):
  """The ``Candidate`` objects of a saved result row (clusters are recomputed when voting)."""
  # pylint: disable-next=import-outside-toplevel
  from postrl.sampling.search import Candidate, TokenCount
  return [Candidate(text=c["text"], answer=c["answer"], score=c["score"], finished=c["finished"],
                    tokens=TokenCount(c["tokens"]["prompt"], c["tokens"]["generated"],
                                      c["tokens"]["scorer"]), info=c.get("info") or {})
          for c in row["candidates"]]


# ------------------------------------------------------------------------------------ stages


class Stages:
  """Runs (or reuses) the stages of one task with one policy."""

  def __init__(self, args, task: str, problems, make_policy, max_new_tokens: int, funcs):
    self.args, self.task, self.problems, self._make_policy = args, task, problems, make_policy
    self.extract, self.equal, self.correct, self.verifier = funcs
    self.base = dict(model=args.model, task=task, problems=fingerprint(
        [p.prompt for p in problems]), num_problems=len(problems),
                     max_new_tokens=max_new_tokens, seed=args.seed)
    self.seconds: dict[str, float] = {}

  @property
  def policy(self):
    """The policy of the sampled strategies and beam search (the model loads on first use)."""
    return self._make_policy(self.args.batch_size)

  @property
  def search_policy(self):
    """The same policy with ``--search_batch_size`` rows per call (step search, MCTS)."""
    return self._make_policy(self.args.search_batch_size)

  def _run(self, stage: str, settings: dict, compute) -> dict:
    import jax  # pylint: disable=import-outside-toplevel
    path = stage_path(self.args.out, self.task, stage)
    settings = dict(self.base, **settings)
    record = load_stage(path, settings)
    if record is None:
      print(f"[{self.task}] {stage} ...", flush=True)
      t0 = time.perf_counter()
      key = jax.random.fold_in(jax.random.key(self.args.seed), zlib.crc32(stage.encode()) >> 1)
      rows = compute(key)
      record = save_stage(path, settings, time.perf_counter() - t0, rows)
      print(f"[{self.task}] {stage}: {record['seconds']:.0f} s", flush=True)
    else:
      print(f"[{self.task}] {stage}: reusing {path}", flush=True)
    self.seconds[stage] = record["seconds"]
    return record

  def greedy(self) -> dict:
    from postrl.sampling.search import greedy  # pylint: disable=import-outside-toplevel
    return self._run("greedy", {}, lambda key: result_rows(
        greedy(self.policy, self.problems, extract=self.extract), self.problems, self.correct))

  def sample(self) -> dict:
    # pylint: disable-next=import-outside-toplevel
    from postrl.sampling.search import self_consistency
    settings = dict(n=self.args.n, temperature=self.args.temperature)
    return self._run("sample", settings, lambda key: result_rows(
        self_consistency(self.policy, self.problems, n=self.args.n, key=key, extract=self.extract,
                         equal=self.equal), self.problems, self.correct))

  def beam(self, width: int) -> dict:
    from postrl.sampling.search import beam_search  # pylint: disable=import-outside-toplevel
    return self._run(f"beam_w{width}", dict(width=width, length_penalty=1.0), lambda key: (
        result_rows(beam_search(self.policy, self.problems, width=width, extract=self.extract),
                    self.problems, self.correct)))

  def reward_model(self, rm_dir: str, samples: dict) -> dict:
    """RM score and scorer tokens of every sample (rows: ``{"scores": [...], "tokens": [...]}``);
    the reward model is trained first when ``rm_dir`` is ours and not there yet."""
    # pylint: disable-next=import-outside-toplevel
    from postrl.sampling.search import RewardModelOutcome
    settings = dict(n=self.args.n, temperature=self.args.temperature,
                    reward_model=os.path.abspath(rm_dir), max_len=self.args.rm_max_len)

    def compute(key):
      del key
      if not self.args.reward_model:
        train_reward_model(self.args)
      scorer = RewardModelOutcome(rm_dir, batch_size=self.args.batch_size,
                                  max_len=self.args.rm_max_len)
      flat = [(p, c["text"]) for p, row in zip(self.problems, samples["rows"])
              for c in row["candidates"]]
      scores = scorer([p for p, _ in flat], [t for _, t in flat])
      rows, i = [], 0
      for row in samples["rows"]:
        k = len(row["candidates"])
        rows.append(dict(scores=scores.values[i:i + k],
                         tokens=[t.scorer for t in scores.item_tokens[i:i + k]]))
        i += k
      return rows
    return self._run("reward_model", settings, compute)

  def _rollout_value(self, key):
    # pylint: disable-next=import-outside-toplevel
    from postrl.sampling.search import RolloutValue
    return RolloutValue(self.search_policy, self.verifier, rollouts=self.args.rollouts, key=key)

  def step_beam(self, width: int) -> dict:
    """Step beam search with ``width`` beams (``--step_expansions`` each), saved as
    ``step_beam_w{width}``."""
    # pylint: disable-next=import-outside-toplevel
    from postrl.sampling.search import step_beam_search
    import jax  # pylint: disable=import-outside-toplevel
    a = self.args
    problems = self.problems[:a.search_problems]
    settings = dict(temperature=a.temperature, subset=len(problems), width=width,
                    expansions=a.step_expansions, max_steps=a.max_steps, rollouts=a.rollouts,
                    max_step_tokens=a.max_step_tokens, batch_size=a.search_batch_size,
                    complete_unfinished=True)
    return self._run(f"step_beam_w{width}", settings, lambda key: result_rows(step_beam_search(
        self.search_policy, problems, value_fn=self._rollout_value(jax.random.fold_in(key, 1)),
        key=key, width=width, expansions=a.step_expansions, max_steps=a.max_steps,
        complete_unfinished=True, extract=self.extract, equal=self.equal), problems,
        self.correct))

  def mcts(self, simulations: int, widening: tuple[float, float] | None = None) -> dict:
    """MCTS with ``simulations`` iterations per problem, saved as ``mcts_stage(simulations,
    widening)``; ``widening``: progressive widening (c, alpha), or None."""
    from postrl.sampling.search import mcts  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    a = self.args
    problems = self.problems[:a.search_problems]
    settings = dict(temperature=a.temperature, subset=len(problems),
                    simulations=simulations, branching=a.branching, max_depth=a.max_steps,
                    rollouts=a.rollouts, max_step_tokens=a.max_step_tokens,
                    batch_size=a.search_batch_size, final_completion="batched")
    if widening is not None:  # absent without widening: the stages saved before it still match
      settings["widening"] = list(widening)
    return self._run(mcts_stage(simulations, widening), settings, lambda key: result_rows(mcts(
        self.search_policy, problems, value_fn=self._rollout_value(jax.random.fold_in(key, 1)),
        key=key, simulations=simulations, branching=a.branching, max_depth=a.max_steps,
        widening=widening, extract=self.extract), problems, self.correct))


def mcts_stage(simulations: int, widening: tuple[float, float] | None = None) -> str:
  """The stage name of MCTS with ``simulations`` (and progressive widening (c, alpha)):
  "mcts_s8", "mcts_pw1-0.5_s8"."""
  if widening is None:
    return f"mcts_s{simulations}"
  return f"mcts_pw{widening[0]:g}-{widening[1]:g}_s{simulations}"


def train_reward_model(args) -> str:
  """``<out>/rm/model``: a Bradley-Terry reward model trained by ``launch.py --config
  configs/rm_arith.py`` (reused when it exists). ``--tiny``: an untrained head on the model."""
  workdir = os.path.join(args.out, "rm")
  model_dir = os.path.join(workdir, "model")
  if os.path.exists(os.path.join(model_dir, "config.json")):
    print(f"reward model: reusing {model_dir}", flush=True)
    return model_dir
  if args.tiny:
    # pylint: disable=import-outside-toplevel
    from flax import nnx
    from postrl.models import ScoredTransformer, load_pretrained, load_tokenizer
    from postrl.rewards.reward_model import save_reward_model
    save_reward_model(ScoredTransformer(load_pretrained(args.model), rngs=nnx.Rngs(0)), model_dir,
                      load_tokenizer(args.model), max_len=args.rm_max_len)
    return model_dir
  data = []
  if args.rm_data:
    data = [f"--config.data.path={os.path.abspath(args.rm_data[0])}"]
    data += [f"--config.data.eval_path={os.path.abspath(x)}" for x in args.rm_data[1:2]]
  cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/rm_arith.py",
         "--workdir", workdir, f"--config.model={args.model}", f"--config.steps={args.rm_steps}",
         f"--config.checkpoint.every={args.rm_steps}", "--config.save_model=True", *data]
  common.launch("reward model", cmd, ROOT)
  return model_dir


# ------------------------------------------------------------------------------------ analysis


def se(p: float, n: int) -> float:
  """Binomial standard error sqrt(p (1 - p) / n)."""
  return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def paired(xs, ys) -> tuple[float, float]:
  """Mean of the per-problem differences x - y and its standard error (std / sqrt(n))."""
  d = [x - y for x, y in zip(xs, ys)]
  n = len(d)
  mean = sum(d) / n
  var = sum((v - mean) ** 2 for v in d) / max(n - 1, 1)
  return mean, math.sqrt(var / n)


def point(method: str, n, per_correct, per_tokens, per_generated, greedy_correct) -> dict:
  """One (strategy, budget) point: accuracy, its SE, mean tokens and the paired difference
  with greedy on the same problems."""
  k = len(per_correct)
  acc = sum(per_correct) / k
  diff, diff_se = paired(per_correct, greedy_correct[:k])
  return dict(method=method, n=n, problems=k, accuracy=acc, se=se(acc, k),
              tokens=sum(per_tokens) / k, generated=sum(per_generated) / k,
              vs_greedy=diff, vs_greedy_se=diff_se, per_problem=list(per_correct),
              per_problem_tokens=list(per_tokens), per_problem_generated=list(per_generated))


def subset_point(p: dict, k: int, greedy_correct) -> dict:
  """``p`` recomputed on its first ``k`` problems (the problems step search and MCTS ran on)."""
  return dict(point(p["method"], p["n"], p["per_problem"][:k], p["per_problem_tokens"][:k],
                    p["per_problem_generated"][:k], greedy_correct), subset=k)


def rescored(candidates, scores, scorer_tokens, *, sigmoid: bool = False):
  """The candidates with new scores (σ(score) with ``sigmoid``) and the scorer's tokens added."""
  # pylint: disable-next=import-outside-toplevel
  from postrl.sampling.search import TokenCount
  out = []
  for c, s, t in zip(candidates, scores, scorer_tokens):
    s = 1.0 / (1.0 + math.exp(-s)) if sigmoid else s
    out.append(dataclasses.replace(c, score=float(s), tokens=c.tokens + TokenCount(scorer=t)))
  return out


def block_select(problem, candidates, n: int, rule: str, strategy: str, funcs):
  """(accuracy, tokens, generated) of ``rule`` on each disjoint block of n candidates, averaged
  over the blocks."""
  # pylint: disable-next=import-outside-toplevel
  from postrl.sampling.search import cluster_answers, select
  _, equal, correct, _ = funcs
  blocks = len(candidates) // n
  acc = tok = gen = 0.0
  for j in range(blocks):
    block = candidates[j * n:(j + 1) * n]
    clusters = cluster_answers([c.answer for c in block], equal)
    block = [dataclasses.replace(c, cluster=k) for c, k in zip(block, clusters)]
    result = select(problem.prompt, strategy, block, rule)
    acc += bool(correct(result.answer, problem))
    tok += result.tokens.total
    gen += result.tokens.generated
  return acc / blocks, tok / blocks, gen / blocks


def sampled_points(problems, samples, rm, ns, funcs, greedy_correct) -> list[dict]:
  """The points of every selection from the N samples at every n (module doc)."""
  verifier = funcs[3]
  families = {"self_consistency": ("majority", lambda i, cands: cands)}
  families["bon_verifier"] = ("max_score", lambda i, cands: rescored(
      cands, [verifier(c.text, problems[i]) for c in cands], [0] * len(cands)))
  if rm is not None:
    families["bon_rm"] = ("max_score", lambda i, cands: rescored(
        cands, rm["rows"][i]["scores"], rm["rows"][i]["tokens"]))
    families["weighted_bon_rm"] = ("weighted_vote", lambda i, cands: rescored(
        cands, rm["rows"][i]["scores"], rm["rows"][i]["tokens"], sigmoid=True))
  points = []
  candidates = [candidates_of(row) for row in samples["rows"]]
  for name, (rule, score) in families.items():
    scored = [score(i, cands) for i, cands in enumerate(candidates)]
    for n in ns:
      stats = [block_select(p, cands, n, rule, name, funcs) for p, cands in zip(problems, scored)]
      points.append(point(name, n, *zip(*stats), greedy_correct))
  return points


def row_points(method: str, n, record: dict, greedy_correct) -> dict:
  rows = record["rows"]
  return point(method, n, [float(r["correct"]) for r in rows],
               [r["tokens"]["total"] for r in rows], [r["tokens"]["generated"] for r in rows],
               greedy_correct)


def truncation(rows: list[dict], problems, max_new_tokens: int, correct) -> dict:
  """How many completions hit ``max_new_tokens`` unfinished, how many of those are still judged
  correct, and how many of their extracted answers are a number that appears in the prompt (the
  failure mode of last-number extraction on cut text)."""
  import re  # pylint: disable=import-outside-toplevel
  total = cut = cut_correct = prompt_number = 0
  for row, p in zip(rows, problems):
    numbers = set(re.findall(r"\d+", p.prompt))
    for c in row["candidates"]:
      total += 1
      if c["finished"] or c["tokens"]["generated"] < max_new_tokens:
        continue
      cut += 1
      cut_correct += bool(correct(c["answer"], p))
      prompt_number += c["answer"] is not None and c["answer"].lstrip("-") in numbers
  return dict(completions=total, cut=cut, cut_fraction=cut / max(total, 1),
              cut_correct=cut_correct, cut_answer_is_a_prompt_number=prompt_number)


def analyse(problems, records: dict, ns, funcs, args, max_new_tokens: int) -> dict:
  """Every point of one task (step search and MCTS with greedy, self-consistency and the oracle
  at the largest N recomputed on the same subset), and per-task statistics."""
  correct = funcs[2]
  greedy = records["greedy"]
  greedy_correct = [float(r["correct"]) for r in greedy["rows"]]
  points = [row_points("greedy", 1, greedy, greedy_correct)]
  stats = dict(greedy_truncation=truncation(greedy["rows"], problems, max_new_tokens,
                                            correct))
  if "sample" in records:
    points += sampled_points(problems, records["sample"], records.get("reward_model"), ns, funcs,
                             greedy_correct)
    rows = records["sample"]["rows"]
    stats["sample_truncation"] = truncation(rows, problems, max_new_tokens, correct)
    flat = [c for r in rows for c in r["candidates"]]
    stats["sample_no_answer_fraction"] = sum(c["answer"] is None for c in flat) / len(flat)
  for width in args.widths:
    if f"beam_w{width}" in records:
      points.append(row_points("beam", width, records[f"beam_w{width}"], greedy_correct))
  subset = []
  for method, stage, budgets in (
      ("step_beam", lambda n: f"step_beam_w{n}", args.step_widths),
      ("mcts", mcts_stage, args.simulations),
      ("mcts_pw", lambda n: mcts_stage(n, args.widening), args.widened_simulations)):
    for n in budgets:
      if stage(n) in records:
        points.append(row_points(method, n, records[stage(n)], greedy_correct))
        subset.append(len(records[stage(n)]["rows"]))
        if method != "step_beam":
          stats.setdefault("trees", {})[stage(n)] = tree_stats(records[stage(n)]["rows"])
  for k in sorted(set(subset)):
    if k < len(problems):
      refs = [p for p in points if (p["method"], p["n"]) in (
          ("greedy", 1), ("self_consistency", max(ns)), ("bon_verifier", max(ns)))]
      points += [subset_point(p, k, greedy_correct) for p in refs]
  chooser = {menu: cross_fit_chooser(points, args.budgets, methods, len(problems))
             for menu, methods in MENUS.items()}
  return dict(points=points, chooser=chooser, stats=stats,
              seconds={k: v["seconds"] for k, v in records.items()})


def tree_stats(rows: list[dict]) -> dict:
  """Mean tree statistics of an MCTS stage's results: nodes expanded, widenings, root children
  and visits (absent from stages saved before widening existed), and how many chosen paths
  ended on an unfinished step that needed a greedy completion."""
  out = {"problems": len(rows)}
  for k in ("expansions", "widenings", "root_children", "root_visits"):
    if all(k in r["info"] for r in rows):
      out[k] = sum(r["info"][k] for r in rows) / len(rows)
  out["single_expansion_trees"] = sum(r["info"]["expansions"] == 1 for r in rows)
  out["completed_choices"] = sum(bool(r["info"].get("completed")) for r in rows)
  return out


def halves(k: int) -> tuple[list[int], list[int]]:
  """The fixed split of ``k`` problems for cross-fitting: even and odd positions in the drawn
  order (the draw is seeded and unrelated to difficulty)."""
  return list(range(0, k, 2)), list(range(1, k, 2))


def cross_fit_chooser(points: list[dict], budgets, menu, k: int) -> list[dict]:
  """The compute-optimal chooser, cross-fitted on the ``k`` problems.

  Snell et al. 2024 (§3.1) pick θ*(B) = argmax_θ acc_cal(θ) over the configurations θ (strategy,
  N) whose mean tokens per problem on the calibration problems are <= B. Here
  ``choose_compute_optimal`` (``postrl.sampling.search``) makes that pick on one half of the
  problems (``halves``) from the saved per-problem outcomes and tokens of every point whose
  method is in ``menu`` and that ran on all ``k`` problems; the pick is scored on the other half,
  then the halves swap, so every problem's outcome comes from a pick made without it. Per budget:
  the two picks, the chooser's accuracy and tokens over the ``k`` problems, and its paired
  difference with greedy and with the best fixed configuration within B chosen on all ``k``
  problems (in-sample, so that comparison favours the fixed one). Budgets where no configuration
  fits on a half are left out.
  """
  # pylint: disable-next=import-outside-toplevel
  from postrl.sampling.search import CalibrationPoint, choose_compute_optimal
  menu_points = [p for p in points if p["method"] in menu and p["problems"] == k
                 and not p.get("subset")]
  calibration = [CalibrationPoint(p["method"], p["n"], tuple(p["per_problem"]),
                                  tuple(p["per_problem_tokens"])) for p in menu_points]
  greedy = next(p for p in points if p["method"] == "greedy" and not p.get("subset"))
  out = []
  for budget in budgets:
    correct, tokens, picks = [0.0] * k, [0.0] * k, []
    for fit, held in (halves(k), halves(k)[::-1]):
      pick = choose_compute_optimal(calibration, budget, idx=fit)
      if pick is None:
        break
      for i in held:
        correct[i], tokens[i] = pick.correct[i], pick.tokens[i]
      picks.append(dict(method=pick.strategy, n=pick.n, calibration_accuracy=pick.accuracy(fit),
                        calibration_tokens=pick.mean_tokens(fit), scored_accuracy=pick.accuracy(
                            held), scored_tokens=pick.mean_tokens(held)))
    if len(picks) < 2:
      continue
    best = choose_compute_optimal(calibration, budget)
    acc = sum(correct) / k
    vs_best, vs_best_se = paired(correct, best.correct)
    vs_greedy, vs_greedy_se = paired(correct, greedy["per_problem"])
    out.append(dict(budget=budget, picks=picks, problems=k, accuracy=acc, se=se(acc, k),
                    tokens=sum(tokens) / k, vs_greedy=vs_greedy, vs_greedy_se=vs_greedy_se,
                    best_fixed=dict(method=best.strategy, n=best.n, accuracy=best.accuracy(),
                                    tokens=best.mean_tokens()),
                    vs_best_fixed=vs_best, vs_best_fixed_se=vs_best_se, per_problem=correct,
                    per_problem_tokens=tokens))
  return out


# -------------------------------------------------------------------------------------- report


def table(task: str, result: dict) -> str:
  lines = [f"**{task}**", "",
           "| strategy | N / W / S | problems | accuracy ± SE | vs greedy (paired) ± SE | "
           "tokens / problem | generated / problem |", "|---|---|---|---|---|---|---|"]
  for p in result["points"]:
    label = LABELS[p["method"]] + (f" (first {p['subset']})" if p.get("subset") else "")
    diff = ("" if p["method"] == "greedy" else
            f"{100 * p['vs_greedy']:+.1f} ± {100 * p['vs_greedy_se']:.1f}")
    lines.append(f"| {label} | {p['n'] if p['n'] is not None else ''} | {p['problems']} | "
                 f"{100 * p['accuracy']:.1f} ± {100 * p['se']:.1f} | {diff} | "
                 f"{p['tokens']:.0f} | {p['generated']:.0f} |")
  return "\n".join(lines)


def short(method: str, n) -> str:
  """A (strategy, N) in a few characters: "beam W=4", "vote N=16", "MCTS S=8", "greedy"."""
  name, letter = SHORT[method]
  return f"{name} {letter}={n}" if letter else name


def chooser_table(task: str, result: dict) -> str:
  """The cross-fitted chooser per menu and budget, next to the best fixed configuration."""
  k = result["points"][0]["problems"]
  lines = [f"**{task}: compute-optimal chooser, cross-fitted (picked on the even-numbered "
           f"problems, scored on the odd ones, and the reverse)**", "",
           "| menu | budget | picks (on even / on odd) | accuracy ± SE | tokens / problem | "
           f"best fixed within budget (all {k}) | its accuracy | chooser − best fixed ± SE | "
           "chooser − greedy ± SE |", "|---|---|---|---|---|---|---|---|---|"]
  for menu, rows in result["chooser"].items():
    for r in rows:
      picks = " / ".join(short(p["method"], p["n"]) for p in r["picks"])
      b = r["best_fixed"]
      lines.append(f"| {menu} | {r['budget']} | {picks} | {100 * r['accuracy']:.1f} ± "
                   f"{100 * r['se']:.1f} | {r['tokens']:.0f} | {short(b['method'], b['n'])} "
                   f"({b['tokens']:.0f} tokens) | {100 * b['accuracy']:.1f} | "
                   f"{100 * r['vs_best_fixed']:+.1f} ± {100 * r['vs_best_fixed_se']:.1f} | "
                   f"{100 * r['vs_greedy']:+.1f} ± {100 * r['vs_greedy_se']:.1f} |")
  return "\n".join(lines)


STYLE = {"self_consistency": ("tab:blue", "o", "-"), "bon_verifier": ("tab:gray", "s", "--"),
         "bon_rm": ("tab:orange", "^", "-"), "weighted_bon_rm": ("tab:red", "v", "-"),
         "beam": ("tab:green", "D", "-"), "greedy": ("black", "*", ""),
         "step_beam": ("tab:purple", "P", "-"), "mcts": ("tab:brown", "X", "-"),
         "mcts_pw": ("tab:pink", "h", "-")}


def plot(results: dict, path: str) -> None:
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(6 * len(results), 5.2), layout="constrained")
  axes = fig.subplots(1, len(results), squeeze=False)[0]
  for ax, (task, result) in zip(axes, results.items()):
    methods = []
    for p in result["points"]:
      if p["method"] not in methods:
        methods.append(p["method"])
    for method in methods:
      pts = [p for p in result["points"] if p["method"] == method and not p.get("subset")]
      if not pts:
        continue
      colour, marker, ls = STYLE[method]
      xs = [p["tokens"] for p in pts]
      ys = [100 * p["accuracy"] for p in pts]
      es = [100 * p["se"] for p in pts]
      label = LABELS[method] + (f" ({pts[0]['problems']} problems)"
                                if pts[0]["problems"] < result["points"][0]["problems"] else "")
      if method == "mcts_pw":
        label = label.replace("(verifier", "(c={:g}, α={:g}; verifier".format(*result["widening"]))
      ax.errorbar(xs, ys, yerr=es, color=colour, marker=marker, ls=ls or "none", capsize=2,
                  ms=8 if method == "greedy" else 5, label=label)
      if method != "greedy":
        for p, x, y in zip(pts, xs, ys):
          ax.annotate(str(p["n"]), (x, y), textcoords="offset points", xytext=(3, 3),
                      fontsize=7, color=colour)
    chosen = result.get("chooser", {}).get("non-oracle", [])
    if chosen:
      ax.plot([r["tokens"] for r in chosen], [100 * r["accuracy"] for r in chosen], color="black",
              marker="o", mfc="none", ls="--", lw=1, ms=7,
              label="compute-optimal chooser, cross-fitted (non-oracle menu)")
    greedy = next(p for p in result["points"] if p["method"] == "greedy")
    ax.axhline(100 * greedy["accuracy"], color="black", ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    n = greedy["problems"]
    ax.set(xlabel="tokens per problem (prompt + generated + reward model), log scale",
           ylabel="accuracy (%)", title=f"{task} ({n} held-out problems)")
    ax.grid(alpha=0.3)
  handles, labels = {}, []
  for ax in axes:  # one legend for both panels, below them
    for h, label in zip(*ax.get_legend_handles_labels()):
      if label not in handles:
        handles[label] = h
        labels.append(label)
  fig.legend([handles[x] for x in labels], labels, loc="outside lower center", ncol=4, fontsize=8)
  fig.suptitle("SmolLM2-135M-Instruct: accuracy vs test-time compute (numbers: samples N, beam "
               "width W or MCTS simulations S; dotted: greedy; error bars: binomial SE)",
               fontsize=10)
  fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------- main


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tasks", default=",".join(TASK_NAMES))
  p.add_argument("--stages", default=",".join(STAGES))
  p.add_argument("--model", default="smollm2-135m-instruct")
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "test_time_scaling"))
  p.add_argument("--num_problems", type=int, default=32)
  p.add_argument("--problem_seed", type=int, default=2024)
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--n", type=int, default=16, help="samples per problem (N)")
  p.add_argument("--temperature", type=float, default=0.5)
  p.add_argument("--max_new_tokens", type=int, default=None,
                 help=f"tokens per completion (default per task: {MAX_NEW_TOKENS})")
  p.add_argument("--batch_size", type=int, default=64, help="rows per compiled sampler call")
  p.add_argument("--widths", default="2,4", help="beam widths")
  p.add_argument("--reward_model", default=None,
                 help="an outcome reward model folder (default: train one, <out>/rm)")
  p.add_argument("--rm_data", default="",
                 help="TRAIN.jsonl[,EVAL.jsonl] preference pairs for the reward model (default: "
                      "configs/rm_arith.py samples its own)")
  p.add_argument("--rm_steps", type=int, default=30)
  p.add_argument("--rm_max_len", type=int, default=192, help="reward-model row length")
  p.add_argument("--rm_tasks", default="arithmetic",
                 help="tasks whose samples the reward model (trained on arithmetic) scores")
  p.add_argument("--search_tasks", default="arithmetic",
                 help="tasks step beam search and MCTS run on")
  p.add_argument("--search_problems", type=int, default=32,
                 help="step beam search and MCTS run on the first this many problems")
  p.add_argument("--search_batch_size", type=int, default=16,
                 help="sampler rows per call in step beam search and MCTS (their calls are "
                      "small)")
  p.add_argument("--step_widths", "--step_width", dest="step_widths", default="2,4",
                 help="step beam search widths, one stage each (expansions per beam: "
                      "--step_expansions)")
  p.add_argument("--step_expansions", type=int, default=2)
  p.add_argument("--simulations", default="3,8",
                 help="MCTS simulations per problem, one stage each")
  p.add_argument("--widening", default="1,0.5",
                 help="C,ALPHA: progressive widening of the --widened_simulations MCTS stages (a "
                      "node may draw max(--branching, ceil(C N^ALPHA)) steps)")
  p.add_argument("--widened_simulations", default="",
                 help="MCTS simulations per problem with --widening, one stage each (default: "
                      "none)")
  p.add_argument("--branching", type=int, default=2)
  p.add_argument("--max_steps", type=int, default=3)
  p.add_argument("--max_step_tokens", type=int, default=48)
  p.add_argument("--rollouts", type=int, default=1)
  p.add_argument("--budgets", default="128,256,512,1024,2048,4096",
                 help="token budgets per problem of the compute-optimal chooser")
  p.add_argument("--tiny", action="store_true",
                 help="smoke-test sizes (give --model a tiny model folder): 3 problems, N = 4, "
                      "8 new tokens, an untrained reward head")
  args = p.parse_args(argv)
  if args.tiny:
    args.num_problems, args.n, args.max_new_tokens, args.batch_size = 3, 4, 8, 8
    args.search_batch_size = 4
    args.search_tasks = ",".join(TASK_NAMES)
    args.search_problems, args.max_step_tokens, args.rm_max_len = 2, 4, 64
    args.simulations, args.step_widths, args.max_steps, args.widths = "1,2", "1,2", 2, "2"
    args.widened_simulations, args.widening = "3", "2,0.5"
  args.tasks = [t for t in args.tasks.split(",") if t]
  args.stages = [s for s in args.stages.split(",") if s]
  # every flag is checked here, before a model loads or a stage runs
  args.widths = common.int_list(p, "widths", args.widths)
  args.step_widths = common.int_list(p, "step_widths", args.step_widths)
  args.simulations = common.int_list(p, "simulations", args.simulations)
  args.widened_simulations = common.int_list(p, "widened_simulations", args.widened_simulations)
  try:
    c, alpha = (float(x) for x in args.widening.split(","))
  except ValueError:
    p.error(f"--widening must be C,ALPHA (two numbers), got {args.widening!r}")
  if not (c > 0 and 0 <= alpha <= 1):
    p.error(f"--widening C,ALPHA needs C > 0 and 0 <= ALPHA <= 1, got {args.widening!r}")
  args.widening = (c, alpha)
  args.budgets = common.int_list(p, "budgets", args.budgets)
  args.rm_tasks = [t for t in args.rm_tasks.split(",") if t]
  args.search_tasks = [t for t in args.search_tasks.split(",") if t]
  args.rm_data = [x for x in args.rm_data.split(",") if x]
  bad = sorted(set(args.tasks + args.rm_tasks + args.search_tasks) - set(TASK_NAMES)) + sorted(
      set(args.stages) - set(STAGES))
  if bad or not args.tasks:
    p.error(f"unknown tasks / stages {bad}; tasks: {TASK_NAMES}, stages: {STAGES}" if bad else
            f"--tasks names no task; tasks: {TASK_NAMES}")
  if args.n < 1 or args.n & (args.n - 1):
    p.error(f"--n must be a power of 2 (the curve uses n = 1, 2, 4, ..., N), got {args.n}")
  # cross-fitting splits the problems into two halves
  common.check_at_least(p, 2, num_problems=args.num_problems)
  common.check_at_least(p, 1, batch_size=args.batch_size, rm_steps=args.rm_steps,
                        rm_max_len=args.rm_max_len, search_problems=args.search_problems,
                        search_batch_size=args.search_batch_size,
                        step_expansions=args.step_expansions, branching=args.branching,
                        max_steps=args.max_steps, max_step_tokens=args.max_step_tokens,
                        rollouts=args.rollouts)
  if args.max_new_tokens is not None:
    common.check_at_least(p, 1, max_new_tokens=args.max_new_tokens)
  if not (math.isfinite(args.temperature) and args.temperature > 0):
    p.error(f"--temperature must be a positive number (the samples are drawn at it), got "
            f"{args.temperature}")
  for path in args.rm_data:
    if not os.path.isfile(path):
      p.error(f"--rm_data {path}: no such file")
  if args.reward_model and not os.path.isdir(args.reward_model):
    p.error(f"--reward_model {args.reward_model}: no such folder")
  common.check_out(p, args.out)
  return args


def main(argv=None) -> dict:
  args = parse(argv)
  # pylint: disable=import-outside-toplevel
  from postrl.models import load_pretrained, load_tokenizer
  from postrl.sampling.search import Policy
  from postrl.search import task_functions
  os.makedirs(args.out, exist_ok=True)
  t_start = time.perf_counter()
  loaded: dict = {}

  def make_policy(max_new_tokens: int, batch_size: int):
    """A ``Policy`` over the model, loaded once, only when a stage has to run."""
    if "model" not in loaded:
      loaded["model"] = load_pretrained(args.model, param_dtype="float32")
      loaded["tokenizer"] = load_tokenizer(args.model)
    key = (max_new_tokens, batch_size)
    if key not in loaded:
      loaded[key] = Policy(loaded["model"], loaded["tokenizer"], max_new_tokens=max_new_tokens,
                           temperature=args.temperature, batch_size=batch_size,
                           max_step_tokens=args.max_step_tokens)
    return loaded[key]

  ns = [2 ** i for i in range(int(math.log2(args.n)) + 1)]
  rm_dir = args.reward_model or os.path.join(args.out, "rm", "model")
  results = {}
  for task in args.tasks:
    spec = ARITHMETIC if task == "arithmetic" else COUNTDOWN
    exclude = reward_model_prompts(args.rm_data) if task == "arithmetic" else frozenset()
    problems = task_problems(spec, args.num_problems, args.problem_seed, exclude)
    funcs = task_functions(task)
    max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS[task]
    stages = Stages(args, task, problems, functools.partial(make_policy, max_new_tokens),
                    max_new_tokens, funcs)
    records = {"greedy": stages.greedy()}
    if "sample" in args.stages or "reward_model" in args.stages:
      records["sample"] = stages.sample()
    if "beam" in args.stages:
      for width in args.widths:
        records[f"beam_w{width}"] = stages.beam(width)
    if "reward_model" in args.stages and task in args.rm_tasks:
      records["reward_model"] = stages.reward_model(rm_dir, records["sample"])
    if "step_beam" in args.stages and task in args.search_tasks:
      for width in args.step_widths:
        records[f"step_beam_w{width}"] = stages.step_beam(width)
    if "mcts" in args.stages and task in args.search_tasks:
      for simulations in args.simulations:
        records[mcts_stage(simulations)] = stages.mcts(simulations)
      for simulations in args.widened_simulations:
        records[mcts_stage(simulations, args.widening)] = stages.mcts(simulations, args.widening)
    results[task] = dict(analyse(problems, records, ns, funcs, args, max_new_tokens), task=spec,
                         max_new_tokens=max_new_tokens, widening=list(args.widening))
    print(table(task, results[task]), flush=True)
    print(chooser_table(task, results[task]), flush=True)
  rm_info = None
  rm_results = os.path.join(args.out, "rm", "results.json")
  if os.path.exists(rm_results):
    with open(rm_results) as f:
      r = json.load(f)
    rm_info = {k: r.get(k) for k in ("pair_accuracy_before", "pair_accuracy_after", "seconds",
                                     "num_train_records", "num_eval_records")}
  summary = dict(settings={k: v for k, v in vars(args).items()}, reward_model=rm_dir,
                 reward_model_training=rm_info, tasks=results,
                 run_seconds=round(time.perf_counter() - t_start, 1))
  common.write_json(os.path.join(args.out, "summary.json"), summary, indent=1)
  path = os.path.join(args.out, "test_time_scaling.png")
  plot(results, path)
  print(f"wrote {path}")
  return summary


if __name__ == "__main__":
  main()
