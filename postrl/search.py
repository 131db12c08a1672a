"""Run a test-time search strategy on a file of prompts and write one JSON line per prompt.

    python -m postrl.search --model DIR --strategy self_consistency --n 16 --prompts FILE \\
        [--task arithmetic] [--reward-model DIR] [--prm DIR] [--out FILE]

``--prompts``: a ``.jsonl`` file of ``{"prompt": str, "answer"?: str, "numbers"?: [int],
"target"?: int, "id"?: any}`` objects, or any other file with one prompt per non-blank line.
``--task arithmetic|countdown`` names the verifier (and the answer extraction): best-of-N can then
score with it, step search and MCTS can value steps by verifier roll-outs, and each result gets
``correct``; the records must then carry ``answer`` (arithmetic) or ``numbers`` and ``target``
(countdown).

``--n`` per strategy: samples (best_of_n, weighted_best_of_n, self_consistency), beam width
(beam_search), samples per round (step_beam_search: ``--width`` beams kept, default n / 4, each
expanded n / width times), simulations (mcts, ``--branching`` steps per expansion); greedy
ignores it. Scorers: ``--reward-model`` (an outcome reward model: best-of-N, reward-weighted
self-consistency; σ(r) for the weighted votes), ``--prm`` (a process reward model: step search
and MCTS), else the task's verifier (roll-outs for step search and MCTS).

Bad input (a missing or empty prompt file, a line that is not UTF-8 or not JSON, a record
without the field the task needs, a missing model, a reward model whose tokenizer differs from
the policy's or whose ``max_len`` a prompt fills, a beam wider than the sampler's batch, a setting
out of range, a ``--reward-model`` / ``--prm`` the strategy does not use, an ``--out`` that cannot
be written) stops with one ``error: ...`` line and exit status 1, before any sampling; ``--out`` is
written all at once at the end, so a failed run leaves no partial file. A prompt whose
candidates hold no extractable answer gets ``"answer": null`` and ``"status": "no_answer"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

STRATEGIES = ("greedy", "best_of_n", "weighted_best_of_n", "self_consistency", "beam_search",
              "step_beam_search", "mcts")
TASKS = ("arithmetic", "countdown")
_FIELDS = {"prompt", "answer", "numbers", "target", "id"}


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """One line of the prompt file."""
  prompt: str
  answer: str | None = None
  numbers: tuple[int, ...] | None = None
  target: int | None = None
  id: Any = None
  where: str | None = dataclasses.field(default=None, compare=False)  # "file:line", for errors


def read_prompts(path: str, task: str | None) -> list[PromptRecord]:
  """The prompt file's records (module doc); DataError naming file:line:field when malformed."""
  from postrl.data.records import DataError  # pylint: disable=import-outside-toplevel
  if os.path.isdir(path):
    raise DataError(f"{path}: is a directory, not a prompt file")
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
  if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (editors on Windows write one)
    raw = raw[3:]
  records = []
  for lineno, data in enumerate(raw.splitlines(), start=1):  # \n, \r\n or \r, as text mode
    where = f"{path}:{lineno}"
    try:
      line = data.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{where}: not UTF-8 text (byte {data[e.start]:#04x} at column "
                      f"{e.start + 1})") from None
    if not line.strip():
      continue
    if not path.endswith(".jsonl"):
      records.append(PromptRecord(prompt=line, where=where))
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    records.append(_record(obj, where, task))
  if not records:
    raise DataError(f"{path}: no prompts (the file has no non-blank line)")
  return records


def _record(obj, where: str, task: str | None) -> PromptRecord:
  from postrl.data.records import DataError  # pylint: disable=import-outside-toplevel
  if not isinstance(obj, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  unknown = sorted(set(obj) - _FIELDS)
  if unknown:
    raise DataError(f"{where}: unknown field(s) {unknown} (known: {sorted(_FIELDS)})")
  prompt = obj.get("prompt")
  if not isinstance(prompt, str) or not prompt.strip():
    raise DataError(f"{where}: field 'prompt': expected a non-empty string")
  answer = obj.get("answer")
  if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
    raise DataError(f"{where}: field 'answer': expected a string or a number")
  numbers, target = obj.get("numbers"), obj.get("target")
  if numbers is not None and (not isinstance(numbers, list) or not all(
      isinstance(x, int) and not isinstance(x, bool) for x in numbers)):
    raise DataError(f"{where}: field 'numbers': expected a list of integers")
  if target is not None and (isinstance(target, bool) or not isinstance(target, int)):
    raise DataError(f"{where}: field 'target': expected an integer")
  if task == "arithmetic" and answer is None:
    raise DataError(f"{where}: field 'answer' is required with --task arithmetic")
  if task == "countdown" and (numbers is None or target is None):
    raise DataError(f"{where}: fields 'numbers' and 'target' are required with --task countdown")
  if task == "countdown" and answer is None:
    answer = target
  return PromptRecord(prompt=prompt, answer=None if answer is None else str(answer),
                      numbers=None if numbers is None else tuple(numbers), target=target,
                      id=obj.get("id"), where=where)


def task_functions(task: str | None):
  """(extract, equal, correct(answer, record), verifier(text, record)) of a task."""
  # pylint: disable=import-outside-toplevel
  from postrl.data.preference import verifier_reward
  from postrl.rewards.countdown import (countdown_reward, evaluate_countdown_expression,
                                       extract_countdown_answer)
  from postrl.sampling.search.common import default_equal, default_extract
  from postrl.sampling.search.compute_optimal import reference_correct
  if task == "countdown":
    def extract(text):  # "expression" or "expression = claimed result", whitespace normalised
      found = extract_countdown_answer(text)
      if found is None or not found[0]:
        return None
      expression, claim = found
      expression = " ".join(expression.split())
      return expression if claim is None else f"{expression} = {' '.join(claim.split())}"

    def correct(answer, record):  # the verifier's rule: a wrong claimed result is wrong
      if answer is None:
        return False
      if "=" in answer:
        return countdown_reward(answer, record.numbers, record.target) > 0
      value = evaluate_countdown_expression(answer, record.numbers)
      return value is not None and value == record.target

    return extract, lambda a, b: a == b, correct, verifier_reward("countdown")
  if task == "arithmetic":
    return default_extract, default_equal, reference_correct, verifier_reward("arithmetic")
  return default_extract, default_equal, None, None


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m postrl.search", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="policy: HF folder, .gguf or shipped model name")
  p.add_argument("--strategy", required=True, choices=STRATEGIES)
  p.add_argument("--n", type=int, default=1)
  p.add_argument("--prompts", required=True)
  p.add_argument("--task", choices=TASKS, default=None)
  p.add_argument("--reward-model", default=None, help="outcome reward model folder")
  p.add_argument("--prm", default=None, help="process reward model folder")
  p.add_argument("--allow-tokenizer-mismatch", action="store_true")
  p.add_argument("--out", default=None, help="JSONL output (default: stdout)")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--sampling-impl", default="auto", choices=["xla", "auto", "pallas"],
                 help="the sampler: XLA bisection, or the sort-free Pallas kernel (one GPU)")
  p.add_argument("--batch-size", type=int, default=16, help="rows per compiled sampler call")
  p.add_argument("--system-prompt", default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--width", type=int, default=None, help="step_beam_search: beams kept")
  p.add_argument("--branching", type=int, default=4, help="mcts: steps per expansion")
  p.add_argument("--widening", default=None, metavar="C,ALPHA",
                 help="mcts: progressive widening, a node holds up to max(branching, "
                      "ceil(C N^ALPHA)) steps after N visits (default: none)")
  p.add_argument("--max-steps", type=int, default=8, help="step search / mcts depth")
  p.add_argument("--max-step-tokens", type=int, default=32)
  p.add_argument("--rollouts", type=int, default=4, help="verifier roll-outs per value")
  p.add_argument("--max-tokens", type=int, default=None, help="mcts: token budget per prompt")
  p.add_argument("--length-penalty", type=float, default=1.0, help="beam search α")
  p.add_argument("--length-norm", choices=("hf", "gnmt"), default="hf")
  return p


def _user_errors():
  # pylint: disable=import-outside-toplevel
  from postrl.data.records import DataError
  from postrl.models import ConfigError, TokenizerError, WeightsError
  from postrl.sampling.search.common import SearchError
  return (DataError, ConfigError, TokenizerError, WeightsError, SearchError, FileNotFoundError)


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    return _run(args)
  except _user_errors() as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


def _strategy(args, policy, records, key, funcs):
  """The chosen search as ``run() -> list[SearchResult]`` (scorers built and checked first)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from postrl.sampling import search
  from postrl.sampling.search.common import SearchError
  extract, equal, _, verifier = funcs
  name, n = args.strategy, args.n
  if name == "greedy":
    return lambda: search.greedy(policy, records, extract=extract)
  if name == "beam_search":
    search.common.check_positive(n=n)
    if n > policy.batch_size:  # before any compilation
      raise SearchError(f"--n {n} (the beam width) is larger than --batch-size "
                        f"{policy.batch_size}: the beams of a prompt decode in one batch")
    return lambda: search.beam_search(policy, records, width=n, extract=extract,
                                      length_penalty=args.length_penalty,
                                      length_norm=args.length_norm)
  weighted = name in ("weighted_best_of_n", "self_consistency")
  scorer = None
  if name in ("best_of_n", "weighted_best_of_n", "self_consistency") and args.reward_model:
    scorer = search.RewardModelOutcome(args.reward_model, sigmoid=weighted,
                                       batch_size=args.batch_size,
                                       allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    search.scorers.check_scorer(policy, scorer, "reward model")
  elif name in ("best_of_n", "weighted_best_of_n") and verifier is not None:
    scorer = search.verifier_scorer(verifier)
  if name == "self_consistency":
    return lambda: search.self_consistency(policy, records, n=n, key=key, scorer=scorer,
                                           extract=extract, equal=equal)
  if name in ("best_of_n", "weighted_best_of_n"):
    if scorer is None:
      raise SearchError(f"{name} needs a scorer: --reward-model DIR, or --task for the verifier")
    return lambda: search.best_of_n(policy, records, n=n, scorer=scorer, key=key,
                                    weighted=name == "weighted_best_of_n", extract=extract,
                                    equal=equal)
  if args.prm:
    value = search.ProcessRewardScorer(args.prm, batch_size=args.batch_size,
                                       allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    search.scorers.check_scorer(policy, value, "process reward model")
  elif verifier is not None:
    value = search.RolloutValue(policy, verifier, rollouts=args.rollouts,
                                key=jax.random.fold_in(key, 7))
  else:
    raise SearchError(f"{name} needs a value function: --prm DIR, or --task for verifier "
                      "roll-outs")
  if name == "step_beam_search":
    search.common.check_positive(n=n)
    width = args.width if args.width is not None else max(1, n // 4)  # --width >= 1: checked
    if n % width:
      raise SearchError(f"--n {n} samples per round must be a multiple of --width {width}")
    return lambda: search.step_beam_search(policy, records, value_fn=value, key=key, width=width,
                                           expansions=n // width, max_steps=args.max_steps,
                                           extract=extract, equal=equal)
  widening = None
  if args.widening:
    try:
      c, alpha = (float(v) for v in args.widening.split(","))
    except ValueError:
      raise SearchError(f"--widening {args.widening!r}: expected two numbers C,ALPHA "
                        "(e.g. 1,0.5)") from None
    widening = (c, alpha)
  return lambda: search.mcts(policy, records, value_fn=value, key=key, simulations=n,
                             branching=args.branching, max_depth=args.max_steps,
                             max_tokens=args.max_tokens, extract=extract, widening=widening)


def _run(args) -> int:
  # pylint: disable=import-outside-toplevel
  import jax
  from postrl.models import check_fits, load_pretrained, load_tokenizer
  from postrl.sampling.search import Policy
  from postrl.sampling.search.common import SearchError
  from postrl.sampling.search.policy import check_sampling
  if args.strategy != "greedy" and args.n < 1:
    raise SearchError(f"--n must be >= 1, got {args.n}")
  _check_settings(args)
  # the settings the policy checks, before minutes of model loading
  check_sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, flags=True)
  if args.out:
    _check_out(args.out)
  records = read_prompts(args.prompts, args.task)
  funcs = task_functions(args.task)
  model = load_pretrained(args.model, param_dtype=args.dtype)
  tokenizer = check_fits(load_tokenizer(args.model), model.config.vocab_size, args.model)
  policy = Policy(model, tokenizer, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  batch_size=args.batch_size, system_prompt=args.system_prompt,
                  max_step_tokens=args.max_step_tokens, sampling_impl=args.sampling_impl)
  key = jax.random.key(args.seed)
  run = _strategy(args, policy, records, key, funcs)
  if args.strategy in ("best_of_n", "weighted_best_of_n", "self_consistency") and (
      args.n > args.batch_size):
    print(f"note: --n {args.n} > --batch-size {args.batch_size}: each prompt's samples run in "
          f"{-(-args.n // args.batch_size)} sampler calls", file=sys.stderr)
  t0 = time.perf_counter()
  results = run()
  seconds = time.perf_counter() - t0
  correct_fn = funcs[2]
  lines = []
  for record, result in zip(records, results):
    out = {"id": record.id, **result.to_json(), "reference": record.answer}
    if correct_fn is not None:
      out["correct"] = bool(correct_fn(result.answer, record))
    lines.append(out)
  _write(args.out, lines)
  _summary(args, lines, seconds)
  return 0


_SCORER_FLAGS = {"reward_model": ("best_of_n", "weighted_best_of_n", "self_consistency"),
                 "prm": ("step_beam_search", "mcts")}


def _check_settings(args) -> None:
  """SearchError for a setting out of range or a scorer the strategy would silently ignore."""
  # pylint: disable=import-outside-toplevel
  from postrl.sampling.search.common import SearchError
  for name in ("max_new_tokens", "batch_size", "max_step_tokens", "max_steps", "rollouts",
               "branching", "width"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise SearchError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
  if not math.isfinite(args.length_penalty):
    raise SearchError(f"--length-penalty must be a finite number, got {args.length_penalty}")
  for flag, users in _SCORER_FLAGS.items():
    if getattr(args, flag) and args.strategy not in users:
      raise SearchError(f"--{flag.replace('_', '-')} is not used by {args.strategy} (it scores "
                        f"{', '.join(users)})")


def _check_out(path: str) -> None:
  """SearchError unless ``path`` can be written (its folder is made now), so a run never ends
  with results it cannot save."""
  # pylint: disable=import-outside-toplevel
  from postrl.sampling.search.common import SearchError
  if os.path.isdir(path):
    raise SearchError(f"--out {path} is a directory")
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    blocker = folder
    while not os.path.exists(blocker) and os.path.dirname(blocker) != blocker:
      blocker = os.path.dirname(blocker)
    why = (f"{blocker} is a file" if os.path.exists(blocker) and not os.path.isdir(blocker)
           else e.strerror or str(e))
    raise SearchError(f"--out {path}: cannot create its folder {folder} ({why})") from None
  if not os.access(folder, os.W_OK | os.X_OK):
    raise SearchError(f"--out {path}: the folder {folder} is not writable")


def _write(path: str | None, lines: list[dict]) -> None:
  """The JSON lines to stdout or, all or nothing, to ``path`` (a temporary file renamed)."""
  # pylint: disable=import-outside-toplevel
  from postrl.sampling.search.common import SearchError
  text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
  if path is None:
    sys.stdout.write(text)
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise SearchError(f"--out {path}: cannot write the results ({e.strerror or e})") from None


def _summary(args, lines: list[dict], seconds: float) -> None:
  n = len(lines)
  no_answer = sum(line["status"] != "ok" for line in lines)
  mean = {k: sum(line["tokens"][k] for line in lines) / n
          for k in ("prompt", "generated", "scorer", "total")}
  acc = ""
  if "correct" in lines[0]:
    k = sum(line["correct"] for line in lines)
    acc = f"accuracy {k / n:.3f} ({k}/{n}), "
  print(f"{args.strategy} n={args.n}: {n} prompts, {acc}{no_answer} without an answer; tokens per "
        f"prompt {mean['total']:.0f} (prompt {mean['prompt']:.0f}, generated "
        f"{mean['generated']:.0f}, scorer {mean['scorer']:.0f}); {seconds:.1f}s"
        + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)


if __name__ == "__main__":
  sys.exit(main())
