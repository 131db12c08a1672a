"""Post-training compression of SmolLM2-135M-Instruct: perplexity increase over full precision
(the survey's quantization-table protocol, in miniature) for quantization and pruning, with the
bytes each compressed model stores.

    python experiments/compression/run.py                       # every default method (~1 h CPU)
    python experiments/compression/run.py --methods rtn_int4_g128,gptq_int4_g128
    python experiments/compression/run.py --tiny --out /tmp/c   # tiny random model, seconds

One process: the float32 model is loaded once and every method compresses its own clone
(``nnx.clone``), so no method sees another's changes (AWQ and SmoothQuant also rescale norms and
v/up columns in place). Calibration: ``champ_windows(tok, "calibration")`` (32 x 256 tokens);
evaluation: ``champ_windows(tok, "evaluation")`` (64 x 256 tokens, disjoint problems). Per method
it records PPL, ΔPPL = PPL - PPL(fp32), the wall time of the compression step alone, the bytes of
the whole model (``postrl.quant.model_nbytes``) and of the compressed Linear layers alone
(the 210 Linears of the 30 blocks; the tied token embedding stays float32, as in GPTQ / AWQ).
Pruned models are stored dense (zeros kept); for 2:4 the bytes of the compressed 2:4 format
(half the values + a 2-bit index per kept value) are *computed*, not measured.

Results go to ``--out/results.json`` (atomically) after every method; methods already there are
reused (``--rerun`` recomputes them; the other model size's results there are an error, not
overwritten). Then a markdown table and ``--out/compression.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
import jax
import numpy as np
from flax import nnx

from experiments import common
from postrl import quant
from postrl.data.text import champ_windows
from postrl.evaluate import perplexity
from postrl.models import Transformer, load_pretrained, load_tokenizer
# pylint: enable=wrong-import-position

def _rtn(spec: str):
  """Round-to-nearest with a ``postrl.quant`` spec name."""
  def call(model, _calib):
    quant.quantize_model(model, spec)
  return call


def _smoothquant(smooth: bool):
  """SmoothQuant W8A8 with α = 0.5 (the paper's default), or naive W8A8 without smoothing."""
  def call(model, calib):
    quant.smoothquant_model(model, calib, alpha=0.5, smooth=smooth)
  return call


def _gptq(act_order: bool):
  """GPTQ int4 g128; returns the mean layer output MSE on the calibration inputs."""
  def call(model, calib):
    errors = quant.gptq_quantize_model(model, calib, "int4_g128", act_order=act_order)
    return {"mean_layer_output_mse": float(sum(errors.values()) / max(len(errors), 1))}
  return call


def _awq(clip: bool):
  """AWQ int4 g128 (20-point α grid); returns the median chosen α."""
  def call(model, calib):
    alphas = sorted(quant.awq_quantize_model(model, calib, "int4_g128", clip=clip).values())
    return {"alpha_median": float(alphas[len(alphas) // 2]),
            "alpha_zero_fraction": float(sum(a == 0 for a in alphas) / len(alphas))}
  return call


def _prune(method: str, pattern: str):
  """50% pruning (unstructured or 2:4); returns the smallest / largest per-layer zero fraction."""
  def call(model, calib):
    result = quant.prune_model(model, method, sparsity=0.5, pattern=pattern,
                               calib_tokens=None if method == "magnitude" else calib)
    return {"sparsity_min": float(min(result.values())),
            "sparsity_max": float(max(result.values()))}
  return call


# name -> (label, group, call). call(model, calib_tokens) compresses ``model`` in place and
# returns extra info for results.json (or None). Groups order the table and colour the plot.
METHODS = {
    "rtn_int8": ("RTN int8 (per channel)", "8-bit", _rtn("int8")),
    "smoothquant_w8a8": ("SmoothQuant W8A8 (α=0.5)", "8-bit", _smoothquant(True)),
    "w8a8_naive": ("W8A8, no smoothing", "8-bit", _smoothquant(False)),
    "rtn_int4_g128": ("RTN int4 g128", "4-bit", _rtn("int4_g128")),
    "gptq_int4_g128": ("GPTQ int4 g128 (act-order)", "4-bit", _gptq(act_order=True)),
    "awq_int4_g128": ("AWQ int4 g128", "4-bit", _awq(clip=True)),
    "nf4": ("NF4 g64", "4-bit", _rtn("nf4")),
    "nf4_dq": ("NF4 g64 + double quant", "4-bit", _rtn("nf4_dq")),
    "magnitude_50": ("magnitude 50%", "50% unstructured", _prune("magnitude", "unstructured")),
    "wanda_50": ("Wanda 50%", "50% unstructured", _prune("wanda", "unstructured")),
    "sparsegpt_50": ("SparseGPT 50%", "50% unstructured", _prune("sparsegpt", "unstructured")),
    "magnitude_2:4": ("magnitude 2:4", "2:4", _prune("magnitude", "2:4")),
    "wanda_2:4": ("Wanda 2:4", "2:4", _prune("wanda", "2:4")),
    "sparsegpt_2:4": ("SparseGPT 2:4", "2:4", _prune("sparsegpt", "2:4")),
}
# Ablations behind the README's discussion (not run by default; ``--methods`` names them).
EXTRA = {
    "rtn_int4_g128_asym": ("RTN int4 g128 asym", "4-bit", _rtn("int4_g128_asym")),
    "rtn_int4_g32_asym": ("RTN int4 g32 asym", "4-bit", _rtn("int4_g32_asym")),
    "gptq_int4_g128_noact": ("GPTQ int4 g128 (no act-order)", "4-bit", _gptq(act_order=False)),
    "awq_int4_g128_noclip": ("AWQ int4 g128, no clip search", "4-bit", _awq(clip=False)),
}
ALL = {**METHODS, **EXTRA}
GROUP_COLOURS = {"8-bit": "tab:blue", "4-bit": "tab:orange", "50% unstructured": "tab:green",
                 "2:4": "tab:red"}


def _state_nbytes(module) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(nnx.state(module)) if hasattr(x, "dtype"))


def linear_nbytes(model) -> tuple[int, int]:
  """(bytes, number of weights) of the Linears of the decoder blocks (``DEFAULT_TARGETS``): the
  layers every method compresses; quantized storage counts packed codes, scales and zeros."""
  pattern = re.compile(quant.DEFAULT_TARGETS)
  layers = {n: lin for n, lin in quant.linear_layers(model).items() if pattern.search(n)}
  nbytes = sum(_state_nbytes(lin) for lin in layers.values())
  nweights = sum(math.prod(lin.kernel.shape) for lin in layers.values())
  return nbytes, nweights


def sparse24_nbytes(model) -> int:
  """Computed (not measured) bytes of the block Linears in the compressed 2:4 layout of sparse
  tensor cores: the 2 kept values of every 4 in the kernel's dtype plus a 2-bit position index
  per kept value: K N (itemsize / 2 + 1 / 8) per kernel (biases as they are)."""
  pattern = re.compile(quant.DEFAULT_TARGETS)
  total = 0
  for name, lin in quant.linear_layers(model).items():
    if pattern.search(name):
      k, n = lin.kernel.shape
      itemsize = lin.kernel[...].dtype.itemsize
      total += k * n * itemsize // 2 + k * n // 8
      total += 0 if lin.bias is None else _state_nbytes(lin.bias)
  return total


def load(tiny: bool):
  """(float model, tokenizer, calibration tokens, evaluation tokens)."""
  tok = load_tokenizer("smollm2-135m-instruct")
  if tiny:
    from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel
    cfg = tiny_config(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
                      pad_token_id=tok.pad_id)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    calib = champ_windows(tok, "calibration", num_windows=8, seq_len=32)
    held = champ_windows(tok, "evaluation", num_windows=8, seq_len=32)
  else:
    model = load_pretrained("smollm2-135m-instruct", param_dtype="float32")
    calib = champ_windows(tok, "calibration")
    held = champ_windows(tok, "evaluation")
  return model, tok, calib, held


def run_method(name, base, calib, held, batch_size) -> dict:
  """Compress a clone of ``base`` with ``name``; time the compression; measure PPL and bytes."""
  label, group, call = ALL[name]
  model = nnx.clone(base)
  t0 = time.perf_counter()
  info = call(model, calib) or {}
  jax.block_until_ready(nnx.state(model))
  seconds = time.perf_counter() - t0
  t1 = time.perf_counter()
  ppl = perplexity(model, held, batch_size=batch_size)
  lin_bytes, lin_weights = linear_nbytes(model)
  out = dict(label=label, group=group, ppl=ppl, compress_seconds=seconds,
             eval_seconds=time.perf_counter() - t1, model_bytes=quant.model_nbytes(model),
             linear_bytes=lin_bytes, linear_bits_per_weight=8 * lin_bytes / lin_weights,
             quantized_layers=len(quant.quantized_layers(model)), **info)
  if name.endswith("2:4"):
    out["linear_bytes_2_4_computed"] = sparse24_nbytes(model)
    out["model_bytes_2_4_computed"] = out["model_bytes"] - lin_bytes + out[
        "linear_bytes_2_4_computed"]
  return out


def environment() -> dict:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return dict(date=time.strftime("%Y-%m-%d"), cpu=cpu, cores=os.cpu_count(),
              jax=jax.__version__, backend=jax.default_backend())


def mb(n) -> str:
  return f"{n / 1e6:.1f}"


def table(results: dict, base: dict) -> str:
  """Markdown table: one row per method, fp32 first."""
  lines = ["| method | group | PPL | ΔPPL | ΔPPL % | model MB | block-Linear MB | "
           "bits / weight (Linears) | compress s |", "|---|---|---|---|---|---|---|---|---|"]
  lines.append(f"| fp32 | - | {base['ppl']:.3f} | 0 | 0 | {mb(base['model_bytes'])} | "
               f"{mb(base['linear_bytes'])} | 32.00 | - |")
  for name, r in results.items():
    d = r["ppl"] - base["ppl"]
    lin = mb(r["linear_bytes"])
    if "linear_bytes_2_4_computed" in r:
      lin += f" (2:4 packed: {mb(r['linear_bytes_2_4_computed'])}, computed)"
    lines.append(f"| {r['label']} | {r['group']} | {r['ppl']:.3f} | {d:+.3f} | "
                 f"{100 * d / base['ppl']:+.1f}% | {mb(r['model_bytes'])} | {lin} | "
                 f"{r['linear_bits_per_weight']:.2f} | {r['compress_seconds']:.1f} |")
  return "\n".join(lines)


def plot(results: dict, base: dict, path: str) -> None:
  """Horizontal bars of ΔPPL per method (symlog axis), block-Linear MB and bits/weight beside."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  names = list(results)
  deltas = [results[n]["ppl"] - base["ppl"] for n in names]
  fig = Figure(figsize=(9, 0.55 * len(names) + 1.6), layout="constrained")
  ax = fig.subplots()
  ys = list(range(len(names)))[::-1]
  colours = [GROUP_COLOURS.get(results[n]["group"], "tab:gray") for n in names]
  ax.barh(ys, deltas, color=colours)
  ax.set_xscale("symlog", linthresh=0.01)
  labels = []
  for n in names:
    r = results[n]
    lin = f"{mb(r['linear_bytes'])} MB Linears ({r['linear_bits_per_weight']:.2f} b/w)"
    if "linear_bytes_2_4_computed" in r:
      lin = f"dense: {lin}"
    labels.append(f"{r['label']}\n{mb(r['model_bytes'])} MB model, {lin}")
  ax.set_yticks(ys, labels, fontsize=7.5)
  ax.axvline(0, color="black", lw=0.8)
  ax.set_xlim(min(min(deltas), 0) * 1.5 - 1e-3, max(max(deltas), 0.01) * 8)
  for y, d in zip(ys, deltas):
    ax.text(max(d, 0) * 1.15 + 0.002, y, f"{d:+.3f}", va="center", fontsize=8)
  ax.set_xlabel(f"ΔPPL over fp32 (PPL {base['ppl']:.3f}; symlog axis, linear below 0.01)")
  ax.set_title(f"SmolLM2-135M-Instruct, post-training compression: ΔPPL over fp32\nfp32: "
               f"{mb(base['model_bytes'])} MB model, {mb(base['linear_bytes'])} MB block Linears; "
               "pruned models are stored dense", fontsize=9)
  from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel
  handles = [Patch(color=c, label=g) for g, c in GROUP_COLOURS.items()]
  fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
  fig.savefig(path, dpi=120)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated; default every main method; extras: {','.join(EXTRA)}")
  parser.add_argument("--out", default=os.path.join(ROOT, "runs", "compression"))
  parser.add_argument("--tiny", action="store_true",
                      help="tiny random model (tests/conftest.py tiny_config), 8 x 32 tokens")
  parser.add_argument("--rerun", action="store_true", help="recompute methods already in --out")
  parser.add_argument("--batch_size", type=int, default=8)
  args = parser.parse_args(argv)
  names = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(names) - set(ALL))
  if unknown or not names:
    parser.error(f"unknown methods {unknown}; known: {sorted(ALL)}" if names else
                 f"--methods names no method; known: {sorted(ALL)}")
  common.check_at_least(parser, 1, batch_size=args.batch_size)
  common.check_out(parser, args.out)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "results.json")
  saved = {}
  if os.path.exists(path) and not args.rerun:
    try:
      with open(path) as f:
        saved = json.load(f)
    except ValueError as e:
      parser.error(f"{path} is not valid JSON ({e}); delete it or pass --rerun")
    if saved.get("tiny") != args.tiny:  # never overwrite the other size's results
      parser.error(f"{path} holds the {'tiny' if saved.get('tiny') else 'full-size'} model's "
                   f"results; use another --out (or --rerun to replace them)")

  t_start = time.perf_counter()
  base_model, _, calib, held = load(args.tiny)
  if "fp32" in saved:
    base = saved["fp32"]
  else:
    t0 = time.perf_counter()
    lin_bytes, _ = linear_nbytes(base_model)
    base = dict(ppl=perplexity(base_model, held, batch_size=args.batch_size),
                model_bytes=quant.model_nbytes(base_model), linear_bytes=lin_bytes,
                eval_seconds=time.perf_counter() - t0)
  print(f"fp32: PPL {base['ppl']:.4f}, {base['model_bytes']} bytes", flush=True)
  record = dict(tiny=args.tiny, environment=saved.get("environment") or environment(),
                calibration_tokens=list(calib.shape), evaluation_tokens=list(held.shape),
                fp32=base, methods=dict(saved.get("methods", {})),
                calls=list(saved.get("calls", [])))

  def save():  # atomically: a crash or Ctrl-C in a long run keeps the methods saved so far
    common.write_json(path, record, indent=1)

  save()
  computed = []
  for name in names:
    if name in record["methods"]:
      print(f"{name}: reusing {path}", flush=True)
      continue
    r = run_method(name, base_model, calib, held, args.batch_size)
    record["methods"][name] = r
    computed.append(name)
    save()
    print(f"{name}: PPL {r['ppl']:.4f} (Δ {r['ppl'] - base['ppl']:+.4f}), "
          f"{r['model_bytes']} bytes, compress {r['compress_seconds']:.1f} s, "
          f"eval {r['eval_seconds']:.1f} s", flush=True)
  seconds = time.perf_counter() - t_start
  record["calls"].append(dict(date=time.strftime("%Y-%m-%d %H:%M"), computed=computed,
                              wall_seconds=seconds))
  save()
  shown = {n: record["methods"][n] for n in names}
  print(table(shown, base))
  png = os.path.join(args.out, "compression.png")
  plot(shown, base, png)
  print(f"wrote {path} and {png}; {seconds:.0f} s")
  return record


if __name__ == "__main__":
  main()
