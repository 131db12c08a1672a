r"""Rollouts with EOS: fixed batches (``generate``) vs continuous batching
(``generate_continuous``), the same prompts, the same model, one run.

    python benchmarks/continuous.py                                   # CPU: shipped SmolLM2, ~10 min
    python benchmarks/continuous.py --prompts 256 --slots 64 --new-tokens 256 --dtype bfloat16  # GPU
    python benchmarks/continuous.py --prompts 6 --slots 2 --new-tokens 8 --repeats 1 \
        --model DIR                                                   # smoke test

The workload is an RL rollout's: Q arithmetic problems ("What is a + b?", ``--digits``) in the
model's chat template, sampled at ``--temperature`` (1.0, as the GRPO config) with EOS on, so
rows end at different lengths, at most ``--new-tokens``. The model is a real checkpoint
(``--model``, default the shipped SmolLM2-135M-Instruct): random weights would not emit EOS.

Three ways to run the Q prompts, each for every B in ``--slots``:

- ``batches``: ``generate`` on consecutive batches of B prompts (what ``postrl.trainers.rollout``
  does with ``rollout.batch_size = B``); each batch decodes until its longest row ends;
- ``continuous``: ``generate_continuous`` with B slots, once per R in ``--prefill-rows``
  (prompts per refill; default B / 4);
- ``one_batch``: ``generate`` on all Q prompts at once (B = Q: the memory a rollout of Q rows
  needs; the longest row of all sets the steps).

Each is timed after a warm-up call (compilation) as the median of ``--repeats`` calls. The
columns: generated tokens (EOS included) and tokens/s, decode steps, slot occupancy (generated
tokens over decode steps x rows per step), and the speed-up of continuous batching as the ratio
of tokens/s (and of seconds). Fixed batches and continuous batching draw different samples
(``generate`` keys its draws by step, ``generate_continuous`` by prompt and step), so their
lengths are not the same rollouts; ``--temperature 0`` makes them identical (checked).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  pylint: disable=wrong-import-position


def _timed(fn, repeats: int):
  """(median seconds of ``repeats`` calls after one warm-up call, the last output)."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def run(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from postrl.data.tasks import arithmetic_problems  # pylint: disable=import-outside-toplevel
  from postrl.models import load_pretrained, load_tokenizer  # pylint: disable=import-outside-toplevel
  from postrl.sampling import generate, generate_continuous, pad_prompts  # pylint: disable=import-outside-toplevel
  from postrl.sampling.generate import stop_and_pad_ids  # pylint: disable=import-outside-toplevel

  dtype = args.dtype or common.default_dtype()
  model = load_pretrained(args.model, param_dtype=dtype)
  tokenizer = load_tokenizer(args.model)
  eos, pad = stop_and_pad_ids(model, tokenizer)
  problems = arithmetic_problems(args.prompts, seed=args.seed, digits=args.digits)
  ids = [tokenizer.encode_chat([{"role": "user", "content": p.prompt}]) for p in problems]
  tokens, lengths = pad_prompts(ids, pad_id=pad, multiple=16)
  Q, N = len(ids), args.new_tokens
  key = jax.random.key(args.seed)
  sampling = dict(max_new_tokens=N, temperature=args.temperature, eos_ids=eos, pad_id=pad,
                  key=key)
  results = common.Results(args.out, environment=common.environment(), model=args.model,
                           dtype=dtype, prompts=Q, prompt_len=int(tokens.shape[1]),
                           new_tokens=N, temperature=args.temperature, command=" ".join(sys.argv))
  budget = common.Budget(args.time_limit)
  common.log(f"{args.model} {dtype}, {Q} prompts padded to {tokens.shape[1]}, <= {N} new tokens, "
             f"T = {args.temperature}, EOS {eos}")

  def batches(B):
    def call():
      outs = []
      for s in range(0, Q, B):
        t, n = tokens[s:s + B], lengths[s:s + B]
        real = len(t)
        if real < B:  # one compiled shape: the last batch repeats its last prompt
          t = np.concatenate([t, np.repeat(t[-1:], B - real, 0)])
          n = np.concatenate([n, np.repeat(n[-1:], B - real, 0)])
        out = generate(model, t, n, **dict(sampling, key=jax.random.fold_in(key, s)))
        outs.append((out.tokens_BxN[:real], out.lengths_B[:real], out.lengths_B))
      return outs
    return call

  def summarise(mode, B, seconds, tokens_QxN, lengths_Q, steps, rows_per_step, prefills=None,
                prefill_rows=None):
    generated = int(np.sum(lengths_Q))
    row = dict(mode=mode, slots=B, seconds=round(seconds, 4), generated_tokens=generated,
               tokens_per_s=round(generated / seconds, 2), decode_steps=int(steps),
               occupancy=round(generated / max(1, steps * rows_per_step), 4),
               mean_length=round(float(np.mean(lengths_Q)), 2),
               max_length=int(np.max(lengths_Q)), ended_by_eos=int(np.sum(lengths_Q < N)))
    if prefills is not None:
      row.update(prefills=int(prefills), prefill_rows=prefill_rows)
    results.append("rows", row)
    common.log(f"{mode:>10} B={B:<4} {seconds:8.2f} s {row['tokens_per_s']:9.1f} tok/s  "
               f"{generated:6d} tokens, {steps:5d} steps, occupancy {row['occupancy']:.2f}, "
               f"mean length {row['mean_length']:.1f} (max {row['max_length']})")
    return row

  by_mode = {}
  for B in args.slots:
    if budget.over():
      common.log(f"time limit: B = {B} and later skipped")
      break
    seconds, outs = _timed(batches(B), args.repeats)
    toks = np.concatenate([np.asarray(o[0]) for o in outs])
    lens = np.concatenate([np.asarray(o[1]) for o in outs])
    steps = sum(int(np.max(np.asarray(o[2]))) for o in outs)  # each batch until its longest row
    by_mode[("batches", B)] = summarise("batches", B, seconds, toks, lens, steps, B)
    for prefill_rows in args.prefill_rows or [max(1, B // 4)]:
      if budget.over():
        common.log(f"time limit: B = {B}, R = {prefill_rows} and later skipped")
        break
      seconds, out = _timed(lambda B=B, r=prefill_rows: generate_continuous(
          model, tokens, lengths, slots=B, prefill_rows=r, **sampling), args.repeats)
      cont = summarise("continuous", B, seconds, out.tokens_BxN, out.lengths_B,
                       int(out.decode_steps), B, int(out.prefills), prefill_rows)
      if args.temperature == 0:  # greedy: the same tokens either way
        if not (np.array_equal(toks, np.asarray(out.tokens_BxN))
                and np.array_equal(lens, np.asarray(out.lengths_B))):
          results.update(check_failed=f"greedy tokens differ at B = {B}, R = {prefill_rows}")
          common.log(f"CHECK FAILED: greedy tokens of the two modes differ at B = {B}, "
                     f"R = {prefill_rows}")
      fixed = by_mode[("batches", B)]
      speedup = cont["tokens_per_s"] / fixed["tokens_per_s"]  # the two draw different rollouts
      results.append("speedups", dict(slots=B, prefill_rows=prefill_rows,
                                      tokens_per_s_ratio=round(speedup, 3),
                                      seconds_ratio=round(fixed["seconds"] / cont["seconds"], 3)))
      common.log(f"{'':>10} B={B:<4} R={prefill_rows:<3} continuous batching is {speedup:.2f}x "
                 f"fixed batches (tokens/s)")
  if args.one_batch and not budget.over():
    seconds, out = _timed(lambda: generate(model, tokens, lengths, **sampling), args.repeats)
    summarise("one_batch", Q, seconds, out.tokens_BxN, out.lengths_B,
              int(np.max(np.asarray(out.lengths_B))), Q)
  return results.doc


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="smollm2-135m-instruct",
                      help="shipped name, HF folder or GGUF file (a model that emits EOS)")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="default: bfloat16 on an accelerator, float32 on CPU")
  parser.add_argument("--prompts", type=int, default=64, help="Q")
  parser.add_argument("--slots", type=int, nargs="+", default=[16], help="B (rows per step)")
  parser.add_argument("--prefill-rows", type=int, nargs="+", default=None,
                      help="R, one continuous row each (default B / 4)")
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--digits", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--one-batch", action="store_true", help="also all Q prompts as one batch")
  parser.add_argument("--time-limit", type=float, default=None)
  parser.add_argument("--out", default="benchmarks/results/continuous.json")
  args = parser.parse_args(argv)
  doc = run(args)
  return 1 if "check_failed" in doc else 0


if __name__ == "__main__":
  sys.exit(main())
