"""Generate from a model on the command line.

    python -m postrl.generate --model smollm2-135m-instruct --prompt "What is 12 + 30?"

``--model`` takes a shipped model name, an HF directory or a .gguf file. The prompt is wrapped in
the model's chat template unless ``--raw``. Prints each completion and the decode speed.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m postrl.generate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="smollm2-135m-instruct")
  parser.add_argument("--prompt", action="append", required=True,
                      help="may be given several times: the prompts form one batch")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top-k", type=int, default=None)
  parser.add_argument("--top-p", type=float, default=None)
  parser.add_argument("--min-p", type=float, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--raw", action="store_true", help="no chat template")
  parser.add_argument("--timing", action="store_true",
                      help="run twice and report the speed of the second (compiled) call")
  args = parser.parse_args(argv)

  from postrl.models import (WeightsError, check_fits, load_pretrained,  # pylint: disable=import-outside-toplevel
                             load_tokenizer)
  from postrl.sampling.generate import generate_text  # pylint: disable=import-outside-toplevel

  try:
    t0 = time.perf_counter()
    model = load_pretrained(args.model, param_dtype=args.dtype)
    tokenizer = check_fits(load_tokenizer(args.model), model.config.vocab_size, args.model)
  except (WeightsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"loaded {args.model} ({model.config.num_params() / 1e6:.0f}M parameters) in "
        f"{time.perf_counter() - t0:.1f}s on {jax.devices()[0].platform}", file=sys.stderr)
  sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  min_p=args.min_p, max_new_tokens=args.max_new_tokens)
  key = jax.random.key(args.seed)
  t0 = time.perf_counter()
  try:  # bad sampling flags or prompts are ValueErrors naming the flag: one line, not a trace
    completions = generate_text(model, tokenizer, args.prompt, chat=not args.raw, key=key,
                                **sampling)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  run = first = time.perf_counter() - t0
  if args.timing:
    t0 = time.perf_counter()
    completions = generate_text(model, tokenizer, args.prompt, chat=not args.raw, key=key, **sampling)
    run = time.perf_counter() - t0
  for prompt, completion in zip(args.prompt, completions):
    print(f"### {prompt}\n{completion}\n")
  n_tokens = sum(len(tokenizer.encode(c)) for c in completions)
  what = "compiled call" if args.timing else "including compilation"
  print(f"{n_tokens} new tokens in {run:.2f}s ({n_tokens / run:.1f} tokens/s, {what}; first call "
        f"{first:.1f}s)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
