r"""Generation throughput: postrl ``generate`` vs transformers ``generate``, one run, same settings.

    python benchmarks/generate.py --batch 1 16 --new-tokens 64            # CPU, real SmolLM2
    python benchmarks/generate.py --dtype bfloat16 --batch 1 16 64 256 --new-tokens 256   # GPU

Random prompts of ``--prompt-len`` tokens, top-p sampling, EOS ignored (every row decodes exactly
``--new-tokens``). Timings exclude compilation (one warm-up call per shape) and take the median of
``--repeats`` calls. Prints a table and writes JSON (device, versions, date) to ``--out``.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import numpy as np


def copy_bandwidth(n_bytes=512 * 2**20, repeats=5):
  """Bytes moved per second (read + write) by a large jitted copy: the memory-bandwidth limit."""
  x = jax.numpy.ones((n_bytes // 4,), jax.numpy.float32)
  f = jax.jit(lambda a: a + 1.0)
  f(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n_bytes / min(times)


def matvec_bandwidth(n_bytes=512 * 2**20, repeats=5):
  """Bytes read per second by a large jitted matrix-vector product (multi-threaded on CPU, where
  XLA's elementwise copy runs on one thread and underestimates what the memory system gives)."""
  n = int((n_bytes // 4) ** 0.5)
  w = jax.numpy.ones((n, n), jax.numpy.float32)
  v = jax.numpy.ones((1, n), jax.numpy.float32)
  f = jax.jit(lambda a, b: b @ a)
  f(w, v).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(w, v).block_until_ready()
    times.append(time.perf_counter() - t0)
  return n * n * 4 / min(times)


def bytes_per_decode_step(cfg, batch, cache_len, param_bytes):
  """Weights plus the whole KV cache, read once per decode step."""
  kv = 2 * cfg.num_hidden_layers * batch * cache_len * cfg.num_key_value_heads * cfg.dim_per_head
  return cfg.num_params() * param_bytes + kv * param_bytes


def time_postrl(model, batch, prompt_len, new_tokens, repeats):
  from postrl.sampling import generate  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  tokens = rng.randint(100, model.config.vocab_size, (batch, prompt_len)).astype(np.int32)
  lengths = np.full((batch,), prompt_len, np.int32)

  def call(seed):
    out = generate(model, tokens, lengths, key=jax.random.key(seed), max_new_tokens=new_tokens,
                   temperature=1.0, top_p=0.9, eos_ids=())
    jax.block_until_ready(out.tokens_BxN)

  call(0)  # compile
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    call(r + 1)
    times.append(time.perf_counter() - t0)
  return batch * new_tokens / statistics.median(times)


def time_transformers(path, dtype, batch, prompt_len, new_tokens, repeats):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  if os.path.isdir(path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=tdt)
  else:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=tdt)
  hf = hf.to(device).eval()
  rng = np.random.RandomState(0)
  ids = torch.tensor(rng.randint(100, hf.config.vocab_size, (batch, prompt_len)), device=device)
  kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_p=0.9,
            attention_mask=torch.ones_like(ids), pad_token_id=0)
  with torch.no_grad():
    hf.generate(ids, **kw)
    times = []
    for _ in range(repeats):
      if device == "cuda":
        torch.cuda.synchronize()
      t0 = time.perf_counter()
      hf.generate(ids, **kw)
      if device == "cuda":
        torch.cuda.synchronize()
      times.append(time.perf_counter() - t0)
  return batch * new_tokens / statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="smollm2-135m-instruct")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-baseline", action="store_true", help="skip transformers")
  parser.add_argument("--out", default="benchmarks/results/generate.json")
  args = parser.parse_args()

  from postrl.models import load_pretrained  # pylint: disable=import-outside-toplevel
  from postrl.models.weights import resolve_model_path  # pylint: disable=import-outside-toplevel
  model = load_pretrained(args.model, param_dtype=args.dtype)
  copy_bw, matvec_bw = copy_bandwidth(), matvec_bandwidth()
  bandwidth = max(copy_bw, matvec_bw)
  param_bytes = 2 if args.dtype == "bfloat16" else 4
  rows = []
  for batch in args.batch:
    ours = time_postrl(model, batch, args.prompt_len, args.new_tokens, args.repeats)
    ref = None if args.no_baseline else time_transformers(
        resolve_model_path(args.model), args.dtype, batch, args.prompt_len, args.new_tokens,
        args.repeats)
    step_bytes = bytes_per_decode_step(model.config, batch, args.prompt_len + args.new_tokens,
                                       param_bytes)
    bound = bandwidth / step_bytes * batch  # tokens/s if each step only streamed its bytes once
    rows.append(dict(batch=batch, postrl_tokens_per_s=round(ours, 1),
                     bandwidth_bound_tokens_per_s=round(bound, 1),
                     fraction_of_bound=round(ours / bound, 3),
                     transformers_tokens_per_s=None if ref is None else round(ref, 1),
                     ratio=None if ref is None else round(ours / ref, 2)))
  print(f"memory bandwidth on {jax.devices()[0].device_kind}: copy {copy_bw / 1e9:.1f} GB/s "
        f"(read + write), matrix-vector read {matvec_bw / 1e9:.1f} GB/s; bound uses the larger")
  print(f"{'batch':>6} {'postrl tok/s':>14} {'transformers tok/s':>19} {'ratio':>7} "
        f"{'bound tok/s':>12} {'of bound':>9}")
  for r in rows:
    ref = "-" if r["transformers_tokens_per_s"] is None else f"{r['transformers_tokens_per_s']:.1f}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    print(f"{r['batch']:>6} {r['postrl_tokens_per_s']:>14.1f} {ref:>19} {ratio:>7} "
          f"{r['bandwidth_bound_tokens_per_s']:>12.1f} {r['fraction_of_bound']:>9.1%}")
  versions = dict(jax=jax.__version__, python=platform.python_version())
  try:
    import torch, transformers  # pylint: disable=import-outside-toplevel,multiple-imports
    versions.update(torch=torch.__version__, transformers=transformers.__version__)
  except ImportError:
    pass
  result = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
                copy_bandwidth_bytes_per_s=copy_bw, matvec_bandwidth_bytes_per_s=matvec_bw,
                cpu_count=os.cpu_count(), versions=versions, settings=vars(args), rows=rows)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
