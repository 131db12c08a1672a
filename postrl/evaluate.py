"""Evaluate a model on a built-in task: generate, extract the answer, exact match.

The job behind ``configs/eval_arith.py`` (``python launch.py --config configs/eval_arith.py``).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from postrl.data.tasks import arithmetic_problems
from postrl.models import load_pretrained, load_tokenizer
from postrl.rewards.math import exact_match, extract_last_number
from postrl.sampling.generate import generate, pad_prompts, stop_and_pad_ids, to_host

TASKS = {"arithmetic": arithmetic_problems}


def evaluate_task(model, tokenizer, problems, *, batch_size: int, max_new_tokens: int,
                  temperature: float = 0.0, seed: int = 0, system_prompt: str | None = None,
                  progress: bool = True):
  """Generates an answer to every problem -> (accuracy, per-problem records, generated tokens)."""
  records, n_tokens = [], 0
  eos, pad = stop_and_pad_ids(model, tokenizer)
  key = jax.random.key(seed)
  batches = range(0, len(problems), batch_size)
  for i in tqdm(batches, desc="evaluate", disable=not progress):
    batch = problems[i:i + batch_size]
    messages = [[{"role": "system", "content": system_prompt}] if system_prompt else [] for _ in batch]
    ids = [tokenizer.encode_chat(m + [{"role": "user", "content": p.prompt}])
           for m, p in zip(messages, batch)]
    ids += [ids[-1]] * (batch_size - len(batch))  # fixed batch shape: one compilation
    tokens, lengths = pad_prompts(ids, pad_id=pad, multiple=16)
    out = generate(model, tokens, lengths, key=jax.random.fold_in(key, i),
                   max_new_tokens=max_new_tokens, temperature=temperature, eos_ids=eos, pad_id=pad)
    toks, lens = to_host(out.tokens_BxN), to_host(out.lengths_B)
    for b, problem in enumerate(batch):
      completion = tokenizer.decode(toks[b, :lens[b]])
      n_tokens += int(lens[b])
      records.append(dict(prompt=problem.prompt, answer=problem.answer, completion=completion,
                          extracted=extract_last_number(completion),
                          correct=exact_match(completion, problem.answer)))
  accuracy = float(np.mean([r["correct"] for r in records])) if records else 0.0
  return accuracy, records, n_tokens


def run(config, workdir: str | None) -> dict:
  """Loads ``config.model``, evaluates it on ``config.task`` and writes results.json."""
  t0 = time.perf_counter()
  model = load_pretrained(config.model, param_dtype=config.param_dtype)
  tokenizer = load_tokenizer(config.model)
  if config.task.name not in TASKS:
    raise ValueError(f"config.task.name: unknown task {config.task.name!r}; known: {sorted(TASKS)}")
  problems = TASKS[config.task.name](config.task.num_problems, seed=config.task.seed,
                                     digits=config.task.digits, ops=config.task.ops)
  t1 = time.perf_counter()
  accuracy, records, n_tokens = evaluate_task(
      model, tokenizer, problems, batch_size=config.batch_size,
      max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=config.seed,
      system_prompt=config.get("system_prompt") or None)
  seconds = time.perf_counter() - t1
  summary = dict(model=config.model, task=config.task.to_dict(), accuracy=accuracy,
                 num_problems=len(records), generated_tokens=n_tokens,
                 generate_seconds=round(seconds, 2), load_seconds=round(t1 - t0, 2),
                 device=jax.devices()[0].device_kind)
  for r in records[:5]:
    print(f"  {r['prompt']!r} -> {r['completion'][:80]!r}  (answer {r['answer']}, "
          f"{'correct' if r['correct'] else 'wrong'})")
  print(f"exact-match accuracy of {config.model} on {len(records)} {config.task.name} problems: "
        f"{accuracy:.1%} ({n_tokens} tokens generated in {seconds:.1f}s)")
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(dict(summary, records=records), f, indent=1)
    print(f"wrote {os.path.join(workdir, 'results.json')}")
  return summary
