r"""End-to-end decode with quantized weights: postrl ``generate`` on a bf16, int8 and int4 model.

    python benchmarks/decode.py --config llama-1b llama-8b --batch 1 64      # one GPU
    python benchmarks/decode.py --config tiny --batch 1 --new-tokens 4       # CPU smoke test

Random weights of a published shape (``benchmarks/common.py`` presets), quantized with
round-to-nearest (``postrl.quant.quantize_model``: every Linear of the blocks; embeddings and the
LM head stay bf16), so every block matmul goes through ``kernels.quantized_matmul`` (impl="auto":
the Pallas kernel where it was measured faster, docs/benchmarks.md). Prompts of ``--prompt-len``
random tokens, ``--new-tokens`` sampled with top-p 0.9, EOS ignored; median of ``--repeats`` calls
after a compiling call. Reports tokens/s, the speed-up over the same run's bf16 model, and model
bytes. Writes JSON (device, versions, date) after each row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  pylint: disable=wrong-import-position
from benchmarks.generate import time_postrl  # noqa: E402  pylint: disable=wrong-import-position

FORMATS = ("bf16", "int8", "int4_g128")


def build(preset: str, fmt: str, dtype: str, seed: int = 0):
  """A random model of ``preset`` in ``dtype``, quantized to ``fmt`` (``bf16`` = none)."""
  from postrl.quant import quantize_model  # pylint: disable=import-outside-toplevel
  cfg = common.model_config(preset, param_dtype=dtype, dtype=dtype)
  model = common.random_model(cfg, seed)
  if fmt != "bf16":
    quantize_model(model, fmt)
  return model


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", nargs="+", default=["llama-1b", "llama-8b"],
                 choices=sorted(common.PRESETS))
  p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
  p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
  p.add_argument("--time-limit", type=float, default=None)
  p.add_argument("--out", default="benchmarks/results/decode.json")
  args = p.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  from postrl.quant import model_nbytes  # pylint: disable=import-outside-toplevel
  dtype = args.dtype or common.default_dtype()
  budget = common.Budget(args.time_limit)
  results = common.Results(args.out, **common.environment(), settings=vars(args), rows=[])
  common.log(f"{jax.devices()[0].device_kind} jax {jax.__version__}; {dtype}")
  for preset in args.config:
    base = {}
    for fmt in args.formats:
      if budget.over(0):
        common.log("time limit: stopping")
        results.update(status="time limit")
        return
      t0 = time.perf_counter()
      model = build(preset, fmt, dtype)
      nbytes = model_nbytes(model)
      build_s = time.perf_counter() - t0
      for batch in args.batch:
        try:
          timing = time_postrl(model, batch, args.prompt_len, args.new_tokens, args.repeats,
                               top_p=0.9)
          tps, first = timing["tokens_per_s"], timing["first_call_s"]
          row = dict(config=preset, format=fmt, batch=batch, tokens_per_s=round(tps, 1),
                     first_call_s=round(first, 2), model_bytes=nbytes, build_s=round(build_s, 1))
          if fmt == "bf16":
            base[batch] = tps
          if batch in base:
            row["speedup_vs_bf16"] = round(tps / base[batch], 3)
        except Exception as e:  # noqa: BLE001 - record and continue
          row = dict(config=preset, format=fmt, batch=batch, error=f"{type(e).__name__}: {e}"[:400])
        results.append("rows", row)
        common.log(str(row))
      del model
  results.update(status="complete")
  common.log(f"{'config':>12} {'format':>10} {'batch':>5} {'tok/s':>10} {'vs bf16':>8} {'GB':>6}")
  for r in results.doc["rows"]:
    if "error" in r:
      common.log(f"{r['config']:>12} {r['format']:>10} {r['batch']:>5} {r['error'][:60]}")
    else:
      common.log(f"{r['config']:>12} {r['format']:>10} {r['batch']:>5} {r['tokens_per_s']:>10.1f} "
                 f"{r.get('speedup_vs_bf16', float('nan')):>8.2f} {r['model_bytes'] / 1e9:>6.2f}")


if __name__ == "__main__":
  main()
