"""Evaluate a model: exact match on a built-in task, and perplexity on held-out text.

The job behind ``configs/eval_arith.py`` (``python launch.py --config configs/eval_arith.py``).
``perplexity`` (with ``postrl.data.text.champ_windows`` for the token budget) is the quality
measure of compressed models: ΔPPL over the full-precision model.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from postrl.data.tasks import arithmetic_problems
from postrl.logprobs import model_apply_fn, token_logps
from postrl.models import ConfigError, check_fits, load_pretrained, load_tokenizer
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


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "vocab_chunk"))
def _nll_sum(graphdef, state, tokens_BxT, mask_BxT, *, chunk, vocab_chunk):
  logps_BxT = token_logps(model_apply_fn(graphdef), state, tokens_BxT, mask_BxT, chunk=chunk,
                          vocab_chunk=vocab_chunk)
  return -jnp.sum(logps_BxT, dtype=jnp.float32)


def token_nll(model, tokens_BxT, *, batch_size: int, mask_BxT=None, chunk: int | None = None,
              vocab_chunk: int | None = None, progress: bool = False) -> tuple[float, int]:
  """Total negative log-likelihood of fixed-length windows and the number of tokens it is over.

      NLL = - Σ_b Σ_{t>=1} mask[b, t] log p(tokens[b, t] | tokens[b, <t])

  Each row is an independent window: its first token has no context, so it is never predicted
  or counted (a window of T tokens contributes T - 1 predictions); a 1 in ``mask_BxT[:, 0]`` is
  ignored. The model runs ``batch_size`` windows at a time (one compilation: a short last batch
  is padded with masked rows); log-probs come from ``postrl.logprobs.token_logps``, per batch
  sums in float32, the total in float64.

  Args:
    model: an NNX ``Transformer`` (any state: quantized layers included).
    tokens_BxT: int token ids [B, T], T >= 2 (e.g. ``postrl.data.text.champ_windows``).
    batch_size: windows per forward pass.
    mask_BxT: 1 where a token counts (default: all of t >= 1).
    chunk, vocab_chunk: passed to ``token_logps`` (bound the [B, T, V] logits memory).
    progress: show a progress bar.
  Returns:
    ``(total_nll, num_predicted_tokens)``.
  """
  tokens = np.asarray(tokens_BxT)
  if tokens.ndim != 2 or tokens.shape[1] < 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens_BxT must be integer [B, T] with T >= 2, got {tokens.dtype} "
                     f"{tokens.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  B, T = tokens.shape
  vocab = getattr(getattr(model, "config", None), "vocab_size", None)
  if tokens.size and (tokens.min() < 0 or (vocab is not None and tokens.max() >= vocab)):
    raise ValueError(f"token ids must lie in [0, {vocab}), got [{tokens.min()}, {tokens.max()}]")
  mask = np.ones((B, T), np.int32) if mask_BxT is None else np.array(mask_BxT, np.int32)
  if mask.shape != (B, T):
    raise ValueError(f"mask_BxT has shape {mask.shape}, tokens_BxT {tokens.shape}")
  mask[:, 0] = 0
  count = int(mask.sum())
  if count == 0:
    raise ValueError("no token to predict: the mask is zero at every position t >= 1")
  pad = (-B) % batch_size
  tokens = np.pad(tokens.astype(np.int32), ((0, pad), (0, 0)))
  mask = np.pad(mask, ((0, pad), (0, 0)))
  graphdef, state = nnx.split(model)
  total = 0.0
  for i in tqdm(range(0, B + pad, batch_size), desc="perplexity", disable=not progress):
    total += float(_nll_sum(graphdef, state, tokens[i:i + batch_size], mask[i:i + batch_size],
                            chunk=chunk, vocab_chunk=vocab_chunk))
  return total, count


def perplexity(model, tokens_BxT, *, batch_size: int, mask_BxT=None, chunk: int | None = None,
               vocab_chunk: int | None = None, progress: bool = False) -> float:
  """Perplexity over fixed-length windows (the protocol of GPTQ / AWQ / SparseGPT tables).

      PPL = exp(NLL / N),   NLL and N from ``token_nll``: N = Σ_b Σ_{t>=1} mask[b, t]

  i.e. the exponential of the mean NLL per predicted token over all windows (not a mean of
  per-window perplexities). Window starts are not counted: with the default mask N = B (T - 1).
  A model that puts uniform probability on a vocabulary of V tokens has PPL = V.

  Args: as ``token_nll``.
  """
  total, count = token_nll(model, tokens_BxT, batch_size=batch_size, mask_BxT=mask_BxT,
                           chunk=chunk, vocab_chunk=vocab_chunk, progress=progress)
  return float(np.exp(total / count))


def _task_problems(config) -> list:
  """``config.task``'s problems; a bad setting is a ``ConfigError`` naming the key (checked
  before the model loads)."""
  for key, value in (("batch_size", config.batch_size), ("max_new_tokens", config.max_new_tokens),
                     ("task.num_problems", config.task.num_problems)):
    if value < 1:
      raise ConfigError(f"config.{key} must be >= 1, got {value}")
  if not 0.0 <= config.temperature < float("inf"):
    raise ConfigError(f"config.temperature must be a finite number >= 0, got {config.temperature}")
  if config.task.name not in TASKS:
    raise ConfigError(f"config.task.name: unknown task {config.task.name!r}; "
                      f"known: {sorted(TASKS)}")
  try:
    return TASKS[config.task.name](config.task.num_problems, seed=config.task.seed,
                                   digits=config.task.digits, ops=config.task.ops)
  except ValueError as e:
    raise ConfigError(f"config.task: {e}") from None


def run(config, workdir: str | None) -> dict:
  """Loads ``config.model``, evaluates it on ``config.task`` and writes results.json."""
  t0 = time.perf_counter()
  problems = _task_problems(config)
  model = load_pretrained(config.model, param_dtype=config.param_dtype)
  tokenizer = check_fits(load_tokenizer(config.model), model.config.vocab_size, config.model)
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
    path = os.path.join(workdir, "results.json")
    with open(f"{path}.tmp", "w") as f:  # renamed when complete: never half a results file
      json.dump(dict(summary, records=records), f, indent=1)
    os.replace(f"{path}.tmp", path)
    print(f"wrote {path}")
  return summary
